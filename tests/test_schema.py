from pathlib import Path

import pytest

from mtpress.archs import registered
from mtpress.errors import ConfigError
from mtpress.schema import load_release_config

# watch.yaml is the watcher's policy, validated by its own schema (tests/test_watch.py).
CONFIGS = sorted(p for p in Path(__file__).parent.parent.joinpath("model_configs").glob("*.yaml")
                 if p.name != "watch.yaml")
VALID = """
name: Demo
finetune: {repo: a/b}
donor: {repo: c/d, revision: 0123abc}
target: {repo: e/f}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "release.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_release_config(path)
    assert cfg.arch in registered() and cfg.quants and cfg.target.repo


def test_seed_releases_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "qwenpaw-flash-9b-mtp.yaml", "qwopus3.5-9b-coder-mtp.yaml", "qwythos-9b-mtp.yaml"} <= names


def test_defaults_come_from_the_schema(tmp_path):
    cfg = load_release_config(write(tmp_path, VALID))
    assert cfg.layouts == ("sidecar", "embedded")
    assert cfg.quants == ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")
    assert cfg.donor.revision == "0123abc" and cfg.finetune.revision == "main"


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, VALID + "quantz: [Q4_K_M]\n")
    with pytest.raises(ConfigError) as err:
        load_release_config(path)
    assert f"{path}: quantz: unknown key" in str(err.value)


def test_unknown_quant_type_lists_the_choices(tmp_path):
    path = write(tmp_path, VALID + "quants: [Q4_K_M, Q3_X]\n")
    with pytest.raises(ConfigError) as err:
        load_release_config(path)
    message = str(err.value)
    assert "quants: unknown quant type 'Q3_X'" in message and "Q6_K" in message


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, "name: 'bad name!'\nfinetune: {repo: nope}\ntarget: {repo: e/f}\nlayouts: []\n")
    with pytest.raises(ConfigError) as err:
        load_release_config(path)
    problems = err.value.problems
    assert any(p.startswith("name:") for p in problems)
    assert any(p.startswith("finetune.repo:") and "owner/name" in p for p in problems)
    assert any(p.startswith("layouts:") for p in problems)


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="target: required key is missing"):
        load_release_config(write(tmp_path, "name: x\nfinetune: {repo: a/b}\n"))


def test_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_release_config(write(tmp_path, "name: [unclosed\n"))


def test_source_needs_exactly_one_of_repo_or_path(tmp_path):
    with pytest.raises(ConfigError, match="finetune: give exactly one of 'repo'"):
        load_release_config(write(tmp_path, "name: x\nfinetune: {repo: a/b, path: here}\ntarget: {repo: e/f}\n"))


def test_local_paths_resolve_relative_to_the_config(tmp_path):
    cfg = load_release_config(write(tmp_path, "name: x\nfinetune: {path: models/ft}\ntarget: {repo: e/f}\n"))
    assert cfg.finetune.path == (tmp_path / "models" / "ft").resolve()
