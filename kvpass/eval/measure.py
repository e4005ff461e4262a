"""Peak memory and decode speed measurements."""

from __future__ import annotations

import threading
import time
from typing import Self

import torch


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak on a GPU, process RSS sampled every 5 ms on CPU."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak = 0

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        self._proc = psutil.Process()
        self._base = self._proc.memory_info().rss
        self._max = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._proc.memory_info().rss)
            self.peak = self._max - self._base


def decode_tokens_per_s(step, prompt_len: int, steps: int, vocab: int, reset=None) -> float:
    """Single-token steps per second after a prompt of ``prompt_len`` tokens; ``step(ids)`` runs one call."""
    g = torch.Generator().manual_seed(0)
    if reset is not None:
        reset()
    step(torch.randint(0, vocab, (1, prompt_len), generator=g))
    start = time.perf_counter()
    for _ in range(steps):
        step(torch.randint(0, vocab, (1, 1), generator=g))
    return steps / (time.perf_counter() - start)
