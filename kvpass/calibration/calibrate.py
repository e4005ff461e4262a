""":func:`calibrate`: record, fit the static tensors (QAQ: eps and the tier shares), rank the layers where the
method keeps the most sensitive ones at higher precision."""

from __future__ import annotations

from kvpass.calibration.guard import check_guard
from kvpass.calibration.guard import guard as run_guard
from kvpass.calibration.record import record, token_samples
from kvpass.calibration.store import Calibration, config_hash
from kvpass.errors import KVPassError
from kvpass.methods.base import MethodConfig, get_method
from kvpass.pipeline.capture import capture_model
from kvpass.pipeline.handler import FitData, handler_for


def calibrate(
    model,
    texts,
    method: str | MethodConfig,
    n_samples: int = 16,
    seq_len: int = 2048,
    tokenizer=None,
    seed: int = 0,
    guard: str = "warn",
) -> Calibration:
    """Fit ``method``'s static tensors on ``texts`` (strings, with ``tokenizer``, or token-id tensors), then check
    the calibration windows' perplexity against the method's documented ``quality_bound``: ``guard="warn"`` warns
    past it, ``"raise"`` raises, ``"more-bits"`` spends more bits until it holds, ``"off"`` skips the check
    (:mod:`kvpass.calibration.guard`; the result is in ``calibration.meta["check"]``)."""
    m = get_method(method)
    check_guard(guard)
    samples = token_samples(texts, tokenizer, n_samples, seq_len, seed)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab and any(bool(((s < 0) | (s >= vocab)).any()) for s in samples):
        raise KVPassError(f"calibration token ids fall outside the model's vocabulary [0, {vocab}); tokenize with the "
                          "model's own tokenizer")
    model.eval()
    captured = capture_model(model, max_cache_len=seq_len, batch_size=1)  # one export for recording and ranking
    acts = record(model, samples, m, captured)
    layers = sorted({int(k.split(".")[0]) for k in acts})
    meta = {"n_samples": n_samples, "seq_len": seq_len, "seed": seed, "layers": len(layers)}
    calibration = Calibration(m.name, config_hash(model), {}, meta)
    handler, data = handler_for(m), FitData(model, samples, acts, layers, seed, captured)
    handler.fit(calibration, m, data)
    run_guard(calibration, m, data, handler, guard)
    return calibration
