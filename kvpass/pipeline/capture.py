"""Capture: export one step of a decoder LM, with its static KV cache held as module buffers.

For a transformers model, :class:`StaticCacheStep` holds a ``StaticCache`` whose tensors are registered as
buffers and runs one step ``(input_ids [B, T], cache_position [T], attention_mask [B, max_cache_len],
position_ids [B, T]) -> logits``. It is exported with ``strict=True`` and a dynamic token dimension, so one
program serves prefill chunks and single-token decode. (``strict=False`` lifts the cache tensors as constants
and silently loses the state between calls.)

Unlike transformers' own export wrapper, the step takes the 2-D padding mask and the position ids, so batched
generation with left padding works: causality runs over cache slots, RoPE over each row's own positions.
Sliding-window layers get a full-length static layer (the window is applied by the mask), as transformers'
export wrapper does, because the ring-buffer layer has data-dependent control flow.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from kvpass.errors import KVPassError, is_int


@dataclass(frozen=True)
class Captured:
    """A captured step that can be rewritten several times (one method each) without exporting again."""

    graph_module: torch.fx.GraphModule
    info: CaptureInfo
    config: object = None
    generation_config: object = None
    name: str = "model"

    def instantiate(self) -> torch.fx.GraphModule:
        """A fresh graph over the same parameters and buffers; rewriting it leaves this capture intact."""
        import copy

        with warnings.catch_warnings():  # torch's own pytree spec copy warns about its deprecated LeafSpec check
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            graph = copy.deepcopy(self.graph_module.graph)
        return torch.fx.GraphModule(self.graph_module, graph)


@dataclass(frozen=True)
class CaptureInfo:
    """What kvpass needs to know about the captured step, beside its graph."""

    kind: str  # "hf": (input_ids, cache_position, attention_mask, position_ids); "module": the module's own inputs
    batch_size: int
    max_cache_len: int
    sliding_window: dict[int, int]  # layer index -> window, for layers whose mask slides


def head_shapes(config) -> tuple[int, int]:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return heads, head_dim


class StaticCacheStep(nn.Module):
    """One decoding step of a transformers causal LM over a static cache held as buffers."""

    def __init__(self, model: nn.Module, batch_size: int, max_cache_len: int) -> None:
        super().__init__()
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

        self.model = model
        config = model.config.get_text_config()
        self.cache = StaticCache(config=config, max_cache_len=max_cache_len)
        self.sliding_window: dict[int, int] = {}
        for i, layer in enumerate(self.cache.layers):
            if isinstance(layer, StaticSlidingWindowLayer):
                self.sliding_window[i] = int(config.sliding_window)
                self.cache.layers[i] = StaticLayer(max_cache_len)
            elif type(layer) is not StaticLayer:
                raise KVPassError(
                    f"layer {i} uses a {type(layer).__name__} cache, which kvpass cannot hold as a static buffer; "
                    "only models whose layers use StaticLayer or StaticSlidingWindowLayer are supported"
                )
        kv_heads, head_dim = head_shapes(config)
        self.cache.early_initialization(batch_size, kv_heads, head_dim, model.dtype, model.device)
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
            self.register_buffer(f"cumulative_length_{i}", layer.cumulative_length, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache_position: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        # The cache layers count written tokens themselves; set the count from the caller's positions so that
        # one program can be re-run from any position (reset, chunked prefill).
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(cache_position[0])
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=self.cache,
            use_cache=True,
        )
        return out.logits


@contextlib.contextmanager
def quiet_export():
    """Silence transformers' output-capturing side-effect warning, which every strict export of an HF model
    prints and which says nothing actionable to a kvpass user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="While compiling, we found certain side effects")
        yield


def is_hf_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "generation_config") and hasattr(model.config, "num_attention_heads")


def example_hf_inputs(batch_size: int, max_cache_len: int, device, tokens: int = 2) -> tuple[torch.Tensor, ...]:
    tokens = min(tokens, max_cache_len)
    ids = torch.zeros(batch_size, tokens, dtype=torch.long, device=device)
    pos = torch.arange(tokens, device=device)
    mask = torch.ones(batch_size, max_cache_len, dtype=torch.long, device=device)
    return ids, pos, mask, pos[None].expand(batch_size, tokens).contiguous()


