import pytest
import torch

from kvpass.formats import expected_nbytes, quantize
from kvpass.formats.outliers import capacity


@pytest.mark.parametrize("variant,dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_matches_torch_cast_with_scale(variant, dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 32) * torch.tensor([0.1, 1.0, 10.0, 100.0]).view(1, 4, 1, 1)
    q = quantize(x, f"fp8_{variant}")
    scale = q.tensors["scale"].float()
    assert scale.shape == (1, 4, 1, 1)  # one scale per head
    fmax = torch.finfo(dtype).max
    expected = (x / scale).clamp(-fmax, fmax).to(dtype).float() * scale
    torch.testing.assert_close(q.dequantize(), expected, rtol=0, atol=0)
    assert q.tensors["codes"].dtype == torch.uint8


@pytest.mark.parametrize("spec", ["fp8_e4m3", "fp8_e5m2", "fp8_e4m3:per_tensor", "fp8_e4m3:per_token"])
def test_fp8_no_nan_from_finite_extremes(spec):
    x = torch.tensor([[0.0, -0.0, 1e-30, -1e-30, 6e4, -6e4, 3.0e4, 1e-8]]).repeat(4, 1)
    d = quantize(x, spec).dequantize()
    assert torch.isfinite(d).all()
    # a static scale far too small saturates instead of overflowing
    codes = quantize(x, spec, scale=torch.tensor(1e-3, dtype=torch.float16))
    assert torch.isfinite(codes.dequantize()).all()


def test_fp8_bits_per_element():
    x = torch.randn(1, 8, 128, 64)
    q = quantize(x, "fp8_e4m3")
    assert q.nbytes == x.numel() + 8 * 2 == expected_nbytes(x.shape, "fp8_e4m3", x.dtype)


def planted(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 64, 128, generator=g) * 0.5
    spikes = torch.zeros_like(x)
    idx = torch.randint(0, 128, (2, 4, 64, 1), generator=g)
    vals = (torch.randint(0, 2, idx.shape, generator=g) * 2 - 1) * (20 + torch.randint(0, 40, idx.shape, generator=g))
    spikes.scatter_(-1, idx, vals.float())  # integers: exactly representable in fp16
    return x + spikes.where(spikes != 0, torch.zeros_like(x)), idx


@pytest.mark.parametrize("base", ["int2:per_token:g64", "int4:per_token", "nuq3:per_token"])
def test_outliers_come_back_exactly_and_dense_error_shrinks(base):
    x, idx = planted()
    x = x.half().float()
    plain = quantize(x, base).dequantize()
    sparse = quantize(x, base + "+outliers1%").dequantize()
    assert torch.equal(sparse.gather(-1, idx), x.gather(-1, idx))
    dense = torch.ones_like(x, dtype=torch.bool).scatter_(-1, idx, False)
    assert (sparse - x)[dense].pow(2).mean() < 0.25 * (plain - x)[dense].pow(2).mean()


def test_outlier_capacity_and_bytes():
    assert capacity(128, 0.01) == 2 and capacity(100, 0.01) == 1 and capacity(64, 0.05) == 4
    x = torch.randn(3, 10, 128)
    q = quantize(x, "int4:per_token+outliers1%")
    assert q.tensors["outlier_values"].shape == (3, 10, 2)
    assert q.tensors["outlier_index"].dtype == torch.uint8
    assert q.nbytes == expected_nbytes(x.shape, "int4:per_token+outliers1%", x.dtype)
    assert q.bits_per_element == pytest.approx(4 + 32 / 128 + 2 * 3 * 8 / 128)


def test_per_channel_outliers_run_along_tokens():
    x = torch.randn(1, 1, 300, 8)
    x[0, 0, 17, 3] = 50.0
    q = quantize(x, "int2:per_channel+outliers1%")
    assert q.tensors["outlier_index"].dtype == torch.int16  # 300 tokens need more than a byte
    assert q.dequantize()[0, 0, 17, 3] == 50.0


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_arithmetic_fp8_bytes_and_values_are_the_casts(fp8):
    """The shift-free fp8 coding the ONNX export traces gives the bytes of ``.to(fp8).view(uint8)`` for every fp8
    value, values between them, signed zeros and underflow, and its table reads them back."""
    from kvpass.formats.fp8 import byte_values, fp8_bytes

    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8).float()
    finite = every[torch.isfinite(every)]
    top = torch.finfo(fp8).max
    x = torch.cat([finite, finite * 1.03, finite * 0.97, torch.tensor([-0.0, 0.0, 1e-12, -1e-12])]).clamp(-top, top)
    assert torch.equal(fp8_bytes(x, fp8), x.to(fp8).view(torch.uint8))
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ok = torch.isfinite(every)
    assert torch.equal(byte_values(fp8)[codes.long()][ok], every[ok])


def test_outliers_are_the_top_scores_with_ties_to_the_lower_index():
    """As a stable descending sort picks them (and ONNX's TopK breaks ties), whatever ``topk`` does with ties."""
    from kvpass.formats.outliers import top_indices

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(2, 70, (1,), generator=g))
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        score = torch.randint(0, 5, (3, n), generator=g).float()  # many ties
        idx, mask = top_indices(score, k)
        ref = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k].sort(-1).values
        assert torch.equal(idx, ref), (n, k)
        assert torch.equal(mask, torch.zeros_like(mask).scatter(-1, ref, True))
