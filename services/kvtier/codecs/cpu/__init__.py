"""The codecs' CPU backend: numba kernels that produce the bytes of the torch reference
(:mod:`kvtier.codecs.torch_reference`) bit for bit, a layer at a time.

    backend.py     blob sections as numpy views handed to the kernels; warmup and self-test
    int8_int4.py   encode and decode kernels of the int8 and int4 codecs
    int4a.py       int4a's key bit allocation and code maps
    rows.py        row helpers: float conversions, the grid, code packing
    intrinsics.py  LLVM intrinsics numba lacks (bit casts, lrint, prefetch, min/max)
"""
