"""The slot KV cache and the ragged batched forward over it.

Every logit the runner returns must equal the HF model's plain forward over the whole sequence
(no cache at all), however the sequence got into its slot: prefilled in pieces, batched with
other sessions of different lengths, rolled back and re-fed, or written into a slot that held
another, longer sequence before.
"""

from __future__ import annotations

import random

import pytest
import torch

from specmesh.errors import CapacityError
from specmesh.kv_cache import CacheShape, SlotKVCache
from specmesh.model_runner import ForwardRequest, ModelRunner
from specmesh.session_slots import SessionSlots
from tests.tiny_models import make_tiny_llama

VOCAB = 64
MAX_TOKENS = 64
NUM_SLOTS = 4
ATOL = 1e-4


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_tiny_llama(VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, seed=3)


@pytest.fixture(params=["packed", "padded"])
def runner(model, request) -> ModelRunner:
    """Both layouts of the runner must give the same logits (specmesh/model_runner.py)."""
    runner = ModelRunner(model, NUM_SLOTS, MAX_TOKENS, packed=request.param == "packed")
    assert (runner.packed is not None) == (request.param == "packed")
    return runner


def random_tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


@torch.no_grad()
def full_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V]: the plain HF forward over the whole sequence."""
    input_ids = torch.tensor([tokens])
    return model(input_ids, attention_mask=torch.ones_like(input_ids)).logits[0].float()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert error <= ATOL, f"{what}: max |difference| {error:.3g} > {ATOL}"


def feed(runner: ModelRunner, slot: int, tokens: list[int], logits_from: int = 0) -> torch.Tensor:
    return runner.forward([ForwardRequest(slot, tokens, logits_from)])[0]


# ---- one slot -------------------------------------------------------------------------------
def test_cache_shape_from_config(model):
    shape = CacheShape.from_config(model.config)
    assert shape == CacheShape(num_layers=2, num_kv_heads=2, head_dim=8)


def test_prefill_at_once_matches_full_forward(model, runner):
    tokens = random_tokens(30, seed=1)
    slot = runner.cache.allocate()
    assert_close(feed(runner, slot, tokens), full_logits(model, tokens), "prefill")
    assert runner.cache.lengths[slot] == 30


@pytest.mark.parametrize("pieces", [[1] * 12, [5, 1, 3, 10, 1, 10], [29, 1], [1, 29]])
def test_prefill_in_pieces(model, runner, pieces):
    tokens = random_tokens(sum(pieces), seed=2)
    slot = runner.cache.allocate()
    got, start = [], 0
    for n in pieces:
        got.append(feed(runner, slot, tokens[start:start + n]))
        start += n
        assert runner.cache.lengths[slot] == start
    assert_close(torch.cat(got), full_logits(model, tokens), f"pieces {pieces}")


def test_logits_from_returns_only_the_tail(model, runner):
    tokens = random_tokens(12, seed=3)
    slot = runner.cache.allocate()
    head = feed(runner, slot, tokens[:5], logits_from=4)
    tail = feed(runner, slot, tokens[5:], logits_from=3)
    expected = full_logits(model, tokens)
    assert head.shape == (1, VOCAB) and tail.shape == (4, VOCAB)
    assert_close(head, expected[4:5], "head")
    assert_close(tail, expected[8:], "tail")


def test_truncate_then_refeed_different_tokens(model, runner):
    first = random_tokens(20, seed=4)
    other = random_tokens(9, seed=5)
    slot = runner.cache.allocate()
    feed(runner, slot, first)
    for keep in (12, 19, 0, 20):
        runner.cache.truncate(slot, keep)
        assert runner.cache.lengths[slot] == keep
        got = feed(runner, slot, other)
        expected = full_logits(model, first[:keep] + other)[keep:]
        assert_close(got, expected, f"truncate to {keep}")
        # Back to the original first sequence for the next round.
        runner.cache.truncate(slot, keep)
        if keep < len(first):
            feed(runner, slot, first[keep:])


def test_repeated_draft_and_rollback(model, runner):
    """The verifier's pattern: append k drafts, keep a few, roll the rest back, repeat."""
    rng = random.Random(6)
    committed = random_tokens(7, seed=6)
    slot = runner.cache.allocate()
    feed(runner, slot, committed[:-1])
    for step in range(12):
        drafts = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 5))]
        got = feed(runner, slot, [committed[-1], *drafts])
        assert_close(got, full_logits(model, committed + drafts)[len(committed) - 1:], f"step {step}")
        accepted = rng.randint(0, len(drafts))
        runner.cache.truncate(slot, len(committed) + accepted)
        committed += drafts[:accepted] + [rng.randrange(VOCAB)]
        runner.cache.truncate(slot, len(committed) - 1)  # the new last token is not fed yet


