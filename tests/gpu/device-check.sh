#!/usr/bin/env bash
# The GPU checks of kvtier, in one run on a machine with a CUDA device (about 3 to 4 minutes).
#
#   cd <checkout> && PYTHONPATH=... OUT=<folder> bash tests/gpu/device-check.sh
#
# Needs: python3 with torch (CUDA), triton, numpy, xxhash, numba, pydantic(-settings), pytest,
# pytest-timeout on PYTHONPATH; no network, no Redis. Writes into $OUT: versions.txt,
# smoke.log, pytest.log, pytest-junit.xml, bench-gpu.json, bench-gpu.log, summary.txt.
# Every step runs under `timeout` and the script goes on after a failure; the summary table
# comes last. Exit status: 0 when every GPU test passed and the bench ran, else 1.

OUT="${OUT:-./device-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
T_CPU="${T_CPU:-75}"        # numba compiles the CPU codec kernels into its cache here
T_SMOKE="${T_SMOKE:-50}"    # Triton compiles the first device kernels here
T_TESTS="${T_TESTS:-130}"
T_BENCH="${T_BENCH:-100}"
export PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET
# compiled kernels shared by the steps below (Triton's and numba's), off the checkout and $OUT
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/kvtier-triton-cache}"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-/tmp/kvtier-numba-cache}"
start=$(date +%s)

step() { echo; echo "== $1 ($(( $(date +%s) - start )) s)"; }

