"""Where a flow run's Hub token comes from: ``HF_TOKEN`` in the worker's environment, or a Prefect Secret block.

Only the block's *name* is ever a flow parameter (parameters are stored and shown in the UI); the value
is read inside the run and placed in this process's environment, where `mtpress.hub.client.hub_api`
finds it and from which `run_tool` strips it for every subprocess.
"""

from __future__ import annotations

import os

from prefect.blocks.system import Secret

from mtpress.errors import PublishError


def use_token_from_secret(block_name: str | None) -> None:
    """Load the token from the Secret block ``block_name`` unless the environment already has one."""
    if not block_name or os.environ.get("HF_TOKEN"):
        return
    try:
        token = Secret.load(block_name).get()
    except ValueError as e:  # what Prefect raises for a missing block
        raise PublishError(f"no Prefect Secret block named {block_name!r} to read the Hub token from",
                           hint=f"create it: prefect block create secret, name it {block_name!r}, "
                                "paste a write token") from e
    if not isinstance(token, str) or not token.strip():
        raise PublishError(f"the Prefect Secret block {block_name!r} holds no token",
                           hint="store the Hub write token itself as the block's value")
    os.environ["HF_TOKEN"] = token.strip()
