"""Compile the bundled model (or a tiny random Llama when it is not installed) with a 4-bit KV cache,
generate, and print the cache report.

    python examples/quickstart.py [--method int4] [--max-cache-len 1024]
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console

import kvpass
from kvpass.errors import KVPassError
from kvpass.models import load


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="int4", help=f"one of: {', '.join(kvpass.methods())}")
    parser.add_argument("--max-cache-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    console = Console()
    try:
        loaded = load("smollm2")
        model, tokenizer = loaded.model, loaded.tokenizer
        chat = [{"role": "user", "content": "What does a KV cache store in a transformer?"}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    except KVPassError as err:
        console.print(f"[yellow]{err}\nusing a tiny random-weight Llama instead[/]")
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
        tokenizer, ids = None, torch.randint(0, 256, (1, 16))
    for method in ("fp16", args.method):
        qmodel = kvpass.compile(model, method, max_cache_len=args.max_cache_len, batch_size=1)
        out = qmodel.generate(ids, max_new_tokens=args.new_tokens)
        new = out[0, ids.shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer else new.tolist()
        console.rule(f"{method} cache")
        console.print(text)
        report = qmodel.cache_report()
        console.print(f"{report.nbytes:,} cache bytes, {report.bits_per_element:.2f} bits/element, "
                      f"{report.compression:.2f}x smaller than the {report.dense_dtype} cache")
    console.print(qmodel.cache_report().table())


if __name__ == "__main__":
    main()
