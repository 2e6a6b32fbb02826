"""The stage cache: content keys, reuse only while every output is intact, JSON only."""

from pathlib import Path

from mtpress.cache import StageCache, cache_key
from mtpress.stages.gguf_files import GgufFile


def gguf(path: Path, payload: bytes) -> GgufFile:
    path.write_bytes(payload)
    return GgufFile(path=path, name=path.name, layout="sidecar", role="model", quant="Q4_K_M", size=len(payload),
                    sha256="ab" * 32, nextn_layers=0, block_count=8, tensor_count=3, parameters=10,
                    head_tensor_types=())


def test_a_second_run_with_the_same_key_reuses_the_result(tmp_path):
    calls = []

    def stage(n):
        calls.append(n)
        return [gguf(tmp_path / f"m{n}.gguf", b"x" * n)]

    first = StageCache(tmp_path).run("quantize", cache_key("sha", "Q4_K_M"), stage, 5)
    cache = StageCache(tmp_path)  # a new process sees the same entries
    second = cache.run("quantize", cache_key("sha", "Q4_K_M"), stage, 5)
    assert calls == [5] and second == first and cache.hits == ["quantize"]
    assert not list((tmp_path / ".mtpress-cache").glob("*.pickle"))


def test_a_changed_input_or_a_touched_output_reruns(tmp_path):
    calls = []

    def stage():
        calls.append(1)
        return [gguf(tmp_path / "m.gguf", b"model")]

    cache = StageCache(tmp_path)
    cache.run("convert", cache_key("a"), stage)
    cache.run("convert", cache_key("b"), stage)
    assert len(calls) == 2
    (tmp_path / "m.gguf").write_bytes(b"damaged!")
    cache.run("convert", cache_key("b"), stage)
    assert len(calls) == 3
    (tmp_path / "m.gguf").unlink()
    cache.run("convert", cache_key("b"), stage)
    assert len(calls) == 4 and cache.hits == []


def test_keys_depend_on_content_not_order_of_dict_keys():
    assert cache_key({"a": 1, "b": 2}) == cache_key({"b": 2, "a": 1})
    assert cache_key("sha1") != cache_key("sha2")


def test_stage_seconds_do_not_depend_on_the_order_parallel_lanes_finished_in(tmp_path):
    """Smoke and quantize finish interleaved in any order; the manifest records the same figures either way."""
    import json

    recorded = []
    for order in (["quantize", "smoke", "quantize"], ["smoke", "quantize", "quantize"]):
        cache = StageCache(tmp_path / "-".join(order))
        for i, stage in enumerate(order):
            cache.run(stage, f"key-{i}", lambda: None)
        recorded.append(json.dumps(cache.seconds))
    assert recorded[0] == recorded[1] and list(json.loads(recorded[0])) == ["quantize", "smoke"]


def test_a_run_forgets_the_seconds_earlier_runs_counted(tmp_path):
    """Each run counts into a folder of its own; without this, every rerun of a release would leave one behind."""
    for _ in range(2):
        StageCache(tmp_path).run("convert", "key", lambda: None)
    counts = tmp_path / ".mtpress-cache" / "seconds"
    assert len(list(counts.iterdir())) == 2
    run = StageCache(tmp_path)
    assert run.forget_earlier_counts() == 2 and not list(counts.iterdir())
    run.run("convert", "key", lambda: None)  # a hit: counted again in this run's own folder
    assert len(list(counts.iterdir())) == 1 and run.seconds == {"convert": 0.0}


def test_file_hashes_are_remembered_per_inode_and_follow_replacement(tmp_path):
    import hashlib
    import os

    from mtpress.fsutil import sha256_file

    path = tmp_path / "f.bin"
    path.write_bytes(b"first")
    assert sha256_file(path) == hashlib.sha256(b"first").hexdigest()
    replacement = tmp_path / "f.tmp"
    replacement.write_bytes(b"other")
    os.replace(replacement, path)  # how every output of mtpress appears
    assert sha256_file(path) == hashlib.sha256(b"other").hexdigest()


