"""What the QAQ tests share: the tiny models' head dim, a test preset and calibration tokens."""

import torch

from helpers.tiny_models import VOCAB
from kvpass.methods import MethodConfig
from kvpass.methods.qaq import QAQConfig

D = 16  # the tiny models' head dim: metadata costs more per element than at 64 or 128


def method(target=None, eps=None, tiers=None, window=5, pre_rope=False, window_dtype=None) -> MethodConfig:
    kw = {} if tiers is None else {"tiers": tiers}
    config = QAQConfig(target_bits=target, eps=eps, window=window, window_dtype=window_dtype, **kw)
    return MethodConfig(f"qaq-test-{target}-{eps}", "QAQ test preset", "none", "none", max_chunk=8, qaq=config,
                        pre_rope_keys=pre_rope)


def calibration_ids(n=600, seed=0):
    return [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))]
