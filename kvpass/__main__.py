"""The ``kvpass`` command line."""

from __future__ import annotations

import argparse
import sys

from kvpass.errors import KVPassError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvpass", description="Low-bit KV caches for LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize the bundled model's real KV cache with every format")
    demo.add_argument("--model", default="smollm2", help="model directory, .gguf file or Hub id (default: bundled)")
    demo.add_argument("--tokens", type=int, default=1024, help="tokens of text to run (default 1024)")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from kvpass import demo as demo_mod

            demo_mod.run(args.model, args.tokens)
    except KVPassError as err:
        print(f"kvpass: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
