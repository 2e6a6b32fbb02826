"""The typed manifest reads every manifest mtpress wrote and writes back exactly what it read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from mtpress.manifest import MANIFEST, Manifest, read_manifest, write_manifest

SAMPLE = Path(__file__).parent / "data" / "manifest-sample.json"


def test_an_older_manifest_reads_and_writes_back_what_it_stated(tmp_path):
    """schema_version 1 from before the bench, quality, MLX and mmproj stages: nothing is filled in."""
    write_manifest(tmp_path, Manifest.model_validate_json(SAMPLE.read_bytes()))
    assert json.loads((tmp_path / MANIFEST).read_text()) == json.loads(SAMPLE.read_text())
    again = (tmp_path / MANIFEST).read_bytes()
    write_manifest(tmp_path, read_manifest(tmp_path))
    assert (tmp_path / MANIFEST).read_bytes() == again


def test_the_gate_section_is_added_after_the_rest(tmp_path):
    manifest = Manifest.model_validate_json(SAMPLE.read_bytes())
    assert manifest.gate is None and "gate" not in json.loads(manifest.model_dump_json(exclude_unset=True))
    rows = [{"client": "llama.cpp -hf", "matches": "16/16 tokens"}]
    write_manifest(tmp_path, manifest.model_copy(update={"gate": rows, "gate_details": {"commit": "0" * 40}}))
    written = json.loads((tmp_path / MANIFEST).read_text())
    assert list(written)[-3:] == ["stage_seconds", "gate", "gate_details"] and written["gate"] == rows
    assert read_manifest(tmp_path).sha256_by_path() == {f["path"]: f["sha256"] for f in written["files"]}


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m.update(galleons=3), "galleons"),  # a key no mtpress wrote
    (lambda m: m["files"][0].update(sha265="x"), "files.0.sha265"),  # a misspelt fact
    (lambda m: m.pop("files"), "files"),  # a release without its files
    (lambda m: m["inject"].update(action="borrowed"), "inject.action"),
])
def test_a_manifest_mtpress_did_not_write_is_refused(tmp_path, edit, problem):
    record = json.loads(SAMPLE.read_text())
    edit(record)
    (tmp_path / MANIFEST).write_text(json.dumps(record))
    with pytest.raises(ValidationError, match=problem.replace(".", r"\.")):
        read_manifest(tmp_path)
