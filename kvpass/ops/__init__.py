"""The kvpass custom ops that the pipeline emits, registered by importing this package.

* :mod:`kvpass.ops.cache`: ``kv_store_``, ``kv_load`` and ``kv_attention`` over any cache spec;
* :mod:`kvpass.ops.recent`: ``kv_recent_attention_`` for caches with a recent window or a residual;
* :mod:`kvpass.ops.balance`: ``kv_balance_``, MiKV's query/key channel balancer (``MethodConfig(balance=True)``);
* :mod:`kvpass.ops.attention`: the attention math they (and the methods' own ops) share.

The methods that need an op of their own keep it beside them (:mod:`kvpass.methods.qaq.op`,
:mod:`kvpass.methods.overlay.op`).
"""

from kvpass.ops import balance, cache, recent  # noqa: F401  (registers the ops)
