"""Quantization specs: a frozen dataclass and its short string form.

Grammar (case-insensitive)::

    spec     := base (":" option)* ("+" extra)*
    base     := "int"B | "nuq"B | "lm"B | "fp8_e4m3" | "fp8_e5m2" | "fp16" | "bf16" | "fp32" | "none"
    option   := "per_token" | "per_channel" | "per_head" | "per_tensor" | "g"N | "qnorm" | "scale_fp32" | "static"
              | "channel_lut" | "hadamard"
    extra    := "outliers"F"%"

Examples: ``"int4:per_channel:g32"``, ``"nuq3:per_token"``, ``"fp8_e4m3"``,
``"int2:per_token:g64+outliers1%"``.

Axes follow the KV-cache convention ``[..., tokens, channels]``: *per_token* means one scale per token
vector (the reduction runs over the channel axis, the last one); *per_channel* means one scale per
channel (the reduction runs over the token axis, the second to last). A group size splits the reduced
axis into groups of that many elements, each with its own scale. Scales and zero points are fp16
unless ``scale_fp32`` asks for fp32 (needed for inputs beyond fp16's range, about 65504).
``static`` (per_channel only) takes each channel's range from calibration (``lo=``/``hi=`` tensors) instead of
computing it, so every token is coded on its own with no per-token metadata (KVQuant's keys).
``channel_lut`` (nuq static only) gives every head and channel its own centroids instead of one LUT per layer:
``lut=`` is then ``[1, heads, 1, channels, 2**B]``.
``lmB`` codes each element with the Lloyd-Max quantizer of N(0, 1) scaled by its group's RMS, storing one
norm-corrected scale per group (:mod:`kvpass.formats.lloyd_max`); ``hadamard`` rotates every token vector by a seeded
randomized Hadamard before coding and back after (:mod:`kvpass.formats.rotation`): ``"lm4:per_token:hadamard"`` is a
TurboQuant-style code that needs no calibration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from kvpass.errors import SpecError

GRANULARITIES = ("per_token", "per_channel", "per_head", "per_tensor")
FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FP8_VARIANTS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
MIN_BITS, MAX_BITS = 1, 8

_BASE = re.compile(r"^(?:(int|nuq|lm)(\d+)|fp8_(e4m3|e5m2)|(fp16|bf16|fp32|none))$")
_GROUP = re.compile(r"^g(\d+)$")
_OUTLIERS = re.compile(r"^outliers(\d+(?:\.\d+)?)%$")

GRAMMAR_HELP = (
    "write a spec as base[:option...][+outliersF%], e.g. 'int4:per_channel:g32', 'nuq3:per_token', "
    "'lm4:per_token:hadamard', 'fp8_e4m3', 'int2:per_token:g64+outliers1%'; bases: intB, nuqB and lmB (B in 1..8), "
    "fp8_e4m3, fp8_e5m2, fp16, bf16, fp32, none"
)


@dataclass(frozen=True)
class QuantSpec:
    """A parsed quantization spec. Build one with :func:`parse_spec` or directly."""

    kind: str  # "int", "nuq", "lm", "fp8" or "float"
    bits: int
    granularity: str = "per_token"
    group: int | None = None
    outlier_frac: float = 0.0
    qnorm: bool = False
    static: bool = False
    channel_lut: bool = False
    fp8_variant: str | None = None
    float_dtype: str | None = None  # "fp16" / "bf16" / "fp32" for kind="float"; None keeps the input dtype
    scale_dtype: torch.dtype = torch.float16
    rotate: bool = False  # a seeded randomized Hadamard on every token vector (":hadamard")

    def __post_init__(self) -> None:
        if self.kind not in ("int", "nuq", "lm", "fp8", "float"):
            raise SpecError(f"unknown format kind {self.kind!r}; {GRAMMAR_HELP}")
        if self.kind in ("int", "nuq", "lm") and not MIN_BITS <= self.bits <= MAX_BITS:
            raise SpecError(
                f"{self.kind}{self.bits}: bits out of range; use {MIN_BITS} to {MAX_BITS} bits "
                f"(for 16 bits use 'fp16' or 'bf16')"
            )
        if self.granularity not in GRANULARITIES:
            raise SpecError(f"unknown granularity {self.granularity!r}; use one of {', '.join(GRANULARITIES)}")
        if self.kind == "lm" and self.granularity != "per_token":
            raise SpecError(f"lm{self.bits} scales each token vector by its RMS; use it per_token, e.g. "
                            f"'lm{self.bits}:per_token:hadamard'")
        if self.rotate and (self.kind == "float" or self.granularity == "per_channel"):
            raise SpecError("'hadamard' rotates each token vector across its channels before coding: use it with a "
                            "per-token (or fp8 per-head) intB, nuqB, lmB or fp8 spec, e.g. 'lm4:per_token:hadamard'")
        if self.kind in ("int", "nuq") and self.granularity not in ("per_token", "per_channel"):
            raise SpecError(
                f"{self.kind} supports per_token or per_channel, not {self.granularity}; "
                "per_head/per_tensor scales are for fp8"
            )
        if self.group is not None and self.group < 1:
            raise SpecError(f"group size must be a positive integer, got {self.group}")
        if self.group is not None and self.kind in ("fp8", "float"):
            raise SpecError(f"a group size applies to int and nuq formats, not {self.kind}; remove ':g{self.group}'")
        if not 0.0 <= self.outlier_frac < 0.5:
            raise SpecError(
                f"outlier fraction {self.outlier_frac * 100:g}% out of range; use a value below 50%, e.g. '+outliers1%'"
            )
        if self.outlier_frac and self.kind not in ("int", "nuq", "lm"):
            raise SpecError(f"dense-and-sparse outliers apply to int, nuq and lm formats, not {self.kind}")
        if self.static and (self.granularity != "per_channel" or self.group is not None or self.kind not in ("int", "nuq")):
            raise SpecError("'static' takes calibrated per-channel ranges: use it as intB/nuqB:per_channel:static, "
                            "without a group size")
        if self.channel_lut and not (self.kind == "nuq" and self.static):
            raise SpecError("channel_lut gives each calibrated channel its own nuq centroids; use it as "
                            "nuqB:per_channel:static:channel_lut")
        if self.qnorm and self.kind != "nuq":
            raise SpecError("qnorm rescales nuq centroids; use it with a nuqB base, e.g. 'nuq2:per_token:qnorm'")

    @property
    def reduce_axis(self) -> int:
        """The axis a scale is taken over: channels (-1) for per-token, tokens (-2) for per-channel."""
        return -1 if self.granularity == "per_token" else -2

    def with_(self, **changes) -> QuantSpec:
        return replace(self, **changes)

    def __str__(self) -> str:
        if self.kind == "float":
            return self.float_dtype or "none"
        if self.kind == "fp8":
            parts = [f"fp8_{self.fp8_variant}"]
            if self.granularity != "per_head":
                parts.append(self.granularity)
            if self.scale_dtype == torch.float32:
                parts.append("scale_fp32")
            if self.rotate:
                parts.append("hadamard")
            return ":".join(parts)
        parts = [f"{self.kind}{self.bits}", self.granularity]
        if self.group is not None:
            parts.append(f"g{self.group}")
        if self.static:
            parts.append("static")
        if self.channel_lut:
            parts.append("channel_lut")
        if self.qnorm:
            parts.append("qnorm")
        if self.scale_dtype == torch.float32:
            parts.append("scale_fp32")
        if self.rotate:
            parts.append("hadamard")
        text = ":".join(parts)
        if self.outlier_frac:
            text += f"+outliers{self.outlier_frac * 100:g}%"
        return text


def parse_spec(spec: str | QuantSpec) -> QuantSpec:
    """Parse a short spec string (see the module docstring) into a :class:`QuantSpec`."""
    if isinstance(spec, QuantSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"cannot parse spec {spec!r}: expected a non-empty string; {GRAMMAR_HELP}")
    text = spec.strip().lower()
    main, *extras = text.split("+")
    base, *options = main.split(":")
    m = _BASE.match(base)
    if not m:
        raise SpecError(f"cannot parse spec {spec!r}: unknown base {base!r}; {GRAMMAR_HELP}")
    fields: dict = {}
    if m.group(1):
        fields.update(kind=m.group(1), bits=int(m.group(2)))
    elif m.group(3):
        fields.update(kind="fp8", bits=8, fp8_variant=m.group(3), granularity="per_head")
    else:
        name = m.group(4)
        fields.update(kind="float", bits=16, float_dtype=None if name == "none" else name)
        if name in ("fp32",):
            fields["bits"] = 32
    seen: dict[str, str] = {}
    for opt in options:
        g = _GROUP.match(opt)
        kind = "granularity" if opt in GRANULARITIES else "group" if g else opt
        if kind in seen:
            clash = f"{opt!r} is given twice" if seen[kind] == opt else f"{seen[kind]!r} and {opt!r} both set the {kind}"
            raise SpecError(f"cannot parse spec {spec!r}: {clash}; keep one")
        seen[kind] = opt
        if opt in GRANULARITIES:
            fields["granularity"] = opt
        elif g:
            fields["group"] = int(g.group(1))
        elif opt == "qnorm":
            fields["qnorm"] = True
        elif opt == "static":
            fields["static"] = True
        elif opt == "channel_lut":
            fields["channel_lut"] = True
        elif opt == "hadamard":
            fields["rotate"] = True
        elif opt == "scale_fp32":
            fields["scale_dtype"] = torch.float32
        else:
            raise SpecError(f"cannot parse spec {spec!r}: unknown option {opt!r}; {GRAMMAR_HELP}")
    if len(extras) > 1:
        raise SpecError(f"cannot parse spec {spec!r}: outliers are given {len(extras)} times; keep one")
    for extra in extras:
        o = _OUTLIERS.match(extra)
        if not o:
            raise SpecError(f"cannot parse spec {spec!r}: unknown extra {extra!r}; {GRAMMAR_HELP}")
        fields["outlier_frac"] = float(o.group(1)) / 100.0
    return QuantSpec(**fields)
