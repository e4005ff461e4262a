"""Backend lowerings of the kvpass ops (installed as ``kvpass.lowering``).

* :mod:`kvpass.lowering.cpu`: the CPU kernels of ``kvpass::kv_attention`` and ``kvpass::kv_store_`` run the native
  fused kernels (:mod:`kvpass.lowering.cpu_build` builds ``plugins/cpu_attention.cpp`` on first use); the
  exact-window op reads through them too.
* :mod:`kvpass.lowering.triton`: the CUDA kernel of ``kvpass::kv_attention`` runs the fused Triton decode kernel
  (:mod:`kvpass.plugins.triton_attention`) for per-token int2/int4/int8 caches.

* :mod:`kvpass.lowering.onnx`: ``export_onnx`` swaps the ops for the functional kernels of
  :mod:`kvpass.lowering.onnx_kernels` and exports the step with the packed cache as explicit I/O.

The TensorRT lowering is open work; see the README.
"""