step "versions"
{
  timeout 15 nvidia-smi -L 2>&1 || echo "nvidia-smi: unavailable"
  timeout 30 "$PY" - <<'EOF' 2>&1
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
for name in ("triton", "cupy", "numba", "numpy", "kvtier"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", ""), getattr(m, "__file__", ""))
    except Exception as e:
        print(name, "MISSING", type(e).__name__, e)
EOF
} | tee "$OUT/versions.txt"

step "CPU codec kernels (numba, compiled once into NUMBA_CACHE_DIR for every later step)"
timeout "$T_CPU" "$PY" -c "import kvtier.codecs as c, kvtier.finite as f; print('compiled and self-tested in %.1f s' % c.warmup()); f.warmup()" 2>&1 | tail -n 3
echo "cpu warmup exit: ${PIPESTATUS[0]}"

step "smoke: one page through the device kernels against the CPU codec"
timeout "$T_SMOKE" "$PY" - <<'EOF' 2>&1 | tee "$OUT/smoke.log"
import time, torch
from kvtier.codecs import decode, encode
from kvtier.codecs import device as accel
from kvtier.codecs.codec import device_self_test
from kvtier.config import CodecConfig
from kvtier.types import Codec, Page
dev = torch.device("cuda")
print("kernels available:", accel.available(dev))
g = torch.Generator().manual_seed(0)
k = (torch.randn(8, 64, 8, 128, generator=g) * 2).half()
v = torch.randn(8, 64, 8, 128, generator=g).half()
cpu, gpu = Page(k=k, v=v, start_position=0), Page(k=k.cuda(), v=v.cuda(), start_position=0)
for codec in (Codec.INT8, Codec.INT4, Codec.INT4A):
    t0 = time.perf_counter()
    try:
        same = encode(gpu, codec, CodecConfig()) == encode(cpu, codec, CodecConfig())
        blob = encode(cpu, codec, CodecConfig())
        back = decode(blob, device=dev).page
        want = decode(blob).page
        dec = torch.equal(back.k.cpu(), want.k) and torch.equal(back.v.cpu(), want.v)
        print(f"{codec.value:6} encode bytes equal: {same}  decode equal: {dec}  "
              f"({time.perf_counter() - t0:.1f} s with compilation)")
    except Exception as e:
        print(f"{codec.value:6} FAILED: {type(e).__name__}: {e}")
print("kernels still on:", accel.available(dev), "turned off because:", accel._off)
print("self test:", device_self_test(dev))
EOF
echo "smoke exit: ${PIPESTATUS[0]}"

step "pytest -m gpu"
timeout "$T_TESTS" "$PY" -m pytest -q -m gpu -p no:cacheprovider --timeout 120 \
  --continue-on-collection-errors -rfE --junitxml="$OUT/pytest-junit.xml" \
  tests/gpu/test_gpu_codecs.py tests/gpu/test_gpu_store.py tests/gpu/test_gpu_ipc.py \
  tests/codecs/test_codec_roundtrip.py tests/store/test_device.py \
  tests/policy/test_learned.py tests/client/test_client.py \
  > "$OUT/pytest.log" 2>&1
tests_rc=$?
tail -n 25 "$OUT/pytest.log"
echo "pytest exit: $tests_rc"

step "kvtier bench gpu --json"
timeout "$T_BENCH" "$PY" -m kvtier.cli bench gpu --json > "$OUT/bench-gpu.json" 2> "$OUT/bench-gpu.log"
bench_rc=$?
tail -n 5 "$OUT/bench-gpu.log"
echo "bench exit: $bench_rc"

step "summary"
timeout 30 "$PY" - "$OUT" "$tests_rc" "$bench_rc" <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import json, sys, xml.etree.ElementTree as ET
out, tests_rc, bench_rc = sys.argv[1], sys.argv[2], sys.argv[3]
print(f"pytest exit {tests_rc} (124: timed out), bench exit {bench_rc}")
try:
    root = ET.parse(f"{out}/pytest-junit.xml").getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    print(f"tests {n['tests']}  passed {n['tests'] - n['failures'] - n['errors'] - n['skipped']}  "
          f"failed {n['failures']}  errors {n['errors']}  skipped {n['skipped']}")
    bad = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    for b in bad[:15]:
        print("  FAIL", b)
except Exception as e:
    print("no junit report:", e, "(see pytest.log)")
try:
    res = json.load(open(f"{out}/bench-gpu.json"))
except Exception as e:
    print("no bench figures:", e, "(see bench-gpu.log)")
    sys.exit(0)
if not res.get("cuda"):
    print("bench:", res.get("error"))
    sys.exit(0)
print(f"bench on {res['device']}, kernels {'on' if res['kernels'] else 'OFF'}")
print(f"{'figure':<34}{'64KiB page':>12}{'64KiB batch':>12}{'2MiB page':>12}{'2MiB batch':>12}  GB/s")
def row(label, get):
    cells = []
    for size in ("64KiB", "2MiB"):
        fig = res["codecs"].get(size, {})
        for mode in ("page", "batch"):
            try:
                cells.append(f"{get(fig, mode):>12.1f}")
            except Exception:
                cells.append(f"{'-':>12}")
    print(f"{label:<34}" + "".join(cells))
row("memcpy", lambda f, m: f["memcpy"][f"{m}_gbps"])
for c in ("int8", "int4", "int4a"):
    for op in ("encode", "decode"):
        row(f"{c} {op}", lambda f, m, c=c, op=op: f[c][op][f"{m}_gbps"])
        row(f"  vs memcpy (%)", lambda f, m, c=c, op=op: 100 * f[c][op][f"{m}_vs_memcpy"])
for size, fig in res.get("codecs", {}).items():
    if "error" in fig:
        print(f"codecs {size}: {fig['error']}")
for size, fig in res.get("reference", {}).items():
    print(f"torch reference {size} (page GB/s): " + json.dumps(fig))
for size, fig in res.get("d2h", {}).items():
    if "error" in fig:
        print(f"d2h {size}: {fig['error']}")
        continue
    parts = [f"raw {fig['raw']['bytes']} B {1e6 * fig['raw']['seconds']:.0f} us"]
    parts += [f"{c} {fig[c]['bytes_vs_raw']:.3f}x bytes {fig[c]['time_vs_raw']:.2f}x time"
              for c in ("int8", "int4", "int4a") if c in fig]
    print(f"d2h {size}: " + "; ".join(parts))
print("store:", json.dumps(res.get("store")))
print("ipc:", json.dumps(res.get("ipc")))
print("targets:")
for t in res.get("targets", []):
    print(f"  {'MET ' if t['met'] else 'MISS'} {t['target']}: {t['value']}"
          + (f" ({t['note']})" if t.get("note") else ""))
EOF
echo "total $(( $(date +%s) - start )) s"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
