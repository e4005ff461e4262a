"""``kvpass.compile``: capture -> locate -> plan -> rewrite, returning a :class:`KVPassModel`."""

from __future__ import annotations

from torch import nn

from kvpass.capture import capture_hf, capture_module, is_hf_causal_lm
from kvpass.errors import KVPassError
from kvpass.layout import plan
from kvpass.methods import MethodConfig, get_method
from kvpass.model import KVPassModel
from kvpass.passes.locate import locate
from kvpass.passes.rewrite import rewrite

DEFAULT_MAX_CACHE_LEN = 4096


def compile(  # noqa: A001 - the public name users expect: kvpass.compile
    model: nn.Module,
    method: "str | MethodConfig" = "int4",
    *,
    max_cache_len: int | None = None,
    batch_size: int = 1,
    example_inputs: tuple | None = None,
    attention: str = "fused",
    prefill_chunk: int = 512,
) -> KVPassModel:
    """Rewrite ``model`` so that its KV cache is stored with ``method`` (see :func:`kvpass.methods`).

    A transformers causal LM is wrapped in a static cache of ``batch_size`` x ``max_cache_len`` tokens (default
    ``min(4096, max_position_embeddings)``) and exported. Any other module must already hold its cache as buffers
    and is exported as it is with ``example_inputs=(tokens [B, T], positions [T], ...)``.
    ``attention="load"`` keeps the original attention op over a dequantized cache (for debugging).
    """
    config = get_method(method)
    if batch_size < 1:
        raise KVPassError(f"batch_size must be >= 1, got {batch_size}")
    if prefill_chunk < 1:
        raise KVPassError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    model.eval()
    if example_inputs is None:
        if not is_hf_causal_lm(model):
            raise KVPassError(
                f"{type(model).__name__} is not a transformers causal LM; pass example_inputs=(tokens, positions) "
                "for a module that holds its own static KV cache buffers"
            )
        if max_cache_len is None:
            max_cache_len = min(DEFAULT_MAX_CACHE_LEN, getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_CACHE_LEN)
        gm, info = capture_hf(model, batch_size, max_cache_len)
    else:
        gm, info = capture_module(model, example_inputs)
    sites = locate(gm, type(model).__name__)
    layouts = plan(sites, config, info.sliding_window)
    rewrite(gm, sites, layouts, attention)
    return KVPassModel(
        gm, info, sites, layouts, config,
        config=getattr(model, "config", None),
        generation_config=getattr(model, "generation_config", None),
        prefill_chunk=prefill_chunk,
    )
