"""Tiny but real Qwen3.5 checkpoints for demos and tests: real vocabulary, real layout, real MTP head."""

from mtpress.demo.models import BENCHMARK_SPEC, DemoSpec, write_demo_base, write_demo_finetune, write_demo_model
from mtpress.demo.tokenizer import write_qwen35_tokenizer

__all__ = ["BENCHMARK_SPEC", "DemoSpec", "write_demo_base", "write_demo_finetune", "write_demo_model",
           "write_qwen35_tokenizer"]
