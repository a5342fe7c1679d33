"""A CUDA graph capture must not run Python's cyclic garbage collector.

Collecting inside a capture can free a dead CUDAGraph whose destructor is not permitted while
the thread captures; that invalidated the verifier's captures on the H200 (every shape then ran
eagerly). `garbage_collection_paused` is what `GraphCache._capture` wraps the capture in.
"""

from __future__ import annotations

import gc

import pytest

from specmesh.cuda_graphs import garbage_collection_paused


class _Finalised:
    """A node of a reference cycle that records when the collector frees it."""

    freed: list[str] = []

    def __init__(self, name: str) -> None:
        self.name = name
        self.partner: _Finalised | None = None

    def __del__(self) -> None:
        _Finalised.freed.append(self.name)


def _drop_cycle(name: str) -> None:
    a, b = _Finalised(name), _Finalised(name)
    a.partner, b.partner = b, a


@pytest.fixture(autouse=True)
def _collector_enabled():
    was = gc.isenabled()
    gc.enable()
    _Finalised.freed.clear()
    yield
    if not was:
        gc.disable()


def test_dead_cycles_wait_until_the_capture_is_over():
    with garbage_collection_paused():
        _drop_cycle("captured")
        # Far past every generation's threshold: an enabled collector would have run here.
        garbage = [[i] for i in range(200_000)]
        del garbage
        assert not gc.isenabled()
        assert "captured" not in _Finalised.freed
    assert gc.isenabled()
    gc.collect()
    assert _Finalised.freed.count("captured") == 2


def test_the_collector_is_restored_after_a_failed_capture():
    with pytest.raises(RuntimeError, match="capture failed"):
        with garbage_collection_paused():
            raise RuntimeError("capture failed")
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off():
    gc.disable()
    with garbage_collection_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()