def test_big_file_hashes_are_remembered_across_processes_until_the_file_is_replaced(tmp_path, monkeypatch):
    import hashlib
    import os
    import sqlite3
    import subprocess
    import sys

    from mtpress.fsutil import MEMO_MIN_BYTES, _sha256_of, sha256_file

    monkeypatch.setenv("MTPRESS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "shard.safetensors"
    path.write_bytes(b"x" * MEMO_MIN_BYTES)
    subprocess.run([sys.executable, "-c", f"from mtpress.fsutil import sha256_file; sha256_file({str(path)!r})"],
                   check=True, env=os.environ)
    memo = tmp_path / "cache" / "file-hashes.sqlite"
    with sqlite3.connect(memo) as db:
        [(key, remembered)] = db.execute("SELECT key, sha256 FROM hashes").fetchall()
        assert remembered == hashlib.sha256(path.read_bytes()).hexdigest()
        db.execute("UPDATE hashes SET sha256 = 'remembered-by-another-process'")
    _sha256_of.cache_clear()
    assert sha256_file(path) == "remembered-by-another-process"  # read from the memo, not the bytes
    replacement = tmp_path / "new.tmp"
    replacement.write_bytes(b"y" * MEMO_MIN_BYTES)
    os.replace(replacement, path)
    assert sha256_file(path) == hashlib.sha256(b"y" * MEMO_MIN_BYTES).hexdigest()


def test_a_changed_stage_reruns_and_an_unrelated_change_does_not(tmp_path, monkeypatch):
    """Keys carry the code: editing the stage's module, or a module it imports, invalidates its results;
    editing a module it does not reach leaves them reusable."""
    import importlib

    from mtpress import cache as cache_module
    from mtpress.code_digest import code_digest

    package = tmp_path / "src" / "fakepress"
    (package / "stages").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "stages" / "__init__.py").write_text("")
    (package / "helpers.py").write_text("SCALE = 1\n")
    (package / "card.py").write_text("TITLE = 'x'\n")
    (package / "stages" / "quantize.py").write_text("def scale():\n    from ..helpers import SCALE\n    return SCALE\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    importlib.invalidate_caches()
    monkeypatch.setitem(cache_module.STAGE_CODE, "quantize", "fakepress.stages.quantize")
    monkeypatch.setattr(cache_module, "code_digest", lambda module: code_digest(module, package="fakepress"))
    calls = []

    def stage():
        calls.append(1)
        return [gguf(tmp_path / "m.gguf", b"model")]

    def run_once():  # a new StageCache per run, as each flow run makes one
        StageCache(tmp_path / "release").run("quantize", cache_key("sha", "Q4_K_M"), stage)

    run_once()
    run_once()
    assert len(calls) == 1
    (package / "card.py").write_text("TITLE = 'y'\n")  # not imported by the stage
    run_once()
    assert len(calls) == 1
    (package / "helpers.py").write_text("SCALE = 2\n")  # imported (deferred, relative) by the stage
    run_once()
    assert len(calls) == 2
    (package / "stages" / "quantize.py").write_text("def scale():\n    return 3\n")
    run_once()
    assert len(calls) == 3


def test_every_stage_the_flows_cache_names_its_code():
    """A stage name missing from STAGE_CODE would be cached without its code: the cache refuses it."""
    import re

    import pytest

    from mtpress.cache import STAGE_CODE

    root = Path(__file__).parents[1]
    sources = "".join(p.read_text() for p in [*(root / "flows").glob("*.py"), *(root / "src").rglob("*.py")])
    used = set(re.findall(r'cache\.(?:run|lookup)\(\s*"(\w+)"', sources))
    assert used and used <= set(STAGE_CODE)
    with pytest.raises(KeyError, match="STAGE_CODE"):
        StageCache(Path("/nonexistent")).lookup("unnamed", "k")
