"""The model card: README.md (English) and README_zh.md (Chinese), rendered from the release manifest alone.

Every number on the card is read from the manifest or computed from it here, in Python; the
templates in ``templates/card/`` only lay the facts out. Everything from the manifest is treated as
untrusted text (upstream names and licenses come from other people's repos): templates run in a
sandbox, every value is escaped for Markdown unless a filter made it safe for its context, the YAML
front matter is dumped from a dict, and the rendered text is checked for encoding damage.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import yaml
from huggingface_hub import ModelCard
from jinja2 import FileSystemLoader, StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from mtpress.errors import MtpressError
from mtpress.fsutil import write_text_atomic
from mtpress.manifest import Manifest, read_manifest
from mtpress.naming import pair_trunks_with_heads
from mtpress.schema import REPO_ID, SmokeSpec

TEMPLATES_DIR = Path(__file__).resolve().parents[3] / "templates" / "card"
# Language → file in the published repo. README.md is the card the Hub shows and the only file whose
# front matter it reads; the templates justify the two-file layout.
CARD_FILES = {"en": "README.md", "zh": "README_zh.md"}
HUB_URL = "https://huggingface.co"

# What a missing value renders as: "not measured" for measurements, "not recorded" for facts the
# manifest lacks (a license, a context length). Never a guess, never a placeholder.
MISSING_WORDS = {
    "en": {"not_measured": "not measured", "not_recorded": "not recorded", "none": "none", "yes": "yes", "no": "no"},
    "zh": {"not_measured": "未测量", "not_recorded": "未记录", "none": "无", "yes": "是", "no": "否"},
}

# The recommendation rule. Q4_K_M first: it is llama.cpp's own default tag for `-hf` and the usual
# size/quality balance; larger quants follow, so a release without Q4_K_M still recommends the
# smallest of the well-behaved K/8-bit quants. Sidecar before embedded: its trunk also loads in Ollama
# and LM Studio, and llama.cpp pairs it with its `mtp-` head. Below 4 bits nothing is recommended.
DEFAULT_QUANT_PREFERENCE = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
# "Pick this if" in the files table: the smallest model file whose mean KL-divergence against BF16 is at most this
# (about where Q4_K_M files of full-size models sit, and well below 2- and 3-bit ones).
CLOSE_ENOUGH_KLD = 0.05
LAYOUT_PREFERENCE = ("sidecar", "embedded")

# Below this many parameters, speed figures describe a toy, not what the released family does.
SMALL_MODEL_PARAMETERS = 1_000_000_000
SHORT_SHA = 12
# What a file is, by (layout, role); the templates name each kind in their language.
FILE_KINDS = {("embedded", "model"): "embedded", ("sidecar", "model"): "trunk", ("sidecar", "head"): "head",
              ("sidecar", "mmproj"): "mmproj", ("embedded", "mmproj"): "mmproj"}
# The shape of a Hub license identifier (apache-2.0, mit, llama3.1, cc-by-nc-4.0, other, …). Anything
# else is published as `license: other` and shown verbatim, as text, in the card body.
LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]{0,63}$")
FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
# A family name that can be a Hub tag as it is ("Qwen3.5" → "qwen3.5"); anything else is not tagged.
FAMILY_TAG = re.compile(r"^[a-z0-9][a-z0-9.-]{0,31}$")


class CardError(MtpressError, ValueError):
    """The card cannot be rendered truthfully: the manifest lacks a fact, a template is wrong, or the
    rendered text is damaged.

    Example:
        README_zh.md: encoding damage (UTF-8 read as cp874) at line 3: 'ไธญๆ–‡' is '中文'
    """


@dataclass(frozen=True)
class RenderedCard:
    """The card's files (repo path → text) and the front matter README.md carries."""

    files: dict[str, str]
    front_matter: dict[str, Any]


def render_card(manifest: Manifest, templates_dir: Path | None = None) -> RenderedCard:
    """Render the English and Chinese card from a release manifest; raise CardError instead of guessing."""
    # The facts are built from the manifest as its file holds it: every fact reads as "stated or not", the same
    # for a manifest of any age, and a fact an older manifest lacks is never filled in by a default.
    record = manifest.model_dump(mode="json", exclude_unset=True)
    return render_card_files(templates_dir or TEMPLATES_DIR, card_facts(record), front_matter(record))


def render_card_files(templates_dir: Path, facts: Mapping[str, Any], matter: dict[str, Any]) -> RenderedCard:
    """Both languages of a card from ``templates_dir``, the English one under the YAML front matter."""
    files = {}
    for lang, name in CARD_FILES.items():
        body = _render_template(templates_dir, lang, f"{name}.j2", card=facts,
                                links={other: Safe(path) for other, path in CARD_FILES.items()})
        text = _with_front_matter(matter, body) if name == "README.md" else body
        check_no_mojibake(text, where=name)
        files[name] = text
    _check_front_matter_round_trip(files["README.md"], matter)
    return RenderedCard(files, matter)


def render_card_from_release(release_dir: Path) -> RenderedCard:
    """Render the card of a release folder from its manifest.json."""
    try:
        manifest = read_manifest(release_dir)
    except FileNotFoundError:
        raise CardError(f"{release_dir}: no manifest.json",
                        hint="run `mtpress publish model_configs/<name>.yaml` to build the release first") from None
    return render_card(manifest)


def write_card(release_dir: Path, card: RenderedCard) -> list[Path]:
    """Write each card file into the release folder atomically, as UTF-8; return the paths written."""
    written = []
    for name, text in card.files.items():
        path = release_dir / name
        write_text_atomic(path, text)
        written.append(path)
    return written


# FRONT MATTER


