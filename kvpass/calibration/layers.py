"""Which layers' caches the model is most sensitive to: the language-model loss on calibration windows with one
layer's cache quantized at a time (every other layer at model precision), relative to the unquantized cache.

KVQuant's Fisher-weighted reconstruction error ranks coding error within a layer well, but across layers it
can miss the layer that costs the model most; measuring the loss itself finds it (docs/methods/kvquant.md).
It takes one compile and one forward per layer and window, through the same packed cache and fused attention that
inference uses.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from kvpass.calibration.store import Calibration
from kvpass.eval.perplexity import kvpass_perplexity
from kvpass.pipeline.build import build
from kvpass.pipeline.capture import Captured, capture_model

if TYPE_CHECKING:
    from kvpass.methods.base import MethodConfig
    from kvpass.pipeline.handler import FitData

WINDOWS = 2  # calibration samples the loss is measured on
TOKENS = 1024  # of each, the first TOKENS (the ranking needs a few thousand scored tokens, not the whole set)


@torch.no_grad()
def layer_losses(model, samples: list[torch.Tensor], method: MethodConfig, calibration: Calibration,
                 layers: list[int], captured=None) -> dict[int, float]:
    """Per layer in ``layers`` (every quantized layer of the model): the relative change of the calibration
    windows' perplexity when only that layer's cache is coded with ``method`` (its static tensors from
    ``calibration``), against the model-precision cache. ``captured`` is reused when its cache is as long as the
    windows (an export is the slowest step)."""
    windows, captured = scoring_windows(model, samples, captured)
    n = captured.info.max_cache_len
    ref = reference_nll(captured, windows, method)
    every = set(layers) | set(method.full_precision_layers)
    out = {}
    for layer in tqdm(layers, desc="layer sensitivity", unit="layer"):
        alone = replace(method, sensitive_layers=0, promoted_layers=(),
                        full_precision_layers=tuple(sorted(every - {layer})))
        nll = kvpass_perplexity(build(captured, alone, calibration, prefill_chunk=n), windows,
                                desc=f"layer {layer}").nll
        out[layer] = float(torch.tensor(nll - ref).exp() - 1)
    return out


def scoring_windows(model, samples: list[torch.Tensor], captured=None) -> tuple[list[torch.Tensor], Captured]:
    """The calibration windows losses are measured on, and a program captured at their length (``captured`` when it
    already is; :func:`capture_model` otherwise)."""
    windows = [s[:TOKENS] for s in samples[:WINDOWS]]
    n = max(len(w) for w in windows)
    if captured is None or captured.info.max_cache_len != n:
        captured = capture_model(model, max_cache_len=n, batch_size=1)
    return windows, captured


def scoring(data: FitData) -> tuple[list[torch.Tensor], Captured]:
    """:func:`scoring_windows` of a calibration's data, exported once for the layer ranking and the quality guard."""
    if "scoring" not in data.memo:
        data.memo["scoring"] = scoring_windows(data.model, data.samples, data.captured)
    return data.memo["scoring"]


def reference_nll(captured: Captured, windows: list[torch.Tensor], method: MethodConfig) -> float:
    """Mean NLL of ``windows`` through the model-precision cache (what losses are relative to)."""
    n = captured.info.max_cache_len
    return kvpass_perplexity(build(captured, model_precision(method), prefill_chunk=n), windows, desc="fp16").nll


def model_precision(method: MethodConfig) -> MethodConfig:
    """``method`` with keys and values at model precision: the reference the layers' losses are measured from."""
    return replace(method, name=f"{method.name} at model precision", key="none", value="none", pre_rope_keys=False,
                   sensitive_layers=0, promoted_layers=(), full_precision_layers=(), max_chunk=None, qaq=None,
                   overlay=None, scheme=None, balance=False)


def most_sensitive(losses: dict[int, float], count: int) -> tuple[int, ...]:
    """The ``count`` layers with the largest loss increase, in layer order (a NaN loss, a layer whose coding breaks
    the model, counts as the largest)."""
    def cost(layer: int) -> float:
        return math.inf if math.isnan(losses[layer]) else losses[layer]

    return tuple(sorted(sorted(losses, key=lambda layer: (-cost(layer), layer))[:count]))
