"""The stages in order on a captured program: locate -> plan -> rewrite, returning a :class:`KVPassModel`.
:func:`kvpass.compile` and the calibration's layer ranking both call :func:`build`."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from kvpass.calibration.store import Calibration
from kvpass.errors import KVPassError
from kvpass.model import KVPassModel
from kvpass.pipeline.capture import Captured
from kvpass.pipeline.locate import locate
from kvpass.pipeline.plan import plan
from kvpass.pipeline.rewrite import rewrite

if TYPE_CHECKING:
    from kvpass.methods.base import MethodConfig


def build(captured: Captured, method: MethodConfig, calibration: Calibration | None = None, *,
          attention: str = "fused", prefill_chunk: int = 512, reuse_graph: bool = False) -> KVPassModel:
    """Rewrite a copy of ``captured``'s program onto ``method``'s packed caches (with ``reuse_graph``, the captured
    program itself, whose full-precision cache buffers are then freed when it wrapped a transformers model).
    ``calibration`` must already be checked against the model and method."""
    if prefill_chunk < 1:
        raise KVPassError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    gm = captured.graph_module if reuse_graph else captured.instantiate()
    sites = locate(gm, captured.name)
    layouts = plan(sites, method, captured.info.sliding_window, calibration)
    if layouts and sum(lay.nbytes for lay in layouts) > sum(lay.dense_nbytes for lay in layouts):
        warnings.warn(f"method {method.name!r} at max_cache_len={captured.info.max_cache_len} takes more bytes than the "
                      "full-precision cache (its windows, rings or tables are fixed costs); compile with a longer "
                      "max_cache_len, or use a method without them", stacklevel=3)
    records = rewrite(gm, sites, layouts, method, attention, calibration,
                      free_old=reuse_graph and captured.info.kind == "hf")  # the user's own module keeps its buffers
    chunk = min(prefill_chunk, method.max_chunk or prefill_chunk)
    return KVPassModel(gm, captured.info, sites, layouts, method, records, config=captured.config,
                       generation_config=captured.generation_config, prefill_chunk=chunk)
