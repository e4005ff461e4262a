"""An undo log for the state ops rewrite wherever they choose (overlay entries, QAQ tiers).

A step that fails part-way has already run the layers before the failing one. Rings and small per-sequence state
are cloned whole before a step; the large entry buffers are not (that would double the cache for a step): instead
the ops that overwrite their rows record the rows' old contents here while :func:`recording` is active (a few rows a
token), and a failed step puts them back in reverse order.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch

_ACTIVE: contextvars.ContextVar[Journal | None] = contextvars.ContextVar("kvpass_journal", default=None)


class Journal:
    """How to put back what a step overwrote, in the order it was overwritten."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def save(self, buf: torch.Tensor, index: tuple[torch.Tensor, ...]) -> None:
        """Remember ``buf[index]`` (advanced indexing) as it is now."""
        old = buf[index].clone()

        def put_back() -> None:
            buf[index] = old
        self._undo.append(put_back)

    def save_taken(self, rows: torch.Tensor, taken: torch.Tensor, old: torch.Tensor) -> None:
        """Remember the entries of ``rows`` ``[B, H, C, D]`` that a call's tokens took (``taken`` ``[B, H, T]``, in
        token order), each token's with the row it overwrote (``old`` ``[B, H, T, D]``). Nothing is computed until
        an undo: this runs on every decoding step."""
        def put_back() -> None:
            for t in reversed(range(taken.shape[-1])):  # the first overwrite's row ends in place
                index = taken[..., t, None, None].expand(*taken.shape[:2], 1, rows.shape[-1])
                rows.scatter_(2, index, old[:, :, t:t + 1])
        self._undo.append(put_back)

    def undo(self) -> None:
        """Put everything back, newest first, so a row overwritten twice ends as it was first."""
        for put_back in reversed(self._undo):
            put_back()
        self._undo.clear()

    def __len__(self) -> int:
        return len(self._undo)


def active() -> Journal | None:
    """The journal of the step being run, or None outside one (export, tests of a single op)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def recording() -> Iterator[Journal]:
    """Record overwritten rows for the duration of the block."""
    journal = Journal()
    token = _ACTIVE.set(journal)
    try:
        yield journal
    finally:
        _ACTIVE.reset(token)


def save_taken(rows: torch.Tensor, taken: torch.Tensor, old: torch.Tensor) -> None:
    """:meth:`Journal.save_taken` on the active journal, if any."""
    log = active()
    if log is not None:
        log.save_taken(rows, taken, old)
