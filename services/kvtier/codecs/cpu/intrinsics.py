"""LLVM intrinsics numba lacks, for the codec kernels: float16/bfloat16/float32 bit casts and
conversions, ``lrint``, a cache prefetch, a vectorized float32 min/max, unaligned 64-bit
loads and stores and the bit deposit / extract of BMI2 (``pdep``, ``pext``).

Each is a numba ``@intrinsic`` that emits the LLVM IR directly. Conversions are bit-exact with
torch: ``fptrunc``/``fpext`` for float16 (IEEE round-to-nearest-even).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _f32_to_f16_typer(typingctx, x):  # type: ignore[no-untyped-def]
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


def _f16_to_f32_typer(typingctx, x):  # type: ignore[no-untyped-def]
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


def _bits_to_f32_typer(typingctx, x):  # type: ignore[no-untyped-def]
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


def _bits_to_f64_typer(typingctx, x):  # type: ignore[no-untyped-def]
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.uint64), codegen


def _f64_to_bits_typer(typingctx, x):  # type: ignore[no-untyped-def]
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(64))
    return types.uint64(types.float64), codegen


def _f32_to_bits_typer(typingctx, x):  # type: ignore[no-untyped-def]
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


def _minmax8_typer(typingctx, arr, start, nvec):  # type: ignore[no-untyped-def]
    """(min, max) of ``arr[start : start + 8 * nvec]``, ``nvec >= 1``, on <8 x float> vectors.

    LLVM does not vectorize a float min/max reduction without fast-math, which numba cannot
    scope to one loop; this is the reduction written out in IR. C-contiguous float32 only.
    Which zero a tie of -0.0 and +0.0 gives depends on the order; no byte of a blob does
    (see :func:`bounds_row`).
    """
    if not (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.layout == "C"):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        vty = ir.VectorType(ir.FloatType(), 8)
        i32 = ir.IntType(32)
        n = args[2]
        base = builder.gep(ary.data, [args[1]])

        def load(i: Any) -> Any:
            ptr = builder.gep(base, [builder.mul(i, ir.Constant(i.type, 8))])
            return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=4)

        def vmin(a: Any, b: Any) -> Any:
            return builder.select(builder.fcmp_ordered("<", b, a), b, a)

        def vmax(a: Any, b: Any) -> Any:
            return builder.select(builder.fcmp_ordered(">", b, a), b, a)

        def const(v: int) -> Any:
            return ir.Constant(n.type, v)

        # two accumulators each (even and odd vectors): half the dependency chain
        first = load(const(0))
        acc = [cgutils.alloca_once_value(builder, first)  # type: ignore[no-untyped-call]
               for _ in range(4)]
        with cgutils.for_range(builder, builder.sdiv(n, const(2))) as loop:
            v0 = load(builder.mul(loop.index, const(2)))
            v1 = load(builder.add(builder.mul(loop.index, const(2)), const(1)))
            builder.store(vmin(builder.load(acc[0]), v0), acc[0])
            builder.store(vmin(builder.load(acc[1]), v1), acc[1])
            builder.store(vmax(builder.load(acc[2]), v0), acc[2])
            builder.store(vmax(builder.load(acc[3]), v1), acc[3])
        with builder.if_then(builder.icmp_signed("!=", builder.srem(n, const(2)), const(0))):
            v = load(builder.sub(n, const(1)))
            builder.store(vmin(builder.load(acc[0]), v), acc[0])
            builder.store(vmax(builder.load(acc[2]), v), acc[2])

        def across(v: Any, f: Any) -> Any:
            """8 lanes to 1 by halves (shuffles), not seven dependent extracts."""
            for lanes in (4, 2):
                a = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, lanes),
                                                             list(range(lanes))))
                b = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, lanes),
                                                             list(range(lanes, 2 * lanes))))
                v = f(a, b)
            return f(builder.extract_element(v, ir.Constant(i32, 0)),
                     builder.extract_element(v, ir.Constant(i32, 1)))

        lo = across(vmin(builder.load(acc[0]), builder.load(acc[1])), vmin)
        hi = across(vmax(builder.load(acc[2]), builder.load(acc[3])), vmax)
        return context.make_tuple(builder, signature.return_type, (lo, hi))

    pair = types.UniTuple(types.float32, 2)  # type: ignore[no-untyped-call]
    return pair(arr, types.intp, types.intp), codegen


def _prefetch_typer(typingctx, arr, idx):  # type: ignore[no-untyped-def]
    """Ask for the cache line holding ``arr[idx]`` to be brought into L2 (``prefetcht1``).

    A hint with no effect on results; C-contiguous arrays only, ``idx`` unchecked (a
    prefetch of an address past the array is harmless, the CPU drops it).
    """
    if not (isinstance(arr, types.Array) and arr.layout == "C"):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(  # type: ignore[no-untyped-call]
            builder.module, fnty, "llvm.prefetch.p0")
        # read, locality 2 (L2), data cache
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(arr, types.intp), codegen


def _lrint_typer(typingctx, x):  # type: ignore[no-untyped-def]
    """float32 -> int32 rounded half to even (``llvm.lrint``; vectorizes to ``vcvtps2dq``).

    Defined for results within int32 only; callers clamp and only feed it bounded values
    (garbage channels aside, whose codes are dropped).
    """
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        fnty = ir.FunctionType(ir.IntType(32), [ir.FloatType()])
        fn = cgutils.get_or_insert_function(  # type: ignore[no-untyped-call]
            builder.module, fnty, "llvm.lrint.i32.f32")
        return builder.call(fn, [args[0]])
    return types.int32(types.float32), codegen


def _host_has_bmi2() -> bool:
    """Whether this host's CPU has BMI2 (``pdep``/``pext``): the code numba compiles here
    may then use the instructions (numba compiles for the host CPU)."""
    try:
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get("bmi2", False))
    except Exception:  # noqa: BLE001 - no feature list: take the portable code
        return False


def _host_has_fast_bmi2() -> bool:
    """BMI2 where ``pdep``/``pext`` take a cycle or so: not AMD before Zen 3, which runs them
    in microcode (hundreds of cycles), where the kernels keep their portable code."""
    if not HAS_BMI2:
        return False
    try:
        import llvmlite.binding as llvm

        name = str(llvm.get_host_cpu_name())
    except Exception:  # noqa: BLE001
        return False
    return not name.startswith(("znver1", "znver2", "bdver", "btver", "amdfam"))


HAS_BMI2 = _host_has_bmi2()
FAST_BMI2 = _host_has_fast_bmi2()


def _soft_pdep(x, mask):  # type: ignore[no-untyped-def]
    """``pdep`` in plain code: the low bits of ``x`` to the set bits of ``mask``, in order."""
    zero, one = np.uint64(0), np.uint64(1)
    out = zero
    bit = one
    m = np.uint64(mask)
    while m != zero:
        low = m & (~m + one)
        if np.uint64(x) & bit:
            out |= low
        bit <<= one
        m ^= low
    return out


def _soft_pext(x, mask):  # type: ignore[no-untyped-def]
    """``pext`` in plain code: the bits of ``x`` under the set bits of ``mask``, packed low."""
    zero, one = np.uint64(0), np.uint64(1)
    out = zero
    bit = one
    m = np.uint64(mask)
    while m != zero:
        low = m & (~m + one)
        if np.uint64(x) & low:
            out |= bit
        bit <<= one
        m ^= low
    return out


def _bmi2_typer(name: str, soft: Any) -> Any:
    def typer(typingctx, x, mask):  # type: ignore[no-untyped-def]
        """``llvm.x86.bmi.<name>.64`` on a BMI2 host; elsewhere the same function in plain
        code, so a kernel that uses it compiles (and is right) on any CPU."""
        sig = types.uint64(types.uint64, types.uint64)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            if not HAS_BMI2:
                return context.compile_internal(builder, soft, signature, args)
            i64 = ir.IntType(64)
            fn = cgutils.get_or_insert_function(  # type: ignore[no-untyped-call]
                builder.module, ir.FunctionType(i64, [i64, i64]), f"llvm.x86.bmi.{name}.64")
            return builder.call(fn, args)
        return sig, codegen
    return typer


def _load_u64_typer(typingctx, arr, idx):  # type: ignore[no-untyped-def]
    """The little-endian uint64 at bytes ``arr[idx:idx + 8]`` of a C-contiguous uint8 array,
    any alignment; unchecked (the caller keeps 8 bytes of slack)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.uint8 and arr.layout == "C"):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.IntType(64).as_pointer())
        return builder.load(ptr, align=1)
    return types.uint64(arr, types.intp), codegen


