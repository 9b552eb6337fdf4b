"""Building and validating pages: every way in (gRPC, REST, library) goes through here.

A page arrives either as tensors (:func:`make_page`) or as a header and its raw bytes
(:func:`check_header`, then :func:`page_of_buffer` over the bytes once they are the daemon's);
keys and namespaces are checked by :func:`check_keys`, once per call.

Decision on non-finite values: pages holding NaN or Inf are **rejected** with INVALID_ARGUMENT.
A NaN in a key or value cache is always an upstream bug, and min/max quantization of a group
that holds one would silently turn the whole group into garbage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvtier.errors import InvalidArgument, PageTooLarge
from kvtier.finite import check_finite
from kvtier.types import (
    DTYPES,
    SUPPORTED_DTYPES,
    Namespace,
    Page,
    PageId,
    PageKey,
    namespace_problem,
)

_TORCH: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}


def check_page_finite(page: Page) -> None:
    """InvalidArgument unless every value of ``page`` is finite."""
    _check_tensor_finite(page.k, "k")
    _check_tensor_finite(page.v, "v")


def _check_tensor_finite(t: torch.Tensor, name: str) -> None:
    if t.device.type == "cpu" and t.is_contiguous():
        check_finite(t.reshape(-1).view(torch.uint8).numpy().data, dtype_name(t.dtype), name)
    elif not bool(torch.isfinite(t).all()):
        raise InvalidArgument(f"{name} holds NaN or Inf values", field=name)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a wire dtype name, or InvalidArgument naming the supported ones."""
    try:
        return _TORCH[name]
    except KeyError:
        raise InvalidArgument(
            f"dtype {name!r} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}",
            field="dtype",
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _TORCH.items():
        if dt == dtype:
            return name
    raise InvalidArgument(
        f"dtype {dtype} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}",
        field="dtype",
    )


def check_namespace(namespace: str) -> Namespace:
    """``namespace`` if valid (see :func:`kvtier.types.namespace_problem`), else InvalidArgument."""
    problem = namespace_problem(namespace)
    if problem is not None:
        raise InvalidArgument(problem, field="namespace")
    return Namespace(namespace)


def check_key(key: bytes, max_key_bytes: int) -> PageKey:
    if not isinstance(key, (bytes, bytearray)):
        raise InvalidArgument(f"key must be bytes, got {type(key).__name__}", field="key")
    if len(key) == 0:
        raise InvalidArgument("key is empty", field="key")
    if len(key) > max_key_bytes:
        raise InvalidArgument(
            f"key is {len(key)} bytes, longer than the maximum of {max_key_bytes}", field="key"
        )
    return PageKey(bytes(key))


def check_keys(
    namespace: str, keys: Sequence[bytes], max_key_bytes: int, max_batch: int | None = None
) -> list[PageId]:
    """Validate a batch of keys of one namespace. An empty batch is an error."""
    ns = check_namespace(namespace)
    if len(keys) == 0:
        raise InvalidArgument("the key list is empty", field="keys")
    if max_batch is not None and len(keys) > max_batch:
        raise InvalidArgument(
            f"{len(keys)} keys in one call, more than the maximum batch of {max_batch}",
            field="keys",
        )
    return [PageId(ns, check_key(k, max_key_bytes)) for k in keys]


def make_page(
    k: torch.Tensor,
    v: torch.Tensor,
    start_position: int,
    *,
    max_page_bytes: int | None = None,
    allow_nonfinite: bool = False,
) -> Page:
    """Validate K and V and return a :class:`Page`; raise InvalidArgument saying what is wrong."""
    if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise InvalidArgument("k and v must be tensors", field="k")
    if start_position < 0:
        raise InvalidArgument(
            f"start_position must be >= 0, got {start_position}", field="start_position"
        )
    for name, t in (("k", k), ("v", v)):
        dtype_name(t.dtype)  # raises on unsupported dtypes
        if t.dim() != 4:
            raise InvalidArgument(
                f"{name} must be 4-D [layers, tokens, kv_heads, head_dim], got shape "
                f"{list(t.shape)}",
                field=f"{name}.shape",
            )
        if t.numel() == 0:
            raise InvalidArgument(
                f"{name} has a zero-size dimension: shape {list(t.shape)}", field=f"{name}.shape"
            )
    if k.shape != v.shape:
        raise InvalidArgument(
            f"k and v shapes differ: k {list(k.shape)} vs v {list(v.shape)}", field="v.shape"
        )
    if k.dtype != v.dtype:
        raise InvalidArgument(
            f"k and v dtypes differ: k {dtype_name(k.dtype)} vs v {dtype_name(v.dtype)}",
            field="v.dtype",
        )
    page = Page(k=k, v=v, start_position=int(start_position))
    if max_page_bytes is not None and page.nbytes > max_page_bytes:
        raise PageTooLarge(
            f"page is {page.nbytes} bytes (k+v), above the maximum page size of "
            f"{max_page_bytes} bytes",
            field="page",
        )
    if not allow_nonfinite:
        _check_tensor_finite(k, "k")
        _check_tensor_finite(v, "v")
    return page


@dataclass(frozen=True, slots=True)
class PageHeader:
    """A checked page header: everything about a page but its bytes."""

    key: PageKey
    dtype: str
    shape: tuple[int, ...]
    start_position: int
    nbytes: int  # of k; v has the same
    chain_position: int | None
    shm_offset: int | None  # where k then v lie in the client's shared-memory segment


def check_header(key: bytes, dtype: str, shape: Sequence[int], start_position: int,
                 k_len: int, v_len: int, *, max_key_bytes: int, max_page_bytes: int,
                 v_dtype: str = "", v_shape: Sequence[int] = (),
                 chain_position: int | None = None,
                 shm_offset: int | None = None) -> PageHeader:
    """Validate what a wire header says about a page before any of its bytes are read:
    InvalidArgument (PageTooLarge above ``max_page_bytes``) naming the field otherwise.
    ``v_dtype`` and ``v_shape``, when given, must be k's."""
    checked = check_key(key, max_key_bytes)
    d = DTYPES.get(dtype)
    if d is None:
        torch_dtype(dtype)  # raises naming the supported dtypes
        raise AssertionError(f"dtype {dtype!r} is supported but not in the dtype table")
    dims = tuple(shape)
    if len(dims) != 4 or min(dims) <= 0:
        raise InvalidArgument(
            f"shape must be 4 positive sizes [layers, tokens, kv_heads, head_dim], got "
            f"{list(dims)}", field="shape"
        )
    if v_dtype and v_dtype != dtype:
        torch_dtype(v_dtype)
        raise InvalidArgument(
            f"k and v dtypes differ: k {dtype} vs v {v_dtype}", field="v.dtype"
        )
    if v_shape and tuple(v_shape) != dims:
        raise InvalidArgument(
            f"k and v shapes differ: k {list(dims)} vs v {list(v_shape)}", field="v.shape"
        )
    if start_position < 0:
        raise InvalidArgument(f"start_position must be >= 0, got {start_position}",
                              field="start_position")
    want = d.itemsize * dims[0] * dims[1] * dims[2] * dims[3]
    if 2 * want > max_page_bytes:
        raise PageTooLarge(
            f"page is {2 * want} bytes (k+v), above the maximum page size of "
            f"{max_page_bytes} bytes", field="page"
        )
    if k_len != want or v_len != want:
        name, got = ("k", k_len) if k_len != want else ("v", v_len)
        raise InvalidArgument(
            f"{name} has {got} bytes but dtype {dtype} x shape {list(dims)} needs {want}",
            field=f"{name}.data",
        )
    if chain_position is not None and chain_position < 0:
        raise InvalidArgument(f"chain_position must be >= 0, got {chain_position}",
                              field="chain_position")
    return PageHeader(checked, dtype, dims, start_position, want, chain_position, shm_offset)


def page_of_buffer(h: PageHeader, buf: torch.Tensor) -> Page:
    """The page of ``h`` viewing ``buf``: ``2 * h.nbytes`` uint8, k's bytes then v's."""
    k, v = buf.view(torch_dtype(h.dtype)).view(2, *h.shape).unbind(0)
    return Page(k, v, h.start_position)


MAX_SESSION_CHARS = 256


def check_session(name: str, field: str = "session") -> str:
    """A session name of a hint ("" = none): a string of at most MAX_SESSION_CHARS."""
    if not isinstance(name, str):
        raise InvalidArgument(f"must be a string, got {type(name).__name__}", field=field)
    if len(name) > MAX_SESSION_CHARS:
        raise InvalidArgument(f"a session name has at most {MAX_SESSION_CHARS} characters, "
                              f"got {len(name)}", field=field)
    return name


def check_expected_reuse(value: float | None) -> float | None:
    """An expected reuse time in seconds: None/0 = unknown, else finite and positive."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"must be a finite number of seconds >= 0, got {value!r}",
                              field="expected_reuse_s")
    return float(value) or None
