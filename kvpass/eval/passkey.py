"""Passkey retrieval: a number hidden at a given depth of a long filler context, asked for at the end.

Two haystacks: the classic repeated filler sentences, and real text (a harder test: the key competes with
meaningful content). Lengths are in tokens of the model's tokenizer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from kvpass.errors import KVPassError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


def needle(key: int) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key. "


@dataclass
class PasskeyPrompt:
    ids: torch.Tensor  # [1, T]
    key: int
    depth: float  # requested depth in [0, 1]
    key_token_start: int  # index of the first token of the needle sentence
    key_token_end: int
    haystack: str
    length: int = 0  # the requested length (``ids`` may hold a token more: BOS)


def make_prompt(tokenizer, length: int, depth: float, key: int, haystack: str = "synthetic",
                text: str | None = None, offset: int = 0) -> PasskeyPrompt:
    """A prompt of about ``length`` tokens with the needle at ``depth`` of the haystack (0 = start, 1 = end).
    A real-text haystack starts ``offset`` tokens into ``text`` (wrapping around), so repeated trials of one cell
    read different text."""
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids
    head, tail, pin = enc(INTRO), enc(QUESTION), enc(needle(key))
    budget = length - len(head) - len(tail) - len(pin)
    if budget <= 0:
        need = length - budget + 1
        raise KVPassError(f"passkey length {length} leaves no room for the haystack; use --passkey-lengths of "
                          f"at least {need} tokens for this tokenizer")
    if haystack == "synthetic":
        unit = enc(FILLER)
        filler = (unit * (budget // len(unit) + 1))[:budget]
    else:
        if not text:
            raise KVPassError("a real-text haystack needs text; pass --text or use the synthetic haystack only")
        whole = enc(text)
        start = offset % max(1, len(whole))
        filler = (whole[start:] + whole * (budget // max(1, len(whole)) + 1))[:budget]
    cut = round(depth * budget)
    tokens = head + filler[:cut] + pin + filler[cut:] + tail
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = [bos] if bos is not None and tokenizer("a").input_ids[:1] == [bos] else []
    ids = torch.tensor([prefix + tokens])
    start = len(prefix) + len(head) + cut
    return PasskeyPrompt(ids, key, depth, start, start + len(pin), haystack, length)


def score(generated: str, key: int) -> bool:
    """Right when the first number in the answer is the key."""
    found = re.findall(r"\d+", generated)
    return bool(found) and found[0] == str(key)


def keys(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(10000, 99999) for _ in range(n)]
