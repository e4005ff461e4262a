"""The methods: :mod:`~kvpass.methods.base` (the config and the registry) and one module per family, each
registering its presets: :mod:`~kvpass.methods.baselines` (int/fp8), :mod:`~kvpass.methods.kivi`,
:mod:`~kvpass.methods.kvquant`, :mod:`~kvpass.methods.qaq`, :mod:`~kvpass.methods.overlay` (MiKV, H2O,
StreamingLLM)."""

from kvpass.methods import baselines, kivi, kvquant, turboquant  # noqa: F401  (register their presets)
from kvpass.methods.base import MethodConfig, fit_group, get_method, methods, register_method
from kvpass.methods.overlay import presets as _overlay_presets  # noqa: F401
from kvpass.methods.overlay.config import OverlayConfig, overlay_nbytes
from kvpass.methods.qaq import presets as _qaq_presets  # noqa: F401
from kvpass.methods.qaq.config import QAQConfig

__all__ = ["MethodConfig", "OverlayConfig", "QAQConfig", "fit_group", "get_method", "methods",
           "overlay_nbytes", "register_method"]
