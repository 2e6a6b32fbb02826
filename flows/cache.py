"""Moved to ``mtpress.cache`` (it has no Prefect in it). Kept only for flows/publish.py's import until it
imports ``mtpress.cache`` itself (issue 19); delete then."""

from mtpress.cache import StageCache, cache_key

__all__ = ["StageCache", "cache_key"]
