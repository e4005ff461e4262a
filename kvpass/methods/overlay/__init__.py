"""The importance overlay: MiKV (every token in low precision, the important ones overlaid in fp16) and the
eviction baselines H2O and StreamingLLM at its memory. The mechanism is in :mod:`kvpass.methods.overlay.op`."""

from kvpass.methods.overlay import op  # noqa: F401  (registers the overlay ops)
from kvpass.methods.overlay.config import OverlayConfig, overlay_nbytes

__all__ = ["OverlayConfig", "overlay_nbytes"]
