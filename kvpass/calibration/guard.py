"""The quality guard of a calibration: after fitting, the calibration windows' perplexity through the method's
cache against the model-precision cache, checked against the preset's documented bound
(``MethodConfig.quality_bound``). A preset tuned on one model can break on another; the guard says so at
calibration time instead of leaving a broken cache to be found in production.

Modes: ``"warn"`` (the default) warns with the loss, the bound and the fix; ``"raise"`` raises a
:class:`KVPassError`; ``"more-bits"`` asks the method's handler for more bits (a sensitive layer promoted, QAQ's
target raised) and measures again until the bound holds or nothing is left to give; ``"off"`` skips the check.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import TYPE_CHECKING

from kvpass.calibration.layers import reference_nll, scoring
from kvpass.errors import KVPassError, KVPassWarning
from kvpass.eval.perplexity import kvpass_perplexity
from kvpass.pipeline.build import build

if TYPE_CHECKING:
    from kvpass.calibration.store import Calibration
    from kvpass.methods.base import MethodConfig
    from kvpass.pipeline.handler import FitData, MethodHandler

GUARDS = ("warn", "raise", "more-bits", "off")
UNMEASURED = ("check", "layer_loss", "tolerance_search")  # meta entries that do not change what is stored
MAX_RAISES = 8  # rounds of "more-bits" before giving up (each costs one forward over the scoring windows)


def check_guard(mode: str) -> None:
    if mode not in GUARDS:
        raise KVPassError(f"guard must be one of {', '.join(map(repr, GUARDS))}, got {mode!r}")


def calibration_loss(calibration: Calibration, method: MethodConfig, data: FitData) -> float:
    """Relative perplexity change of the calibration windows through ``method``'s cache (its tensors from
    ``calibration``) against the model-precision cache: 0.01 is +1%; NaN when the method's logits are not finite."""
    # what a calibration's tensors follow from is in its meta (eps, target, promoted layers): measured once each
    state = json.dumps({k: v for k, v in calibration.meta.items() if k not in UNMEASURED}, sort_keys=True, default=str)
    losses = data.memo.setdefault("losses", {})
    if state in losses:
        return losses[state]
    windows, captured = scoring(data)
    if "reference_nll" not in data.memo:
        data.memo["reference_nll"] = reference_nll(captured, windows, method)
    n = captured.info.max_cache_len
    nll = kvpass_perplexity(build(captured, method, calibration, prefill_chunk=n), windows, desc="quality check").nll
    losses[state] = math.expm1(nll - data.memo["reference_nll"]) if math.isfinite(nll) else math.nan
    return losses[state]


def guard(calibration: Calibration, method: MethodConfig, data: FitData, handler: MethodHandler,
          mode: str = "warn") -> None:
    """Measure ``calibration`` (in ``calibration.meta["check"]``) and act on a loss past ``method.quality_bound``
    as ``mode`` says."""
    check_guard(mode)
    if mode == "off":
        return
    bound = method.quality_bound
    loss = calibration_loss(calibration, method, data)
    raised: list[str] = []
    while mode == "more-bits" and bound is not None and not loss <= bound and len(raised) < MAX_RAISES:
        step = handler.more_bits(calibration, method, data)
        if step is None:
            break
        raised.append(step)
        loss = calibration_loss(calibration, method, data)
    windows, _ = scoring(data)
    calibration.meta["check"] = {"loss": loss, "bound": bound, "tokens": sum(len(w) for w in windows),
                                 "raised": raised}
    if bound is None or loss <= bound:
        return
    what = (f"method {method.name!r} raises the calibration windows' perplexity by {_pct(loss)} on this model, past "
            f"its documented bound of +{100 * bound:g}%")
    if raised:
        what += f" even after {len(raised)} step(s) of more bits ({'; '.join(raised)})"
    fix = ("calibrate with guard='more-bits' (kvpass calibrate --guard more-bits) to spend more bits where it "
           "costs least, or choose a method with more bits" if mode != "more-bits" else
           "choose a method with more bits (kvpass methods)")
    if mode == "raise":
        raise KVPassError(f"{what}; {fix}")
    warnings.warn(f"{what}; {fix}", KVPassWarning, stacklevel=3)


def _pct(loss: float) -> str:
    return "an undefined amount (non-finite logits)" if math.isnan(loss) else f"{100 * loss:+.2f}%"
