import math

import pytest
import torch

from kvpass.formats import expected_nbytes, parse_spec, quantize
from kvpass.formats.uniform import safe


def fp16_slack(x: torch.Tensor) -> float:
    # zero is rounded to fp16 before the codes are fitted; at the clamped ends the error may grow by that rounding
    return float(x.abs().max()) * 2.0**-10


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["per_token", "per_channel"])
@pytest.mark.parametrize("group", [None, 16, 32])
def test_round_trip_error_within_half_a_step(bits, granularity, group):
    torch.manual_seed(bits)
    x = torch.randn(2, 3, 64, 32) * torch.linspace(0.1, 4, 32)  # channels of very different ranges
    spec = f"int{bits}:{granularity}" + (f":g{group}" if group else "")
    q = quantize(x, spec)
    err = (q.dequantize() - x).abs()
    scale = safe(q.tensors["scale"])  # [..., vectors, groups] in the vector-last layout
    n = 64 if granularity == "per_channel" else 32
    per_elem = scale.repeat_interleave(n // scale.shape[-1], dim=-1)
    if granularity == "per_channel":
        per_elem = per_elem.transpose(-1, -2)
    bound = per_elem / 2 * (1 + 2**-10) + fp16_slack(x)
    assert (err <= bound).all(), float((err - bound).max())
    assert q.tensors["codes"].dtype == torch.uint8


def test_constant_input_is_exact():
    x = torch.full((4, 64), 0.375)
    assert torch.equal(quantize(x, "int2:per_token").dequantize(), x)


@pytest.mark.parametrize(
    "spec,bits",
    [
        ("int4:per_token:g64", 4.5),  # 4 + (16 + 16) / 64
        ("int2:per_token:g64", 2.5),
        ("int8:per_token", 8 + 32 / 128),
        ("int3:per_token:g32", 3 + 1.0),
        ("int4:per_channel:g32", 5.0),
        ("int4:per_token:g64:scale_fp32", 5.0),
    ],
)
def test_bits_per_element_closed_form(spec, bits):
    x = torch.randn(2, 4, 128, 128)
    q = quantize(x, spec)
    assert q.nbytes == sum(t.numel() * t.element_size() for t in q.tensors.values())
    assert q.nbytes == expected_nbytes(x.shape, spec, x.dtype)
    assert q.bits_per_element == pytest.approx(bits)


def test_codes_are_really_packed():
    x = torch.randn(1, 1, 10, 64)
    q = quantize(x, "int3:per_token")
    assert q.tensors["codes"].shape == (1, 1, 10, 24)  # 64 codes * 3 bits / 8
    assert q.nbytes == 10 * (24 + 4)
    assert not any(t.shape == x.shape and t.is_floating_point() for t in q.tensors.values())


def test_spec_round_trip_through_str():
    for text in ["int4:per_channel:g32", "nuq3:per_token", "fp8_e4m3", "int2:per_token:g64+outliers1%",
                 "nuq2:per_token:qnorm", "fp8_e5m2:per_token", "fp16", "none", "int4:per_token:scale_fp32"]:
        spec = parse_spec(text)
        assert parse_spec(str(spec)) == spec
        assert str(spec) == text


def test_dtypes_are_kept():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(8, 64).to(dtype)
        d = quantize(x, "int8:per_token").dequantize()
        assert d.dtype == dtype and d.shape == x.shape
        assert math.isclose(float((d.float() - x.float()).abs().max()), 0.0, abs_tol=0.06)