# ---- ragged batches -------------------------------------------------------------------------
@pytest.mark.parametrize("slot_order", [[0, 1, 2, 3], [2, 0, 3, 1], [3, 1]])
def test_ragged_batch_matches_separate_forwards(model, runner, slot_order):
    """Sessions at different cached lengths, feeding different numbers of tokens, in one
    forward; contiguous slots (a view of the cache) and scattered ones (a gather)."""
    sequences = {slot: random_tokens(30, seed=10 + slot) for slot in range(NUM_SLOTS)}
    cached = {0: 0, 1: 3, 2: 17, 3: 8}
    new = {0: 5, 1: 1, 2: 9, 3: 2}
    for _ in range(NUM_SLOTS):
        runner.cache.allocate()
    for slot in slot_order:
        if cached[slot]:
            feed(runner, slot, sequences[slot][: cached[slot]])
    requests = [ForwardRequest(slot, sequences[slot][cached[slot]:cached[slot] + new[slot]]) for slot in slot_order]
    outs = runner.forward(requests)
    for slot, got in zip(slot_order, outs):
        total = cached[slot] + new[slot]
        assert_close(got, full_logits(model, sequences[slot][:total])[cached[slot]:], f"slot {slot}")
        assert runner.cache.lengths[slot] == total


def test_ragged_batches_over_many_steps(model, runner):
    """Random ragged batches (prefill chunks, single tokens, drafts, rollbacks) for every slot
    over many steps; each row checked against the full forward of its sequence."""
    rng = random.Random(7)
    sequences: dict[int, list[int]] = {}
    for _ in range(NUM_SLOTS):
        sequences[runner.cache.allocate()] = []
    for step in range(25):
        batch = rng.sample(sorted(sequences), rng.randint(1, NUM_SLOTS))
        requests = []
        for slot in batch:
            room = MAX_TOKENS - len(sequences[slot])
            if room < 8 or rng.random() < 0.2:  # occasionally roll back far
                keep = rng.randint(0, len(sequences[slot]))
                runner.cache.truncate(slot, keep)
                del sequences[slot][keep:]
            tokens = [rng.randrange(VOCAB) for _ in range(rng.choice([1, 1, 2, 4, 7]))]
            requests.append(ForwardRequest(slot, tokens, logits_from=rng.randint(0, len(tokens) - 1)))
        outs = runner.forward(requests)
        for request, got in zip(requests, outs):
            start = len(sequences[request.slot])
            sequences[request.slot] += list(request.tokens)
            expected = full_logits(model, sequences[request.slot])[start + request.logits_from:]
            assert_close(got, expected, f"step {step} slot {request.slot}")
            assert runner.cache.lengths[request.slot] == len(sequences[request.slot])


# ---- slot reuse and isolation ---------------------------------------------------------------
def test_freed_slot_reused_for_a_shorter_sequence(model, runner):
    """A slot that held a long sequence is freed and reused: the stale positions beyond the new
    sequence are never attended to, even when a longer neighbour makes the batch read them."""
    cache = runner.cache
    long_slot = cache.allocate()
    feed(runner, long_slot, random_tokens(50, seed=20))
    cache.free(long_slot)
    assert cache.lengths[long_slot] == 0
    reused = cache.allocate()
    assert reused == long_slot  # the freed slot comes back first
    neighbour = cache.allocate()
    neighbour_tokens = random_tokens(40, seed=21)
    feed(runner, neighbour, neighbour_tokens[:35])
    short = random_tokens(6, seed=22)
    outs = runner.forward([ForwardRequest(reused, short[:4]), ForwardRequest(neighbour, neighbour_tokens[35:])])
    assert_close(outs[0], full_logits(model, short[:4]), "reused slot")
    assert_close(outs[1], full_logits(model, neighbour_tokens)[35:], "neighbour")
    assert_close(feed(runner, reused, short[4:]), full_logits(model, short)[4:], "reused slot, next step")


def _snapshot(cache: SlotKVCache) -> list[torch.Tensor]:
    return [t.clone() for t in cache.keys + cache.values]


