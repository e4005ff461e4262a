"""Evaluation: perplexity, passkey retrieval, memory and speed of each method next to the fp16 cache and the
peers users already have (transformers' QuantizedCache with quanto and HQQ)."""
