"""``kvpass.compile``: capture -> locate -> plan -> rewrite, returning a :class:`KVPassModel`."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from kvpass.capture import Captured, capture_hf, capture_module, is_hf_causal_lm
from kvpass.errors import KVPassError
from kvpass.layout import plan
from kvpass.methods import MethodConfig, get_method
from kvpass.model import KVPassModel
from kvpass.passes.locate import locate
from kvpass.passes.rewrite import rewrite

DEFAULT_MAX_CACHE_LEN = 4096


def capture_model(
    model: nn.Module,
    *,
    max_cache_len: int | None = None,
    batch_size: int = 1,
    example_inputs: tuple | None = None,
) -> Captured:
    """Export one step of ``model`` once, to compile it with several methods (``kvpass.compile(captured, m)``)."""
    if batch_size < 1:
        raise KVPassError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    if example_inputs is None:
        if not is_hf_causal_lm(model):
            raise KVPassError(
                f"{type(model).__name__} is not a transformers causal LM; pass example_inputs=(tokens, positions) "
                "for a module that holds its own static KV cache buffers"
            )
        if max_cache_len is None:
            limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_CACHE_LEN
            max_cache_len = min(DEFAULT_MAX_CACHE_LEN, limit)
        gm, info = capture_hf(model, batch_size, max_cache_len)
    else:
        gm, info = capture_module(model, example_inputs)
    return Captured(gm, info, getattr(model, "config", None), getattr(model, "generation_config", None),
                    type(model).__name__)


def resolve_calibration(calibration, model, config: MethodConfig, tokenizer, captured: Captured):
    from pathlib import Path

    from kvpass.calibrate import Calibration, calibrate

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
    """
    config = get_method(method)
    if prefill_chunk < 1:
        raise KVPassError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    if isinstance(model, Captured):
        captured = model
        gm = captured.instantiate()
    else:
        captured = capture_model(model, max_cache_len=max_cache_len, batch_size=batch_size, example_inputs=example_inputs)
        gm = captured.graph_module
    sites = locate(gm, captured.name)
    calib = resolve_calibration(calibration, model, config, tokenizer, captured)
    if config.sensitive_layers:
        config = replace(config, promoted_layers=calib.promoted_layers)
    calib_input = calib.as_rewrite_input() if calib else None
    layouts = plan(sites, config, captured.info.sliding_window, calib_input)
    rewrite(gm, sites, layouts, attention, pre_rope_keys=config.pre_rope_keys,
            calibration=calib_input, free_old=not isinstance(model, Captured) and captured.info.kind == "hf",  # the user's module keeps its own
            overlay=config.overlay, balance=config.balance)
    chunk = min(prefill_chunk, config.max_chunk or prefill_chunk)
    return KVPassModel(gm, captured.info, sites, layouts, config, config=captured.config,
                       generation_config=captured.generation_config, prefill_chunk=chunk)
