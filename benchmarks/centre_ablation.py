"""Ablation of the centred presets (docs/methods/turboquant.md): keys before RoPE, ``centre=64`` on keys and values,
and both, registered here beside the presets, then ``kvpass eval`` over them.

Run: ``python benchmarks/centre_ablation.py --model qwen2.5 --windows 1 --context 2048 --no-peers`` (any ``kvpass
eval`` options; ``--methods`` defaults to every variant below and the presets they vary).
"""

from __future__ import annotations

import sys

from kvpass.methods import MethodConfig, register_method

INT4, TQ4 = "int4:per_token:g64", "lm4:per_token:hadamard"
VARIANTS = {  # name: (keys, values, keys before RoPE)
    "int4-p": (INT4, INT4, True),
    "int4-post-c": (f"{INT4}|centre=64", f"{INT4}|centre=64", False),
    "tq-4bit-post-c": (f"{TQ4}|centre=64", f"{TQ4}|centre=64", False),
    "tq-4bit-post-kc": (f"{TQ4}|centre=64", TQ4, False),
}


def main(argv: list[str]) -> None:
    for name, (k, v, pre) in VARIANTS.items():
        register_method(MethodConfig(name, f"ablation: {k} / {v}{', keys before RoPE' if pre else ''}", k, v,
                                     pre_rope_keys=pre))
    from kvpass.__main__ import main as kvpass_main

    if "--methods" not in argv:
        argv = [*argv, "--methods", ",".join(["int4", "int4-c", "tq-4bit", "tq-4bit-c", *VARIANTS])]
    kvpass_main(["eval", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
