#!/usr/bin/env bash
# The GPU checks of kvtier, in one run on a machine with a CUDA device (at most T_TOTAL = 295 s).
#
#   cd <checkout> && OUT=<folder> [KVTIER_MODEL_DIR=<SmolLM2 config+tokenizer>] \
#     bash tests/gpu/device-check.sh
#
# Needs: python3 with torch (CUDA), triton, numpy, xxhash, numba, pydantic(-settings), grpcio,
# redis-py, fastapi, uvicorn, transformers, pytest, pytest-timeout; the checkout's services/,
# client/ and proto/ and /tmp/site (where the lead installs wheels) go on PYTHONPATH here;
# redis-server on PATH; no network. Writes into $OUT: versions.txt, smoke.log, pytest.log,
# pytest-junit.xml, bench-gpu.json (bench-gpu.partial.json as it goes), bench-gpu.log,
# ttft-cuda.json, ttft-cuda.log, engines.log, engines-junit.xml, summary.txt.
# Steps, in order: versions, CPU codec kernels, device smoke, pytest -m gpu, kvtier bench gpu,
# kvtier bench ttft on the device (only with KVTIER_MODEL_DIR: a config and tokenizer, random
# weights), pytest tests/engines -m "not slow" (the transformers integration). Every step runs
# under `timeout`, capped so that the steps after it keep their minimum and the whole run ends
# by T_TOTAL; the script goes on after a failure; the summary comes last. Exit status: 0 when
# every GPU test and engine test passed and the benches ran, else 1.

OUT="${OUT:-./device-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
export PYTHONPATH="$ROOT/services:$ROOT/client:$ROOT/proto${PYTHONPATH:+:$PYTHONPATH}"
[ -d /tmp/site ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
T_TOTAL="${T_TOTAL:-295}"
T_CPU="${T_CPU:-75}"        # numba compiles the CPU codec kernels into its cache here
T_SMOKE="${T_SMOKE:-45}"    # Triton compiles the first device kernels here
T_TESTS="${T_TESTS:-80}"
T_BENCH="${T_BENCH:-85}"
T_TTFT="${T_TTFT:-50}"
T_ENGINES="${T_ENGINES:-60}"
export PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET
# compiled kernels shared by the steps below (Triton's and numba's), off the checkout and $OUT
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/kvtier-triton-cache}"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-/tmp/kvtier-numba-cache}"
start=$(date +%s)
deadline=$(( start + T_TOTAL ))

step() { echo; echo "== $1 ($(( $(date +%s) - start )) s)"; }
# cap WANT RESERVE: seconds for a step that wants WANT, leaving RESERVE for the steps after it
cap() {
  local left=$(( deadline - $(date +%s) - $2 ))
  if [ "$left" -lt "$1" ]; then echo $(( left > 10 ? left : 10 )); else echo "$1"; fi
}

