"""Kernel and plugin sources for the kvpass ops (installed as ``kvpass.plugins``).

* ``cpu_attention.cpp``: fused dequantize + attention over every cache layout kvpass stores, and the per-token
  int/fp8 store, on the CPU (C++ through ``torch.library``; built by :mod:`kvpass.lowering.cpu_build`).
* :mod:`kvpass.plugins.triton_attention`: fused dequantize + attention for decoding over packed per-token int
  caches (needs ``triton``; tested on the CPU through ``TRITON_INTERPRET=1``).

TensorRT plugins are open work; see the README.
"""
