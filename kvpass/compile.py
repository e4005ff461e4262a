"""``kvpass.compile``: the method and its calibration resolved, then the pipeline (:mod:`kvpass.pipeline`)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from kvpass.calibration.calibrate import calibrate
from kvpass.calibration.store import Calibration
from kvpass.errors import KVPassError
from kvpass.methods.base import MethodConfig, get_method
from kvpass.model import KVPassModel
from kvpass.pipeline.build import build
from kvpass.pipeline.capture import Captured, capture_model


def resolve_calibration(calibration, model, config: MethodConfig, tokenizer, captured: Captured) -> Calibration | None:
    """``calibration`` as a checked :class:`Calibration`: loaded from a path, fitted from texts, or as given."""
    if calibration is None:
        if config.needs_calibration:
            raise KVPassError(
                f"method {config.name!r} needs calibration (calibrated ranges, QAQ's tier shares or its sensitive "
                f"layers come from it): pass "
                f"calibration=kvpass.calibrate(model, texts, method={config.name!r}) (or the texts themselves)"
            )
        return None
    if isinstance(calibration, Path) or (isinstance(calibration, str) and Path(calibration).with_suffix(".json").exists()):
        calibration = Calibration.load(calibration)
    elif isinstance(calibration, str):
        calibration = [calibration]
    if not isinstance(calibration, Calibration):
        if isinstance(model, Captured):
            raise KVPassError("to calibrate while compiling, pass the model itself, not a captured program")
        limit = captured.info.max_cache_len
        calibration = calibrate(model, calibration, config, seq_len=min(2048, limit), tokenizer=tokenizer)
    calibration.check(captured.config if captured.config is not None else model, config)
    return calibration


def compile(
    model: nn.Module | Captured,
    method: str | MethodConfig = "int4",
    *,
    max_cache_len: int | None = None,
    batch_size: int = 1,
    example_inputs: tuple | None = None,
    attention: str = "fused",
    prefill_chunk: int = 512,
    calibration=None,
    tokenizer=None,
) -> KVPassModel:
    """Rewrite ``model`` so that its KV cache is stored with ``method`` (see :func:`kvpass.methods`).

    A transformers causal LM is wrapped in a static cache of ``batch_size`` x ``max_cache_len`` tokens (default
    ``min(4096, max_position_embeddings)``) and exported. Any other module must already hold its cache as buffers
    and is exported as it is with ``example_inputs=(tokens [B, T], positions [T], ...)``. ``model`` may also be
    the result of :func:`capture_model`, which skips the export.
    ``attention="load"`` keeps the original attention op over a dequantized cache (for debugging).
    ``calibration``: a :class:`Calibration`, a path to a saved one, or texts (or token ids) to calibrate on.
    """
    config = get_method(method)
    if prefill_chunk < 1:
        raise KVPassError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    fresh = not isinstance(model, Captured)
    captured = capture_model(model, max_cache_len=max_cache_len, batch_size=batch_size,
                             example_inputs=example_inputs) if fresh else model
    calib = resolve_calibration(calibration, model, config, tokenizer, captured)
    return build(captured, config, calib, attention=attention, prefill_chunk=prefill_chunk, reuse_graph=fresh)
