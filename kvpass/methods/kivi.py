"""KIVI (Liu et al. 2024): keys per channel and values per token in groups of 32, the newest tokens at model
precision in a residual ring until their block of 128 fills."""

from kvpass.methods import specs as _specs  # noqa: F401  (registers their handler)
from kvpass.methods.base import MethodConfig, register_method

for _bits in (2, 4):
    register_method(MethodConfig(
        f"kivi-{_bits}bit",
        f"KIVI: int{_bits} keys per channel in groups of 32 tokens, values per token in groups of 32 channels, the "
        "last 128 tokens at model precision until their block fills",
        f"int{_bits}:per_channel:g32|residual=128", f"int{_bits}:per_token:g32|residual=128"))
