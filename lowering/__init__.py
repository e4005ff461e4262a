"""Backend lowerings of the kvpass ops (installed as ``kvpass.lowering``).

Nothing is lowered yet beyond what torch.compile does with the reference kernels in :mod:`kvpass.ops`
(Inductor calls them as extern kernels). The ONNX, TensorRT and Triton lowerings are open work; see the README.
"""
