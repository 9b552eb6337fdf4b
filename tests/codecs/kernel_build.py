"""Compile every device codec kernel variant the launcher uses for sm_90, with Triton's own
LLVM and ptxas (no GPU needed), and check the PTX: no fused multiply-add (``fma``) and no
approximate division (``div.full``/``div.approx``), either of which would change the codes.

Run as a script (``python tests/codecs/kernel_build.py``) in a process without
``TRITON_INTERPRET``: the kernels must be decorated in compiled mode. Prints one line per
kernel and exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kvtier.codecs.cuda import decode as dk  # noqa: E402
from kvtier.codecs.cuda import encode as ek  # noqa: E402
from kvtier.codecs.cuda import launch  # noqa: E402
from kvtier.codecs.cuda import transcode as tk  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # the H200 the device checks run on
PAGE = {0: "*fp16", 1: "*i16", 2: "*fp32"}
FORBIDDEN = ("fma.", "div.full", "div.approx")


def build(fn: object, pointers: dict[str, str], constexprs: dict[str, int]) -> None:
    names: list[str] = fn.arg_names  # type: ignore[attr-defined]
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    t0 = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=TARGET,
                            options={"num_warps": 4, "enable_fp_fusion": False})
    ptx: str = kernel.asm["ptx"]
    bad = [f for f in FORBIDDEN if f in ptx]
    name = fn.__name__  # type: ignore[attr-defined]
    print(f"{name} {constexprs}: {time.perf_counter() - t0:.1f} s"
          + (f"  FORBIDDEN {bad}" if bad else ""))
    if bad:
        sys.exit(1)


def main() -> None:
    blocks = {"BT": launch.BT, "BC": launch.BC}
    lanes = launch._lanes(1)  # noqa: SLF001  (every head of up to 128 channels)
    for kind, page in PAGE.items():
        vec = 16 // (4 if kind == 2 else 2)
        build(ek.encode_bounds, {"k_ptr": page, "v_ptr": page, "out_ptr": "*u8",
                                 "scr_f": "*fp32", "top_ptr": "*i64"},
              {"KIND": kind, "DP": lanes, "GB": 64, "VEC": vec, "BT": launch.BT,
               "VR": launch.VR})
        for bits in (8, 4, 0):  # 0: int4a's first step (K's int8 codes to scratch)
            build(ek.encode_codes, {"k_ptr": page, "v_ptr": page, "out_ptr": "*u8",
                                    "scr_f": "*fp32", "top_ptr": "*i64", "m_ptr": "*i32",
                                    "mant_ptr": "*fp64", "q8_ptr": "*u8"},
                  {"KIND": kind, "BITS": bits, "GB": 64, "VEC": vec, "VR": launch.VR,
                   "CP": launch.CP, **blocks})
        for kbits, vbits in ((8, 8), (4, 4), (0, 4)):
            build(dk.decode_page, {"src_ptr": "*u8", "k_ptr": page, "v_ptr": page,
                                   "mant_ptr": "*fp64"},
                  {"KIND": kind, "KBITS": kbits, "VBITS": vbits, "VEC": vec, "VR": launch.VR,
                   "GB": 64, "KC": launch.BC // (2 if kbits == 0 else 1), **blocks})
        build(tk.int4a_bits, {"src_ptr": "*u8", "bits_ptr": "*i32", "scr_d": "*fp64",
                              "mant_ptr": "*fp64", "drop_ptr": "*fp64"},
              {"KIND": kind, "DP": lanes, "BT": launch.BT})
    build(tk.int4a_from_int8, {"src_ptr": "*u8", "out_ptr": "*u8", "spans": "*i64",
                               "bits_ptr": "*i32", "scr_i": "*i32"},
          {"BLOCK": launch.COPY_BLOCK, **blocks})
    build(tk.int4_from_int8, {"src_ptr": "*u8", "out_ptr": "*u8", "spans": "*i64"},
          {"BLOCK": launch.COPY_BLOCK, **blocks})
    build(ek.pack_m12, {"m_ptr": "*i32", "out_ptr": "*u8"}, {"BLOCK": launch.COPY_BLOCK})


if __name__ == "__main__":
    main()
