"""QAQ: per-token key and value bits from attention, in tiers of static capacity.

Each token of each KV head is first held in a small ring for ``window`` steps (the attention window), at the
precision of the highest tier (fp16 for an fp32 model whose top tier is fp16: a prompt reads it rounded as decoding
does), or in fp8 or in int8 with a scale per token (``QAQConfig.window_dtype``). When it leaves the window its bits
are decided from the largest attention ``a`` it received in it:

* values: ``B_v = ceil(log2(1 + a * range(v) / eps))`` (every token adds the same output error ``eps``);
* keys: ``B_k = ceil(log2(1 + a' (1 - a') * q_p * range(k) / (sqrt(d) * eps)))`` with ``q_p`` the
  ``quantile`` of a log-normal fitted to the query norms seen so far, and ``a' = min(a, 1/2)``.

``a (1 - a)`` is the design's sensitivity of a logit error; it falls again above 1/2, which would give the keys of
attention sinks (the tokens with the most attention, which KVQuant keeps in fp16) the fewest bits because the
softmax happens to be saturated now. The window exists because importance jumps, so we take the monotone
envelope: a token with more attention never gets fewer bits.

The bits are rounded up to a tier (2/4/8/16 bits by default). Every tier is a packed store of a fixed number of
entries per head (its capacity, from the shares measured on calibration data), and a 4-bit map says which tier
holds each cache slot. Slots are written in order, so the entry of slot ``i`` in tier ``t`` is the number of
earlier slots in ``t``: no index is stored. A token whose tier is full goes to the nearest lower tier with room,
else the nearest higher one; the capacities sum to the cache length, so there always is one.

With ``QAQConfig.retain`` every token is also kept at model precision (the paper keeps this copy in host memory;
here it is one more cache buffer, counted in ``cache_report``). A decided token whose attention now asks for more
bits than its tier has is then moved up to the highest tier at or below the one it asks for that has room, and
re-coded from that copy; without it a token's tier is final once it leaves the window.

Key tiers may differ from value tiers (``QAQConfig.key_tiers``) and may code keys per channel against calibrated
ranges (``:static`` formats code each token alone, so a token can still be written when it is decided): per-token
int2 keys lose to a few outlier channels what per-channel ranges keep (``docs/methods/qaq.md``). With ``MethodConfig(pre_rope_keys=True)`` the keys are stored before
RoPE, as KVQuant stores them (their channels keep one range across positions), and the op rotates each slot by its
cached position when it reads; the key formula then takes the range of the stored key and the attention of the
rotated one. The ranges and LUTs are fitted on calibration keys with their Fisher information. Value tiers may
use calibrated tensors too (nuq per token with a Fisher-weighted LUT per layer, KVQuant's value format).

The package: :mod:`~kvpass.methods.qaq.config` (the knob, the tiers, their bytes), :mod:`~kvpass.methods.qaq.formulas`
(the bits a token needs), :mod:`~kvpass.methods.qaq.storage` (tiers of fixed capacity),
:mod:`~kvpass.methods.qaq.op` (``kv_qaq_attention_``) and :mod:`~kvpass.methods.qaq.fit` (eps and the tier shares
from calibration data); the presets are registered in :mod:`~kvpass.methods.qaq.presets`.
"""

from kvpass.methods.qaq.config import (
                                       QAQConfig,
                                       capacities,
                                       fixed_nbytes,
                                       from_ring,
                                       qnorm_stats_nbytes,
                                       to_ring,
                                       token_nbytes,
                                       unpack_map,
)
from kvpass.methods.qaq.fit import sensitivities, shares, solve
from kvpass.methods.qaq.formulas import key_bits, quantile_norm, to_tier, token_range, value_bits
from kvpass.methods.qaq.op import QAQMeta, kv_qaq_attention_
from kvpass.methods.qaq.storage import TierLayout, assign, read, split_buffers, write

__all__ = [
                                       "QAQConfig",
                                       "QAQMeta",
                                       "TierLayout",
                                       "assign",
                                       "capacities",
                                       "fixed_nbytes",
                                       "from_ring",
                                       "key_bits",
                                       "kv_qaq_attention_",
                                       "qnorm_stats_nbytes",
                                       "quantile_norm",
                                       "read",
                                       "sensitivities",
                                       "shares",
                                       "solve",
                                       "split_buffers",
                                       "to_ring",
                                       "to_tier",
                                       "token_nbytes",
                                       "token_range",
                                       "unpack_map",
                                       "value_bits",
                                       "write",
]