def test_scratch_padding_never_leaks_into_real_slots(model, runner):
    """Padding of a ragged batch writes only to the scratch slot: every real slot changes
    exactly at the positions its own tokens were written to, nowhere else."""
    cache = runner.cache
    slots = [cache.allocate() for _ in range(3)]
    feed(runner, slots[0], random_tokens(10, seed=30))
    feed(runner, slots[1], random_tokens(3, seed=31))
    # Stale finite garbage beyond every session's length and in the scratch slot: must not matter.
    with torch.no_grad():
        for tensor in cache.keys + cache.values:
            tensor[slots[0], :, 10:] = 1e3 * torch.randn_like(tensor[slots[0], :, 10:])
            tensor[slots[1], :, 3:] = -1e3
            tensor[cache.scratch_slot] = 1e4
    before = _snapshot(cache)
    seqs = {slots[0]: random_tokens(11, seed=30), slots[1]: random_tokens(3, seed=31) + random_tokens(8, seed=32)}
    requests = [ForwardRequest(slots[0], seqs[slots[0]][10:]), ForwardRequest(slots[1], seqs[slots[1]][3:])]
    outs = runner.forward(requests)  # 1 token and 8 tokens: the first row has 7 padding positions
    assert_close(outs[0], full_logits(model, seqs[slots[0]])[10:], "short row")
    assert_close(outs[1], full_logits(model, seqs[slots[1]])[3:], "long row")
    written = {slots[0]: range(10, 11), slots[1]: range(3, 11)}
    for old, new in zip(before, cache.keys + cache.values):
        for slot in range(cache.num_slots):
            changed = (old[slot] != new[slot]).any(dim=0).any(dim=-1)  # [max_tokens]
            expected = torch.zeros(MAX_TOKENS, dtype=torch.bool)
            for position in written.get(slot, ()):
                expected[position] = True
            assert torch.equal(changed, expected), f"slot {slot}: positions {changed.nonzero().flatten().tolist()}"
        if runner.packed is None:  # the packed layout has no padding outside CUDA graphs
            assert not torch.equal(old[cache.scratch_slot], new[cache.scratch_slot])  # padding went there


def test_sessions_do_not_see_each_other(model, runner):
    """The same tokens in two slots batched together, and one of them alone: identical logits."""
    tokens = random_tokens(16, seed=40)
    a, b = runner.cache.allocate(), runner.cache.allocate()
    feed(runner, a, tokens[:8])
    feed(runner, b, random_tokens(30, seed=41))  # a different, longer history
    together = runner.forward([ForwardRequest(b, random_tokens(3, seed=42)), ForwardRequest(a, tokens[8:])])
    assert_close(together[1], full_logits(model, tokens)[8:], "batched with another session")


# ---- errors ---------------------------------------------------------------------------------
def test_capacity_error_beyond_max_tokens(model, runner):
    cache = runner.cache
    slot, other = cache.allocate(), cache.allocate()
    tokens = random_tokens(MAX_TOKENS, seed=50)
    feed(runner, slot, tokens[:60])
    feed(runner, other, tokens[:2])
    with pytest.raises(CapacityError, match=str(MAX_TOKENS)):
        runner.forward([ForwardRequest(other, [1]), ForwardRequest(slot, tokens[60:] + [5])])  # 65 > 64
    # Nothing was written or counted: both sessions continue as if the call never happened.
    assert cache.lengths[slot] == 60 and cache.lengths[other] == 2
    assert_close(feed(runner, slot, tokens[60:]), full_logits(model, tokens)[60:], "after CapacityError")
    assert cache.lengths[slot] == MAX_TOKENS
    with pytest.raises(CapacityError):
        feed(runner, slot, [1])
    with pytest.raises(CapacityError):
        feed(runner, cache.allocate(), random_tokens(MAX_TOKENS + 1, seed=51))


def test_capacity_error_when_slots_run_out(runner):
    cache = runner.cache
    slots = [cache.allocate() for _ in range(NUM_SLOTS)]
    assert sorted(slots) == list(range(NUM_SLOTS))
    assert cache.num_free_slots == 0
    with pytest.raises(CapacityError):
        cache.allocate()
    cache.free(slots[2])
    assert cache.allocate() == slots[2]


def test_truncate_beyond_length_raises(runner):
    cache = runner.cache
    slot = cache.allocate()
    feed(runner, slot, random_tokens(5, seed=60))
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(slot, 6)
    with pytest.raises(ValueError):
        cache.truncate(slot, -1)
    assert cache.lengths[slot] == 5
    cache.truncate(slot, 5)  # a no-op is fine
    assert cache.lengths[slot] == 5


def test_empty_request_raises(runner):
    slot = runner.cache.allocate()
    with pytest.raises(ValueError, match="empty"):
        runner.forward([ForwardRequest(slot, [])])
    assert runner.forward([]) == []


