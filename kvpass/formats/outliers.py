"""Dense-and-sparse outliers (KVQuant, QAQ): per quantization vector, a fixed number of the largest-magnitude
values is stored apart (value + index) and left out of the dense range.

The capacity is ``ceil(fraction * vector_length)`` for every vector, so shapes are static and the layout
exports. Values are kept in fp16 (bf16 for bf16 inputs, which fp16 cannot hold); indices in the smallest
integer type that holds the vector length.
"""

from __future__ import annotations

import math

import torch


def capacity(n: int, fraction: float) -> int:
    """Outliers kept per vector of length ``n``."""
    return min(n, math.ceil(fraction * n - 1e-9)) if fraction > 0 else 0


def index_dtype(n: int) -> torch.dtype:
    return torch.uint8 if n <= 256 else torch.int16 if n <= 32768 else torch.int32


def value_dtype(input_dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if input_dtype == torch.bfloat16 else torch.float16


def split(x: torch.Tensor, fraction: float, score: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Pick each vector's (last axis) outliers: the largest ``score`` (default: magnitude). Returns the stored
    tensors and the mask of picked elements."""
    n = x.shape[-1]
    k = capacity(n, fraction)
    score = x.abs() if score is None else score
    idx, mask = top_indices(score, k)
    values = x.gather(-1, idx).to(value_dtype(x.dtype))
    return {"outlier_values": values, "outlier_index": idx.to(index_dtype(n))}, mask


def top_indices(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices of the ``k`` largest scores of each vector, ascending, ties to the lower index (``topk`` leaves
    ties to the backend: torch and ONNX Runtime pick differently, and an exported store must write the same bytes),
    and the mask of the picked elements."""
    n = score.shape[-1]
    order = torch.arange(n, device=score.device)
    kth = score.topk(k, dim=-1, sorted=True).values[..., k - 1:k]  # the k-th largest score
    above, tied = score > kth, score == kth
    # all above the k-th score, then the tied ones lowest index first (counted in float32: TensorRT sums no ints)
    need = k - above.to(torch.float32).sum(-1, keepdim=True)
    picked = above | (tied & (tied.to(torch.float32).cumsum(-1) <= need))
    # the k picked in ascending order: every key distinct, the picked ones below the rest
    key = torch.where(picked, order, order + n).to(torch.float32)
    return key.topk(k, dim=-1, largest=False, sorted=True).indices, picked


def merge(dense: torch.Tensor, tensors: dict[str, torch.Tensor], add: bool = False) -> torch.Tensor:
    """Put the stored outliers back into the dequantized dense tensor (``add``: onto it, where the dense codes hold
    the rest of each vector, as rotated codes do)."""
    idx = tensors["outlier_index"].long()
    values = tensors["outlier_values"].to(dense.dtype)
    return dense.scatter_add(-1, idx, values) if add else dense.scatter(-1, idx, values)


def nbytes(shape: tuple[int, ...], fraction: float, input_dtype: torch.dtype) -> int:
    *lead, n = shape
    k = capacity(n, fraction)
    per = torch.tensor([], dtype=value_dtype(input_dtype)).element_size()
    per += torch.tensor([], dtype=index_dtype(n)).element_size()
    return math.prod(lead) * k * per
