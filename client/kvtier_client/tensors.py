"""Tensors at the client's edge: numpy arrays, torch tensors (optional) or raw bytes.

The wire carries raw little-endian bytes plus a dtype name and a shape. numpy has no bfloat16,
so without torch a bfloat16 tensor is a :class:`RawTensor` (bytes + dtype name + shape); with
``as_torch=True`` results become torch tensors of the right dtype. torch is imported only when a
torch tensor is passed in or torch output is asked for.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

# The client's one dtype table (the daemon's is kvtier.types.DTYPES): the numpy dtype that holds
# each wire dtype's values (numpy has no bfloat16), and each one's item size.
WIRE_DTYPES: dict[str, np.dtype[Any] | None] = {
    "float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "bfloat16": None,
}
_ELEM = {name: 2 if dt is None else dt.itemsize for name, dt in WIRE_DTYPES.items()}


@dataclass(frozen=True, slots=True)
class RawTensor:
    """Raw tensor bytes with their dtype name and shape (bfloat16 without torch, or any)."""

    data: bytes | bytearray | memoryview
    dtype: str
    shape: tuple[int, ...]

    def to_torch(self) -> Any:
        return _torch_from_bytes(self.data, self.dtype, self.shape)


# Any: a torch.Tensor, named without importing torch.
TensorLike = Union[np.ndarray, RawTensor, Any]


@dataclass(frozen=True, slots=True)
class Page:
    """A page to put: ``k`` and ``v`` shaped [layers, tokens, kv_heads, head_dim].
    ``expected_reuse_s``: when the worker expects to use it again, if it knows (a hint)."""

    k: TensorLike
    v: TensorLike
    start_position: int = 0
    chain_position: int | None = None
    expected_reuse_s: float | None = None


@dataclass(frozen=True, slots=True)
class FetchedPage:
    """A page got back. ``k``/``v`` are numpy arrays, torch tensors (``as_torch``) or, for
    bfloat16 without torch, :class:`RawTensor`. ``precision``: 16 = as put, 8/4 = the lowest
    quantization the page passed through. ``tier`` is where it was found."""

    k: Any
    v: Any
    dtype: str
    shape: tuple[int, ...]
    start_position: int
    tier: str
    precision: int


@dataclass(frozen=True, slots=True)
class WireTensor:
    """A tensor as the wire needs it: a flat byte view that stays valid while this lives."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview
    owner: Any  # keeps the source buffer alive


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and "torch" in sys.modules


def to_wire(x: TensorLike, name: str) -> WireTensor:
    """Convert one input tensor to wire bytes; ValueError naming ``name`` if it is no tensor.

    Dtypes are not judged here: the daemon is the one place that decides what it accepts and
    answers INVALID_ARGUMENT naming the field, so every client behaves alike.
    """
    if isinstance(x, np.ndarray):  # first: the common case, and the cheapest test
        arr = np.ascontiguousarray(x)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        flat_np: Any = arr.reshape(-1).view(np.uint8)
        return WireTensor(_dtype_name(arr.dtype), arr.shape, memoryview(flat_np), arr)
    if isinstance(x, RawTensor):
        mv = memoryview(x.data).cast("B")
        return WireTensor(x.dtype, tuple(int(s) for s in x.shape), mv, x.data)
    if _is_torch(x):
        t: Any = x
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        import torch

        flat = t.reshape(-1).view(torch.uint8).numpy()
        return WireTensor(dtype, tuple(int(s) for s in t.shape), memoryview(flat), flat)
    raise ValueError(f"{name}: expected a numpy array, torch tensor or RawTensor, "
                     f"got {type(x).__name__}")


_DTYPE_NAMES: dict[np.dtype[Any], str] = {}


def _dtype_name(dtype: np.dtype[Any]) -> str:
    """``dtype.name``, remembered: numpy computes it in Python on every access (~4 us)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = dtype.name
        if len(_DTYPE_NAMES) < 64:  # the few dtypes a worker uses; any others stay uncached
            _DTYPE_NAMES[dtype] = name
    return name


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int:
    return _ELEM.get(dtype, 1) * math.prod(shape)


def from_wire(data: bytes | bytearray | memoryview | np.ndarray, dtype: str,
              shape: tuple[int, ...], as_torch: bool | str) -> Any:
    """A result tensor over ``data`` (taken over, not copied): numpy, torch or RawTensor.

    ``as_torch`` may name a device (``"cuda"``, ``"cuda:1"``): the tensor is moved there.
    """
    if as_torch:
        t = _torch_from_bytes(data, dtype, shape)
        return t.to(as_torch) if isinstance(as_torch, str) else t
    np_dtype = WIRE_DTYPES.get(dtype)
    if np_dtype is None:
        raw = data.tobytes() if isinstance(data, np.ndarray) else data
        return RawTensor(raw, dtype, shape)
    buf: Any = data
    return np.frombuffer(buf, dtype=np_dtype).reshape(shape)


def _torch_from_bytes(data: Any, dtype: str, shape: tuple[int, ...]) -> Any:
    import torch

    buf: Any = data if isinstance(data, (bytearray, np.ndarray)) else bytearray(data)
    if len(memoryview(buf).cast("B")) == 0:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    t = torch.frombuffer(buf, dtype=torch.uint8)
    return t.view(getattr(torch, dtype)).reshape(shape)
