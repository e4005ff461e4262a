import pytest
import torch

from kvpass.formats import packing


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 31, 64, 100])
def test_pack_round_trip_is_bit_exact(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (3, 5, n), generator=g, dtype=torch.uint8)
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, packing.packed_len(n, bits))
    assert torch.equal(packing.unpack(packed, bits, n), codes)
    assert torch.equal(packing.pack(codes.long(), bits), packed)  # the formats pass int64 codes


@pytest.mark.parametrize(
    "bits,n,nbytes",
    [(2, 4, 1), (2, 5, 2), (4, 2, 1), (4, 3, 2), (3, 8, 3), (3, 9, 6), (8, 5, 5), (1, 8, 1), (1, 9, 2)],
)
def test_packed_sizes(bits, n, nbytes):
    # 2-bit: four per byte; 4-bit: two per byte; 3-bit: eight codes in three bytes; 8-bit: one per byte.
    assert packing.packed_len(n, bits) == nbytes


def test_bit_order_is_little_endian_within_a_unit():
    # Documented order the ONNX/TensorRT lowerings depend on: first code in the lowest bits.
    assert packing.pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert packing.pack(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]
    assert packing.pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.uint8), 1).tolist() == [0x81, 1]
    three = packing.pack(torch.tensor([7, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8), 3).tolist()
    assert three == [7, 0, 1 << 5]  # code 7 at bits 0-2, last code at bits 21-23


@pytest.mark.parametrize("bits", range(1, 9))
def test_arithmetic_packing_is_the_same_bytes(bits):
    """The shift-free packing the ONNX export traces writes and reads exactly the bytes of the bitwise one."""
    g = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 13, 64):
        codes = torch.randint(0, 1 << bits, (3, n), generator=g)
        packed = packing.pack(codes, bits)
        with packing.arithmetic():
            assert torch.equal(packing.pack(codes, bits), packed)
            unpacked = packing.unpack(packed, bits, n)
        assert torch.equal(unpacked, packing.unpack(packed, bits, n))
        assert torch.equal(unpacked.long(), codes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_next_up_is_nextafter_for_every_non_negative_finite_value(dtype):
    from kvpass.formats.uniform import next_up

    top = 0x7C00 if dtype == torch.float16 else 0x7F80
    values = torch.arange(0, top, dtype=torch.int32).to(torch.int16).view(dtype)
    expected = torch.nextafter(values, torch.full_like(values, float("inf")))
    assert torch.equal(next_up(values).view(torch.int16), expected.view(torch.int16))
