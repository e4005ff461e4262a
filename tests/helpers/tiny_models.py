"""Tiny random-weight configs of every supported architecture, built in code (no downloads)."""

from __future__ import annotations

import torch

VOCAB = 96


def _common(**kw):
    base = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0}
    base.update(kw)
    return base


def build(arch: str, attn: str = "sdpa") -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if arch == "llama":
        cfg = tf.LlamaConfig(**_common(num_key_value_heads=2))
        cls = tf.LlamaForCausalLM
    elif arch == "mistral":
        cfg = tf.MistralConfig(**_common(num_key_value_heads=2, sliding_window=None))
        cls = tf.MistralForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**_common(num_key_value_heads=2))
        cls = tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**_common(num_key_value_heads=2, head_dim=16))
        cls = tf.Qwen3ForCausalLM
    elif arch == "phi3":
        cfg = tf.Phi3Config(**_common(num_key_value_heads=2, partial_rotary_factor=0.5))
        cls = tf.Phi3ForCausalLM
    elif arch == "gemma":
        cfg = tf.GemmaConfig(**_common(num_key_value_heads=1, head_dim=16))
        cls = tf.GemmaForCausalLM
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(**_common(num_key_value_heads=1, head_dim=16, num_hidden_layers=3,
                                            sliding_window=8, layer_types=["sliding_attention", "sliding_attention",
                                                                           "full_attention"]))
        cls = tf.Gemma3ForCausalLM
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=256, bos_token_id=1,
                               eos_token_id=2, pad_token_id=0)
        cls = tf.GPTNeoXForCausalLM
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1,
                            eos_token_id=2, pad_token_id=0)
        cls = tf.GPT2LMHeadModel
    elif arch == "opt":
        cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=256, word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
        cls = tf.OPTForCausalLM
    else:
        raise ValueError(arch)
    cfg._attn_implementation = attn
    model = cls(cfg).eval()
    # random init is too tame to tell caches apart: widen the weights so logits are peaked and keys vary
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    return model


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma3", "gpt_neox", "gpt2", "opt"]
