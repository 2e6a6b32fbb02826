"""Moved to ``mtpress.stage_keys`` (it has no Prefect in it). Kept only for flows/publish.py's import until it
imports ``mtpress.stage_keys`` itself (issue 19); delete then."""

from mtpress.stage_keys import convert_key, quantize_key, reused_outputs

__all__ = ["convert_key", "quantize_key", "reused_outputs"]