def capture_hf(model: nn.Module, batch_size: int, max_cache_len: int) -> tuple[torch.fx.GraphModule, CaptureInfo]:
    """Export one step of a transformers causal LM; returns the unlifted graph module and what was captured."""
    if max_cache_len < 2:
        raise KVPassError(f"max_cache_len={max_cache_len} is too small; use at least 2 (typically 1024 or more)")
    step = StaticCacheStep(model, batch_size, max_cache_len).eval()
    tokens = torch.export.Dim("tokens", min=1, max=max_cache_len)
    dynamic = ({1: tokens}, {0: tokens}, None, {1: tokens})
    with torch.no_grad(), quiet_export():
        try:
            ep = torch.export.export(step, example_hf_inputs(batch_size, max_cache_len, model.device),
                                     dynamic_shapes=dynamic, strict=True)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise KVPassError(
                f"torch.export could not trace one step of {type(model).__name__} over a static cache ({first}); "
                "kvpass needs a decoder-only model whose attention reads transformers' StaticCache (SDPA or eager "
                "attention; not flex_attention, encoder-decoder or custom cache classes)"
            ) from err
    info = CaptureInfo("hf", batch_size, max_cache_len, dict(step.sliding_window))
    return ep.module(), info


def check_learned_positions(model: nn.Module, max_cache_len: int) -> None:
    """A model with a table of learned position embeddings (GPT-2, OPT) cannot place tokens past its end."""
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, nn.Embedding) and (leaf in ("wpe", "embed_positions", "position_embeddings")):
            limit = mod.num_embeddings - int(getattr(mod, "offset", 0))
            if max_cache_len > limit:
                raise KVPassError(f"{type(model).__name__} learned position embeddings for {limit} positions "
                                  f"({name}); use max_cache_len <= {limit}")


def capture_module(module: nn.Module, example_inputs: tuple) -> tuple[torch.fx.GraphModule, CaptureInfo]:
    """Export a module that owns its static KV cache buffers, called as ``module(tokens [B, T], positions [T])``
    (or any signature whose first input has a token dimension 1 and second a token dimension 0)."""
    if len(example_inputs) < 2:
        raise KVPassError(
            "example_inputs must be (tokens [B, T], positions [T], ...) for a module that is not a transformers model"
        )
    tokens_in = example_inputs[0]
    if not isinstance(tokens_in, torch.Tensor) or tokens_in.ndim != 2 or tokens_in.shape[1] < 2:
        raise KVPassError("example_inputs[0] must be tokens [B, T] with T >= 2 (torch.export fixes a dimension of "
                          f"size 1, so the program would take one token only); got {getattr(tokens_in, 'shape', tokens_in)}")
    cache_buffers = [b for b in module.buffers() if b.ndim == 4]
    if not cache_buffers:
        raise KVPassError(
            f"{type(module).__name__} holds no 4-D buffer that could be a static KV cache [batch, heads, max_len, "
            "head_dim]; kvpass needs the cache as module buffers (a dynamic cache passed in and out is not supported)"
        )
    max_len = cache_buffers[0].shape[2]
    tokens = torch.export.Dim("tokens", min=1, max=max_len)
    dynamic = ({1: tokens}, {0: tokens}, *([None] * (len(example_inputs) - 2)))
    with torch.no_grad():
        try:
            ep = torch.export.export(module, tuple(example_inputs), dynamic_shapes=dynamic, strict=True)
        except Exception as err:
            raise KVPassError(
                f"torch.export could not trace {type(module).__name__} with a dynamic token dimension: {err}"
            ) from err
    info = CaptureInfo("module", int(tokens_in.shape[0]), int(max_len), {})
    return ep.module(), info


DEFAULT_MAX_CACHE_LEN = 4096


def capture_model(
    model: nn.Module,
    *,
    max_cache_len: int | None = None,
    batch_size: int = 1,
    example_inputs: tuple | None = None,
) -> Captured:
    """Export one step of ``model`` once, to compile it with several methods (``kvpass.compile(captured, m)``)."""
    for name, value in (("batch_size", batch_size), ("max_cache_len", max_cache_len)):
        if value is not None and not is_int(value):
            raise KVPassError(f"{name} must be an int, got {value!r}")
    if batch_size < 1:
        raise KVPassError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(model, nn.Module):
        raise KVPassError(f"kvpass.compile takes a torch module (a transformers causal LM or a decoder holding its "
                          f"cache as buffers), got {type(model).__name__}")
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise KVPassError(f"{type(model).__name__} has weights on the meta device ({on_meta[0]}, ...); load real "
                          "weights (from_pretrained without device_map='meta', or to_empty + load_state_dict) first")
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
        check_learned_positions(model, max_cache_len)
        gm, info = capture_hf(model, batch_size, max_cache_len)
    else:
        gm, info = capture_module(model, example_inputs)
    return Captured(gm, info, getattr(model, "config", None), getattr(model, "generation_config", None),
                    type(model).__name__)
