"""Per-channel quantization with calibrated (static) ranges: each token coded on its own, no per-token metadata."""

import pytest
import torch

from kvpass import KVPassError
from kvpass.formats import expected_nbytes, fit_lut, packing, parse_spec, quantize
from kvpass.formats.nuq import fit_lut_rows


def keys_with_outlier_channels(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, 64, 32, generator=g)
    x[..., 3] *= 20.0  # the outlier channels KVQuant describes
    x[..., 17] += 8.0
    return x


@pytest.mark.parametrize("base", ["int4", "int2", "nuq3"])
def test_static_per_channel_rows_are_independent_and_bounded(base):
    x = keys_with_outlier_channels()
    lo, hi = x.amin(dim=2, keepdim=True), x.amax(dim=2, keepdim=True)  # [1, H, 1, D]
    spec = f"{base}:per_channel:static"
    q = quantize(x, spec, lo=lo, hi=hi)
    # a row quantized alone gives the same codes: tokens can be written one at a time
    row = quantize(x[:, :, 10:11], spec, lo=lo, hi=hi)
    packed_row = q.tensors["codes"][:, :, 10:11]
    assert torch.equal(row.tensors["codes"], packed_row)
    err = (q.dequantize() - x).abs()
    bits = int(base[-1])
    step = (hi - lo) / (2**bits - 1)
    if base.startswith("int"):
        assert (err <= step / 2 + 1e-2 * (hi - lo)).all()
    assert q.nbytes == expected_nbytes(x.shape, spec, x.dtype)
    assert set(q.tensors) >= {"codes", "lo", "hi"} and "scale" not in q.tensors
    assert parse_spec(str(parse_spec(spec))) == parse_spec(spec)


def test_static_beats_per_token_on_outlier_channels():
    x = keys_with_outlier_channels(1)
    lo, hi = x.amin(dim=2, keepdim=True), x.amax(dim=2, keepdim=True)
    static = (quantize(x, "int4:per_channel:static", lo=lo, hi=hi).dequantize() - x).pow(2).mean()
    per_token = (quantize(x, "int4:per_token").dequantize() - x).pow(2).mean()
    assert static < 0.5 * per_token


def test_static_with_outliers_and_fitted_lut():
    x = keys_with_outlier_channels(2)
    lo, hi = x.quantile(0.02, dim=2, keepdim=True), x.quantile(0.98, dim=2, keepdim=True)
    lut = fit_lut(((x - (hi + lo) / 2) / ((hi - lo) / 2)).clamp(-1, 1), 3)
    q = quantize(x, "nuq3:per_channel:static+outliers5%", lo=lo, hi=hi, lut=lut)
    d = q.dequantize()
    idx = q.tensors["outlier_index"].long()
    assert torch.equal(d.gather(-1, idx), x.gather(-1, idx).half().float())
    assert q.nbytes == expected_nbytes(x.shape, "nuq3:per_channel:static+outliers5%", x.dtype)


@pytest.mark.parametrize("spec", ["int3:per_channel:static+outliers5%", "nuq2:per_channel:static:channel_lut+outliers4%"])
def test_static_outliers_are_the_costliest_codes_weighted_by_sensitivity(spec):
    x = keys_with_outlier_channels(6)
    lo, hi = x.quantile(0.1, dim=2, keepdim=True), x.quantile(0.9, dim=2, keepdim=True)
    sens = torch.rand(1, 2, 1, 32, generator=torch.Generator().manual_seed(1)) * 4
    sens[..., 5] = 1000.0  # a channel the loss is very sensitive to: its coding error is always worth keeping
    q = quantize(x, spec, lo=lo, hi=hi, sens=sens.half())
    dense = quantize(x, spec.split("+")[0], lo=lo, hi=hi)  # the same codes without outliers
    cost = (x - dense.dequantize()).square() * sens.half().float()
    k = q.tensors["outlier_index"].shape[-1]
    want = cost.topk(k, dim=-1).indices.sort(-1).values
    assert torch.equal(q.tensors["outlier_index"].long(), want)
    assert torch.equal(q.tensors["codes"], dense.tensors["codes"])
    # without sensitivities every channel weighs the same: the largest coding errors are kept
    plain = quantize(x, spec, lo=lo, hi=hi)
    err = (x - dense.dequantize()).square()
    assert torch.equal(plain.tensors["outlier_index"].long(), err.topk(k, dim=-1).indices.sort(-1).values)
    kept5 = [(t.tensors["outlier_index"] == 5).any(-1).float().mean() for t in (q, plain)]
    assert kept5[0] > kept5[1] + 0.3, kept5
    assert (q.dequantize() - x).square().mul(sens).mean() < (plain.dequantize() - x).square().mul(sens).mean()


