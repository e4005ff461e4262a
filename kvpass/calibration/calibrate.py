""":func:`calibrate`: record, fit the static tensors (QAQ: eps and the tier shares), rank the layers where the
method keeps the most sensitive ones at higher precision."""

from __future__ import annotations

from dataclasses import replace

import torch

from kvpass.calibration.layers import layer_losses, most_sensitive
from kvpass.calibration.record import record, token_samples
from kvpass.calibration.statics import fit_recorded
from kvpass.calibration.store import Calibration, config_hash
from kvpass.errors import KVPassError
from kvpass.methods.base import MethodConfig, get_method
from kvpass.methods.qaq.fit import fit_qaq
from kvpass.pipeline.capture import capture_model


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
