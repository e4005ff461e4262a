"""Kernel and plugin sources for the kvpass ops (installed as ``kvpass.plugins``).

Empty for now: the Triton kernels and TensorRT plugins are open work; see the README.
"""
