"""Prompts and transformers' own generation, the reference the rewritten models are checked against."""

import torch

from helpers.tiny_models import VOCAB

NEW = 16


def prompt(batch: int, length: int = 10, pad: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, :pad] = 0  # left padding on the second row
        ids[1, :pad] = 0
    return ids, mask


def reference(model, ids, mask, new=NEW):
    """transformers' own greedy generation with its dynamic cache: tokens and the logits of every step."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        prefill = model(ids, attention_mask=mask, position_ids=pos).logits
    return out.sequences, prefill, torch.stack(out.logits, 1)
