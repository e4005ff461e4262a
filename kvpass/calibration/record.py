"""Recording: run the captured graph on calibration windows with ``torch.fx.Interpreter`` and keep the keys
(before RoPE when the method stores them so), values and queries the cache would see, with the squared gradients of
the language-model loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kvpass.errors import InputError, KVPassError, is_int
from kvpass.methods.base import MethodConfig
from kvpass.pipeline.capture import capture_model, example_hf_inputs
from kvpass.pipeline.handler import handler_for
from kvpass.pipeline.locate import locate


def token_samples(texts, tokenizer, n_samples: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """``n_samples`` windows of ``seq_len`` token ids drawn from the concatenated texts (deterministic)."""
    for name, value, least in (("n_samples", n_samples, 1), ("seq_len", seq_len, 2)):
        if not is_int(value) or value < least:
            raise KVPassError(f"calibration {name} must be an int >= {least}, got {value!r}")
    if isinstance(texts, (list, tuple)) and not texts:
        raise KVPassError("no calibration texts given; pass strings (with tokenizer=) or token-id tensors")
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
            if t.dtype == torch.bool or t.is_complex():
                raise InputError(f"calibration token ids must be integers, got {t.dtype}")
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
    """Per layer and k/v: activations ``[H, T, D]`` and their squared loss gradients, for every sample. For a method
    whose handler asks for them (QAQ), queries, keys and values (keys also after RoPE, as ``k_rope``, when the method stores them before it),
    gradients only where tiers have calibrated tensors to fit; and each
    layer's softmax scale. ``captured``: the model exported with a cache of the samples' length (else exported
    here)."""
    seq_len = len(samples[0])
    captured = captured or capture_model(model, max_cache_len=seq_len, batch_size=1)
    gm = captured.instantiate()
    sites = locate(gm, captured.name)
    wanted = {}
    with_queries, with_grads = handler_for(method).recording(method)
    for s in sites:
        key = s.rope.pre if method.pre_rope_keys and s.rope is not None else s.key.new
        wanted[key], wanted[s.value.new] = f"{s.index}.k", f"{s.index}.v"
        if with_queries:
            wanted[s.query] = f"{s.index}.q"
            if key is not s.key.new:  # keys stored before RoPE: the attention needs them rotated too
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
        # the next sample chains onto it. With the del below, peak memory is one sample's forward and backward and
        # grows per sample only by the recorded tensors.
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
        del logits, loss, grads, rec  # the logits of a long window over a large vocabulary are large
    return out
