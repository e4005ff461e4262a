"""Lloyd-Max codes (lmB) and the randomized Hadamard rotation (:hadamard): the codebooks against Max's published
tables, the rotation orthogonal and undone exactly, reconstruction bounds, bytes and the grammar."""

import math

import pytest
import torch

from kvpass.errors import SpecError
from kvpass.formats import expected_nbytes, parse_spec, quantize, rotation
from kvpass.formats.lloyd_max import gaussian_codebook, gaussian_mse

# J. Max, "Quantizing for minimum distortion" (1960), Table I: the positive output levels and the mean squared error
# of the optimal quantizer of N(0, 1)
MAX_1960 = {
    1: ([0.7980], 0.3634),
    2: ([0.4528, 1.510], 0.1175),
    3: ([0.2451, 0.7560, 1.344, 2.152], 0.03454),
    4: ([0.1284, 0.3881, 0.6568, 0.9424, 1.256, 1.618, 2.069, 2.733], 0.009497),
}


@pytest.mark.parametrize("bits", sorted(MAX_1960))
def test_codebooks_are_max_s_gaussian_quantizers(bits):
    levels, mse = MAX_1960[bits]
    book = gaussian_codebook(bits)
    assert torch.equal(book, -book.flip(0))  # symmetric
    torch.testing.assert_close(book[1 << (bits - 1):], torch.tensor(levels, dtype=torch.float64), atol=6e-4, rtol=0)
    assert gaussian_mse(bits) == pytest.approx(mse, rel=1e-3)
    # Monte Carlo agrees with the integral
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    coded = book[torch.bucketize(x, (book[1:] + book[:-1]) / 2)]
    assert (x - coded).square().mean().item() == pytest.approx(mse, rel=0.02)


@pytest.mark.parametrize("d", [16, 48, 64, 80, 128])
def test_rotation_is_orthogonal_seeded_and_undone(d):
    r = rotation.matrix(d)
    torch.testing.assert_close(r @ r.T, torch.eye(d), atol=1e-6, rtol=0)
    assert rotation.blocks(d) == [1 << b for b in reversed(range(8)) if d >> b & 1]
    assert torch.equal(r, rotation.matrix(d))  # the same every call and run
    x = torch.randn(3, 5, d)
    torch.testing.assert_close(rotation.unrotate(rotation.rotate(x)), x, atol=1e-5, rtol=0)
    # one outlier channel is spread over every coordinate of its block
    spike = torch.zeros(d)
    spike[3] = 1.0
    assert rotation.rotate(spike).abs().max() <= 1 / math.sqrt(rotation.blocks(d)[0]) + 1e-6


def test_rotation_signs_are_fixed():
    # pinned so that a cache written by one build is read by another: R = H diag(signs)
    signs = (rotation.matrix(8)[0] * math.sqrt(8)).round()
    assert signs.tolist() == (torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(rotation.SEED)) * 2
                              - 1).float().tolist()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lm_codes_rotated_gaussian_vectors_within_the_codebook_s_error_and_keep_norms(bits):
    x = torch.randn(4, 2, 256, 64, generator=torch.Generator().manual_seed(0))
    q = quantize(x, f"lm{bits}:per_token:hadamard")
    y = q.dequantize()
    rel = ((y - x).square().sum() / x.square().sum()).item()
    assert rel < 1.15 * gaussian_mse(bits) + 1e-5
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1.5e-3, atol=0)  # norm correction (fp16 scale)
    assert q.nbytes == expected_nbytes(x.shape, f"lm{bits}:per_token:hadamard", x.dtype)
    assert q.bits_per_element == bits + 16 / 64


def test_the_rotation_tames_an_outlier_channel():
    x = torch.randn(2, 2, 128, 64, generator=torch.Generator().manual_seed(1))
    x[..., 7] += 12.0
    err = {s: ((quantize(x, s).dequantize() - x).norm() / x.norm()).item()
           for s in ("int4:per_token", "int4:per_token:hadamard", "lm4:per_token", "lm4:per_token:hadamard",
                     "lm4:per_token:hadamard+outliers2%")}
    assert err["int4:per_token:hadamard"] < 0.6 * err["int4:per_token"]
    assert err["lm4:per_token:hadamard"] < 0.4 * err["lm4:per_token"]
    assert err["lm4:per_token:hadamard"] < 1.1 * math.sqrt(gaussian_mse(4))
    # the outlier kept before the rotation: the rest is coded on its own scale, the outlier added back exact
    assert err["lm4:per_token:hadamard+outliers2%"] < 0.6 * err["lm4:per_token:hadamard"]


def test_grammar():
    assert str(parse_spec("LM3:per_token:g32:hadamard+outliers1%")) == "lm3:per_token:g32:hadamard+outliers1%"
    assert str(parse_spec("fp8_e4m3:per_token:hadamard")) == "fp8_e4m3:per_token:hadamard"
    for bad, says in (("lm4:per_channel", "use it per_token"), ("int4:per_channel:static:hadamard", "per-token"),
                      ("fp16:hadamard", "per-token"), ("lm9", "bits out of range"),
                      ("lm4:hadamard:hadamard", "given twice")):
        with pytest.raises(SpecError, match=says):
            parse_spec(bad)
