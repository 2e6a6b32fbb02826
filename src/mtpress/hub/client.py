"""The one place that builds a huggingface_hub client: endpoint and token come from the environment.

``HF_ENDPOINT`` selects the Hub (the local endpoint in the demo); the token comes from ``HF_TOKEN``
and never appears in a log line, an exception or a subprocess command line.
"""

from __future__ import annotations

import os
from functools import lru_cache

from huggingface_hub import HfApi

HUB_MAX_FILE_SIZE = 50 * 1000**3  # the Hub's per-file limit ("storage limits": 50 GB; 20 GB recommended)


@lru_cache(maxsize=None)
def _api(endpoint: str, token: str | None) -> HfApi:
    return HfApi(endpoint=endpoint, token=token or False)


def hub_api() -> HfApi:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return _api(endpoint, os.environ.get("HF_TOKEN") or None)
