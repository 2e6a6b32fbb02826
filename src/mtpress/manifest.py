"""The release manifest: every input, tool, file and measurement of a release, as JSON.

The card is rendered from it alone, so everything a card says can be traced here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Any

from mtpress.fsutil import write_text_atomic

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


def jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.name.startswith("_") and f.name != "path"}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def hardware() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": None, "os": f"{platform.system()} {platform.release()}"}


def write_manifest(release_dir: Path, manifest: dict[str, Any]) -> Path:
    path = release_dir / MANIFEST
    write_text_atomic(path, json.dumps({"schema_version": SCHEMA_VERSION, **jsonable(manifest)}, indent=2,
                                       ensure_ascii=False) + "\n")
    return path


def read_manifest(release_dir: Path) -> dict[str, Any]:
    return json.loads((release_dir / MANIFEST).read_text(encoding="utf-8"))
