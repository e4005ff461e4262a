import math

import pytest
import torch

from kvpass.formats import expected_nbytes
from kvpass.kvcache import CacheLayout


@pytest.mark.parametrize("spec", ["int8:per_token", "int4:per_token:g64", "int2:per_token:g32+outliers1%",
                                  "nuq3:per_token", "nuq2:per_token:qnorm", "fp8_e4m3:per_token", "fp8_e5m2", "fp16"])
def test_layout_bytes_equal_allocated_buffers_and_closed_form(spec):
    shape = (2, 3, 256, 128)
    layout = CacheLayout.build(spec, shape, torch.float32)
    cache, static = layout.allocate()
    real = sum(t.numel() * t.element_size() for t in cache + static)
    assert layout.nbytes == real
    per_token_closed_form = expected_nbytes(shape, spec, torch.float32)
    if spec.startswith("fp8_e5m2"):  # a static per-head scale instead of per-token ones
        per_token_closed_form = math.prod(shape) + 3 * 2
    assert layout.nbytes == per_token_closed_form
    assert all(t.shape[:3] == shape[:3] for t in cache)


def test_int4_cache_is_under_030_of_fp16_at_32k():
    layout = CacheLayout.build("int4:per_token:g64", (1, 8, 32768, 128), torch.float16)
    assert layout.nbytes / layout.dense_nbytes == pytest.approx(4.5 / 16)
    assert layout.bits_per_element == pytest.approx(4.5)
