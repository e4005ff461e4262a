"""The naive baselines: the model-precision cache and per-token int8, fp8, int4 and int2."""

from kvpass.methods import specs as _specs  # noqa: F401  (registers their handler)
from kvpass.methods.base import MethodConfig, register_method

register_method(MethodConfig("fp16", "no quantization: the cache in the model's own dtype (exactness check)",
                             "none", "none"), "none")
register_method(MethodConfig("int8", "int8 keys and values, per-token min/max with fp16 scale and zero",
                             "int8:per_token", "int8:per_token"))
register_method(MethodConfig("fp8", "fp8 e4m3 keys and values with a per-token fp16 scale",
                             "fp8_e4m3:per_token", "fp8_e4m3:per_token"))
register_method(MethodConfig("int4", "int4 keys and values, per-token groups of 64 (naive baseline)",
                             "int4:per_token:g64", "int4:per_token:g64"))
register_method(MethodConfig("int4-c", "int4 as above, centred: keys before RoPE, every token minus the mean of the "
                             "prompt's first 64 (no calibration)", "int4:per_token:g64|centre=64",
                             "int4:per_token:g64|centre=64", pre_rope_keys=True))
register_method(MethodConfig("int2", "int2 keys and values, per-token groups of 64 (naive baseline)",
                             "int2:per_token:g64", "int2:per_token:g64"))
