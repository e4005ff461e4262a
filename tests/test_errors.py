"""Every bad input gets a KVPassError that names the problem and the fix."""

import pytest
import torch

from kvpass import KVPassError
from kvpass.formats import fit_lut, parse_spec, quantize
from kvpass.kvcache import CacheLayout


@pytest.mark.parametrize(
    "spec,words",
    [
        ("int9", ["bits out of range", "1 to 8"]),
        ("int0:per_token", ["bits out of range"]),
        ("nuq12", ["bits out of range"]),
        ("int4:per_row", ["unknown option 'per_row'", "per_token"]),
        ("float4", ["unknown base 'float4'", "int4:per_channel:g32"]),
        ("int4+outliers", ["unknown extra 'outliers'", "outliers1%"]),
        ("int4+outliers60%", ["out of range", "below 50%"]),
        ("fp8_e4m3:g32", ["group size applies to int and nuq"]),
        ("int4:qnorm", ["qnorm", "nuq"]),
        ("int4:per_head", ["per_token or per_channel"]),
        ("", ["non-empty"]),
    ],
)
def test_bad_specs(spec, words):
    with pytest.raises(KVPassError) as err:
        parse_spec(spec)
    for w in words:
        assert w in str(err.value)


def test_group_that_does_not_divide():
    with pytest.raises(KVPassError, match=r"group size 48 does not divide the reduced axis of length 64.*g64"):
        quantize(torch.randn(4, 64), "int4:per_token:g48")
    with pytest.raises(KVPassError, match="length 10"):
        quantize(torch.randn(10, 64), "int4:per_channel:g4")


def test_non_floating_input():
    with pytest.raises(KVPassError, match=r"torch.int64 tensor.*x.float\(\)"):
        quantize(torch.arange(64).reshape(1, 64), "int4")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_says_where(bad):
    x = torch.randn(2, 3, 64)
    x[1, 2, 17] = bad
    with pytest.raises(KVPassError, match=r"first at index \(1, 2, 17\).*remove NaN/inf"):
        quantize(x, "int4:per_token")


def test_values_beyond_fp16_scales():
    with pytest.raises(KVPassError, match="scale_fp32"):
        quantize(torch.tensor([[1e5, -2.0, 3.0, 4.0]]), "int4:per_token")
    assert quantize(torch.tensor([[1e5, -2.0, 3.0, 4.0]]), "int4:per_token:scale_fp32").dequantize()[0, 0] == 1e5


def test_empty_and_per_channel_on_a_vector():
    with pytest.raises(KVPassError, match="empty"):
        quantize(torch.randn(0, 4), "int4")
    with pytest.raises(KVPassError, match="per_channel needs"):
        quantize(torch.randn(64), "int4:per_channel")


def test_lut_errors():
    with pytest.raises(KVPassError, match="needs 8 centroids"):
        quantize(torch.randn(2, 64), "nuq3", lut=torch.linspace(-1, 1, 4))
    with pytest.raises(KVPassError, match="NaN"):
        fit_lut(torch.tensor([0.1, float("nan"), 0.3]), 1)
    with pytest.raises(KVPassError, match="do not match"):
        fit_lut(torch.rand(10), 2, torch.rand(9))


def test_per_channel_cache_is_refused():
    with pytest.raises(KVPassError, match="per-channel scale changes as tokens arrive"):
        CacheLayout.build("int4:per_channel:g32", (1, 2, 64, 32), torch.float16)
