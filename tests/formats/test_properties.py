"""Hypothesis property tests over shapes, dtypes and formats."""

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvpass.formats import expected_nbytes, packing, quantize
from kvpass.formats.uniform import safe

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@st.composite
def tensors(draw, min_tokens=1):
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    tokens = draw(st.integers(min_tokens, 40))
    channels = draw(st.sampled_from([1, 3, 8, 16, 33, 64]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    x = torch.randn(*lead, tokens, channels, generator=torch.Generator().manual_seed(seed)) * scale
    return x.to(draw(DTYPES))


@settings(max_examples=60, deadline=None)
@given(x=tensors(), bits=st.sampled_from([1, 2, 3, 4, 8]), granularity=st.sampled_from(["per_token", "per_channel"]))
@example(x=torch.tensor([[6.6135e-04, 2.6692e-04, 6.1677e-05]]), bits=8, granularity="per_token")  # fp16-subnormal scale
def test_uniform_bound_holds_for_any_shape_and_dtype(x, bits, granularity):
    q = quantize(x, f"int{bits}:{granularity}")
    d = q.dequantize()
    assert d.dtype == x.dtype and d.shape == x.shape
    step = safe(q.tensors["scale"]).squeeze(-1).unsqueeze(-1)
    if granularity == "per_channel":
        step = step.transpose(-1, -2)
    xf = x.float()
    # half a step, plus the rounding of zero to fp16 and of the result to the input dtype
    out_eps = torch.finfo(x.dtype).eps * xf.abs().max()
    bound = step / 2 * (1 + 2**-10) + xf.abs().max() * 2**-10 + out_eps
    assert ((d.float() - xf).abs() <= bound).all()
    assert q.nbytes == expected_nbytes(x.shape, f"int{bits}:{granularity}", x.dtype)


@settings(max_examples=60, deadline=None)
@given(x=tensors(), spec=st.sampled_from(["nuq2:per_token", "nuq3:per_channel", "nuq4:per_token+outliers5%",
                                          "fp8_e4m3", "fp8_e5m2:per_token", "int2:per_token+outliers10%", "bf16"]))
def test_every_format_round_trips_shape_dtype_and_bytes(x, spec):
    q = quantize(x, spec)
    d = q.dequantize()
    assert d.shape == x.shape and d.dtype == x.dtype and torch.isfinite(d).all()
    assert q.nbytes == expected_nbytes(x.shape, spec, x.dtype)
    # never worse than the range of the data
    assert (d.float() - x.float()).abs().max() <= 2 * x.float().abs().max() + 1e-6


@settings(max_examples=100, deadline=None)
@given(bits=st.integers(1, 8), shape=st.lists(st.integers(1, 20), min_size=1, max_size=3), seed=st.integers(0, 9999))
def test_packing_round_trip(bits, shape, seed):
    codes = torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    assert torch.equal(packing.unpack(packing.pack(codes, bits), bits, shape[-1]), codes)
