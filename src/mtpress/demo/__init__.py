"""Tiny but real Qwen3.5 checkpoints for demos and tests: real vocabulary, real layout, real MTP head."""
