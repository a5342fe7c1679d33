"""PackedForward.host_inputs: its decode fast path (one token per request, 8 or more requests,
the drafter's every step) writes exactly what the general request-by-request layout writes."""

from __future__ import annotations

import random

import numpy as np
import pytest

from specmesh.cuda_graphs import GraphKey
from specmesh.model_runner import ForwardRequest, ModelRunner
from specmesh.packed_forward import PackedForward
from tests.tiny_models import make_tiny_llama


def general_layout(packed: PackedForward, requests, cached, lengths, key: GraphKey) -> np.ndarray:
    out = np.zeros(key.input_size, dtype=np.int64)
    out[2 * key.tokens: 3 * key.tokens] = packed.runner.cache.scratch_slot
    out[5 * key.tokens: 6 * key.tokens] = key.q_len - 1
    return PackedForward._ragged_inputs(out, requests, cached, lengths, key)


@pytest.mark.parametrize("seed", range(4))
def test_decode_fast_path_writes_what_the_general_layout_writes(seed):
    runner = ModelRunner(make_tiny_llama(64, seed=3), 128, 64, packed=True, cuda_graphs=True)
    packed = runner.packed
    assert packed is not None
    rng = random.Random(seed)
    for _ in range(50):
        count = rng.choice([8, 9, 16, 33, 64, 100])
        slots = rng.sample(range(128), count)
        cached = [rng.randint(0, 63) for _ in slots]
        requests = [ForwardRequest(s, (rng.randrange(64),) if rng.random() < 0.5 else [rng.randrange(64)],
                                   rng.randint(0, 1)) for s in slots]
        key = GraphKey(count + rng.randint(0, 30), 128, rng.choice([2, 17]), 64)
        got = packed.host_inputs(requests, cached, [1] * count, key)
        want = general_layout(packed, requests, cached, [1] * count, key)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want)
