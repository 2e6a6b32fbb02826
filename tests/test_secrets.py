"""The Hub token from a Prefect Secret block: read inside the run, never a parameter, never logged."""

import os

import pytest
from prefect import flow
from prefect.blocks.system import Secret

from flows.secrets import use_token_from_secret
from mtpress.errors import PublishError
from mtpress.hub.client import hub_api

TOKEN = "hf_" + "mtpressSecretBlockToken0123456789abcdef"


@flow
def whoami_flow(token_secret: str) -> str:
    use_token_from_secret(token_secret)
    return hub_api().whoami()["name"]


def test_a_flow_reads_the_token_from_a_secret_block(local_hub, prefect_harness, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    local_hub.tokens = {TOKEN}  # the hub knows only the block's token: whoami answers only if the flow used it
    Secret(value=TOKEN).save("mtpress-test-hf-token", overwrite=True)
    assert whoami_flow("mtpress-test-hf-token") == local_hub.user
    assert hub_api().token == TOKEN


def test_the_environment_wins_over_the_block(local_hub, prefect_harness, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "fromTheEnvironment0123456789abcdefgh")
    Secret(value=TOKEN).save("mtpress-test-hf-token", overwrite=True)
    use_token_from_secret("mtpress-test-hf-token")
    assert hub_api().token.startswith("hf_fromTheEnvironment")


@pytest.mark.parametrize("value, problem", [(None, "no Prefect Secret block named"), ("  ", "holds no token")])
def test_a_missing_or_empty_block_is_a_clear_error(prefect_harness, monkeypatch, value, problem):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    name = "mtpress-test-empty" if value is not None else "mtpress-test-absent"
    if value is not None:
        Secret(value=value).save(name, overwrite=True)
    with pytest.raises(PublishError, match=problem) as err:
        use_token_from_secret(name)
    assert name in str(err.value)
    assert "HF_TOKEN" not in os.environ
