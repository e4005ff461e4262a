"""What `kvpass eval` shows and writes: a rich table, a JSON file, PNG plots, and the RESULTS.md table."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.table import Table


def _f(x, fmt: str, none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def table(result: dict) -> Table:
    t = Table(title=f"kvpass eval: {result['model']}, perplexity over {result['tokens_scored']} tokens "
                    f"at context {result['context']}")
    cols = ["method", "bits/elem", "cache MB", "ppl", "Δppl", "passkey synth", "passkey text", "prefill tok/s",
            "decode tok/s", "peak MB", f"ctx in {result['config']['memory_budget_gb']:g} GiB"]
    for c in cols:
        t.add_column(c, justify="left" if c == "method" else "right", no_wrap=True)
    for r in result["records"]:
        bits = _f(r["bits_per_element"], ".2f") + ("" if r["bits_measured"] else "*")
        t.add_row(
            r["method"] + (" (failed)" if r.get("error") else ""), bits, _f(r["cache_bytes"] and r["cache_bytes"] / 2**20, ".1f"), _f(r["perplexity"], ".3f"),
            _f(r["perplexity_rel_change"], "+.2%"),
            _f(r["passkey_synthetic"], ".0%"), _f(r["passkey_text"], ".0%"), _f(r["prefill_tokens_per_s"], ".0f"),
            _f(r["decode_tokens_per_s"], ".1f"), _f(r["peak_memory_bytes"] and r["peak_memory_bytes"] / 2**20, ".0f"),
            _f(r["max_context_in_budget"], ","),
        )
    return t


FOOTNOTE = ("bits/elem: measured from the stored buffers (codes, scales, zero points, outliers); * = nominal, for "
            "peers whose storage is not inspected. fits in budget: tokens of context whose cache fits in the memory "
            "budget. Peers' perplexity is teacher-forced decode, one token at a time (their prefill attends in full "
            "precision); their prefill tok/s is not measured.")


def write_json(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2, default=str))


def write_plots(result: dict, directory: str | Path) -> list[Path]:
    """perplexity vs bits per element for all methods; a passkey heatmap (depth x length) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(9, 5))
    shown = [r for r in result["records"] if r["perplexity"] is not None and r["bits_per_element"] is not None]
    colors = plt.get_cmap("tab20")
    for i, r in enumerate(shown):
        # a legend instead of labels at the points: the 4-5 bit methods sit on top of each other
        ax.scatter(r["bits_per_element"], r["perplexity"], color=colors(i % 20), label=r["method"],
                   marker="o" if r["kind"].startswith("kvpass") else "s", edgecolors="black", linewidths=0.4)
    if shown:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="o kvpass, □ peer",
                  title_fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xticks([2, 3, 4, 6, 8, 12, 16, 32], ["2", "3", "4", "6", "8", "12", "16", "32"])
    ax.set_xlabel("bits per element (keys and values, metadata included; log scale)")
    ax.set_ylabel(f"perplexity (context {result['context']}, log scale)")
    ax.set_yscale("log")
    ax.set_title(f"{result['model']}: perplexity vs cache size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "perplexity_vs_bits.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    records = [r for r in result["records"] if r["passkey_cells"]]
    if records:
        lengths = sorted({c["length"] for r in records for c in r["passkey_cells"]})
        depths = sorted({c["depth"] for r in records for c in r["passkey_cells"]})
        cols = min(6, len(records))
        rows = -(-len(records) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols + 1, 2.2 * rows + 0.6), squeeze=False)
        for ax in axes.flat[len(records):]:
            ax.axis("off")
        for ax, r in zip(axes.flat, records):
            grid = [[0.0] * len(lengths) for _ in depths]
            for i, d in enumerate(depths):
                for j, n in enumerate(lengths):
                    hits = [c["correct"] for c in r["passkey_cells"] if c["depth"] == d and c["length"] == n]
                    grid[i][j] = sum(hits) / len(hits) if hits else float("nan")
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for i, row in enumerate(grid):
                for j, acc in enumerate(row):
                    ax.text(j, i, "-" if math.isnan(acc) else f"{acc:.0%}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            ax.set_title(r["method"], fontsize=8)
            ax.set_xlabel("prompt tokens", fontsize=7)
        for row in axes:
            row[0].set_ylabel("needle depth", fontsize=7)
        fig.suptitle("passkey accuracy (both haystacks)", fontsize=9)
        fig.tight_layout()
        paths.append(out / "passkey_heatmap.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def markdown(result: dict, command: str) -> str:
    """The RESULTS.md section of one run."""
    lines = [
        f"## {result['model']} — {result['date']}",
        "",
        f"Machine: {result['machine']} ({result['device']}); versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
        f"Command: `{command}`",
        "",
        (f"Perplexity over {result['tokens_scored']} tokens in {result['windows']} window(s) of {result['context']} "
         "tokens, the quantized cache read for every token."),
        "",
        ("| method | bits/elem | cache MB | perplexity | Δ vs fp16 | passkey synthetic | passkey real text | prefill tok/s "
         f"| decode tok/s | context in {result['config']['memory_budget_gb']:g} GiB |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["records"]:
        bits = _f(r["bits_per_element"], ".2f") + ("" if r["bits_measured"] else " (nominal)")
        lines.append(
            f"| {r['method']} | {bits} | {_f(r['cache_bytes'] and r['cache_bytes'] / 2**20, '.1f')} | "
            f"{_f(r['perplexity'], '.3f')} | {_f(r['perplexity_rel_change'], '+.2%')} | "
            f"{_f(r['passkey_synthetic'], '.0%')} | {_f(r['passkey_text'], '.0%')} | "
            f"{_f(r['prefill_tokens_per_s'], '.0f')} | {_f(r['decode_tokens_per_s'], '.1f')} | "
            f"{_f(r['max_context_in_budget'], ',')} |"
        )
    failed = [r for r in result["records"] if r.get("error")]
    if failed:
        lines += ["", "Failed in this run: " + "; ".join(f"`{r['method']}`: {r['error']}" for r in failed)]
    return "\n".join(lines) + "\n"


def add_results_section(path: str | Path, section: str) -> None:
    """Put ``section`` (starting ``## ``) first among the sections of the RESULTS file at ``path`` (newest first),
    creating it with its header when missing."""
    path = Path(path)
    if not path.exists():
        path.write_text("# Results\n\nWritten by `kvpass eval --results-md`; newest first.\n\n" + section)
        return
    old = path.read_text()
    head, sep, rest = old.partition("\n## ")
    path.write_text(head.rstrip() + "\n\n" + section + sep + rest if sep else old + section)
