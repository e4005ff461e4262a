"""KVQuant (Hooper et al. 2024): nuq keys per channel before RoPE against calibrated ranges, nuq values per
token, Fisher-weighted LUTs, an attention sink; the ``-1%`` presets add dense-and-sparse outliers, the most
sensitive layer in int8 and a window of newest tokens read at model precision (deviations:
``docs/methods/kvquant.md``)."""

from kvpass.methods import specs as _specs  # noqa: F401  (registers their handler)
from kvpass.methods.base import MethodConfig, register_method

# each query reads its newest tokens at model precision: attention is mostly local (docs/methods/kvquant.md)
RECENT = 16
# the documented rise of the calibration windows' perplexity each preset stays under (checked after calibration:
# kvpass.calibration.guard); the -1% presets' are those of the issue's targets, the plain ones have measured margin
BOUNDS = {(4, ""): 0.03, (3, ""): 0.10, (2, ""): 0.60, (4, "+outliers1%"): 0.005, (3, "+outliers1%"): 0.02,
          (2, "+outliers1%"): 0.08}
for _bits in (4, 3, 2):
    _qn = ":qnorm" if _bits == 2 else ""
    for _out in ("", "+outliers1%"):
        _win = f"|recent={RECENT}" if _out else ""
        register_method(MethodConfig(
            f"kvquant-{_bits}bit" + ("-1%" if _out else ""),
            f"KVQuant: nuq{_bits} keys per channel before RoPE with calibrated ranges and a LUT per channel, "
            f"nuq{_bits} values per token, Fisher-weighted LUTs, first token at model precision"
            + (", 1% dense-and-sparse outliers" if _out else "") + (", Q-Norm" if _qn else "")
            + (f", each query's {RECENT} newest tokens at model precision; the one layer whose coding costs the most "
               "loss on the calibration data in int8 with 1% outliers (not in the bits figure: it adds about "
               "(8.6 - bits) / layers)" if _out else "")
            + " (needs calibration)",
            f"nuq{_bits}:per_channel:static:channel_lut{_qn}{_out}|sink=1{_win}",
            f"nuq{_bits}:per_token{_qn}{_out}|sink=1{_win}",
            pre_rope_keys=True, sensitive_layers=1 if _out else 0, quality_bound=BOUNDS[_bits, _out]))
