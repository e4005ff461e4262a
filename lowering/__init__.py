"""Backend lowerings of the kvpass ops (installed as ``kvpass.lowering``).

* :mod:`kvpass.lowering.triton`: the CUDA kernel of ``kvpass::kv_attention`` runs the fused Triton decode kernel
  (:mod:`kvpass.plugins.triton_attention`) for per-token int2/int4/int8 caches.

The ONNX and TensorRT lowerings are open work; see the README.
"""
