"""Kernel and plugin sources for the kvpass ops (installed as ``kvpass.plugins``).

* :mod:`kvpass.plugins.triton_attention`: fused dequantize + attention for decoding over packed per-token int
  caches (needs ``triton``; tested on the CPU through ``TRITON_INTERPRET=1``).

TensorRT plugins are open work; see the README.
"""
