"""The peers users already have: transformers' QuantizedCache with the quanto and HQQ backends, configured
like KIVI (group 64, the last 128 tokens kept at model precision).

HQQ runs at axis 1 (groups of 64 channels of one token, what transformers' documentation recommends for it) with
the token axis zero-padded to a multiple of 4 before quantizing: hqq 0.2.8 packs int4 codes two groups per byte
and int2 four, and cannot unpack a tensor whose number of groups is not a multiple of that (3 KV heads with an odd
number of tokens raise a size mismatch). Padded tokens form groups of their own and are cropped after
dequantizing, so the numbers are those of axis 1; at transformers' default axis 0 a group strides across tokens
and heads and the peer is far worse than HQQ can be.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

from kvpass.errors import KVPassError

GROUP, RESIDUAL = 64, 128
HQQ_AXIS, HQQ_TOKEN_MULTIPLE = 1, 4


@dataclass(frozen=True)
class Peer:
    name: str
    backend: str  # "quanto" or "hqq"
    nbits: int
    module: str  # the import that must exist

    @property
    def installed(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            return False

    def require(self) -> None:
        if not self.installed:
            package = "optimum-quanto" if self.backend == "quanto" else "hqq"
            raise KVPassError(
                f"peer {self.name} needs {package}, which is not installed; install the eval extra: "
                f"pip install 'kvpass[eval]' (or pip install {package})"
            )

    def cache_config(self) -> dict:
        axes = {"axis_key": HQQ_AXIS, "axis_value": HQQ_AXIS} if self.backend == "hqq" else {}
        return {"backend": self.backend, "nbits": self.nbits, "q_group_size": GROUP, "residual_length": RESIDUAL,
                **axes}

    def make_cache(self, config):
        """A fresh transformers ``QuantizedCache`` for ``config`` (HQQ layers padded, see the module docstring)."""
        from transformers import QuantizedCache

        cache = QuantizedCache(config=config, **self.cache_config())
        if self.backend == "hqq":
            kwargs = {k: v for k, v in self.cache_config().items() if k != "backend"}
            cache.layers = [padded_hqq_layer_class()(**kwargs) for _ in cache.layers]
        return cache

    def nominal_bits(self) -> float:
        """Codes plus a 16-bit scale and zero per group; the fp residual window is not counted."""
        return self.nbits + 32 / GROUP


PEERS = {
    p.name: p
    for p in (
        Peer("hf-quanto-int4", "quanto", 4, "optimum.quanto"),
        Peer("hf-quanto-int2", "quanto", 2, "optimum.quanto"),
        Peer("hf-hqq-int4", "hqq", 4, "hqq"),
        Peer("hf-hqq-int2", "hqq", 2, "hqq"),
    )
}


@functools.cache
def padded_hqq_layer_class():
    """transformers' ``HQQQuantizedLayer`` with the token axis padded so that hqq can unpack it (built on first
    use: transformers is imported only when a peer runs)."""
    import torch.nn.functional as F
    from transformers.cache_utils import HQQQuantizedLayer

    class PaddedHQQQuantizedLayer(HQQQuantizedLayer):
        def _quantize(self, tensor, axis):
            tokens = tensor.shape[-2]
            padded = F.pad(tensor, (0, 0, 0, -tokens % HQQ_TOKEN_MULTIPLE))
            qtensor, meta = super()._quantize(padded.contiguous(), axis)
            meta["kvpass_tokens"] = tokens
            return qtensor, meta

        def _dequantize(self, qtensor):
            return super()._dequantize(qtensor)[..., : qtensor[1]["kvpass_tokens"], :]

    return PaddedHQQQuantizedLayer