def front_matter(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The model-tree metadata, as a dict (dumped with yaml.safe_dump, never templated).

    Only Hub-valid values go in: ``base_model`` only when the fine-tune is a Hub repo id, ``license``
    only when it looks like a license identifier (else ``other``; the body shows the text). A release
    without a head is not tagged for MTP or speculative decoding: nothing in it drafts.
    """
    family = (manifest.get("architecture") or {}).get("family")
    family_tag = [family.lower()] if isinstance(family, str) and FAMILY_TAG.fullmatch(family.lower()) else []
    mtp_tags = [] if _inject_action(manifest) == "no-head" else ["mtp", "speculative-decoding"]
    return model_tree_front_matter(manifest, library="gguf", tags=["gguf", *mtp_tags, *family_tag])


def model_tree_front_matter(manifest: Mapping[str, Any], *, library: str, tags: list[str]) -> dict[str, Any]:
    """What every repo mtpress publishes declares: the fine-tune as ``base_model`` of a quantization, the
    license, both languages, the library its files are for and its tags."""
    matter: dict[str, Any] = {}
    finetune_repo = _source(manifest, "finetune").get("repo")
    if isinstance(finetune_repo, str) and REPO_ID.fullmatch(finetune_repo):
        matter["base_model"] = finetune_repo
        matter["base_model_relation"] = "quantized"
    license_id = _license_id(_license(manifest)[0])
    if license_id is not None:
        matter["license"] = license_id
    matter["language"] = ["en", "zh"]
    matter["library_name"] = library
    matter["pipeline_tag"] = "text-generation"
    matter["tags"] = list(dict.fromkeys(tags))
    return matter


def _with_front_matter(matter: dict[str, Any], body: str) -> str:
    return "---\n" + yaml.safe_dump(matter, sort_keys=False, allow_unicode=True) + "---\n\n" + body


def _check_front_matter_round_trip(readme: str, matter: dict[str, Any]) -> None:
    """The Hub parses README.md with huggingface_hub's own splitter: prove it reads back what we built."""
    parsed = ModelCard(readme).data.to_dict()
    if parsed != matter:
        raise CardError(f"README.md: the front matter reads back as {parsed!r}, not as built ({matter!r})",
                        hint="a value broke the YAML block; report it with the manifest")


# FACTS: everything the templates show, computed from the manifest


def card_facts(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest reduced to what the card says, with every derived number computed here."""
    config = manifest.get("config") or {}
    target = _require(config, "target", "repo", where="manifest config")
    release = _require(manifest, "release", where="manifest")
    # Older manifests lack the config's own path; the release name is the best guess there.
    config_file = manifest.get("config_file") or f"model_configs/{release}.yaml"
    arch = _architecture_facts(manifest)
    files = _file_rows(manifest, arch)
    pair = _recommended_pair(files)
    # Stage records name files by layout and file name; the card shows their paths in the repo.
    paths = {(f["layout"], f["name"]): f["path"] for f in files}
    quality = _quality_facts(manifest.get("quality_details"), paths)
    _add_picks(files, quality)
    smoke = _smoke_rows(manifest, paths)
    hardware = manifest.get("hardware") or {}
    smoke_config = config.get("smoke") or {}
    draft_n_max = _smoke_setting(smoke_config, smoke, "draft_n_max")
    mtp_flags = ["--spec-type", "draft-mtp", *(["--spec-draft-n-max", str(draft_n_max)] if draft_n_max else [])]
    license_text, license_source = _license(manifest)
    return {
        "title": target.rsplit("/", 1)[-1],
        "release": release,
        "target": target,
        "finetune": _source(manifest, "finetune"),
        # Credited only when the head came from it: a fine-tune that kept its own head used no donor.
        "donor": _source(manifest, "donor") if _inject_action(manifest) == "injected" else None,
        "license": license_text,
        "license_source": license_source,
        "license_id": _license_id(license_text),
        "inject": _inject_facts(manifest, arch),
        "head_choice": _head_choice(manifest.get("head_choice")),
        "arch": arch,
        "files": files,
        "file_rows": _file_table(files),
        "has_layout": {layout: any(f["layout"] == layout for f in files) for layout in LAYOUT_PREFERENCE},
        "folder": _layout_folders(files),
        "preferred_quants": DEFAULT_QUANT_PREFERENCE,
        "pair": pair,
        "config_file": config_file,
        "usage": _usage(target, config_file, pair, mtp_flags),
        "draft_n_max": draft_n_max,
        "smoke_flags": " ".join(mtp_flags),
        "smoke": smoke,
        "smoke_prompt": smoke_config.get("prompt"),
        "smoke_n_predict": _smoke_setting(smoke_config, smoke, "n_predict"),
        "speed": _speed_verdict(smoke, arch),
        "hardware": hardware,
        "cpu_only": bool(hardware) and not hardware.get("gpu"),
        "toolchain": manifest.get("toolchain") or {},
        "bench": _bench_rows(manifest.get("bench_details"), paths),
        "quality": quality,
        "imatrix": manifest.get("imatrix"),
        "close_enough_kld": CLOSE_ENOUGH_KLD,
        "gate": as_table(manifest.get("gate")),
        "gate_run": _gate_run(manifest.get("gate_details")),
        "hub_pairs": _hub_pairs(files, manifest.get("gate_details")),
        "mlx": as_table(manifest.get("mlx")),
        "mlx_repo": (manifest.get("mlx") or {}).get("repo"),
        "config_yaml": yaml.safe_dump(_without_none(config), sort_keys=False, allow_unicode=True) if config else None,
        # What the repo holds, so that `sha256sum -c` checks a download: a split file's parts, not the whole.
        "sha256sums": "\n".join(f"{p['sha256']}  {p['path']}" for f in files
                                for p in f["parts"] or [f] if p["sha256"]),
        "vision_without_mmproj": arch["parameters_vision"] > 0 and not any("mmproj" in f["path"] for f in files),
        "mmproj": pair["mmproj"],
        "image_smoke": _image_smoke(manifest.get("smoke") or []),
        "acceptance": _head_acceptance(smoke_config, smoke),
        "head_downloads": _head_downloads(files, manifest.get("lean_heads")),
        # Older manifests lack it: their heads kept the quant's own types for these matrices.
        "head_shared_type": config.get("head_shared_type"),
    }


def _require(mapping: Mapping[str, Any], *keys: str, where: str) -> Any:
    value: Any = mapping
    for key in keys:
        value = value.get(key) if isinstance(value, Mapping) else None
    if value is None:
        raise CardError(f"{where}: {'.'.join(keys)} is missing; the card cannot state it without guessing",
                        hint="re-run the publish flow so that it writes a complete manifest.json")
    return value


def _source(manifest: Mapping[str, Any], role: str) -> dict[str, Any]:
    """A fine-tune or donor: what was asked for (config) and what was fetched (inputs, with the full sha).

    ``name`` is the Hub repo id or, for a local folder, the folder's name alone, with ``digest`` (a sha256
    over its files' names and sha256s) to tell which folder it was: where it sat on the publisher's machine is theirs
    (a manifest from before named local folders by their full path; only the last part is shown).
    ``mtp_layers``: the MTP layers the checkpoint's own config declares.
    """
    asked = (manifest.get("config") or {}).get(role) or {}
    fetched = (manifest.get("inputs") or {}).get(role) or {}
    repo = fetched.get("repo") or asked.get("repo")
    local = fetched.get("label") or asked.get("path")
    # PureWindowsPath splits at both / and \, whichever machine wrote the manifest.
    return {"repo": repo, "name": repo or (PureWindowsPath(local).name if local else None),
            "revision": fetched.get("revision"), "digest": fetched.get("digest"), "license": fetched.get("license"),
            "mtp_layers": fetched.get("mtp_layers")}


def _inject_action(manifest: Mapping[str, Any]) -> str | None:
    """How the release got its head: "injected" (from the donor), "passthrough" (its own) or "no-head"."""
    return (manifest.get("inject") or {}).get("action")


def _license(manifest: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(license text, "config" | "upstream"): config.target.license overrides the fine-tune's card."""
    for source, value in (("config", ((manifest.get("config") or {}).get("target") or {}).get("license")),
                          ("upstream", ((manifest.get("inputs") or {}).get("finetune") or {}).get("license"))):
        if isinstance(value, str) and value.strip():
            return value.strip(), source
    return None, None


def _license_id(license_text: str | None) -> str | None:
    if license_text is None:
        return None
    return license_text if LICENSE_ID.fullmatch(license_text) else "other"


def _architecture_facts(manifest: Mapping[str, Any]) -> dict[str, Any]:
    arch = dict(manifest.get("architecture") or {})
    total = _require(arch, "parameters_total", where="manifest architecture")
    head = arch.get("parameters_head") or 0
    vision = arch.get("parameters_vision") or 0
    pattern = arch.get("layer_pattern")
    unit, repeats = repeating_unit(pattern) if pattern else (None, None)
    return arch | {
        "parameters_head": head,
        "parameters_vision": vision,
        # Mixture-of-experts facts, from architectures that have them (ArchSpec.describe); absent for dense ones.
        "experts": arch.get("experts"),
        "parameters_active": arch.get("parameters_active"),
        # The vision tower is never inside these GGUFs: llama.cpp puts it in an mmproj file.
        "parameters_model": total - vision,
        "parameters_trunk": total - head - vision,
        "head_share": head / total if total else None,
        "pattern_unit": unit,
        "pattern_repeats": repeats,
        "small": total < SMALL_MODEL_PARAMETERS,
    }


def repeating_unit(pattern: str) -> tuple[str, int]:
    """The shortest block that tiles ``pattern``: "LLLFLLLF" → ("LLLF", 2)."""
    for size in range(1, len(pattern) + 1):
        if len(pattern) % size == 0 and pattern[:size] * (len(pattern) // size) == pattern:
            return pattern[:size], len(pattern) // size
    return pattern, 1


def _inject_facts(manifest: Mapping[str, Any], arch: Mapping[str, Any]) -> dict[str, Any]:
    inject = manifest.get("inject") or {}
    head = inject.get("head") or {}
    parameters = head.get("parameters") or arch["parameters_head"]
    total = arch["parameters_total"]
    return {"action": inject.get("action"), "donor_revision": head.get("donor_revision"),
            "tensors": "\n".join(str(t) for t in head.get("tensors") or []),
            "tensor_count": len(head.get("tensors") or []), "parameters": parameters,
            "share": parameters / total if total else None, "dtype": head.get("dtype"),
            "source_dtype": head.get("source_dtype"), "cast": head.get("cast"),
            "vocabulary": inject.get("vocabulary"), "reason": inject.get("reason")}


def recommended_model(files: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The model file a newcomer should take: the first DEFAULT_QUANT_PREFERENCE quant present, in the
    first LAYOUT_PREFERENCE layout that has it."""
    models = [f for f in files if f.get("role") == "model"]
    for quant in DEFAULT_QUANT_PREFERENCE:
        for layout in LAYOUT_PREFERENCE:
            for f in models:
                if f.get("quant") == quant and f.get("layout") == layout:
                    return f
    return None


def head_of(model: Mapping[str, Any], files: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """A trunk's `mtp-` head, by the release's one pairing rule (an embedded file carries its own: None)."""
    return next((head for trunk, head in pair_trunks_with_heads(files, _role_layout_quant) if trunk is model), None)


def _role_layout_quant(file: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    return file.get("role"), file.get("layout"), file.get("quant")


def _file_rows(manifest: Mapping[str, Any], arch: Mapping[str, Any]) -> list[dict[str, Any]]:
    files = _require(manifest, "files", where="manifest")
    model = recommended_model(files)
    head = head_of(model, files) if model else None
    picked = {id(f) for f in (model, head) if f is not None}
    headless = _inject_action(manifest) == "no-head"
    rows = []
    for f in files:
        role, layout = f.get("role"), f.get("layout")
        # A head file also carries copies of the shared embedding and output matrices, which the
        # manifest does not count, so it gets no bits-per-weight figure.
        parameters = None if role == "head" else f.get("parameters") if role == "mmproj" else (
            arch["parameters_model"] if layout == "embedded" else arch["parameters_trunk"])
        size = _numeric(f.get("size"))
        path = f.get("path") or _require(f, "name", where="manifest files[]")
        rows.append({
            "path": path, "name": f.get("name") or PurePosixPath(path).name, "layout": layout, "role": role,
            # Without a head there is no trunk/head split: each model file is simply the model.
            "kind": "plain" if headless and role == "model" else FILE_KINDS.get((layout, role)),
            "quant": f.get("quant"), "size": size, "sha256": f.get("sha256"),
            "bits_per_weight": size * 8 / parameters if size is not None and parameters else None,
            "head_tensor_types": sorted({str(t).upper() for t in f.get("head_tensor_types") or []}),
            "recommended": id(f) in picked,
            # Over the Hub's per-file limit: the repo holds these llama-gguf-split parts, and -hf loads them whole.
            "parts": f.get("parts") or [],
            "imatrix": f.get("imatrix"),
            "kld_mean": None, "picks": [],  # from the quality stage's figures (_add_picks)
        })
    return rows


def _file_table(files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The files table's rows: one per model file (and the vision projector), a sidecar trunk with its head."""
    heads = {id(trunk): head for trunk, head in pair_trunks_with_heads(files, _role_layout_quant) if head}
    return [{**f, "head": heads.get(id(f))} for f in files if f["role"] != "head"]


def _add_picks(files: list[dict[str, Any]], quality: Mapping[str, Any] | None) -> None:
    """Each model file's mean KLD against BF16 and its "pick this if" notes, derived from the figures, each on one
    file: the recommended default, the smallest file, the smallest with a mean KLD of at most CLOSE_ENOUGH_KLD,
    and the closest to BF16 (the smaller of equals). KLD is measured on the first layout's files; a file of the
    other layout with the same quant holds the same trunk weights and shows the same figure."""
    kld = {r["quant"]: (r["kld_mean"] or {}).get("value")
           for r in (quality or {}).get("rows", []) if not r["reference"]}
    kld["BF16"] = 0.0 if quality else None
    models = [f for f in files if f["role"] == "model"]
    for f in models:
        f["kld_mean"] = kld.get(f["quant"])
        if f["recommended"]:
            f["picks"].append("default")

    def first(candidates: list[dict[str, Any]], order: Callable[[dict[str, Any]], Any]) -> int | None:
        return id(min(candidates, key=order)) if candidates else None

    sized = [f for f in models if f["size"] is not None]
    measured = [f for f in sized if f["kld_mean"] is not None and f["quant"] != "BF16"]
    notes = {"smallest": first(sized, lambda f: f["size"]),  # one file each: ties go to the smaller
             "close_enough": first([f for f in measured if f["kld_mean"] <= CLOSE_ENOUGH_KLD], lambda f: f["size"]),
             "closest": first(measured, lambda f: (f["kld_mean"], f["size"]))}
    for f in models:
        f["picks"] += [note for note, picked in notes.items() if picked == id(f)]


def _head_downloads(files: list[dict[str, Any]], lean_heads: list[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """What MTP adds to each sidecar trunk's download: its head file, in bytes and as a share of the trunk; and the
    drafts its lean copies accepted against the embedded file of its quant, where the smoke tests measured both."""
    measured = {row.get("quant"): row for row in lean_heads or []}
    return [{"quant": trunk["quant"], "trunk": trunk["path"], "trunk_size": trunk["size"], "head": head["path"],
             "head_size": head["size"],
             "share": head["size"] / trunk["size"] if head["size"] is not None and trunk["size"] else None,
             "lean": measured.get(trunk["quant"])}
            for trunk, head in pair_trunks_with_heads(files, _role_layout_quant) if head is not None]


def _recommended_pair(files: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """The recommended quant's files: the marked model, and that quant's sidecar trunk, head and embedded file."""
    model = next((f for f in files if f["recommended"] and f["role"] == "model"), None)
    same_quant = {(f["layout"], f["role"]): f for f in files if model and f["quant"] == model["quant"]}
    return {"model": model, "trunk": same_quant.get(("sidecar", "model")),
            "head": same_quant.get(("sidecar", "head")), "embedded": same_quant.get(("embedded", "model")),
            "mmproj": next((f for f in files if f["role"] == "mmproj"), None)}


def _usage(target: str, config_file: str, pair: dict[str, dict[str, Any] | None], mtp: list[str]
           ) -> dict[str, Safe]:
    """The command lines the card shows, for the recommended quant.

    Each is one shell-quoted line starting with the program's name, so it is safe inside a fenced code
    block (nothing in it can close the fence), though not in prose.
    """
    commands = {"rerun": ["mtpress", "publish", config_file]}
    model, trunk, head, embedded, mmproj = pair["model"], pair["trunk"], pair["head"], pair["embedded"], pair["mmproj"]
    if model is not None:
        hub = ["-hf", f"{target}:{model['quant']}"]
        commands |= {"server_hub_mtp": ["llama-server", *hub, *mtp], "server_hub_plain": ["llama-server", *hub],
                     "cli_hub_mtp": ["llama-cli", *hub, *mtp], "cli_hub_plain": ["llama-cli", *hub],
                     "download_model": ["hf", "download", target, model["path"], "--local-dir", "."]}
    if trunk:
        commands["download_trunk"] = ["hf", "download", target, trunk["path"], "--local-dir", "."]
    if trunk and head:
        commands |= {
            "download_sidecar": ["hf", "download", target, trunk["path"], head["path"], "--local-dir", "."],
            "server_sidecar_mtp": ["llama-server", "-m", trunk["path"], "-md", head["path"], *mtp],
            "server_sidecar_plain": ["llama-server", "-m", trunk["path"]],
            "server_hub_sidecar_mtp": ["llama-server", *hub, "-hff", trunk["path"], *mtp],
        }
    if embedded:
        commands |= {"download_embedded": ["hf", "download", target, embedded["path"], "--local-dir", "."],
                     "server_embedded_mtp": ["llama-server", "-m", embedded["path"], *mtp]}
    if mmproj and trunk and head:
        commands |= {"download_mmproj": ["hf", "download", target, mmproj["path"], "--local-dir", "."],
                     "server_sidecar_vision_mtp": ["llama-server", "-m", trunk["path"], "-md", head["path"],
                                                   "--mmproj", mmproj["path"], *mtp]}
    if mmproj and embedded:
        commands |= {"download_mmproj": ["hf", "download", target, mmproj["path"], "--local-dir", "."],
                     "server_embedded_vision_mtp": ["llama-server", "-m", embedded["path"], "--mmproj",
                                                    mmproj["path"], *mtp]}
    return {key: Safe(shell_command(argv)) for key, argv in commands.items()}


def _hub_pairs(files: list[dict[str, Any]], gate: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """What `-hf repo:TAG --spec-type draft-mtp` is meant to load for each root trunk, and whether the release
    gate saw llama.cpp load exactly that (None: the gate did not run -hf for that quant; it runs the recommended
    one and the smallest, and checks the other files' sha256 only)."""
    loaded = {(r.get("trunk"), r.get("head")) for r in (gate or {}).get("runs") or [] if r.get("mtp")}
    ran = {r.get("tag") for r in (gate or {}).get("runs") or []}
    pairs = []
    for model in files:
        if model["role"] != "model" or "/" in model["path"]:
            continue
        head = head_of(model, files)
        pairs.append({"tag": model["quant"], "trunk": model["path"], "head": head["path"] if head else None,
                      "verified": (model["path"], head["path"] if head else None) in loaded
                      if model["quant"] in ran else None})
    return pairs


def _gate_run(gate: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Which commit of which repo the release gate checked, with which clients."""
    if not gate:
        return None
    runs = gate.get("runs") or []
    snapshot = gate.get("snapshot") or {}
    return {"repo": gate.get("repo"), "commit": gate.get("commit"), "runs": len(runs),
            "llama_cpp": runs[0].get("version") if runs else None, "tags": len({r.get("tag") for r in runs}),
            "snapshot_version": snapshot.get("version"), "files_checked": snapshot.get("files_checked")}


def _layout_folders(files: list[dict[str, Any]]) -> dict[str, str]:
    """Each layout's folder in the repo ("" for the root), as the manifest's paths place it."""
    return {f["layout"]: str(PurePosixPath(f["path"]).parent).removeprefix(".") for f in files if f["layout"]}


def _smoke_rows(manifest: Mapping[str, Any], paths: Mapping[tuple[Any, Any], str]) -> list[dict[str, Any]]:
    """The smoke records, each ratio computed from the figures its row shows."""
    rows = []
    for s in manifest.get("smoke") or []:
        plain, mtp = _numeric(s.get("tokens_per_second_plain")), _numeric(s.get("tokens_per_second_mtp"))
        layout = s.get("layout")
        rows.append({
            "file": paths.get((layout, s.get("model")), s.get("model")),
            "head": paths.get((layout, s.get("head")), s.get("head")), "identical": s.get("tokens_identical"),
            "n_predict": s.get("n_predict"), "draft_n_max": s.get("draft_n_max"), "drafted": s.get("drafted"),
            "accepted": s.get("accepted"), "acceptance": _fraction(s.get("accepted"), s.get("drafted")),
            "tps_plain": plain, "tps_mtp": mtp, "speedup": ratio_as_shown(mtp, plain, "decimal"),
        })
    return rows


def _bench_rows(details: list[Mapping[str, Any]] | None, paths: Mapping[tuple[Any, Any], str]
                ) -> list[dict[str, Any]]:
    """One row per benchmarked file and configuration (plain first), with every ratio computed here from the
    figures the row shows: acceptance from the counts, the speedup from the two tokens/s as the card rounds them.

    ``alpha`` is the per-position acceptance the bench estimated from the pooled counts; the bound comes from it.
    A manifest from before that estimate computed its bound from the pooled rate, which is wrong for draft
    lengths above 1: that bound is not shown.
    """
    rows = []
    for result in details or []:
        file = paths.get((result.get("layout"), result.get("model")), result.get("model"))
        plain_tg = None
        for config in result.get("configs") or []:
            overall, k = config.get("overall") or {}, config.get("draft_n_max") or 0
            tg, pp = overall.get("generation_per_second") or {}, overall.get("prompt_per_second") or {}
            if not k:
                plain_tg = tg.get("median")
            rows.append({
                "file": file, "config": config.get("config"), "draft_n_max": k, "tg": tg.get("median"),
                "tg_iqr": tg.get("iqr"), "pp": pp.get("median"), "drafted": overall.get("drafted"),
                "accepted": overall.get("accepted"), "acceptance": _fraction(overall.get("accepted"),
                                                                             overall.get("drafted")),
                "alpha": overall.get("acceptance_per_position"),
                "bound": overall.get("acceptance_bound") if "acceptance_per_position" in overall else None,
                "speedup": ratio_as_shown(tg.get("median"), plain_tg, "decimal") if k else None,
                "same_tokens": config.get("matches_plain")})
    return rows


def _quality_facts(details: Mapping[str, Any] | None, paths: Mapping[tuple[Any, Any], str]) -> dict[str, Any] | None:
    """Perplexity and KL-divergence per file, BF16 first. The ratio divides each file's perplexity by BF16's, both
    as the card shows them; llama-perplexity's own ratio divides by BF16's perplexity recomputed from a 16-bit
    copy of its log-probabilities, which can disagree with the two figures beside it, so the card leaves it out."""
    if not details:
        return None
    quants = details.get("quants") or []
    base_layout = quants[0].get("layout") if quants else None
    base = (details.get("base_ppl") or {}).get("value")
    rows = [{"file": paths.get((base_layout, details.get("base_model")), details.get("base_model")), "quant": "BF16",
             "ppl": details.get("base_ppl") or {}, "ratio": ratio_as_shown(base, base, "figure"), "reference": True}]
    for q in quants:
        rows.append({"file": paths.get((q.get("layout"), q.get("model")), q.get("model")), "quant": q.get("quant"),
                     "ppl": q.get("ppl") or {}, "ratio": ratio_as_shown((q.get("ppl") or {}).get("value"), base,
                                                                         "figure"),
                     "kld_mean": q.get("kld_mean") or {}, "kld_median": q.get("kld_median"),
                     "kld_p99": q.get("kld_p99"), "same_top_p": (q.get("same_top_p") or {}).get("value"),
                     "reference": False})
    return {"rows": rows, "calibration": details.get("calibration"), "ctx_size": details.get("ctx_size"),
            "chunks": details.get("chunks"), "tokens_scored": details.get("tokens_scored")}


def _head_choice(choice: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The realign stage's comparison, when the config asked for one; each head's acceptance from the counts
    the card shows beside it."""
    if not choice:
        return None
    return {**choice, **{role: {**choice[role], "acceptance": _fraction(choice[role].get("accepted"),
                                                                         choice[role].get("drafted"))}
                         for role in ("copied", "realigned") if choice.get(role)}}


def _fraction(part: Any, whole: Any) -> float | None:
    """part ÷ whole of two counts (accepted ÷ drafted); None when nothing was counted."""
    part, whole = _numeric(part), _numeric(whole)
    return part / whole if part is not None and whole else None


def ratio_as_shown(numerator: Any, denominator: Any, kind: str) -> float | None:
    """numerator ÷ denominator as a reader of the card computes it: each rounded as the card shows it
    (NUMBER_FORMATS[kind]), so a ratio never contradicts the two figures beside it, however they round."""
    numerator, denominator = _numeric(numerator), _numeric(denominator)
    if numerator is None or denominator is None:
        return None
    shown_numerator, shown_denominator = (float(NUMBER_FORMATS[kind](x).replace(",", ""))
                                          for x in (numerator, denominator))
    return shown_numerator / shown_denominator if shown_denominator else None


def _head_acceptance(smoke_config: Mapping[str, Any], smoke: list[dict[str, Any]]) -> dict[str, Any]:
    """The head's smoke-test acceptance (accepted ÷ drafted, from the manifest's counts) against the floor the
    release was held to. ``working``: every file that ran with a head was measured and met the floor."""
    floor = smoke_config.get("min_acceptance")
    if floor is None:  # a manifest from before the floor was recorded is held to today's default
        floor = SmokeSpec.model_fields["min_acceptance"].default
    with_head = [row for row in smoke if row["identical"] is not None]  # None: the file ran without a head
    measured = [(row["accepted"] / row["drafted"], row["file"]) for row in with_head
                if row["drafted"] and row["accepted"] is not None]
    lowest, lowest_file = min(measured, default=(None, None))
    return {"floor": floor, "lowest": lowest, "lowest_file": lowest_file,
            "working": bool(with_head) and len(measured) == len(with_head) and lowest >= floor}


def _image_smoke(smoke: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The smoke test's image requests (files served with the mmproj), summed over every file."""
    runs = [s for s in smoke if s.get("mmproj")]
    if not runs:
        return None
    return {"files": len(runs), "identical": sum(bool(s.get("image_tokens_identical")) for s in runs),
            "drafted": sum(s.get("image_drafted") or 0 for s in runs),
            "accepted": sum(s.get("image_accepted") or 0 for s in runs),
            "fewest_drafted": min(s.get("image_drafted") or 0 for s in runs), "mmproj": runs[0]["mmproj"]}


def _smoke_setting(smoke_config: Mapping[str, Any], rows: list[dict[str, Any]], key: str) -> Any:
    """A smoke setting from the release config, else from the first smoke record that has it."""
    return smoke_config.get(key) or next((row[key] for row in rows if row[key]), None)


def _speed_verdict(smoke: list[dict[str, Any]], arch: Mapping[str, Any]) -> dict[str, Any]:
    """What the measured tokens/s say about draft-mtp in this run: compared, never asserted."""
    compared = [row for row in smoke if row["speedup"] is not None]
    slower = [row for row in compared if row["speedup"] < 1]
    return {"compared": len(compared), "slower": len(slower), "slower_files": [r["file"] for r in slower],
            "small_model": arch["small"]}


def _without_none(value: Any) -> Any:
    """The config as a user would write it: keys left at None are the schema's defaults."""
    if isinstance(value, Mapping):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


@dataclass(frozen=True)
class Table:
    """A measurement whose shape the card does not know in advance, laid out as rows of cells."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    keyed: bool  # key/value rows: the first cell of each row is a (flattened) key


def as_table(value: Any) -> Table | None:
    """A list of records becomes one row per record; a mapping becomes key/value rows; nothing → None."""
    if not value:
        return None
    if isinstance(value, list) and all(isinstance(item, Mapping) for item in value):
        records = [dict(_flatten(item)) for item in value]
        columns = tuple(dict.fromkeys(key for record in records for key in record))
        return Table(columns, tuple(tuple(record.get(c) for c in columns) for record in records), keyed=False)
    if isinstance(value, Mapping):
        return Table(("key", "value"), tuple(_flatten(value)), keyed=True)
    return Table(("value",), ((value,),), keyed=False)


def _flatten(value: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as dotted keys; lists of mappings as indexed keys; other values as they are."""
    pairs: list[tuple[str, Any]] = []
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, Mapping):
            pairs += _flatten(item, f"{name}.")
        elif isinstance(item, list) and any(isinstance(element, Mapping) for element in item):
            for index, element in enumerate(item):
                pairs += (_flatten(element, f"{name}[{index}].") if isinstance(element, Mapping)
                          else [(f"{name}[{index}]", element)])
        else:
            pairs.append((name, item))
    return pairs


# ESCAPING: untrusted text becomes Markdown text, never Markdown, HTML, Jinja or shell syntax


class Safe(str):
    """Text already escaped for where a template puts it; every other string is escaped on output."""


# CommonMark lets any ASCII punctuation be backslash-escaped; these are the ones that can start
# emphasis, links, images, code, tables, headings, HTML or Jinja-looking text inside a line.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]{}#|!~])")
_HTML_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029\x0b\x0c]+")


def escape_markdown(value: Any) -> Safe:
    """Inline text safe in a paragraph or a table cell: one line, no markup, no HTML, no pipes."""
    text = _LINE_BREAKS.sub(" ", str(value))
    text = "".join(_HTML_ENTITIES.get(c, c) for c in text)
    return Safe(_MARKDOWN_SPECIAL.sub(r"\\\1", text))


def code_span(value: Any) -> Safe:
    """Inline code safe in a table cell: a backtick fence longer than any run inside, pipes escaped.

    Outside a table an escaped pipe shows as ``\\|``; no legal file or repo name has a pipe, so only
    hostile text pays that price, and it stays inert.
    """
    text = _LINE_BREAKS.sub(" ", str(value))
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return Safe(f"{fence}{padding}{text.replace('|', chr(92) + '|')}{padding}{fence}")


def fenced(text: str, info: str = "") -> Safe:
    """A fenced code block no content can close: the fence is longer than any backtick run inside."""
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return Safe(f"{fence}{info}\n{text.rstrip(chr(10))}\n{fence}")


def shell_command(argv: Iterable[str]) -> str:
    """A command line to copy: each argument shell-quoted, so a hostile name stays one inert word."""
    words = []
    for arg in argv:
        if _LINE_BREAKS.search(arg) or any(ord(c) < 32 for c in arg):
            raise CardError(f"refusing to put {arg!r} in a command line: it contains a control character",
                            hint="file and repo names must be single-line printable text")
        words.append(shlex.quote(arg))
    return " ".join(words)


def hub_url(repo: Any, revision: Any = None) -> str | None:
    """The Hub page of a repo (at a revision when it is a full sha); None when ``repo`` is not a repo id."""
    if not isinstance(repo, str) or not REPO_ID.fullmatch(repo):
        return None
    url = f"{HUB_URL}/{repo}"  # REPO_ID admits only URL-safe characters
    if isinstance(revision, str) and FULL_SHA.fullmatch(revision):
        url += f"/tree/{revision}"
    return url


# NUMBERS: each filter formats one kind of quantity; a missing value becomes the language's phrase


def _numeric(value: Any) -> float | int | None:
    """A number from the manifest; None (or NaN) when it was not measured; CardError when it is not a number."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CardError(f"the manifest holds {value!r} where a number belongs",
                        hint="the manifest is written by the publish flow; re-run it rather than editing it")
    return value


def human_size(size: float) -> str:
    """Bytes in decimal units, as the Hub shows them: 105000000 → "105 MB", 5380000000 → "5.38 GB"."""
    units = ("B", "kB", "MB", "GB", "TB")
    exponent = 0
    while abs(size) >= 1000 and exponent < len(units) - 1:
        size /= 1000
        exponent += 1
    return f"{size:.0f} {units[exponent]}" if exponent == 0 or abs(size) >= 100 else f"{size:.3g} {units[exponent]}"


def human_parameters(count: float) -> str:
    """136881920 → "136.9M"; 9_000_000_000 → "9.0B"."""
    for divisor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= divisor:
            return f"{count / divisor:.1f}{suffix}"
    return f"{count:.0f}"


def _plain_number(number: float | int) -> str:
    return str(number) if isinstance(number, int) else f"{number:.4g}"


NUMBER_FORMATS: dict[str, Callable[[Any], str]] = {
    "count": lambda n: f"{n:,}",
    "decimal": lambda n: f"{n:,.1f}",
    "percent": lambda n: f"{100 * n:.1f}%",
    "share": lambda n: f"{100 * n:.2f}%",
    "times": lambda n: f"{n:.2f}×",
    "figure": lambda n: f"{n:.6g}",  # a measurement at llama-perplexity's precision, whatever its magnitude
    "ratio": lambda n: f"{n:.4f}",
    "bits": lambda n: f"{n:.2f}",
    "size": human_size,
    "params": human_parameters,
}


def _filters(words: Mapping[str, str]) -> dict[str, Callable[..., Safe]]:
    """The template filters for one language: numbers by kind, and the language's words for missing values."""

    def number_filter(fmt: Callable[[Any], str]) -> Callable[..., Safe]:
        def apply(value: Any, missing: str = "not_measured") -> Safe:
            number = _numeric(value)
            return Safe(words[missing] if number is None else fmt(number))
        return apply

    def verdict(value: Any) -> Safe:
        """A pass/fail measurement: ✅ yes, ❌ no, or not measured."""
        if value is None:
            return Safe(words["not_measured"])
        if not isinstance(value, bool):
            raise CardError(f"the manifest holds {value!r} where true or false belongs")
        return Safe(f"✅ {words['yes']}" if value else f"❌ {words['no']}")

    def text_or(value: Any, missing: str = "not_recorded") -> Safe:
        return Safe(words[missing]) if value is None or value == "" else escape_markdown(value)

    def yes_no(value: Any) -> Safe:
        """A recorded fact that is true or false (not a test outcome)."""
        return Safe(words["not_recorded"] if not isinstance(value, bool) else words["yes" if value else "no"])

    def code(value: Any, missing: str = "not_recorded") -> Safe:
        return Safe(words[missing]) if value is None or value == "" else code_span(value)

    def codes(values: Iterable[Any], separator: str = ", ", missing: str = "none") -> Safe:
        spans = [code_span(v) for v in values]
        return Safe(escape_markdown(separator).join(spans) if spans else words[missing])

    def short_sha(value: Any) -> Safe:
        return code(value if value is None else str(value)[:SHORT_SHA])

    def hub_link(repo: Any, revision: Any = None) -> Safe:
        """A link to the repo on the Hub; text when it is not a repo id (a local folder's name), or "not recorded"."""
        url = hub_url(repo, revision)
        return Safe(f"[{escape_markdown(repo)}]({url})") if url else text_or(repo)

    def cell(value: Any) -> Safe:
        """A value of a measurement whose shape is not known in advance, formatted by its type."""
        if isinstance(value, bool):
            return verdict(value)
        if isinstance(value, str):
            return escape_markdown(value)
        if isinstance(value, list):
            return escape_markdown(", ".join(str(v) for v in value))
        return number_filter(_plain_number)(value)

    def table(value: Table, headers: Mapping[str, str]) -> Safe:
        """A Markdown table of a measurement; ``headers`` names the generic columns in this language,
        the manifest's own keys are shown as code."""
        head = [escape_markdown(headers[c]) if c in headers else code_span(c) for c in value.columns]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in value.rows:
            cells = [code_span(row[0]), *map(cell, row[1:])] if value.keyed else [cell(v) for v in row]
            lines.append("| " + " | ".join(cells) + " |")
        return Safe("\n".join(lines))

    return {name: number_filter(fmt) for name, fmt in NUMBER_FORMATS.items()} | {
        "verdict": verdict, "text_or": text_or, "yes_no": yes_no, "code": code, "codes": codes,
        "short_sha": short_sha, "hub_link": hub_link, "cell": cell, "table": table}


# TEMPLATES


def _environment(templates_dir: Path, lang: str) -> SandboxedEnvironment:
    """A sandbox (upstream text must never run) where a missing fact fails and every value is escaped."""
    env = SandboxedEnvironment(loader=FileSystemLoader(templates_dir, encoding="utf-8"), undefined=StrictUndefined,
                               finalize=_finalize, autoescape=False, trim_blocks=True, lstrip_blocks=True,
                               keep_trailing_newline=True)
    env.filters |= _filters(MISSING_WORDS[lang]) | {"md": escape_markdown, "fenced": fenced}
    return env


def _finalize(value: Any) -> Any:
    """Every ``{{ … }}`` passes here: escaped text and integers go out; a missing or unformatted value fails."""
    if isinstance(value, Safe):
        return value
    if value is None or isinstance(value, (bool, float)):
        raise CardError(f"a template printed {value!r} as is",
                        hint="format it with a filter that states the missing case (count, percent, verdict, "
                             "text_or, …)")
    if isinstance(value, int):
        return str(value)
    return escape_markdown(value)


def _render_template(templates_dir: Path, lang: str, name: str, **context: Any) -> str:
    try:
        return _environment(templates_dir, lang).get_template(name).render(**context)
    except TemplateError as e:
        raise CardError(f"template {templates_dir / name}: {e}",
                        hint="a template may only use facts that render_card provides") from e


# ENCODING DAMAGE


# Mojibake is UTF-8 read with a single-byte code page: every byte of a multi-byte character becomes
# one character. These are the code pages the seeds and the Hub show it in: cp1252 (and latin-1,
# whose 0x80-0x9F are C1 controls) gives "Ã©", "â€™", "ðŸ"; cp1253 (Greek) gives "β€”", "Γ—";
# cp874 (Thai) gives "ไธญ", "โ€”". Decoders that meet a byte the code page leaves undefined emit the
# windows-1252 character or the C1 control, so both count as that byte too.
MOJIBAKE_CODEPAGES = ("cp1252", "cp1253", "cp874")
_UTF8_MULTIBYTE = re.compile(
    rb"[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}|\xed[\x80-\x9f][\x80-\xbf]"
    rb"|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}|\xf4[\x80-\x8f][\x80-\xbf]{2}")
_LOSSY = re.compile(r"[\x80-\x9f\ufffd]")


def _byte_of_char(codepage: str) -> dict[str, int]:
    table: dict[str, int] = {}
    for byte in range(0x80, 0x100):
        for decoder in (codepage, "cp1252", "latin-1"):
            try:
                table.setdefault(bytes([byte]).decode(decoder), byte)
                break
            except UnicodeDecodeError:
                continue
        table.setdefault(chr(byte), byte)  # the C1 control / latin-1 reading of the same byte
    return table


_BYTE_OF_CHAR = {codepage: _byte_of_char(codepage) for codepage in MOJIBAKE_CODEPAGES}
_HIGH_RUNS = {codepage: re.compile("[" + "".join(re.escape(c) for c in table) + "]+")
              for codepage, table in _BYTE_OF_CHAR.items()}


def check_no_mojibake(text: str, *, where: str = "text") -> None:
    """Raise CardError if ``text`` shows UTF-8 decoded with a single-byte code page, or lossy decoding.

    A run of characters counts as damage only when its bytes under that code page form a complete,
    valid UTF-8 multi-byte sequence, so real accents ("café", "São"), "×", "—" and any Chinese pass.
    """
    lossy = _LOSSY.search(text)
    if lossy:
        raise CardError(f"{where}: encoding damage at line {_line(text, lossy.start())}: "
                        f"{lossy.group()!r} (a C1 control or replacement character: text was decoded lossily)",
                        hint="read every input as UTF-8")
    for codepage, table in _BYTE_OF_CHAR.items():
        for run in _HIGH_RUNS[codepage].finditer(text):
            damaged = _UTF8_MULTIBYTE.search(bytes(table[c] for c in run.group()))
            if damaged:
                start = run.start() + damaged.start()
                snippet = text[start:run.start() + damaged.end()]
                raise CardError(f"{where}: encoding damage (UTF-8 read as {codepage}) at line "
                                f"{_line(text, start)}: {snippet!r} is {damaged.group().decode('utf-8')!r}",
                                hint="the text was decoded with the wrong code page upstream; "
                                     "fix the source rather than the card")


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1

