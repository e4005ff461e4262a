"""TurboQuant-style caches (Zandieh et al. 2025): every token vector rotated by a seeded randomized Hadamard, each
coordinate coded with the Lloyd-Max quantizer of N(0, 1), one norm-corrected fp16 scale per vector. No calibration:
the rotation makes every model's coordinates look alike. Named after vLLM's ``turboquant_*`` KV-cache dtypes."""

from kvpass.methods import specs as _specs  # noqa: F401  (registers their handler)
from kvpass.methods.base import MethodConfig, register_method


def _tq(bits: int) -> str:
    return f"lm{bits}:per_token:hadamard"


for _name, _kb, _vb in (("tq-k8v4", 8, 4), ("tq-4bit", 4, 4), ("tq-k3v4", 3, 4), ("tq-3bit", 3, 3),
                        ("tq-2bit", 2, 2)):
    _what = f"{_kb}-bit" if _kb == _vb else f"{_kb}-bit keys and {_vb}-bit values"
    register_method(MethodConfig(
        _name, f"TurboQuant-style, {_what}: token vectors rotated by a randomized Hadamard, Lloyd-Max codes for "
        "N(0, 1), one norm-corrected fp16 scale per vector (no calibration)", _tq(_kb), _tq(_vb)))
# the keys of some models carry a few channels far larger than the rest, which one scale per vector spends its
# codes on even after the rotation: the largest value of each key vector is kept apart before the rotation
register_method(MethodConfig(
    "tq-4bit-1%", "TurboQuant-style 4-bit with outlier-aware keys: each key vector's largest 1% (one value at head "
    "dim 64) kept in fp16 before the rotation (no calibration)", "lm4:per_token:hadamard+outliers1%", _tq(4)))
# keys stored before RoPE and every token coded minus the prompt's mean (centre=64): a constant offset such as a key
# projection's bias is then removed exactly instead of taking a share of each vector's scale
for _name, _kb, _vb in (("tq-4bit-c", 4, 4), ("tq-k3v4-c", 3, 4), ("tq-3bit-c", 3, 3)):
    _what = f"{_kb}-bit" if _kb == _vb else f"{_kb}-bit keys and {_vb}-bit values"
    register_method(MethodConfig(
        _name, f"TurboQuant-style {_what}, centred: keys before RoPE, every token minus the mean of the prompt's "
        "first 64 (no calibration)", f"{_tq(_kb)}|centre=64", f"{_tq(_vb)}|centre=64", pre_rope_keys=True))
