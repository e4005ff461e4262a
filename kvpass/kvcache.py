"""Static storage layout of one quantized K or V cache ``[batch, kv_heads, max_len, head_dim]``.

A cache is a list of *per-token* tensors, each with the token axis at dim 2 (packed codes, scales, zero
points, outliers), written row by row as tokens arrive, plus *static* tensors shared by all tokens
(a nuq LUT, a calibrated fp8 scale). Specs must be per-token here: a per-channel scale would change as
tokens arrive; per-channel keys with a residual window are a method-level layout built on top of this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvpass.errors import SpecError
from kvpass.formats import QuantSpec, parse_spec, quantize
from kvpass.formats.api import QuantizedTensor, dequantize
from kvpass.formats.nuq import normal_float_grid


def cache_names(spec: QuantSpec) -> list[str]:
    """Names of the per-token tensors of a cache, in the order the kvpass ops take them."""
    if spec.kind == "float":
        return ["data"]
    if spec.kind == "fp8":
        return ["codes", "scale"] if spec.granularity == "per_token" else ["codes"]
    names = ["codes", "scale", "zero"]
    if spec.outlier_frac:
        names += ["outlier_values", "outlier_index"]
    return names


def static_names(spec: QuantSpec) -> list[str]:
    """Names of the tensors shared by every token (not written by ``kv_store_``)."""
    if spec.kind == "nuq":
        return ["lut", "qnorm"] if spec.qnorm else ["lut"]
    if spec.kind == "fp8" and spec.granularity != "per_token":
        return ["scale"]
    return []


def check_cache_spec(spec: QuantSpec) -> None:
    if spec.granularity == "per_channel":
        raise SpecError(
            f"'{spec}' cannot be stored token by token: a per-channel scale changes as tokens arrive; "
            "use a per_token spec for the cache (per-channel keys come with a method such as kivi or kvquant)"
        )


@dataclass(frozen=True)
class CacheLayout:
    """The buffers of one cache: shapes, dtypes and exact bytes."""

    spec: QuantSpec
    batch: int
    heads: int
    max_len: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def build(cls, spec: "str | QuantSpec", shape: tuple[int, int, int, int], dtype: torch.dtype) -> "CacheLayout":
        spec = parse_spec(spec)
        check_cache_spec(spec)
        return cls(spec, *shape, dtype)

    def _row(self) -> QuantizedTensor:
        row = torch.zeros(1, 1, 1, self.head_dim, dtype=self.dtype)
        return quantize(row, self.spec, check=False, **self.default_static())

    def default_static(self) -> dict[str, torch.Tensor]:
        """Calibration-free static tensors: the NormalFloat LUT; a unit fp8 per-head/per-tensor scale, as
        vLLM uses without calibration (a calibrated scale replaces it)."""
        out: dict[str, torch.Tensor] = {}
        if self.spec.kind == "nuq":
            out["lut"] = normal_float_grid(self.spec.bits).to(torch.float16)
            if self.spec.qnorm:
                out["qnorm"] = torch.tensor([1.0, 0.0])  # identity until calibration fits it
        elif "scale" in static_names(self.spec):
            shape = (1, self.heads, 1, 1) if self.spec.granularity == "per_head" else (1, 1, 1, 1)
            out["scale"] = torch.ones(shape, dtype=self.spec.scale_dtype)
        return out

    def buffer_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-token buffers: name -> (shape, dtype)."""
        row = self._row().tensors
        return {
            n: ((self.batch, self.heads, self.max_len, row[n].shape[-1]), row[n].dtype) for n in cache_names(self.spec)
        }

    def allocate(self, device: "torch.device | str" = "cpu") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Zeroed per-token buffers and default static tensors, in op order."""
        cache = [torch.zeros(s, dtype=d, device=device) for s, d in self.buffer_specs().values()]
        static = self.default_static()
        return cache, [static[n].to(device) for n in static_names(self.spec)]

    @property
    def nbytes(self) -> int:
        """Exact bytes of every buffer of this cache, static tensors included."""
        per_token = sum(math.prod(s) * torch.tensor([], dtype=d).element_size() for s, d in self.buffer_specs().values())
        return per_token + sum(t.numel() * t.element_size() for t in self.default_static().values())

    @property
    def dense_nbytes(self) -> int:
        """Bytes the same cache takes in the model's dtype."""
        return self.batch * self.heads * self.max_len * self.head_dim * torch.tensor([], dtype=self.dtype).element_size()

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes / (self.batch * self.heads * self.max_len * self.head_dim)


def store(cache: list[torch.Tensor], static: list[torch.Tensor], new: torch.Tensor, positions: torch.Tensor, spec: QuantSpec) -> None:
    """Quantize ``new`` ``[B, H, T, D]`` and write its rows at ``positions`` (``[T]``) of every per-token buffer."""
    params = dict(zip(static_names(spec), static))
    q = quantize(new, spec, check=False, **params)
    for name, buf in zip(cache_names(spec), cache):
        buf.index_copy_(2, positions, q.tensors[name].to(buf.dtype))


def load(cache: list[torch.Tensor], static: list[torch.Tensor], spec: QuantSpec, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize a whole cache to ``[B, H, S, D]`` in ``dtype``."""
    tensors = dict(zip(cache_names(spec), cache)) | dict(zip(static_names(spec), static))
    b, h, s = cache[0].shape[:3]
    return dequantize(QuantizedTensor(spec, torch.Size((b, h, s, head_dim)), dtype, tensors))
