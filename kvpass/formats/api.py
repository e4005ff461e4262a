"""The public quantization API: :func:`quantize`, :class:`QuantizedTensor`, :func:`expected_nbytes`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvpass.formats import outliers
from kvpass.formats.base import get_format, validate_input
from kvpass.formats.spec import QuantSpec, parse_spec


@dataclass
class QuantizedTensor:
    """A quantized tensor: every stored tensor (packed codes, scales, zero points, outliers, LUTs).

    ``tensors`` holds exactly what would be kept in memory; nothing dense of the original shape is kept.
    For per-channel specs the stored tensors are laid out with tokens last (``[..., channels, tokens]``),
    so every reduction runs over the last axis.
    """

    spec: QuantSpec
    shape: torch.Size
    dtype: torch.dtype
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        """The dense tensor these codes stand for, in the original dtype and shape."""
        return dequantize(self)

    @property
    def nbytes(self) -> int:
        """Exact bytes of every stored tensor."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_element(self) -> float:
        """Stored bits per element of the original tensor, metadata included."""
        return 8.0 * self.nbytes / max(1, math.prod(self.shape))



def to_vector_last(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-channel vectors run along the token axis: move it last so every format reduces over -1."""
    return x.transpose(-1, -2).contiguous() if spec.granularity == "per_channel" else x


def vector_last_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    if spec.granularity == "per_channel":
        return (*shape[:-2], shape[-1], shape[-2])
    return tuple(shape)


def quantize(
    x: torch.Tensor, spec: "str | QuantSpec", *, check: bool = True, **params: torch.Tensor
) -> QuantizedTensor:
    """Quantize ``x`` (``[..., tokens, channels]``) with ``spec`` and return every stored tensor.

    ``params`` pass calibrated state to the format: ``lut=`` (nuq centroids), ``scale=`` (a static fp8 scale).
    ``check=False`` skips the NaN/inf scan (for hot paths whose inputs were checked upstream).
    """
    spec = parse_spec(spec)
    if check:
        validate_input(x, spec)
    fmt = get_format(spec)
    xv = to_vector_last(x, spec)
    exclude = None
    stored: dict[str, torch.Tensor] = {}
    if spec.outlier_frac:
        stored, exclude = outliers.split(xv, spec.outlier_frac)
    stored = {**fmt.quantize(xv, spec, exclude, params), **stored}
    return QuantizedTensor(spec, x.shape, x.dtype, stored)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Dense tensor of ``q``'s original shape and dtype."""
    spec = q.spec
    n = vector_last_shape(tuple(q.shape), spec)[-1]
    dense = get_format(spec).dequantize(q.tensors, spec, n)
    if spec.outlier_frac:
        dense = outliers.merge(dense, q.tensors)
    if spec.granularity == "per_channel":
        dense = dense.transpose(-1, -2)
    return dense.to(q.dtype)


def expected_nbytes(shape: tuple[int, ...], spec: "str | QuantSpec", dtype: torch.dtype = torch.float16) -> int:
    """Closed-form bytes of quantizing a tensor of ``shape`` and ``dtype`` with ``spec``."""
    spec = parse_spec(spec)
    vshape = vector_last_shape(tuple(shape), spec)
    total = get_format(spec).nbytes(vshape, spec, dtype)
    if spec.outlier_frac:
        total += outliers.nbytes(vshape, spec.outlier_frac, dtype)
    return total
