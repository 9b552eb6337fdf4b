"""Device codec kernels (Triton): encode, decode and transcode pages on a CUDA device with the
bytes of the CPU kernels.

``numerics`` (shared Triton helpers), ``encode``, ``decode`` and ``transcode`` (the kernels),
``launch`` (layouts to launches, on device tensors). Nothing here is imported until a device
page asks for it (:mod:`kvtier.codecs.device` decides when): importing it imports Triton.
"""
