"""Static storage layout of one quantized K or V cache ``[batch, kv_heads, max_len, head_dim]``.

A cache spec is a format spec plus cache options, written ``"<format>|residual=R|sink=S|recent=W"``:

* the format (``kvpass.formats``) codes the tokens. Per-token formats, and per-channel formats with
  calibrated (``static``) ranges, code each token on its own as it arrives.
* ``residual=R`` (KIVI) keeps the most recent tokens at model precision in a ring of R slots and codes them a
  block of R tokens at a time once the block is complete, which is what per-channel groups along tokens need.
* ``sink=S`` (KVQuant's attention sink) keeps the first S tokens at model precision as well.
* ``recent=W`` keeps the newest W tokens at model precision as well, in a ring next to their codes: the query at
  position p reads token j from the ring iff ``p - j < W``.
* ``centre=N`` codes each token minus a centre, the mean of the first write's first N tokens per sequence, head
  and channel, kept at model precision (and added back on reading): a constant offset of every key or value, such
  as a key projection's bias, then takes no share of each token's scale. Needs no calibration.

Caches with a residual or a recent window are written and attended by ``kvpass.ops.recent.kv_recent_attention_``, which
gives each query of a prompt chunk the tokens it would read exact if the chunk had been decoded token by token.

The buffers are *per-token* tensors, written as tokens arrive (token axis at dim 2, or blocks of R tokens at
dim 2 with a residual), and *static* tensors shared by every token (a nuq LUT and its Q-Norm, calibrated
per-channel ranges, a calibrated fp8 scale).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from kvpass.errors import KVPassError, SpecError
from kvpass.formats import QuantSpec, parse_spec, quantize
from kvpass.formats.api import QuantizedTensor, dequantize
from kvpass.formats.base import FP16_MAX, metadata_bound
from kvpass.formats.nuq import normal_float_grid


@dataclass(frozen=True)
class CacheSpec:
    """A format plus the cache options ``residual`` and ``sink``."""

    format: QuantSpec
    residual: int = 0
    sink: int = 0
    recent: int = 0
    centre: int = 0

    def __str__(self) -> str:
        text = str(self.format)
        if self.residual:
            text += f"|residual={self.residual}"
        if self.sink:
            text += f"|sink={self.sink}"
        if self.recent:
            text += f"|recent={self.recent}"
        if self.centre:
            text += f"|centre={self.centre}"
        return text


@functools.cache
def parse_cache_spec(text: str | CacheSpec | QuantSpec) -> CacheSpec:
    """Parse ``"<format>[|residual=R][|sink=S][|recent=W][|centre=N]"``."""
    if isinstance(text, CacheSpec):
        return text
    if isinstance(text, QuantSpec):
        return CacheSpec(text)
    fmt, *options = str(text).split("|")
    fields: dict[str, int] = {}
    for opt in options:
        key, _, value = opt.partition("=")
        if key not in ("residual", "sink", "recent", "centre") or not value.isdigit():
            raise SpecError(f"unknown cache option {opt!r} in {text!r}; use residual=N, sink=N, recent=N and centre=N")
        fields[key] = int(value)
    spec = CacheSpec(parse_spec(fmt), **fields)
    check_cache_spec(spec)
    return spec


def check_cache_spec(cs: CacheSpec) -> None:
    spec = cs.format
    if spec.granularity == "per_channel" and not spec.static and not cs.residual:
        raise SpecError(
            f"'{spec}' cannot be stored token by token: a per-channel scale changes as tokens arrive; keep recent "
            "tokens in a residual window ('|residual=128', as KIVI does) or calibrate the ranges (':static')"
        )
    if cs.residual and cs.recent:
        raise SpecError(f"'{cs}' keeps recent tokens at model precision twice: residual=R already holds the newest "
                        "tokens until their block is coded; use one of residual and recent")
    if cs.centre and spec.kind == "float":
        raise SpecError(f"'{cs}' stores tokens at model precision: there is no code for centre= to sharpen; drop it")
    if cs.residual and spec.granularity == "per_channel" and spec.group and cs.residual % spec.group:
        raise SpecError(f"residual={cs.residual} must be a multiple of the token group size {spec.group}")


def cache_names(cs: CacheSpec) -> list[str]:
    """Names of the per-token tensors of a cache, in the order the kvpass ops take them."""
    spec = cs.format
    if spec.kind == "float":
        names = ["data"]
    elif spec.kind == "fp8":
        names = ["codes", "scale"] if spec.granularity == "per_token" else ["codes"]
    elif spec.static:
        names = ["codes"]
    elif spec.kind == "lm":
        names = ["codes", "scale"]
    else:
        names = ["codes", "scale", "zero"]
    if spec.outlier_frac:
        names += ["outlier_values", "outlier_index"]
    if cs.residual:
        names += ["residual", "state"]
    if cs.sink:
        names += ["sink"]
    if cs.recent:
        names += ["recent"]
    if cs.centre:
        names += ["centre", "centred"]
    return names


def static_names(cs: CacheSpec) -> list[str]:
    """Names of the tensors shared by every token (never written by ``kv_store_``)."""
    spec = cs.format
    names = ["lo", "hi"] if spec.static else []
    if spec.static and spec.outlier_frac:
        names += ["sens"]
    if spec.kind == "nuq":
        names += ["lut", "qnorm"] if spec.qnorm else ["lut"]
    if spec.kind == "fp8" and spec.granularity != "per_token":
        names += ["scale"]
    return names


def needs_calibration(cs: CacheSpec) -> bool:
    return cs.format.static


@dataclass(frozen=True)
class CacheLayout:
    """The buffers of one cache: shapes, dtypes and exact bytes."""

    spec: CacheSpec
    batch: int
    heads: int
    max_len: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def build(cls, spec: str | CacheSpec | QuantSpec, shape: tuple[int, int, int, int], dtype: torch.dtype) -> CacheLayout:
        return cls(parse_cache_spec(spec), *shape, dtype)

    @property
    def format(self) -> QuantSpec:
        return self.spec.format

    @property
    def blocks(self) -> int:
        """Complete residual blocks the cache can hold; the remaining tokens stay in the ring."""
        return self.max_len // self.spec.residual if self.spec.residual else 0

    def default_static(self) -> dict[str, torch.Tensor]:
        """Calibration-free static tensors: the NormalFloat LUT and an identity Q-Norm; a unit fp8 per-head scale
        as vLLM uses without calibration. Calibrated ranges have no default (see :func:`needs_calibration`)."""
        spec, out = self.format, {}
        if spec.static:
            shape = (1, self.heads, 1, self.head_dim)
            out["lo"], out["hi"] = -torch.ones(shape, dtype=spec.scale_dtype), torch.ones(shape, dtype=spec.scale_dtype)
            if spec.outlier_frac:
                out["sens"] = torch.ones(shape, dtype=torch.float16)
        if spec.kind == "nuq":
            out["lut"] = normal_float_grid(spec.bits).to(torch.float16)
            if spec.channel_lut:
                out["lut"] = out["lut"].expand(1, self.heads, 1, self.head_dim, -1).contiguous()
            if spec.qnorm:
                out["qnorm"] = torch.tensor([1.0, 0.0])
        elif "scale" in static_names(self.spec):
            shape = (1, self.heads, 1, 1) if spec.granularity == "per_head" else (1, 1, 1, 1)
            out["scale"] = torch.ones(shape, dtype=spec.scale_dtype)
        return out

    def _coded(self) -> dict[str, torch.Tensor]:
        """The tensors the format stores for one token (or one residual block)."""
        rows = self.spec.residual or 1
        x = torch.zeros(1, 1, rows, self.head_dim, dtype=self.dtype)
        static = {k: v[:, :1] if v.ndim >= 4 else v for k, v in self.default_static().items()}
        return quantize(x, self.format, check=False, **static).tensors

    def buffer_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-token buffers: name -> (shape, dtype)."""
        coded, b, h = self._coded(), self.batch, self.heads
        out = {}
        for name in cache_names(self.spec):
            if name == "residual":
                out[name] = ((b, h, self.spec.residual, self.head_dim), self.dtype)
            elif name == "state":  # tokens written
                out[name] = ((1,), torch.int64)
            elif name == "sink":
                out[name] = ((b, h, self.spec.sink, self.head_dim), self.dtype)
            elif name == "recent":
                out[name] = ((b, h, self.spec.recent, self.head_dim), self.dtype)
            elif name == "centre":
                out[name] = ((b, h, 1, self.head_dim), self.dtype)
            elif name == "centred":  # whether the centre is set
                out[name] = ((1,), torch.int64)
            elif self.spec.residual:
                t = coded[name]
                out[name] = ((b, h, self.blocks, *t.shape[2:]), t.dtype)
            else:
                t = coded[name]
                out[name] = ((b, h, self.max_len, t.shape[-1]), t.dtype)
        return out

    def allocate(self, device: torch.device | str = "cpu",
                 static: dict[str, torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Zeroed per-token buffers and the static tensors (``static`` overrides the defaults), in op order."""
        cache = [torch.zeros(s, dtype=d, device=device) for s, d in self.buffer_specs().values()]
        defaults = self.default_static()
        for name, t in (static or {}).items():
            if name in defaults and tuple(t.shape) != tuple(defaults[name].shape):
                raise KVPassError(f"calibrated tensor '{name}' for '{self.spec}' has shape {tuple(t.shape)}, this cache "
                                  f"needs {tuple(defaults[name].shape)} ({self.heads} heads of {self.head_dim}); the "
                                  "calibration was made for another model or method: calibrate again")
        values = {**defaults, **(static or {})}
        missing = [n for n in ("lo", "hi") if n in static_names(self.spec) and n not in (static or {})]
        if missing:
            raise KVPassError(
                f"cache spec '{self.spec}' codes tokens against calibrated per-channel ranges, and none were given; "
                "pass calibration=kvpass.calibrate(model, texts, method=...) to kvpass.compile"
            )
        return cache, [values[n].to(device) for n in static_names(self.spec)]

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


UNCODED = ("residual", "state", "sink", "recent", "centre", "centred")  # model precision (or bookkeeping)
RINGS = ("residual", "state", "recent", "centre", "centred")  # of those, rewritten in place, not at a token's slot


def _params(cs: CacheSpec, static: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(zip(static_names(cs), static))


def _write_coded(bufs: dict[str, torch.Tensor], coded: dict[str, torch.Tensor], names: list[str], index: torch.Tensor) -> None:
    for name in names:
        bufs[name].index_copy_(2, index, coded[name].to(bufs[name].dtype))


def check_range(new: torch.Tensor, cs: CacheSpec) -> None:
    """Keys or values whose scales or zero points would overflow fp16 (an fp32 or bf16 model can produce them)
    are an error naming the fix, not NaN logits."""
    spec = cs.format
    if spec.scale_dtype != torch.float16 or spec.kind == "float" or spec.static or not new.numel():
        return
    amax = float(new.detach().abs().amax())
    if metadata_bound(amax, spec, new.shape[-1]) > FP16_MAX:
        raise KVPassError(f"cached keys or values reach {amax:.4g}, past what the fp16 scales of '{cs}' can hold; "
                          f"use a spec with ':scale_fp32' (e.g. '{spec}:scale_fp32') for this model")


def store_sink(bufs: dict[str, torch.Tensor], new: torch.Tensor, positions: torch.Tensor, cs: CacheSpec) -> None:
    """Keep the new tokens at positions below ``sink=S`` at model precision as well."""
    if cs.sink:
        keep = positions < cs.sink
        if bool(keep.any()):
            bufs["sink"].index_copy_(2, positions[keep], new[:, :, keep].to(bufs["sink"].dtype))


def centre_of(bufs: dict[str, torch.Tensor], new: torch.Tensor, cs: CacheSpec) -> torch.Tensor | None:
    """The centre the coded tokens are taken from (None without ``centre=N``): set by the first write, from its
    first N tokens, and fixed from then on."""
    if not cs.centre:
        return None
    centre, done = bufs["centre"], bufs["centred"]
    if not int(done) and new.shape[2]:
        centre.copy_(new[:, :, :cs.centre].float().mean(2, keepdim=True).to(centre.dtype))
        done.fill_(1)
    return centre.to(new.dtype)


def store(cache: list[torch.Tensor], static: list[torch.Tensor], new: torch.Tensor, positions: torch.Tensor,
          cs: CacheSpec) -> None:
    """Write ``new`` ``[B, H, T, D]`` at token ``positions`` ``[T]`` of every per-token buffer."""
    check_range(new, cs)
    names = cache_names(cs)
    bufs = dict(zip(names, cache))
    coded_names = [n for n in names if n not in UNCODED]
    params = _params(cs, static)
    store_sink(bufs, new, positions, cs)
    centre = centre_of(bufs, new, cs)
    if not cs.residual:
        coded = quantize(new if centre is None else new - centre, cs.format, check=False, **params).tensors
        _write_coded(bufs, coded, coded_names, positions)
        return
    r, ring = cs.residual, bufs["residual"]
    pos = positions.tolist()
    if pos != list(range(pos[0], pos[0] + len(pos))):
        raise KVPassError(f"a residual cache needs consecutive positions, got {pos[:8]}...")
    blocks = bufs[coded_names[0]].shape[2]
    i = 0
    while i < len(pos):
        p = pos[i]
        take = min(len(pos) - i, r - p % r)  # up to the end of p's block
        ring[:, :, p % r: p % r + take] = new[:, :, i:i + take].to(ring.dtype)
        end = p + take
        if end % r == 0 and end // r <= blocks:  # the block is complete: code it from the ring
            coded = quantize(ring if centre is None else ring - centre, cs.format, check=False, **params).tensors
            k = torch.tensor([end // r - 1], device=new.device)
            for name in coded_names:
                bufs[name].index_copy_(2, k, coded[name].unsqueeze(2).to(bufs[name].dtype))
        i += take
    bufs["state"].fill_(pos[-1] + 1)


def load(cache: list[torch.Tensor], static: list[torch.Tensor], cs: CacheSpec, head_dim: int, max_len: int,
         dtype: torch.dtype, upto: int | None = None) -> torch.Tensor:
    """Dequantize a cache to ``[B, H, upto or max_len, D]`` in ``dtype`` (slots never written come back as zeros
    or stale values; attention masks them). ``upto`` skips the slots past the last one any query can see."""
    names = cache_names(cs)
    bufs = dict(zip(names, cache))
    coded_names = [n for n in names if n not in UNCODED]
    params = _params(cs, static)
    max_len = max_len if upto is None else min(upto, max_len)
    if not cs.residual:
        b, h = cache[0].shape[:2]
        s = max_len
        tensors = {n: bufs[n][:, :, :s] for n in coded_names} | params
        dense = dequantize(QuantizedTensor(cs.format, torch.Size((b, h, s, head_dim)), dtype, tensors))
        if cs.centre:
            dense = dense + bufs["centre"].to(dtype)
    else:
        ring, r = bufs["residual"], cs.residual
        b, h = ring.shape[:2]
        n, s = int(bufs["state"]), max_len
        dense = torch.zeros(b, h, s, head_dim, dtype=dtype, device=ring.device)
        done = min(n // r, bufs[coded_names[0]].shape[2])  # complete blocks; later tokens are in the ring
        use = min(done, -(-s // r))  # the blocks that reach into the slots asked for
        if use:
            tensors = {name: bufs[name][:, :, :use] for name in coded_names} | params
            q = QuantizedTensor(cs.format, torch.Size((b, h, use, r, head_dim)), dtype, tensors)
            upto_block = min(use * r, s)
            coded = dequantize(q).reshape(b, h, use * r, head_dim)[:, :, :upto_block]
            dense[:, :, :upto_block] = coded + bufs["centre"].to(dtype) if cs.centre else coded
        tail = torch.arange(done * r, max(done * r, min(n, s)), device=ring.device)
        dense[:, :, tail] = ring[:, :, tail % r].to(dtype)
    if cs.sink:
        dense = dense.clone() if dense.data_ptr() == cache[0].data_ptr() else dense
        dense[:, :, :cs.sink] = bufs["sink"][:, :, :dense.shape[2]].to(dtype)
    return dense
