"""The qaq presets."""

from kvpass.methods.base import MethodConfig, register_method
from kvpass.methods.qaq import handler as _handler  # noqa: F401  (registers the QAQ handler)
from kvpass.methods.qaq.config import QAQConfig

# keys in the low tiers are coded per channel against calibrated ranges, as KVQuant's are: per token at 2 bits a few
# outlier channels ruin them
_QAQ_KEYS = ("nuq2:per_channel:static:channel_lut:qnorm+outliers1%", "nuq4:per_channel:static:channel_lut+outliers1%",
             "int8:per_token", "fp16")
register_method(MethodConfig(
    "qaq", "QAQ: per-token key and value bits from attention over a 5-step window, tiers of 2 and 4 bits (1% fp16 "
    "outliers; keys nuq per channel with calibrated ranges, values int per token), int8, fp16; eps solved on "
    "calibration data for 4 bits/elem, 4x smaller than fp16 (needs calibration)",
    "none", "none", max_chunk=32, qaq=QAQConfig(target_bits=4.0, key_tiers=_QAQ_KEYS), quality_bound=0.05))
# qaq-6x: values per channel against calibrated ranges too (a per-token scale and zero take too much of 2.67 bits),
# keys before RoPE, a long window in int8, no Q-Norm (the recipe's ablations: docs/methods/qaq.md); each layer's eps
# solved on its own, so that a layer whose key bias widens its ranges cannot take every other layer's high tiers
_6X_KEYS = ("nuq2:per_channel:static:channel_lut+outliers1%", "int4:per_token+outliers1%", *_QAQ_KEYS[2:])
_6X_VALUES = ("nuq2:per_channel:static:channel_lut", "int4:per_token+outliers1%", "int8:per_token", "fp16")
register_method(MethodConfig(
    "qaq-6x", "QAQ solved for 2.67 bits/elem at 2k tokens with everything counted (6x smaller than fp16): keys "
    "stored before RoPE, an 81-step attention window (its 80 newest tokens in int8 with a scale each), tiers of 2 "
    "bits (nuq per channel with calibrated ranges for keys and values; 1% fp16 key outliers), 4 (int per token, 1% "
    "outliers), 8 and 16; each layer's eps solved for the target on its own (needs calibration)", "none", "none",
    max_chunk=32, pre_rope_keys=True, quality_bound=0.03,
    qaq=QAQConfig(target_bits=16 / 6, target_context=2048, window=81, window_dtype="int8", per_layer_eps=True,
                  key_tiers=_6X_KEYS, tiers=_6X_VALUES)))
# qaq-1%: quality adaptive, the paper's knob: the fewest bits that keep the calibration windows within +1%
register_method(MethodConfig(
    "qaq-1%", "QAQ adaptive to quality: the tiers, window and keys of qaq-6x, each layer's eps solved for the "
    "fewest bits per element at which the calibration windows' perplexity rises at most 1% over the "
    "model-precision cache (measured during calibration; the bits follow from the model)", "none", "none",
    max_chunk=32, pre_rope_keys=True, quality_bound=0.01,
    qaq=QAQConfig(tolerance=0.01, target_context=2048, window=81, window_dtype="int8", per_layer_eps=True,
                  key_tiers=_6X_KEYS, tiers=_6X_VALUES)))
