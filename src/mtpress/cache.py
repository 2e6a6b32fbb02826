"""Never redo a stage whose inputs are unchanged, across runs and processes.

A stage's key hashes its inputs by content (sha256 of files, toolchain version, stage parameters) —
never paths — and the code that computes it: the digest of the stage's module and every mtpress module
it imports (``mtpress.code_digest``), so a changed stage reruns while unchanged ones are reused. Its
result is stored under the key next to the outputs; a hit is used only if every output file it names
still exists with the size and modification time recorded when it was written. Outputs are renamed
into place only when complete, so a run that died midway leaves nothing a later run could mistake for
a result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mtpress.checkpoint import ModelDir
from mtpress.code_digest import code_digest
from mtpress.fsutil import write_text_atomic
from mtpress.stages.bench import BenchResult, ConfigResult, Figures, Sample, Spread
from mtpress.stages.export_mlx import MlxChecks, MlxPack, PackFile
from mtpress.stages.gate import ClientRun, GateResult, SnapshotCheck
from mtpress.stages.gguf_files import GgufFile
from mtpress.stages.imatrix import ImatrixFile
from mtpress.stages.quality import Estimate, QualityResult, QuantQuality
from mtpress.stages.realign import HiddenStates, RealignResult
from mtpress.stages.smoke import SmokeResult

T = TypeVar("T")
# What a cache entry may hold; results are stored as JSON (never pickles) and rebuilt by type name.
RESULT_TYPES = {cls.__name__: cls for cls in (GgufFile, SmokeResult, BenchResult, ConfigResult, Figures, Sample,
                                              Spread, QualityResult, QuantQuality, Estimate, GateResult, ClientRun,
                                              SnapshotCheck, MlxPack, PackFile, MlxChecks, HiddenStates,
                                              RealignResult, ModelDir, ImatrixFile)}
# A stored result whose type has since gained or lost fields must not be decoded: it is part of every key.
RESULT_SCHEMA = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in RESULT_TYPES.items()}
CACHE_DIR = ".mtpress-cache"
FORMAT = 2
# The module whose code (with everything it imports from mtpress) makes each stage's results.
STAGE_CODE = {
    "convert": "mtpress.stages.convert", "mmproj": "mtpress.stages.convert", "quantize": "mtpress.stages.quantize",
    "smoke": "mtpress.stages.smoke", "bench": "mtpress.stages.bench", "quality": "mtpress.stages.quality",
    "gate": "mtpress.stages.gate", "collect": "mtpress.stages.realign", "realign": "mtpress.stages.realign",
    "export_mlx": "mtpress.stages.export_mlx", "check_mlx": "mtpress.stages.export_mlx",
    "imatrix": "mtpress.stages.imatrix",
}


def cache_key(*parts: Any) -> str:
    payload = json.dumps([FORMAT, RESULT_SCHEMA, *parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class StageCache:
    """A release folder's cache. It travels to other processes (a Dask worker gets a copy with each task): what
    they add to it is on disk, shared storage included, and so is the count of seconds."""

    def __init__(self, root: Path) -> None:
        self.root = root / CACHE_DIR
        self.hits: list[str] = []  # this process's hits
        # Seconds each stage's results took to compute, in this run or the run that stored them: a rerun
        # that reuses everything reports the same figures, so the manifest (and the repo) do not change.
        # One small file per stage run under a folder of this cache's own, which its copies in worker
        # processes write to as well: the flow's copy reads every count.
        self._seconds = self.root / "seconds" / uuid.uuid4().hex
        self._lock = threading.Lock()  # stages may finish on more than one thread (the flow's smoke lane)
        self._code: dict[str, str] = {}  # stage → code digest, read once per run: the code a run loaded

    def __getstate__(self) -> dict[str, Any]:
        return {name: value for name, value in vars(self).items() if name != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state, _lock=threading.Lock())

    def _entry(self, stage: str, key: str) -> Path:
        if stage not in STAGE_CODE:
            raise KeyError(f"stage {stage!r} has no entry in STAGE_CODE: name the module that computes it")
        with self._lock:
            code = self._code.setdefault(stage, code_digest(STAGE_CODE[stage]))
        return self.root / f"{stage}-{cache_key(key, code)}.json"

    def lookup(self, stage: str, key: str) -> Any | None:
        """The result stored under ``key`` if every file it names is intact, else None; counts nothing."""
        stored = self._valid_entry(stage, key)
        return _decode(stored["result"]) if stored else None

    def run(self, stage: str, key: str, compute: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``compute(*args, **kwargs)``, unless a valid result is stored under ``key``."""
        stored = self._valid_entry(stage, key)
        if stored:
            self.hits.append(stage)
            self._count(stage, stored["seconds"])
            return _decode(stored["result"])
        entry = self._entry(stage, key)
        start = time.monotonic()
        result = compute(*args, **kwargs)
        seconds = round(time.monotonic() - start, 1)
        outputs = [(str(f.path), _stat(f.path)) for f in _flatten(result)
                   if isinstance(f, (GgufFile, ImatrixFile, PackFile))]
        # Results that are not GGUFs (realign's hidden states and checkpoint) name their files themselves.
        outputs += [(str(p), _stat(p)) for r in _flatten(result) for p in getattr(r, "output_files", ())]
        write_text_atomic(entry, json.dumps({"result": _encode(result), "outputs": outputs, "seconds": seconds}))
        self._count(stage, seconds)
        return result

    def _valid_entry(self, stage: str, key: str) -> dict | None:
        entry = self._entry(stage, key)
        if not entry.is_file():
            return None
        stored = json.loads(entry.read_text())
        return stored if all(_unchanged(Path(path), stat) for path, stat in stored["outputs"]) else None

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds per stage, by stage name: stages on parallel lanes finish in any order, the manifest must not."""
        counts = [json.loads(f.read_text()) for f in self._seconds.glob("*.json")] if self._seconds.is_dir() else []
        totals: dict[str, float] = {}
        for stage, seconds in sorted(counts):  # summed in one order, however the files are listed
            totals[stage] = round(totals.get(stage, 0.0) + seconds, 1)
        return totals

    def forget_earlier_counts(self) -> int:
        """Remove the seconds counted by earlier runs (only this cache's are ever read); the caller holds the
        release folder, so none of them is running. How many runs' counts went."""
        counts = self._seconds.parent
        earlier = [d for d in counts.iterdir() if d != self._seconds] if counts.is_dir() else []
        for folder in earlier:
            shutil.rmtree(folder, ignore_errors=True)
        return len(earlier)

    def _count(self, stage: str, seconds: float) -> None:
        write_text_atomic(self._seconds / f"{uuid.uuid4().hex}.json", json.dumps([stage, seconds]))


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, MlxPack):  # a pack is checked through its files
        return [value, *value.files]
    return [item for v in value for item in _flatten(v)] if isinstance(value, (list, tuple)) else [value]


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {"type": type(value).__name__,
                **{f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return str(value) if isinstance(value, Path) else value


def _decode(value: Any, *, top: bool = True) -> Any:
    """The inverse of _encode; sequences inside results are tuples (the result types are frozen)."""
    if isinstance(value, list):
        items = [_decode(v, top=False) for v in value]
        return items if top else tuple(items)
    if isinstance(value, dict) and value.get("type") in RESULT_TYPES:
        cls = RESULT_TYPES[value["type"]]
        return cls(**{f.name: Path(value[f.name]) if f.name == "path" else _decode(value[f.name], top=False)
                      for f in dataclasses.fields(cls)})
    if isinstance(value, dict):
        return {k: _decode(v, top=False) for k, v in value.items()}
    return value


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _unchanged(path: Path, stat: list[int]) -> bool:
    return path.is_file() and list(_stat(path)) == stat