def _store_u64_typer(typingctx, arr, idx, value):  # type: ignore[no-untyped-def]
    """Store ``value`` little-endian at bytes ``arr[idx:idx + 8]`` of a C-contiguous uint8
    array, any alignment; unchecked (the caller keeps 8 bytes of slack)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.uint8 and arr.layout == "C"):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.IntType(64).as_pointer())
        builder.store(args[2], ptr, align=1)
        return context.get_dummy_value()
    return types.none(arr, types.intp, types.uint64), codegen


f32_to_f16: Any = intrinsic(_f32_to_f16_typer)
f16_to_f32: Any = intrinsic(_f16_to_f32_typer)
bits_to_f32: Any = intrinsic(_bits_to_f32_typer)
f32_to_bits: Any = intrinsic(_f32_to_bits_typer)
bits_to_f64: Any = intrinsic(_bits_to_f64_typer)
f64_to_bits: Any = intrinsic(_f64_to_bits_typer)
minmax8: Any = intrinsic(_minmax8_typer)
prefetch: Any = intrinsic(_prefetch_typer)
lrint: Any = intrinsic(_lrint_typer)
pdep: Any = intrinsic(_bmi2_typer("pdep", _soft_pdep))
pext: Any = intrinsic(_bmi2_typer("pext", _soft_pext))
load_u64: Any = intrinsic(_load_u64_typer)
store_u64: Any = intrinsic(_store_u64_typer)
