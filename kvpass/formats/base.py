"""The common interface of every format, the registry that maps a spec kind to its handler, and the
input checks every format shares."""

from __future__ import annotations

from typing import ClassVar

import torch

from kvpass.errors import InputError, SpecError
from kvpass.formats.spec import FP8_VARIANTS, QuantSpec


class Format:
    """One quantization format. Subclasses set ``kind`` and implement the three methods below.

    ``quantize`` and ``dequantize`` receive tensors already moved to the layout where the quantization
    vectors run along the last axis (see :func:`kvpass.formats.quantize`), in the input dtype; ``dequantize``
    returns float32 (or the stored float dtype).
    ``exclude`` marks elements held elsewhere (dense-and-sparse outliers) that must not set the range.
    """

    kind: ClassVar[str]

    def quantize(
        self, x: torch.Tensor, spec: QuantSpec, exclude: torch.Tensor | None, params: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dequantize(self, tensors: dict[str, torch.Tensor], spec: QuantSpec, n: int) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self, shape: tuple[int, ...], spec: QuantSpec, dtype: torch.dtype) -> int:
        """Closed-form stored bytes for a vector-last ``shape``, without outliers."""
        raise NotImplementedError


_REGISTRY: dict[str, Format] = {}


def register_format(cls: type[Format]) -> type[Format]:
    """Class decorator: make ``cls`` the handler of specs of its ``kind``."""
    _REGISTRY[cls.kind] = cls()
    return cls


def get_format(spec: QuantSpec) -> Format:
    try:
        return _REGISTRY[spec.kind]
    except KeyError:
        raise SpecError(f"no format registered for kind {spec.kind!r}; registered: {sorted(_REGISTRY)}") from None


def group_count(n: int, spec: QuantSpec, axis_name: str) -> int:
    """Number of groups along a reduced axis of length ``n``; a clear error if the group does not divide it."""
    if spec.group is None:
        return 1
    if n % spec.group:
        divisors = [d for d in (16, 32, 64, 128, 256) if n % d == 0] or [n]
        raise SpecError(
            f"group size {spec.group} does not divide the {axis_name} axis of length {n}; "
            f"use a group size that divides {n} (e.g. g{divisors[-1]}) or drop ':g{spec.group}'"
        )
    return n // spec.group


def validate_input(x: torch.Tensor, spec: QuantSpec) -> None:
    """Reject tensors that cannot be quantized faithfully, naming the problem and the fix."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"expected a torch.Tensor, got {type(x).__name__}; convert with torch.as_tensor(...)")
    if not x.is_floating_point():
        raise InputError(
            f"cannot quantize a {x.dtype} tensor: kvpass quantizes floating-point activations; "
            "cast it first, e.g. x.float()"
        )
    if x.ndim < 1 or x.numel() == 0:
        raise InputError(f"cannot quantize an empty or 0-d tensor of shape {tuple(x.shape)}")
    if spec.granularity == "per_channel" and x.ndim < 2:
        raise InputError(
            f"per_channel needs a [..., tokens, channels] tensor, got shape {tuple(x.shape)}; "
            "add a token axis or use per_token"
        )
    bad = ~torch.isfinite(x)
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        n_nan = int(torch.isnan(x).sum())
        raise InputError(
            f"input has {int(bad.sum())} non-finite values ({n_nan} NaN), first at index {where} "
            f"(value {x[where].item()}); remove NaN/inf before quantizing (check the upstream activations or "
            "the calibration data)"
        )
    problem = fp16_metadata_problem(float(x.detach().abs().max()), spec, x.shape[-1])
    if problem:
        raise InputError(problem)


def fp16_metadata_problem(amax: float, spec: QuantSpec, dim: int = 1) -> str | None:
    """Why inputs bounded by ``amax`` cannot be coded faithfully with ``spec``'s fp16 scales (None when they can):
    scales or zero points past fp16's range, or quantization steps so small that fp16 stores them with a bit or two."""
    if spec.scale_dtype != torch.float16 or spec.kind not in ("int", "nuq", "lm", "fp8"):
        return None
    fix = f"add ':scale_fp32' to the spec ('{spec}:scale_fp32')"
    if metadata_bound(amax, spec, dim) > FP16_MAX:
        return f"input magnitude {amax:.4g} gives scales or zero points beyond fp16's range; {fix}"
    step = 2 * amax / ((1 << spec.bits) - 1) if spec.kind == "int" else amax / (1 << (spec.bits - 1))
    if spec.kind != "fp8" and 0 < step < FP16_STEP_FLOOR:
        return (f"input magnitude {amax:.3g} is too small for fp16 scales: its steps of {step:.2g} fall among fp16's "
                f"subnormals and lose most of their precision; {fix}, or rescale the input")
    return None


FP16_MAX = torch.finfo(torch.float16).max
FP16_STEP_FLOOR = 2.0**-23  # two of fp16's smallest subnormal steps: a scale below it keeps almost no precision


def metadata_bound(amax: float, spec: QuantSpec, dim: int = 1) -> float:
    """Largest scale or zero point a format may store for inputs bounded by ``amax`` (vectors of ``dim`` elements:
    a rotation can gather a vector's norm, up to ``amax * sqrt(dim)``, into one coordinate)."""
    if spec.rotate:
        amax *= dim**0.5
    if spec.kind == "int":
        return max(amax, 2 * amax / ((1 << spec.bits) - 1))
    if spec.kind == "nuq":
        return amax
    if spec.kind == "lm":
        return get_format(spec).scale_bound(amax, spec)
    if spec.kind == "fp8":
        return amax / torch.finfo(FP8_VARIANTS[spec.fp8_variant]).max
    return 0.0
