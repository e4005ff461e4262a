import pytest
import torch

from kvpass.formats import fit_lut, normal_float_grid, quantize
from kvpass.formats.nuq import nearest

# The NF4 table published with QLoRA (bitsandbytes' NF4 code book).
NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def test_normal_float_grid_matches_nf4():
    torch.testing.assert_close(normal_float_grid(4), torch.tensor(NF4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_normal_float_grid_definition(bits):
    grid = normal_float_grid(bits)
    assert grid.numel() == 2**bits
    assert grid[0] == -1 and grid[-1] == 1 and (grid == 0).sum() == 1
    assert (grid.diff() > 0).all()
    assert (grid > 0).sum() == 2 ** (bits - 1) and (grid < 0).sum() == 2 ** (bits - 1) - 1


def weighted_error(x, w, lut):
    q = lut[nearest(x, lut)]
    return float((w * (x - q) ** 2).sum())


def test_fisher_weighted_kmeans_lowers_weighted_error():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20000, generator=g) * 2 - 1
    # Sensitivity concentrated on a narrow band of values, as Fisher information is on real activations.
    w = torch.where((x > 0.3) & (x < 0.6), 100.0, 0.01)
    plain = fit_lut(x, 2)
    weighted = fit_lut(x, 2, w)
    assert weighted_error(x, w, weighted) < 0.5 * weighted_error(x, w, plain)
    # and plain k-means is the better fit when nothing is weighted
    ones = torch.ones_like(x)
    assert weighted_error(x, ones, plain) <= weighted_error(x, ones, weighted)


def test_kmeans_is_deterministic_and_beats_the_grid_on_its_data():
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(5000, generator=g) ** 3) * 2 - 1  # skewed towards -1
    a, b = fit_lut(x, 3), fit_lut(x, 3)
    assert torch.equal(a, b)
    ones = torch.ones_like(x)
    assert weighted_error(x, ones, a) < weighted_error(x, ones, normal_float_grid(3))


def test_qnorm_keeps_mean_and_std():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1000, 128, generator=g) + 0.3
    plain = quantize(x, "nuq2:per_token").dequantize()
    normed = quantize(x, "nuq2:per_token:qnorm").dequantize()
    err_std_plain = abs(float(plain.std() - x.std()))
    err_std_normed = abs(float(normed.std() - x.std()))
    assert err_std_normed < 0.02 * float(x.std())
    assert err_std_normed < err_std_plain
    assert abs(float(normed.mean() - x.mean())) < 0.02


def test_nuq_with_a_fitted_lut_and_its_bytes():
    x = torch.randn(2, 2, 32, 64)
    lut = fit_lut(torch.rand(4000) * 2 - 1, 3)
    q = quantize(x, "nuq3:per_token", lut=lut)
    torch.testing.assert_close(q.tensors["lut"].float(), lut.half().float())
    assert q.nbytes == 2 * 2 * 32 * (24 + 4) + 8 * 2
    err = (q.dequantize() - x).abs().max()
    assert err < 0.5 * float(x.abs().max())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nuq_error_shrinks_with_bits(bits):
    torch.manual_seed(0)
    x = torch.randn(4, 256, 64)
    e = [float((quantize(x, f"nuq{b}:per_token").dequantize() - x).pow(2).mean()) for b in (bits, bits + 1)]
    assert e[1] < e[0]
