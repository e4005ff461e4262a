"""Calibration: run the model on text and collect what a method's static tensors need.

For every attention layer it records the keys (before RoPE when the method stores them so) and values that
the cache would hold, and their gradients of the language-model loss; from those it fits:

* calibrated per-channel key ranges (``:static`` specs): the ``f/2`` and ``1 - f/2`` quantiles per head and
  channel when ``f`` of the values are kept as outliers, else min and max;
* nuq lookup tables by k-means weighted with the diagonal Fisher information ``(dLoss/dA)**2`` (KVQuant's
  sensitivity-weighted datatype) over the normalised values, and the Q-Norm correction where asked.

The recording runs the captured graph with ``torch.fx.Interpreter``, so it finds keys and values from the graph,
like the pass, not from module names. :class:`Calibration` saves to safetensors + JSON with a hash of the
model's config, checked when loaded into a compile.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kvpass.errors import InputError, KVPassError
from kvpass.formats import fit_lut, outliers
from kvpass.formats.nuq import fit_lut_rows, lookup_per_channel, nearest_per_channel, normalize, qnorm_affine
from kvpass.kvcache import CacheSpec, parse_cache_spec, static_names
from kvpass.methods import MethodConfig, get_method
from kvpass.passes.locate import locate

MAX_FIT_SAMPLES = 200_000


def config_hash(model) -> str:
    """A hash of what makes a calibration valid for a model: its config (transformers) or parameter shapes.
    ``model`` may also be a config."""
    config = model if hasattr(model, "to_dict") and not isinstance(model, torch.nn.Module) else getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        data = {k: v for k, v in config.to_dict().items()
                if k not in ("transformers_version", "_name_or_path", "name_or_path", "quantization_config",
                             "_attn_implementation_autoset", "dtype", "torch_dtype", "architectures")}
    else:
        data = {n: list(p.shape) for n, p in model.named_parameters()}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Calibration:
    """Static tensors per layer (``"{layer}.k.lut"``, ``"{layer}.v.lo"``...) for one method and one model."""

    method: str
    model_hash: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def for_layer(self, layer: int, which: str) -> dict[str, torch.Tensor]:
        prefix = f"{layer}.{which}."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def as_rewrite_input(self) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
        layers = {int(k.split(".")[0]) for k in self.tensors}
        return {(i, w): self.for_layer(i, w) for i in layers for w in ("k", "v") if self.for_layer(i, w)}

    def save(self, path: str | Path) -> None:
        """Write ``path.safetensors`` and ``path.json``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path.with_suffix(".safetensors")))
        path.with_suffix(".json").write_text(json.dumps(
            {"method": self.method, "model_hash": self.model_hash, "meta": self.meta}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        from safetensors.torch import load_file

        path = Path(path)
        meta_path, tensor_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
        if not meta_path.exists() or not tensor_path.exists():
            raise KVPassError(f"no calibration at {path}: expected {meta_path.name} and {tensor_path.name}")
        meta = json.loads(meta_path.read_text())
        return cls(meta["method"], meta["model_hash"], load_file(str(tensor_path)), meta.get("meta", {}))

    @property
    def promoted_layers(self) -> tuple[int, ...]:
        """The layers chosen as the most sensitive (stored in the method's ``sensitive_spec``)."""
        return tuple(self.meta.get("promoted_layers", ()))

    def check(self, model, method: MethodConfig) -> None:
        if self.method != method.name:
            raise KVPassError(f"this calibration is for method {self.method!r}, not {method.name!r}; calibrate with "
                              f"kvpass.calibrate(model, texts, method={method.name!r})")
        if len(self.promoted_layers) != method.sensitive_layers:
            raise KVPassError(f"this calibration chose {len(self.promoted_layers)} sensitive layers, method "
                              f"{method.name!r} keeps {method.sensitive_layers}; calibrate again with this method")
        if model is not None and config_hash(model) != self.model_hash:  # a model or its config
            raise KVPassError(
                f"this calibration was made for another model (config hash {self.model_hash}, this model "
                f"{config_hash(model)}); calibrate this model with kvpass.calibrate(model, texts, method=...)"
            )


def token_samples(texts, tokenizer, n_samples: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """``n_samples`` windows of ``seq_len`` token ids drawn from the concatenated texts (deterministic)."""
    streams = []
    for t in texts if isinstance(texts, (list, tuple)) else [texts]:
        if isinstance(t, str):
            if tokenizer is None:
                raise KVPassError("calibration texts are strings but no tokenizer was given; pass tokenizer= or "
                                  "token-id tensors")
            streams.append(torch.tensor(tokenizer(t, add_special_tokens=False).input_ids))
        elif isinstance(t, torch.Tensor):
            if t.is_floating_point():
                if not torch.isfinite(t).all():
                    raise InputError("calibration data contains NaN/inf; pass clean token ids")
                if not torch.equal(t, t.round()):
                    raise InputError("calibration token ids must be integers")
            streams.append(t.reshape(-1).long())
        else:
            raise KVPassError(f"calibration texts must be strings or token-id tensors, not {type(t).__name__}")
    ids = torch.cat(streams)
    if len(ids) < seq_len:
        raise KVPassError(f"calibration data has {len(ids)} tokens, fewer than seq_len={seq_len}; pass more text or a "
                          "smaller seq_len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_samples,), generator=g)
    return [ids[s:s + seq_len] for s in starts.tolist()]


class Recorder(torch.fx.Interpreter):
    """Runs the captured graph, keeping the values of chosen nodes (with autograd history)."""

    def __init__(self, gm, wanted: dict[torch.fx.Node, str]) -> None:
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.wanted:
            self.values[self.wanted[n]] = out
        return out


def record(model, samples: list[torch.Tensor], method: MethodConfig, captured=None) -> dict[str, list[torch.Tensor]]:
    """Per layer and k/v: activations ``[H, T, D]`` and their squared loss gradients, for every sample. For QAQ,
    queries, keys and values (keys also after RoPE, as ``k_rope``, when the method stores them before it),
    gradients only where tiers have calibrated tensors to fit; and each
    layer's softmax scale. ``captured``: the model exported with a cache of the samples' length (else exported
    here)."""
    from kvpass.capture import example_hf_inputs
    from kvpass.compile import capture_model

    seq_len = len(samples[0])
    captured = captured or capture_model(model, max_cache_len=seq_len, batch_size=1)
    gm = captured.instantiate()
    sites = locate(gm, captured.name)
    wanted = {}
    with_grads = method.qaq is None or any(static_names(parse_cache_spec(t))
                                           for which in "kv" for t in method.qaq.tiers_for(which))
    for s in sites:
        key = s.rope.pre if method.pre_rope_keys and s.rope is not None else s.key.new
        wanted[key], wanted[s.value.new] = f"{s.index}.k", f"{s.index}.v"
        if method.qaq is not None:
            wanted[s.query] = f"{s.index}.q"
            if key is not s.key.new:  # keys stored before RoPE: QAQ's attention needs them rotated too
                wanted[s.key.new] = f"{s.index}.k_rope"
    out: dict[str, list[torch.Tensor]] = {f"{s.index}.scale": [torch.tensor(s.scale)] for s in sites}
    _, _, mask, _ = example_hf_inputs(1, seq_len, model.device, seq_len)
    for ids in tqdm(samples, desc="calibrating", unit="sample"):
        rec = Recorder(gm, wanted)
        if not with_grads:
            with torch.no_grad():
                rec.run(ids[None].to(model.device), torch.arange(seq_len), mask, torch.arange(seq_len)[None])
            for name, act in rec.values.items():
                if not torch.isfinite(act).all():
                    raise InputError(f"layer {name}: NaN/inf in the activations during calibration; check the "
                                     "calibration data and the model's weights")
                out.setdefault(name, []).append(act[0].float())
            continue
        with torch.enable_grad():
            logits = rec.run(ids[None].to(model.device), torch.arange(seq_len), mask, torch.arange(seq_len)[None])
            loss = F.cross_entropy(logits[0, :-1].float(), ids[1:].to(logits.device))
            names = list(rec.values)
            grads = torch.autograd.grad(loss, [rec.values[n] for n in names])
        # The cache writes are in place, so the cache buffers now carry this sample's autograd graph: cut it before
        # the next sample chains onto it. With the del below, peak RSS over 3 x 2048 SmolLM2 samples went from
        # 9.6 GB to 7.7 GB (one sample's forward and backward) and grows per sample only by the recorded tensors.
        for buf in gm.buffers():
            if buf.grad_fn is not None:
                buf.detach_()
        for name, grad in zip(names, grads):
            act = rec.values[name].detach()[0]
            if not (torch.isfinite(act).all() and torch.isfinite(grad).all()):
                raise InputError(f"layer {name}: NaN/inf in the activations or gradients during calibration; check "
                                 "the calibration data and the model's weights")
            out.setdefault(name, []).append(act.float())
            out.setdefault(name + ".fisher", []).append(grad.detach()[0].float().pow(2))
        del logits, loss, grads, rec  # the logits alone are 0.4 GB at 2k tokens with a 49k vocabulary
    return out


def subsample(x: torch.Tensor, w: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = x.reshape(-1), w.reshape(-1)
    if x.numel() <= MAX_FIT_SAMPLES:
        return x, w
    idx = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))[:MAX_FIT_SAMPLES]
    return x[idx], w[idx]


def fit_statics(cs: CacheSpec, act: torch.Tensor, fisher: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Static tensors of one cache from activations ``[N, H, T, D]`` and their Fisher weights. The first
    ``cs.sink`` tokens of each sample are left out: they are stored at model precision, and the first token's
    keys are often far outside every other token's range."""
    spec, out = cs.format, {}
    act, fisher = act[:, :, cs.sink:], fisher[:, :, cs.sink:]
    x = act.permute(1, 0, 2, 3).reshape(act.shape[1], -1, act.shape[-1])  # [H, N*T, D]
    w = fisher.permute(1, 0, 2, 3).reshape_as(x)
    if spec.static:
        f = spec.outlier_frac
        lo = torch.quantile(x, f / 2, dim=1) if f else x.amin(1)
        hi = torch.quantile(x, 1 - f / 2, dim=1) if f else x.amax(1)
        out["lo"] = lo[None, :, None, :].to(spec.scale_dtype)
        out["hi"] = hi[None, :, None, :].to(spec.scale_dtype)
        if f:
            out["sens"] = sensitivity(w)
    if spec.kind != "nuq":
        return out
    if spec.static:
        center, half = (out["hi"].float() + out["lo"].float())[0] / 2, (out["hi"].float() - out["lo"].float())[0] / 2
        xn = ((x - center) / half.clamp_min(1e-12)).clamp(-1, 1)  # [H, N*T, D]
        keep = torch.ones_like(xn, dtype=torch.bool)
        if spec.outlier_frac:
            score = (x - center).abs() / half.clamp_min(1e-12)
            _, picked = outliers.split(x, spec.outlier_frac, score)
            keep = ~picked
        if spec.channel_lut:
            return out | channel_luts(spec, xn, w, keep, seed)
    else:
        exclude = None
        if spec.outlier_frac:
            _, exclude = outliers.split(x, spec.outlier_frac)
        g = spec.group or x.shape[-1]
        xg = x.reshape(*x.shape[:-1], -1, g)
        xn, _, _ = normalize(xg, None if exclude is None else exclude.reshape(xg.shape))
        xn = xn.reshape(x.shape)
        keep = torch.ones_like(xn, dtype=torch.bool) if exclude is None else ~exclude
    samples, weights = subsample(xn[keep], w[keep], seed)
    lut = fit_lut(samples, spec.bits, weights)
    out["lut"] = lut.to(torch.float16)
    if spec.qnorm:
        out["qnorm"] = qnorm_affine(lut.half().float(), samples)
    return out


def sensitivity(w: torch.Tensor) -> torch.Tensor:
    """Mean Fisher information of each head and channel (``w`` ``[H, M, D]``) over the layer's mean, as fp16
    ``[1, H, 1, D]``: the weight of each channel's coding error when a vector picks its outliers."""
    mean = w.mean(1)
    return (mean / mean.mean().clamp_min(1e-30)).clamp(1e-4, 1e4)[None, :, None, :].half()


def channel_luts(spec, xn: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """One LUT per head and channel from normalised values ``[H, M, D]``, their Fisher weights and the mask of
    non-outliers, as ``[1, H, 1, D, 2**B]``, with the layer's Q-Norm fitted over every channel's decoded values."""
    h, m, d = xn.shape
    if m > MAX_FIT_SAMPLES // 4:  # the same tokens for every channel keeps the rows rectangular
        cols = torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:MAX_FIT_SAMPLES // 4]
        xn, w, keep = xn[:, cols], w[:, cols], keep[:, cols]
    weights = (w * keep).permute(0, 2, 1).reshape(h * d, -1)  # weight 0 leaves an outlier out
    lut = fit_lut_rows(xn.permute(0, 2, 1).reshape(h * d, -1), spec.bits, weights).reshape(1, h, 1, d, -1).half()
    out = {"lut": lut}
    if spec.qnorm:
        rows_in = xn.unsqueeze(0)  # [1, H, M, D]: tokens as rows
        q = lookup_per_channel(nearest_per_channel(rows_in, lut.float()), lut.float())
        # the outlier mask, not the weights: a token with zero Fisher information (the last one of each sample,
        # whose logits are not scored) is still a value Q-Norm must match
        out["qnorm"] = qnorm_affine(lut.float(), rows_in[keep[None]], q[keep[None]])
    return out


def calibrate(
    model,
    texts,
    method: str | MethodConfig,
    n_samples: int = 16,
    seq_len: int = 2048,
    tokenizer=None,
    seed: int = 0,
) -> Calibration:
    """Fit ``method``'s static tensors on ``texts`` (strings, with ``tokenizer``, or token-id tensors)."""
    from kvpass.compile import capture_model

    m = get_method(method)
    samples = token_samples(texts, tokenizer, n_samples, seq_len, seed)
    model.eval()
    captured = capture_model(model, max_cache_len=seq_len, batch_size=1)  # one export for recording and ranking
    acts = record(model, samples, m, captured)
    layers = sorted({int(k.split(".")[0]) for k in acts})
    meta = {"n_samples": n_samples, "seq_len": seq_len, "seed": seed, "layers": len(layers)}
    if m.qaq is not None:
        tensors, meta["eps"] = fit_qaq(acts, layers, m.qaq, seed, next(model.parameters()).dtype)
        return Calibration(m.name, config_hash(model), tensors, meta)
    calibration = Calibration(m.name, config_hash(model), fit_recorded(acts, layers, m, seed), meta)
    if m.sensitive_layers:
        promote_sensitive(calibration, model, samples, acts, layers, m, seed, captured)
    return calibration


def promote_sensitive(calibration: Calibration, model, samples: list[torch.Tensor], acts: dict, layers: list[int],
                      method: MethodConfig, seed: int, captured=None) -> None:
    """Choose the method's ``sensitive_layers`` by their loss on the calibration samples (:mod:`kvpass.sensitivity`)
    and refit those layers' static tensors for ``sensitive_spec``; both are recorded in ``calibration``."""
    from kvpass.sensitivity import layer_losses, most_sensitive

    quantized = [layer for layer in layers if layer not in method.full_precision_layers]
    if method.sensitive_layers > len(quantized):
        raise KVPassError(f"method {method.name!r} keeps {method.sensitive_layers} sensitive layers in "
                          f"{method.sensitive_spec}, but the model has {len(quantized)} quantized layers; lower "
                          "sensitive_layers")
    losses = layer_losses(model, samples, method, calibration, quantized, captured)
    chosen = most_sensitive(losses, method.sensitive_layers)
    calibration.tensors = {k: v for k, v in calibration.tensors.items() if int(k.split(".")[0]) not in chosen}
    calibration.tensors |= fit_recorded(acts, list(chosen), replace(method, promoted_layers=chosen), seed)
    calibration.meta["layer_loss"] = {str(layer): loss for layer, loss in losses.items()}
    calibration.meta["promoted_layers"] = list(chosen)


def fit_recorded(acts: dict[str, list[torch.Tensor]], layers: list[int], method: MethodConfig, seed: int = 0,
                 fisher_weights: bool = True) -> dict[str, torch.Tensor]:
    """Every layer's static key and value tensors (``"{layer}.{k|v}.{name}"``) fitted from :func:`record`'s output.
    ``fisher_weights=False`` fits the LUTs by plain k-means (every sample weighted 1)."""
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        for which in ("k", "v"):
            act = torch.stack(acts[f"{layer}.{which}"])  # [N, H, T, D]
            fisher = torch.stack(acts[f"{layer}.{which}.fisher"])
            if not fisher_weights:
                fisher = torch.ones_like(fisher)
            cs = method.key_spec(act.shape[-1], layer) if which == "k" else method.value_spec(act.shape[-1], layer)
            for name, t in fit_statics(cs, act, fisher, seed).items():
                tensors[f"{layer}.{which}.{name}"] = t.contiguous()
    return tensors


def fit_qaq(acts: dict[str, list[torch.Tensor]], layers: list[int], config, seed: int = 0,
            dtype: torch.dtype = torch.float16) -> tuple[dict[str, torch.Tensor], float]:
    """QAQ's eps (given, or solved for the target bits over every layer), each layer's share of tokens per tier
    for keys and values, and the calibrated tensors (ranges, LUTs) of the key and value tiers that have them."""
    from kvpass import qaq

    nums = {}
    for layer in layers:
        scale = float(acts[f"{layer}.scale"][0])
        rotated = acts.get(f"{layer}.k_rope", acts[f"{layer}.k"])  # what attends (keys may be stored before RoPE)
        pairs = [qaq.sensitivities(q, k_rope, v, scale, config, stored_k=k)
                 for q, k_rope, k, v in zip(acts[f"{layer}.q"], rotated, acts[f"{layer}.k"], acts[f"{layer}.v"])]
        nums[layer] = tuple(torch.stack(x) for x in zip(*pairs))
    hkv, _, dk = acts[f"{layers[0]}.k"][0].shape
    dv = acts[f"{layers[0]}.v"][0].shape[-1]
    # keys stored before RoPE: one int32 position id per slot, shared by every layer (kvpass.passes.rope)
    shared = 32.0 / (len(layers) * hkv * (dk + dv)) if f"{layers[0]}.k_rope" in acts else 0.0
    eps = config.eps or qaq.solve([n[0] for n in nums.values()], [n[1] for n in nums.values()], config, dk, dv, dtype,
                                  shared)
    tensors = {}
    for layer, (nk, nv) in nums.items():
        for which, num in (("k", nk), ("v", nv)):
            tensors[f"{layer}.{which}.tier_share"] = qaq.shares(num, eps, config.tier_bits)
            tensors[f"{layer}.{which}.eps"] = torch.tensor(eps, dtype=torch.float64)
        for which in "kv":
            for t, tier in enumerate(config.tiers_for(which)):
                cs = parse_cache_spec(tier)
                if not static_names(cs):
                    continue
                # every token, the first left out (sink=1 only trims it from the fit): its keys are often far
                # outside the others' ranges, and the sink is stored in the highest tier anyway
                act, fisher = torch.stack(acts[f"{layer}.{which}"]), torch.stack(acts[f"{layer}.{which}.fisher"])
                for name, x in fit_statics(replace(cs, sink=1), act, fisher, seed).items():
                    tensors[f"{layer}.{which}.t{t}_{name}"] = x.contiguous()
    return tensors, eps