step "versions"
{
  timeout 10 nvidia-smi -L 2>&1 || echo "nvidia-smi: unavailable"
  timeout 20 "$PY" - <<'EOF' 2>&1
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
for name in ("triton", "numba", "numpy", "transformers", "grpc", "kvtier"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", ""), getattr(m, "__file__", ""))
    except Exception as e:
        print(name, "MISSING", type(e).__name__, e)
EOF
} | tee "$OUT/versions.txt"

step "CPU codec kernels (numba, compiled once into NUMBA_CACHE_DIR for every later step)"
timeout "$(cap "$T_CPU" 200)" "$PY" -c "import kvtier.codecs as c, kvtier.finite as f; print('compiled and self-tested in %.1f s' % c.warmup()); f.warmup()" 2>&1 | tail -n 3
echo "cpu warmup exit: ${PIPESTATUS[0]}"

step "smoke: one page through the device kernels against the CPU codec"
timeout "$(cap "$T_SMOKE" 175)" "$PY" - <<'EOF' 2>&1 | tee "$OUT/smoke.log"
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
timeout "$(cap "$T_TESTS" 125)" "$PY" -m pytest -q -m gpu -p no:cacheprovider --timeout 60 \
  --continue-on-collection-errors -rfE --junitxml="$OUT/pytest-junit.xml" \
  tests/gpu/test_gpu_codecs.py tests/gpu/test_gpu_store.py tests/gpu/test_gpu_ipc.py \
  tests/codecs/test_codec_roundtrip.py tests/store/test_device.py \
  tests/policy/test_learned.py tests/client/test_client.py \
  > "$OUT/pytest.log" 2>&1
tests_rc=$?
tail -n 25 "$OUT/pytest.log"
echo "pytest exit: $tests_rc"

step "kvtier bench gpu --json"
timeout "$(cap "$T_BENCH" 75)" "$PY" -m kvtier.cli bench gpu --json \
  --partial "$OUT/bench-gpu.partial.json" > "$OUT/bench-gpu.json" 2> "$OUT/bench-gpu.log"
bench_rc=$?
tail -n 5 "$OUT/bench-gpu.log"
echo "bench exit: $bench_rc"

step "kvtier bench ttft on the device"
if [ -n "${KVTIER_MODEL_DIR:-}" ]; then
  timeout "$(cap "$T_TTFT" 45)" "$PY" -m kvtier.cli bench ttft --model-dir "$KVTIER_MODEL_DIR" \
    --prompts 2 --repeats 5 --json > "$OUT/ttft-cuda.json" 2> "$OUT/ttft-cuda.log"
  ttft_rc=$?
  tail -n 5 "$OUT/ttft-cuda.log"
else
  echo "KVTIER_MODEL_DIR not set: skipped" | tee "$OUT/ttft-cuda.log"
  ttft_rc=skipped
fi
echo "ttft exit: $ttft_rc"

step "pytest tests/engines -m 'not slow' (transformers integration)"
timeout "$(cap "$T_ENGINES" 15)" "$PY" -m pytest -q tests/engines -m "not slow" -p no:cacheprovider \
  --timeout 60 -rfE --junitxml="$OUT/engines-junit.xml" > "$OUT/engines.log" 2>&1
engines_rc=$?
tail -n 8 "$OUT/engines.log"
echo "engines exit: $engines_rc"

step "summary"
timeout 15 "$PY" - "$OUT" "$tests_rc" "$bench_rc" "$ttft_rc" "$engines_rc" <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import json, sys, xml.etree.ElementTree as ET
out, tests_rc, bench_rc, ttft_rc, engines_rc = sys.argv[1:6]
print(f"exits (124: timed out): gpu tests {tests_rc}, bench gpu {bench_rc}, bench ttft {ttft_rc}, "
      f"engine tests {engines_rc}")
def junit(name, path):
    try:
        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        n = {k: sum(int(s.get(k, 0)) for s in suites)
             for k in ("tests", "failures", "errors", "skipped")}
        print(f"{name}: tests {n['tests']}  passed "
              f"{n['tests'] - n['failures'] - n['errors'] - n['skipped']}  failed "
              f"{n['failures']}  errors {n['errors']}  skipped {n['skipped']}")
        bad = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
               if c.find("failure") is not None or c.find("error") is not None]
        for b in bad[:10]:
            print("  FAIL", b)
    except Exception as e:
        print(f"{name}: no junit report: {e}")
junit("gpu tests", f"{out}/pytest-junit.xml")
junit("engine tests", f"{out}/engines-junit.xml")
try:
    t = json.load(open(f"{out}/ttft-cuda.json"))
    keep = {k: v for k, v in t.items() if not isinstance(v, (list, dict)) or k in ("ttft_ms", "tiers")}
    print("ttft:", json.dumps(keep)[:1500])
except Exception as e:
    print("ttft: no figures:", e, "(see ttft-cuda.log)")
try:
    res = json.load(open(f"{out}/bench-gpu.json"))
except Exception as e:
    try:
        res = json.load(open(f"{out}/bench-gpu.partial.json"))
        print("bench cut short: the figures it had measured (bench-gpu.partial.json)")
    except Exception:
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
sections = res.get("d2h", {}).get("2MiB", {}).get("int4a_sections")
if sections:
    print("int4a bytes of a 2 MiB page (fraction of fp16):", json.dumps(sections))
for name, fig in (res.get("ipc") or {}).items():
    if not isinstance(fig, dict) or "get_seconds" not in fig:
        print(f"ipc {name}:", json.dumps(fig)[:400])
        continue
    print(f"ipc {name}: {fig['bytes'] / 2**20:.0f} MiB get {1e3 * fig['get_seconds']:.2f} ms "
          f"({fig['get_gbps']:.0f} GB/s), per-page D2D {1e3 * fig['d2d_copy_seconds']:.2f} ms, "
          f"one memcpy {1e3 * fig['memcpy_seconds']:.2f} ms; get/d2d {fig['get_vs_d2d']:.2f}x, "
          f"get/memcpy {fig['get_vs_memcpy']:.2f}x; put {1e3 * fig['put_seconds']:.1f} ms "
          f"({fig['put_gbps']:.1f} GB/s) ok {fig.get('ok')}")
print("targets:")
for t in res.get("targets", []):
    print(f"  {'MET ' if t['met'] else 'MISS'} {t['target']}: {t['value']}"
          + (f" ({t['note']})" if t.get("note") else ""))
EOF
echo "total $(( $(date +%s) - start )) s"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$engines_rc" = 0 ] && \
  { [ "$ttft_rc" = 0 ] || [ "$ttft_rc" = skipped ]; }
