"""The peers users already have: transformers' QuantizedCache with the quanto and HQQ backends, configured
like KIVI (group 64, the last 128 tokens kept at model precision)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from kvpass.errors import KVPassError

GROUP, RESIDUAL = 64, 128


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
        # Both backends keep transformers' default axis 0. transformers' documentation suggests axis 1 for HQQ, but
        # hqq 0.2.8 cannot unpack an axis-1 tensor whose number of groups is not a multiple of its packing (2 for
        # int4, 4 for int2): with 3 KV heads (SmolLM2) and an odd prompt length it raises a size mismatch in
        # dequantize, so axis 1 cannot run the evaluation at all.
        return {"backend": self.backend, "nbits": self.nbits, "q_group_size": GROUP, "residual_length": RESIDUAL}

    def make_cache(self, config):
        from transformers import QuantizedCache

        return QuantizedCache(config=config, **self.cache_config())

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
