"""`kvpass demo`: quantize real KV caches of the bundled model with every format and show error and bits.

Runs the bundled SmolLM2-135M-Instruct over a State of the Union address, keeps every layer's keys (before
and after RoPE) and values, quantizes them with each format and reports the relative reconstruction error
(``||x_hat - x||^2 / ||x||^2``, averaged over layers) and the bits per element counted from the stored
tensors. Falls back to a tiny random Llama (and says so) when the bundled model is not installed.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from kvpass import formats
from kvpass.errors import KVPassError, is_int
from kvpass.models import bundled_texts, load

DEMO_SPECS = [
    "fp8_e4m3:per_token",
    "int8:per_token",
    "int4:per_token:g64",
    "int4:per_channel:g32",
    "nuq4:per_token",
    "int3:per_token:g64",
    "nuq3:per_token",
    "nuq3:per_token+outliers1%",
    "int2:per_token:g64",
    "int2:per_channel:g32",
    "int2:per_token:g64+outliers1%",
    "nuq2:per_token:qnorm",
]


def capture_kv(model, input_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per layer: ``keys_pre_rope``, ``keys`` (post-RoPE, as cached) and ``values``, each ``[B, Hkv, T, D]``."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pre: list[torch.Tensor] = []

    def hook(_mod, _inp, out):
        b, t, _ = out.shape
        pre.append(out.detach().view(b, t, -1, head_dim).transpose(1, 2))

    handles = [layer.self_attn.k_proj.register_forward_hook(hook) for layer in model.model.layers]
    try:
        with torch.no_grad():
            out = model(input_ids, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    return [
        {"keys_pre_rope": pre[i], "keys": layer.keys, "values": layer.values} for i, layer in enumerate(cache.layers)
    ]


def fit_to(spec: formats.QuantSpec, shape: torch.Size) -> formats.QuantSpec:
    """``spec`` without its group where the group does not divide the axis it splits (channels for per-token,
    tokens for per-channel), as the methods fit their specs to a model's head dim."""
    axis = shape[-1] if spec.granularity == "per_token" else shape[-2]
    return spec.with_(group=None) if spec.group is not None and axis % spec.group else spec


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


def run(model_name: str = "smollm2", tokens: int = 1024, console: Console | None = None) -> list[dict]:
    console = console or Console()
    if not is_int(tokens) or tokens < 2:
        raise KVPassError(f"--tokens must be at least 2, got {tokens!r}")
    start = time.time()
    try:
        loaded = load(model_name)
        model, name = loaded.model, loaded.name
        text = bundled_texts()[-1].read_text(encoding="utf-8")
        ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    except KVPassError as err:
        if model_name != "smollm2":
            raise
        console.print(f"[yellow]{err}[/]\n[yellow]Falling back to a tiny random-weight Llama.[/]")
        model, name = tiny_model(), "tiny random Llama"
        ids = torch.randint(0, 512, (1, tokens), generator=torch.Generator().manual_seed(0))
    layers = capture_kv(model, ids)
    rows = []
    for text in tqdm(DEMO_SPECS, desc="quantizing", unit="format"):
        spec = fit_to(formats.parse_spec(text), layers[0]["keys"].shape)
        row: dict = {"spec": str(spec)}
        for kind in ("keys_pre_rope", "keys", "values"):
            errs, bits = [], []
            for layer in layers:
                x = layer[kind]
                q = formats.quantize(x, spec)
                errs.append(float((q.dequantize() - x).pow(2).sum() / x.pow(2).sum()))
                bits.append(q.bits_per_element)
            row[kind] = sum(errs) / len(errs)
            row["bits"] = sum(bits) / len(bits)
        rows.append(row)
    table = Table(title=f"KV cache of {name}: {ids.shape[1]} tokens x {len(layers)} layers "
                        f"(relative squared error, averaged over layers)")
    for col in ("format", "bits/elem", "keys pre-RoPE", "keys post-RoPE", "values"):
        table.add_column(col, justify="left" if col == "format" else "right", no_wrap=True)
    for r in rows:
        table.add_row(r["spec"], f"{r['bits']:.3f}", f"{r['keys_pre_rope']:.2e}", f"{r['keys']:.2e}",
                      f"{r['values']:.2e}")
    console.print(table)
    console.print(f"bits/elem counts codes, scales, zero points, outliers and LUTs as stored. "
                  f"({time.time() - start:.0f} s)")
    return rows
