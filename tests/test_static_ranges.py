"""Per-channel quantization with calibrated (static) ranges: each token coded on its own, no per-token metadata."""

import pytest
import torch

from kvpass import KVPassError
from kvpass.formats import expected_nbytes, fit_lut, parse_spec, quantize


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


def test_static_errors():
    with pytest.raises(KVPassError, match="needs calibrated per-channel ranges"):
        quantize(torch.randn(4, 8), "int4:per_channel:static")
    with pytest.raises(KVPassError, match="'static' takes calibrated per-channel ranges"):
        parse_spec("int4:per_token:static")
