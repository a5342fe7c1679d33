"""What `specmesh up`, `generate` and `bench` run when the user names no precision or drafter."""

from __future__ import annotations

import pytest

from specmesh.local_defaults import local_choice, native_bfloat16_cpu, resolve_drafter, resolve_dtype


def test_auto_precision_is_bfloat16_only_where_it_is_computed_natively_and_exact():
    assert resolve_dtype("auto", "cuda", "gemma3-270m") == "bfloat16"
    assert resolve_dtype("auto", "cuda:1", "gemma3-270m") == "bfloat16"
    assert resolve_dtype("auto", "cpu", "smollm2-135m") == ("bfloat16" if native_bfloat16_cpu() else "float32")
    # Models without a shipped drafter (Gemma 3: sliding windows, the padded path, where bfloat16
    # is not batch-invariant) stay float32 on CPU unless asked.
    assert resolve_dtype("auto", "cpu", "gemma3-270m") == "float32"
    assert resolve_dtype("auto", "cpu", "/models/my-llama") == "float32"
    for explicit in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(explicit, "cpu") == explicit


@pytest.mark.parametrize("verifier", ["smollm2-135m", "smollm2", "SmolLM2-135M-Instruct"])
def test_auto_drafter_is_the_shipped_one_in_bfloat16_and_prompt_lookup_in_float32(verifier):
    assert resolve_drafter("auto", verifier, "bfloat16") == "smollm2-135m-drafter"
    assert resolve_drafter("auto", verifier, "float32") == "prompt-lookup"


def test_auto_drafter_without_a_shipped_one_is_prompt_lookup_and_a_named_drafter_is_kept():
    assert resolve_drafter("auto", "gemma3-270m", "bfloat16") == "prompt-lookup"
    assert resolve_drafter("auto", "/models/my-llama", "bfloat16") == "prompt-lookup"
    assert resolve_drafter("layers:2", "smollm2-135m", "bfloat16") == "layers:2"
    assert resolve_drafter("prompt-lookup", "smollm2-135m", "bfloat16") == "prompt-lookup"


def test_a_local_clusters_verifier_gets_every_core_but_one():
    """The other three services share the core left (they run one thread each); on 2 cores the
    verifier's one thread served 29.4 tokens/s against 25.3 with two (bfloat16, concurrency 1)."""
    from specmesh.local_cluster import verifier_threads

    assert [verifier_threads(n) for n in (1, 2, 4, 16)] == [1, 1, 3, 15]
    assert verifier_threads() >= 1


def test_the_services_own_settings_in_the_environment_win_over_auto():
    """SPECMESH_VERIFIER_DTYPE / _DEVICE, which the spawned services read, decide `auto` for
    `up`, `generate` and `bench` too; a precision named on the command line wins over both."""
    assert local_choice("smollm2-135m", "auto", "auto", {"SPECMESH_VERIFIER_DTYPE": "float32"}) == \
        ("prompt-lookup", "float32")
    assert local_choice("smollm2-135m", "auto", "auto", {"SPECMESH_VERIFIER_DTYPE": "bfloat16"}) == \
        ("smollm2-135m-drafter", "bfloat16")
    assert local_choice("gemma3-270m", "auto", "auto", {"SPECMESH_VERIFIER_DEVICE": "cuda:0"}) == \
        ("prompt-lookup", "bfloat16")
    assert local_choice("smollm2-135m", "none", "float32", {"SPECMESH_VERIFIER_DTYPE": "bfloat16"}) == \
        ("none", "float32")
    expected = "bfloat16" if native_bfloat16_cpu() else "float32"
    assert local_choice("smollm2-135m", "auto", "auto", {})[1] == expected
