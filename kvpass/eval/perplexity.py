"""Perplexity with the quantized cache read for every token (as KVQuant evaluates): a whole window is written
to the cache and attended through it in one call, so every prediction sees only dequantized keys and values."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def _summarise(total_nll: float, total_tokens: int, seconds: float, prefill_tokens: int) -> PerplexityResult:
    nll = total_nll / total_tokens
    return PerplexityResult(math.exp(nll), nll, prefill_tokens, seconds)


def nll_sum(logits: torch.Tensor, window: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of ``window`` under ``logits`` ``[T, V]``."""
    loss = F.cross_entropy(logits[:-1].float(), window[1:].to(logits.device), reduction="sum")
    return float(loss), len(window) - 1


def kvpass_perplexity(qmodel, windows: list[torch.Tensor], desc: str = "perplexity") -> PerplexityResult:
    """Perplexity of a :class:`~kvpass.KVPassModel`, one window per call through its packed cache."""
    total, count, seconds, seen = 0.0, 0, 0.0, 0
    for w in tqdm(windows, desc=desc, unit="window", leave=False):
        qmodel.reset()
        start = time.perf_counter()
        logits = qmodel(w[None])[0]
        seconds += time.perf_counter() - start
        s, n = nll_sum(logits, w)
        total, count, seen = total + s, count + n, seen + len(w)
    return _summarise(total, count, seconds, seen)


@torch.no_grad()
def hf_perplexity(model, windows: list[torch.Tensor], desc: str = "perplexity") -> PerplexityResult:
    """The same perplexity computed directly with transformers (full-precision dynamic cache)."""
    total, count, seconds, seen = 0.0, 0, 0.0, 0
    for w in tqdm(windows, desc=desc, unit="window", leave=False):
        start = time.perf_counter()
        logits = model(w[None].to(model.device)).logits[0]
        seconds += time.perf_counter() - start
        s, n = nll_sum(logits, w)
        total, count, seen = total + s, count + n, seen + len(w)
    return _summarise(total, count, seconds, seen)


@torch.no_grad()
def quantized_cache_perplexity(model, windows: list[torch.Tensor], make_cache, desc: str = "perplexity",
                               batch_size: int = 8) -> PerplexityResult:
    """Perplexity of a model using a transformers cache object (the QuantizedCache peers), teacher-forced one token
    at a time so that every token after the first reads the cache as it is stored.

    Windows of equal length run ``batch_size`` at a time, one cache for the batch: a decode step of a small model on
    a CPU costs about the same for 8 rows as for 1, and the peers quantize each row's groups on their own (groups
    run along a token's channels), so the numbers are those of one window at a time."""
    total, count, seconds, seen = 0.0, 0, 0.0, 0
    groups = _equal_length_batches(windows, batch_size)
    with tqdm(total=len(windows), desc=desc, unit="window", leave=False) as bar:
        for batch in groups:
            ids = torch.stack(batch).to(model.device)
            cache = make_cache()
            logits = []
            start = time.perf_counter()
            for i in range(ids.shape[1]):
                out = model(ids[:, i:i + 1], cache=cache, use_cache=True)
                logits.append(out.logits[:, -1])
            seconds += time.perf_counter() - start
            logits = torch.stack(logits, dim=1)
            for row, w in zip(logits, batch):
                s, n = nll_sum(row, w)
                total, count, seen = total + s, count + n, seen + len(w)
            bar.update(len(batch))
    return _summarise(total, count, seconds, seen)


def _equal_length_batches(windows: list[torch.Tensor], batch_size: int) -> list[list[torch.Tensor]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    by_length: dict[int, list[torch.Tensor]] = {}
    for w in windows:
        by_length.setdefault(len(w), []).append(w)
    return [ws[i:i + batch_size] for ws in by_length.values() for i in range(0, len(ws), batch_size)]
