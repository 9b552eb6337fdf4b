"""Client behaviour: import weight, tensors in and out, retries, deadlines, async client."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from kvtier.procs.redis import free_port
from kvtier.daemon import Daemon
from kvtier_client import (
    AsyncKVTierClient,
    DeadlineExceededError,
    KVTierClient,
    Page,
    RawTensor,
    UnavailableError,
)


def test_import_leaves_torch_out() -> None:
    code = ("import sys, kvtier_client\n"
            "bad = [m for m in ('torch', 'fastapi', 'kvtier') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


class Counter(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor,
              grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Counts call attempts per method on a real channel."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _count(self, details: Any) -> None:
        name = details.method.rsplit("/", 1)[-1]
        self.calls[name] = self.calls.get(name, 0) + 1

    def intercept_unary_unary(self, cont: Callable[..., Any], details: Any, req: Any) -> Any:
        self._count(details)
        return cont(details, req)

    def intercept_stream_unary(self, cont: Callable[..., Any], details: Any, it: Any) -> Any:
        self._count(details)
        return cont(details, it)

    def intercept_unary_stream(self, cont: Callable[..., Any], details: Any, req: Any) -> Any:
        self._count(details)
        return cont(details, req)


def test_only_idempotent_calls_retry_on_unavailable() -> None:
    counter = Counter()
    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    channel = grpc.intercept_channel(grpc.insecure_channel(target), counter)
    c = KVTierClient(target, "r", channel=channel, shared_memory=False, timeout_s=5,
                     data_channel=False)
    k = np.zeros((1, 1, 1, 8), np.float16)
    for call in (lambda: c.get([b"a"]), lambda: c.lookup([b"a"]),
                 lambda: c.put([b"a"], [Page(k, k)]), lambda: c.delete([b"a"])):
        with pytest.raises(UnavailableError) as info:
            call()
        assert info.value.code == "UNAVAILABLE"
    assert counter.calls == {"Get": 3, "Lookup": 3, "Put": 3, "Delete": 1}
    c.close()


def test_deadline_on_every_call(daemon: Daemon) -> None:
    big = np.ones((8, 1024, 8, 128), np.float16)  # 32 MiB page: cannot cross in 1 ms
    with KVTierClient(daemon.grpc_address, "d", timeout_s=0.001, shared_memory=False) as c:
        with pytest.raises(DeadlineExceededError) as info:
            c.put([b"a"], [Page(big, big)])
        assert info.value.code == "DEADLINE_EXCEEDED"
        assert c.lookup([b"a"], timeout_s=10).prefix_length == 0


def test_inputs_numpy_torch_raw_and_outputs(daemon: Daemon) -> None:
    torch = pytest.importorskip("torch")
    with KVTierClient(daemon.grpc_address, "t") as c:
        kt = torch.randn(2, 4, 2, 8, dtype=torch.float32)
        kn = np.random.default_rng(1).standard_normal((2, 4, 2, 8)).astype(np.float16)
        raw = RawTensor(kn.tobytes(), "float16", (2, 4, 2, 8))
        c.put([b"torch", b"numpy", b"raw"],
              [Page(kt, kt.clone(), 1), Page(kn, kn, 2), Page(raw, raw, 3)])
        t, n, r = c.get([b"torch", b"numpy", b"raw"])
        assert t is not None and n is not None and r is not None
        assert t.dtype == "float32" and np.array_equal(t.k, kt.numpy())
        assert isinstance(n.k, np.ndarray) and np.array_equal(n.k, kn)
        assert np.array_equal(r.v, kn) and r.start_position == 3
        tt = c.get([b"torch"], as_torch=True)[0]
        assert tt is not None and torch.equal(tt.v, kt)


async def test_async_client(daemon: Daemon) -> None:
    k = np.random.default_rng(2).standard_normal((2, 16, 2, 64)).astype(np.float16)
    big = np.random.default_rng(3).standard_normal((4, 256, 8, 128)).astype(np.float16)
    async with AsyncKVTierClient(daemon.grpc_address, "aio") as c:
        assert await c.put([b"a", b"big"], [Page(k, k), Page(big, big)]) == ["stored"] * 2
        got = await c.get([b"a", b"big", b"none"])
        assert got[2] is None
        assert got[0] is not None and np.array_equal(got[0].k, k)
        assert got[1] is not None and np.array_equal(got[1].v, big)
        assert (await c.lookup([b"a", b"none"])).prefix_length == 1
        assert await c.promote([b"a"], "hot") == [True]
        assert await c.delete([b"a"]) == 1
        assert (await c.stats()).tiers[0].pages == 1


def test_torch_out_on_a_named_device(daemon: Daemon) -> None:
    torch = pytest.importorskip("torch")
    k = torch.randn(1, 4, 1, 8, dtype=torch.float16)
    with KVTierClient(daemon.grpc_address, "dev") as c:
        c.put([b"d"], [Page(k, k)])
        got = c.get([b"d"], as_torch="cpu")[0]
        assert got is not None and got.k.device.type == "cpu" and torch.equal(got.k, k)


@pytest.mark.gpu
def test_cuda_tensors_in_and_out(daemon: Daemon) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    k = torch.randn(2, 16, 2, 64, dtype=torch.bfloat16, device="cuda")
    with KVTierClient(daemon.grpc_address, "gpu") as c:
        c.put([b"g"], [Page(k, k * 2)])
        got = c.get([b"g"], as_torch="cuda")[0]
        assert got is not None and got.k.is_cuda
        assert torch.equal(got.k, k) and torch.equal(got.v, k * 2)
