"""``kvpass.compile``: the method and its calibration resolved, then the pipeline (:mod:`kvpass.pipeline`)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from kvpass.calibration.calibrate import calibrate
from kvpass.calibration.store import Calibration
from kvpass.errors import KVPassError, is_int
from kvpass.methods.base import MethodConfig, get_method
from kvpass.model import KVPassModel
from kvpass.pipeline.build import build
from kvpass.pipeline.capture import Captured, capture_model


def looks_like_path(text: str) -> bool:
    """Whether a calibration string names a saved calibration rather than being text to calibrate on: an existing
    ``.json``, or one short word ending in ``.json``/``.safetensors`` or holding a ``/`` (a mistyped path is an
    error, not a text of a few tokens)."""
    if "\n" in text or " " in text or len(text) > 255:
        return False
    try:
        if Path(text).with_suffix(".json").exists():
            return True
    except (OSError, ValueError):
        return False
    return text.endswith((".json", ".safetensors")) or "/" in text


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
    if isinstance(calibration, Path) or (isinstance(calibration, str) and looks_like_path(calibration)):
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
    batch_size: int | None = None,
    example_inputs: tuple | None = None,
    attention: str = "fused",
    prefill_chunk: int = 512,
    calibration=None,
    tokenizer=None,
) -> KVPassModel:
    """Rewrite ``model`` so that its KV cache is stored with ``method`` (see :func:`kvpass.methods`).

    A transformers causal LM is wrapped in a static cache of ``batch_size`` (default 1) x ``max_cache_len`` tokens
    (default ``min(4096, max_position_embeddings)``) and exported. Any other module must already hold its cache as buffers
    and is exported as it is with ``example_inputs=(tokens [B, T], positions [T], ...)``. ``model`` may also be
    the result of :func:`capture_model`, which skips the export.
    ``attention="load"`` keeps the original attention op over a dequantized cache (for debugging).
    ``calibration``: a :class:`Calibration`, a path to a saved one, or texts (or token ids) to calibrate on.
    """
    config = get_method(method)
    if not is_int(prefill_chunk) or prefill_chunk < 1:
        raise KVPassError(f"prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
    fresh = not isinstance(model, Captured)
    if fresh:
        captured = capture_model(model, max_cache_len=max_cache_len, batch_size=1 if batch_size is None else batch_size,
                                 example_inputs=example_inputs)
    else:
        captured = model
        asked = {"max_cache_len": (max_cache_len, captured.info.max_cache_len),
                 "batch_size": (batch_size, captured.info.batch_size)}
        wrong = {k: v for k, v in asked.items() if v[0] is not None and v[0] != v[1]}
        if wrong or example_inputs is not None:
            got = ", ".join(f"{k}={v[1]}" for k, v in asked.items())
            raise KVPassError(f"this captured program was exported with {got}; sizes and example_inputs are fixed at "
                              "capture: capture again with kvpass.capture_model(model, max_cache_len=..., "
                              "batch_size=...), or leave them out here")
    calib = resolve_calibration(calibration, model, config, tokenizer, captured)
    return build(captured, config, calib, attention=attention, prefill_chunk=prefill_chunk, reuse_graph=fresh)
