"""Method handlers: what the pipeline asks of a method family, registered by the type of the family's config.

A :class:`~kvpass.methods.base.MethodConfig` names its family by its ``family`` config (``QAQConfig``,
``OverlayConfig``, a user's own, or ``None`` for one key and one value cache spec per layer). The stages never test
the family: ``plan`` asks :meth:`MethodHandler.plan`, ``rewrite`` :meth:`MethodHandler.add_buffers` and
:meth:`MethodHandler.emit`, calibration :meth:`MethodHandler.recording` and :meth:`MethodHandler.fit`,
``cache_report`` :meth:`MethodHandler.describe`. A new family is a config dataclass and a handler registered for
its type with :func:`register_handler`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import GraphModule, Node

from kvpass.errors import KVPassError

if TYPE_CHECKING:
    from kvpass.calibration.store import Calibration
    from kvpass.kvcache import CacheLayout
    from kvpass.methods.base import MethodConfig
    from kvpass.pipeline.buffers import BufferTable
    from kvpass.pipeline.locate import AttentionSite
    from kvpass.pipeline.plan import KVLayout


@dataclass(frozen=True)
class LayerPlan:
    """A handler's plan of one layer: its key and value caches (None when it keeps none), the bytes of anything
    else it holds, and its own record of the layer for ``emit`` (``detail``)."""

    key: CacheLayout | None
    value: CacheLayout | None
    extra_nbytes: int = 0
    detail: Any = None


@dataclass
class RewriteContext:
    """What a handler's ``add_buffers`` and ``emit`` may use: the graph module being rewritten, its device, the
    attention mode, the method, the calibration (None without one) and the table that registers buffers."""

    gm: GraphModule
    device: torch.device
    attention: str
    method: MethodConfig
    calibration: Calibration | None
    buffers: BufferTable

    def fitted(self, layer: int, which: str) -> dict[str, torch.Tensor]:
        """The calibrated tensors of a layer's keys or values (``which``: "k" or "v") by name; empty without."""
        return self.calibration.for_layer(layer, which) if self.calibration else {}


@dataclass(frozen=True)
class FitData:
    """What calibration recorded, for a handler's ``fit``: the model, its samples, the recorded activations by
    ``"{layer}.{k|v|q}"``, the layer indices, the seed and the captured program (for layer ranking)."""

    model: Any
    samples: list[torch.Tensor]
    acts: dict[str, list[torch.Tensor]]
    layers: list[int]
    seed: int
    captured: Any = None
    memo: dict = field(default_factory=dict, repr=False, compare=False)  # what fit, ranking and guard compute once


class MethodHandler:
    """The hooks of one method family. Every hook gets the method's :class:`MethodConfig`."""

    def validate(self, method: MethodConfig) -> None:
        """Raise a :class:`KVPassError` when ``method`` combines options this family cannot hold."""

    def needs_calibration(self, method: MethodConfig) -> bool:
        """Compiling without a calibration is an error."""
        return False

    def uses_calibration(self, method: MethodConfig) -> bool:
        """Something is fitted on calibration data (without it, defaults are used)."""
        return self.needs_calibration(method)

    def nominal_bits(self, method: MethodConfig, head_dim: int, tokens: int) -> float:
        """Bits per element of keys and values together at ``head_dim`` and ``tokens`` in an fp16 model."""
        raise NotImplementedError

    def plan(self, method: MethodConfig, site: AttentionSite, calibration: Calibration | None) -> LayerPlan:
        """The layer's buffers at the site's shapes."""
        raise NotImplementedError

    def add_buffers(self, ctx: RewriteContext, site: AttentionSite, layout: KVLayout) -> Any:
        """Register the layer's key and value buffers; what is returned is passed to :meth:`emit`."""
        return None

    def emit(self, ctx: RewriteContext, site: AttentionSite, layout: KVLayout, buffers: Any,
             tables: tuple | None) -> Node:
        """Insert the layer's cache writes and its attention (before ``site.output``, which it replaces); ``tables``:
        the RoPE tables of keys stored before RoPE."""
        raise NotImplementedError

    def describe(self, layout: KVLayout) -> tuple[str, str]:
        """What the keys and values hold, for ``cache_report``."""
        return ("evicted", "evicted") if layout.key is None else (str(layout.key.spec), str(layout.value.spec))

    def recording(self, method: MethodConfig) -> tuple[bool, bool]:
        """Whether calibration records the queries, and the loss gradients of keys and values."""
        return False, True

    def fit(self, calibration: Calibration, method: MethodConfig, data: FitData) -> None:
        """Fill ``calibration`` (tensors and meta) from the recorded data."""

    def more_bits(self, calibration: Calibration, method: MethodConfig, data: FitData) -> str | None:
        """Spend more bits where they buy the most quality (the quality guard's ``"more-bits"``), updating
        ``calibration``; what was done in a few words, or None when the family has nothing more to give."""
        return None


_HANDLERS: dict[type, MethodHandler] = {}


def register_handler(config_type: type, handler: MethodHandler) -> MethodHandler:
    """Make ``handler`` the one for methods whose ``family`` config is a ``config_type`` (``type(None)``: one key
    and one value spec per layer)."""
    _HANDLERS[config_type] = handler
    return handler


def handler_for(method: MethodConfig) -> MethodHandler:
    """The handler registered for the type of ``method.family``."""
    kind = type(method.family)
    if kind not in _HANDLERS:
        raise KVPassError(f"method {method.name!r}: no handler is registered for {kind.__name__}; register one with "
                          "kvpass.pipeline.handler.register_handler(config_type, handler)")
    return _HANDLERS[kind]
