"""Shared test helpers: tiny models built in code, a plain PyTorch decoder, prompts and reference generation."""
