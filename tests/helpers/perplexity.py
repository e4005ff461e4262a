"""Mean next-token NLL of windows through a compiled model, each window from an empty cache."""

import torch


def nll(qm, windows) -> float:
    total = 0.0
    for w in windows:
        qm.reset()
        total += float(torch.nn.functional.cross_entropy(qm(w[None])[0, :-1], w[1:], reduction="sum"))
    return total / sum(len(w) - 1 for w in windows)