def test_invalid_cache_sizes():
    shape = CacheShape(1, 1, 4)
    with pytest.raises(ValueError):
        SlotKVCache(shape, 0, 8, torch.float32, "cpu")
    with pytest.raises(ValueError):
        SlotKVCache(shape, 2, 0, torch.float32, "cpu")


# ---- session -> slot bookkeeping ------------------------------------------------------------
def test_session_slots_sync_rollback_and_miss(runner):
    sessions = SessionSlots(runner.cache)
    assert sessions.sync("a", 3) is None  # unknown session with a history: a miss
    slot = sessions.sync("a", 0)
    assert slot is not None and "a" in sessions
    feed(runner, slot, random_tokens(8, seed=70))
    assert sessions.sync("a", 5) == slot and sessions.cached_length("a") == 5  # rolled back
    assert sessions.sync("a", 6) is None  # holds fewer than the caller believes
    assert sessions.num_cache_misses == 2
    assert sessions.sync("a", 0) == slot and sessions.cached_length("a") == 0  # restart in place
    assert sessions.release("a") and not sessions.release("a")
    assert runner.cache.num_free_slots == NUM_SLOTS


def test_session_slots_evict_least_recently_used_outside_the_batch(runner):
    sessions = SessionSlots(runner.cache)
    for name in "abcd":
        sessions.sync(name, 0)
    sessions.sync("a", 0)  # a is now the most recently used; b the least
    sessions.sync("e", 0, pinned=["e", "b"])
    assert "b" in sessions and "c" not in sessions and sessions.num_evictions == 1
    with pytest.raises(CapacityError):
        sessions.sync("f", 0, pinned=["a", "b", "d", "e", "f"])


def test_session_slots_idle_ttl(runner):
    now = [0.0]
    sessions = SessionSlots(runner.cache, idle_ttl_s=10.0, clock=lambda: now[0])
    sessions.sync("old", 0)
    now[0] = 8.0
    sessions.sync("new", 0)
    now[0] = 12.0
    assert sessions.evict_idle() == ["old"]
    assert sessions.session_ids() == ["new"]


# ---- the graphed shapes (bucketed, padded), run eagerly on CPU ----------------------------------
def test_graph_buckets_match_full_forward(model):
    """The CUDA-graph layout (tokens padded to a bucket, slot rows to a power of two, fixed query
    grid and read length) emulated eagerly on CPU: same logits as the plain forward, and the
    padding writes land in the scratch slot only."""
    runner = ModelRunner(model, NUM_SLOTS, MAX_TOKENS, packed=True, cuda_graphs=True)
    assert runner.packed is not None and runner.packed.graphs is not None
    cache = runner.cache
    slots = [cache.allocate() for _ in range(3)]
    seqs = {slot: random_tokens(20 + 3 * i, seed=60 + i) for i, slot in enumerate(slots)}
    # Prefill in pieces of 1-5 tokens per session (graph-sized), sessions at different lengths.
    done = {slot: 0 for slot in slots}
    rng = random.Random(7)
    while any(done[s] < len(seqs[s]) for s in slots):
        batch = []
        for slot in slots:
            if done[slot] < len(seqs[slot]) and rng.random() < 0.8:
                n = min(rng.randint(1, 5), len(seqs[slot]) - done[slot])
                batch.append((slot, done[slot], n))
        if not batch:
            continue
        outs = runner.forward([ForwardRequest(s, seqs[s][start:start + n], logits_from=0) for s, start, n in batch])
        for (slot, start, n), out in zip(batch, outs):
            assert_close(out, full_logits(model, seqs[slot][: start + n])[start:], f"slot {slot} at {start}")
            done[slot] = start + n
    assert runner.packed.num_graph_forwards > 0
    assert runner.packed.num_eager_forwards == 0


def test_cpu_head_runs_two_or_three_rows_as_four_with_the_same_logits():
    """ModelRunner.head_logits pads 2-3 rows to 4 on CPU (a faster kernel path); the logits of
    the real rows are those of the unpadded head."""
    from specmesh.model_runner import ModelRunner
    from tests.tiny_models import make_tiny_llama

    runner = ModelRunner(make_tiny_llama(64, seed=3), 2, 32)
    hidden = torch.randn(3, runner.lm_head.weight.shape[1])
    for rows in (1, 2, 3):
        expected = runner.lm_head(hidden[:rows]).float()
        got = runner.head_logits(hidden[:rows])
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.argmax(dim=-1), expected.argmax(dim=-1))
