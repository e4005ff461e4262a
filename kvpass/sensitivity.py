"""Which layers' caches the model is most sensitive to: the language-model loss on calibration windows with one
layer's cache quantized at a time (every other layer at model precision), relative to the unquantized cache.

KVQuant's Fisher-weighted reconstruction error ranks coding error within a layer well, but across layers it did
not find the layer that costs SmolLM2 most at 4 bits (layer 1: +0.23% perplexity alone, a third of the whole
+0.76%, while Fisher ranked keys of layers 9, 10 and 23 above it, which cost ~0). Measuring the loss itself does:
on two calibration windows of 1024 tokens with kvquant-3bit-1%, layer 1 costs +0.82%, the next (layer 17) +0.39%.
It takes one compile and one forward per layer and window, through the same packed cache and fused attention that
inference uses.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from tqdm import tqdm

from kvpass.eval.perplexity import kvpass_perplexity
from kvpass.methods import MethodConfig

WINDOWS = 2  # calibration samples the loss is measured on
TOKENS = 1024  # of each, the first TOKENS (the ranking needs a few thousand scored tokens, not the whole set)


@torch.no_grad()
def layer_losses(model, samples: list[torch.Tensor], method: MethodConfig, calibration,
                 layers: list[int], captured=None) -> dict[int, float]:
    """Per layer in ``layers`` (every quantized layer of the model): the relative change of the calibration
    windows' perplexity when only that layer's cache is coded with ``method`` (its static tensors from
    ``calibration``), against the model-precision cache. ``captured`` is reused when its cache is as long as the
    windows (an export of SmolLM2 takes ~30 s on 2 cores)."""
    from kvpass.compile import capture_model, compile

    windows = [s[:TOKENS] for s in samples[:WINDOWS]]
    n = max(len(w) for w in windows)
    if captured is None or captured.info.max_cache_len != n:
        captured = capture_model(model, max_cache_len=n, batch_size=1)
    ref = kvpass_perplexity(compile(captured, "fp16", prefill_chunk=n), windows, desc="fp16").nll
    every = set(layers) | set(method.full_precision_layers)
    out = {}
    for layer in tqdm(layers, desc="layer sensitivity", unit="layer"):
        alone = replace(method, sensitive_layers=0, promoted_layers=(),
                        full_precision_layers=tuple(sorted(every - {layer})))
        nll = kvpass_perplexity(compile(captured, alone, prefill_chunk=n, calibration=calibration), windows,
                                desc=f"layer {layer}").nll
        out[layer] = float(torch.tensor(nll - ref).exp() - 1)
    return out


def most_sensitive(losses: dict[int, float], count: int) -> tuple[int, ...]:
    """The ``count`` layers with the largest loss increase, in layer order (a NaN loss, a layer whose coding breaks
    the model, counts as the largest)."""
    def cost(layer: int) -> float:
        return math.inf if math.isnan(losses[layer]) else losses[layer]

    return tuple(sorted(sorted(losses, key=lambda layer: (-cost(layer), layer))[:count]))