def test_calibrated_sensitivity_is_each_channels_mean_fisher_over_the_layer_mean():
    from kvpass.calibration.statics import fit_statics
    from kvpass.kvcache import parse_cache_spec

    g = torch.Generator().manual_seed(0)
    act = torch.randn(2, 2, 40, 8, generator=g)
    fisher = torch.rand(2, 2, 40, 8, generator=g) * 1e-9  # Fisher information is tiny: fp16 needs it normalised
    fisher[:, 1, :, 3] *= 50
    st = fit_statics(parse_cache_spec("nuq2:per_channel:static:channel_lut+outliers1%|sink=1"), act, fisher, 0)
    mean = fisher[:, :, 1:].mean(dim=(0, 2))
    torch.testing.assert_close(st["sens"].float()[0, :, 0], mean / mean.mean(), rtol=2e-3, atol=0)
    assert st["sens"].dtype == torch.float16 and st["sens"].shape == (1, 2, 1, 8)
    assert "sens" not in fit_statics(parse_cache_spec("nuq2:per_channel:static"), act, fisher, 0)


def test_static_errors():
    with pytest.raises(KVPassError, match="needs calibrated per-channel ranges"):
        quantize(torch.randn(4, 8), "int4:per_channel:static")
    with pytest.raises(KVPassError, match="'static' takes calibrated per-channel ranges"):
        parse_spec("int4:per_token:static")


def channel_luts(heads, channels, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, heads, 1, channels, 2**bits, generator=g) * 2 - 1).sort(-1).values


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_channel_lut_codes_each_channel_against_its_own_centroids(bits):
    x = keys_with_outlier_channels(3)
    lo, hi = x.amin(dim=2, keepdim=True), x.amax(dim=2, keepdim=True)
    lut = channel_luts(2, 32, bits).half()
    spec = f"nuq{bits}:per_channel:static:channel_lut"
    q = quantize(x, spec, lo=lo, hi=hi, lut=lut)
    # brute force: nearest centroid of the channel's own row
    lo16, hi16 = lo.half().float(), hi.half().float()
    xn = ((x - (hi16 + lo16) / 2) / ((hi16 - lo16) / 2)).clamp(-1, 1)
    brute = (xn.unsqueeze(-1) - lut.float()).abs().argmin(-1)
    codes = packing.unpack(q.tensors["codes"], bits, 32).long()
    dist = (xn - lut.float().expand(1, 2, 64, 32, -1).gather(-1, codes.unsqueeze(-1)).squeeze(-1)).abs()
    best = (xn.unsqueeze(-1) - lut.float()).abs().amin(-1)
    assert (dist <= best + 1e-6).all()  # nearest (256 fp16 centroids per row can tie)
    if bits <= 3:
        assert torch.equal(codes, brute)
    want = lut.float().expand(1, 2, 64, 32, -1).gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(q.dequantize(), want * (hi16 - lo16) / 2 + (hi16 + lo16) / 2, rtol=0, atol=1e-6)
    assert q.nbytes == expected_nbytes(x.shape, spec, x.dtype)
    assert q.tensors["lut"].shape == (1, 2, 1, 32, 2**bits)
    assert parse_spec(str(parse_spec(spec))) == parse_spec(spec)


def test_fit_lut_rows_matches_fit_lut_row_by_row():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(5, 700, generator=g) * 2 - 1
    x[1] = x[1].sign() * 0.8 + 0.05 * x[1]  # two clusters
    w = torch.rand(5, 700, generator=g)
    w[2, :100] = 0  # left out, as outliers are
    rows = fit_lut_rows(x, 2, w)
    for i in range(5):
        keep = w[i] > 0
        torch.testing.assert_close(rows[i], fit_lut(x[i][keep], 2, w[i][keep]), rtol=0, atol=1e-4)


def test_channel_luts_beat_one_lut_per_layer_on_channels_of_different_shapes():
    # keys whose channels are distributed differently (two clusters, one-sided, gaussian): one LUT cannot fit all
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 1, 4096, 6, generator=g)
    x[..., 0] = x[..., 0].sign() * 3 + 0.1 * x[..., 0]
    x[..., 1] = x[..., 1].abs() ** 2
    lo, hi = x.amin(dim=2, keepdim=True), x.amax(dim=2, keepdim=True)
    xn = ((x - (hi + lo) / 2) / ((hi - lo) / 2)).clamp(-1, 1)
    shared = fit_lut(xn, 2)
    rows = fit_lut_rows(xn[0, 0].T, 2, torch.ones(6, 4096)).reshape(1, 1, 1, 6, 4)
    err_shared = (quantize(x, "nuq2:per_channel:static", lo=lo, hi=hi, lut=shared).dequantize() - x).pow(2).mean()
    err_rows = (quantize(x, "nuq2:per_channel:static:channel_lut", lo=lo, hi=hi, lut=rows).dequantize() - x).pow(2).mean()
    assert err_rows < 0.6 * err_shared, (err_rows, err_shared)


def test_channel_lut_errors():
    with pytest.raises(KVPassError, match="channel_lut gives each calibrated channel"):
        parse_spec("nuq2:per_token:channel_lut")
    with pytest.raises(KVPassError, match="channel_lut gives each calibrated channel"):
        parse_spec("int4:per_channel:static:channel_lut")
    x = keys_with_outlier_channels()
    lo, hi = x.amin(dim=2, keepdim=True), x.amax(dim=2, keepdim=True)
    with pytest.raises(KVPassError, match=r"LUT of shape \(1, 2, 1, 32, 4\)"):
        quantize(x, "nuq2:per_channel:static:channel_lut", lo=lo, hi=hi, lut=torch.linspace(-1, 1, 4))
