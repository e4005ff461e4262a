"""The Triton decode kernel against the reference attention, on the GPU when there is one and otherwise through
Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined, so before the import
triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'kvpass[triton]')")

from kvpass.plugins import triton_attention as ta

from kvpass.formats import quantize
from kvpass.kvcache import parse_cache_spec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def packed(x, spec):
    t = quantize(x, parse_cache_spec(spec).format).tensors
    return {"codes": t["codes"], "scale": t["scale"], "zero": t["zero"]}


@pytest.mark.parametrize("kspec,vspec", [("int4:per_token:g32", "int4:per_token:g32"),
                                         ("int2:per_token:g16", "int8:per_token"),
                                         ("int8:per_token", "int2:per_token:g32")])
@pytest.mark.parametrize("b,hq,hkv,t,s,n", [(1, 4, 4, 1, 100, 77), (2, 8, 2, 3, 200, 200), (1, 6, 2, 5, 64, 40)])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_matches_the_reference(kspec, vspec, b, hq, hkv, t, s, n, masked):
    g = torch.Generator().manual_seed(0)
    d = 64
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    q = torch.randn(b, hq, t, d, generator=g).to(DEVICE, dtype)
    k = packed(torch.randn(b, hkv, s, d, generator=g).to(DEVICE, dtype), kspec)
    v = packed(torch.randn(b, hkv, s, d, generator=g).to(DEVICE, dtype), vspec)
    ks, vs = parse_cache_spec(kspec), parse_cache_spec(vspec)
    mask = None
    if masked:  # causal over the last t slots plus left padding on row 0 (HF's [B, 1, T, S] boolean mask)
        pos = torch.arange(n - t, n)
        mask = (torch.arange(s)[None, :] <= pos[:, None]).expand(b, 1, t, s).clone()
        mask[0, :, :, :3] = False
        mask = mask.to(DEVICE)
    out = ta.decode_attention(q, k, v, ks, vs, n, mask, d**-0.5, block_n=32, splits=3)
    ref = ta.reference(q, k, v, ks, vs, n, mask, d**-0.5)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_supported_specs():
    assert ta.supports(parse_cache_spec("int4:per_token:g64"), 64)
    assert not ta.supports(parse_cache_spec("int3:per_token"), 64)  # 3-bit units span bytes
    assert not ta.supports(parse_cache_spec("int4:per_token+outliers1%"), 64)
    assert not ta.supports(parse_cache_spec("int2:per_channel:g32|residual=128"), 64)
    assert not ta.supports(parse_cache_spec("int4:per_token"), 80)


@pytest.mark.parametrize("spec", ["int4:per_token:g32", "int2:per_token:g16", "int8:per_token"])
@pytest.mark.parametrize("half_math", [False, True])
def test_fp16_queries_with_and_without_half_math(spec, half_math):
    # fp16 dequantization (codes as the bits of 1024 + code) against the fp32 reference: within fp16 rounding
    g = torch.Generator().manual_seed(1)
    b, hq, hkv, t, s, n, d = 2, 8, 2, 1, 96, 90, 64
    q = torch.randn(b, hq, t, d, generator=g).to(DEVICE, torch.float16)
    k = packed(torch.randn(b, hkv, s, d, generator=g).to(DEVICE, torch.float16), spec)
    v = packed(torch.randn(b, hkv, s, d, generator=g).to(DEVICE, torch.float16), spec)
    cs = parse_cache_spec(spec)
    out = ta.decode_attention(q, k, v, cs, cs, n, None, d**-0.5, block_n=32, half_math=half_math)
    ref = ta.reference(q.float(), k, v, cs, cs, n, None, d**-0.5)
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-3, atol=3e-3)
