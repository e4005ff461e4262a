"""Text for evaluation: files or a `datasets` name, tokenized into fixed-length windows."""

from __future__ import annotations

import torch

from kvpass.errors import KVPassError
from kvpass.models import read_texts


def load_text(paths: list[str] | None = None, dataset: str | None = None) -> str:
    """Text files (or the bundled sample), or a Hugging Face `datasets` name such as ``wikitext-2``
    (``wikitext:wikitext-2-raw-v1:test`` in full: name, config, split)."""
    if dataset:
        return load_dataset_text(dataset)
    return read_texts(paths)


def load_dataset_text(spec: str) -> str:
    aliases = {"wikitext-2": "wikitext:wikitext-2-raw-v1:test", "wikitext-103": "wikitext:wikitext-103-raw-v1:test"}
    name, config, split = (aliases.get(spec, spec).split(":") + [None, None])[:3]
    try:
        import datasets
    except ImportError:
        raise KVPassError(f"--dataset {spec} needs the 'datasets' package; pip install datasets (or pass --text FILES)") from None
    ds = datasets.load_dataset(name, config, split=split or "test")
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(t for t in ds[column] if t)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself starts an encoding with BOS (Gemma does; perplexity windows then need it)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    if tokenizer is None:
        raise KVPassError("the model has no tokenizer; pass a model directory or GGUF file that includes one")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids


def windows(ids: torch.Tensor, context: int, count: int | None, bos: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows of ``context`` tokens (BOS first when given), at most ``count`` of them."""
    body = context - (1 if bos is not None else 0)
    if body < 2 or len(ids) < body:
        raise KVPassError(
            f"text is shorter than one window: {len(ids)} tokens < context {context}; pass more text (--text) or "
            "a smaller --context"
        )
    out = []
    for start in range(0, len(ids) - body + 1, body):
        w = ids[start:start + body]
        out.append(torch.cat([torch.tensor([bos]), w]) if bos is not None else w)
        if count is not None and len(out) >= count:
            break
    return out
