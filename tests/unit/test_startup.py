"""The command line's loading phase: no cyclic collection meanwhile, what it loaded frozen after."""

from __future__ import annotations

import gc

import pytest

from flows.startup import loading


@pytest.fixture
def collector():
    was_enabled = gc.isenabled()
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process collects as before
    (gc.enable if was_enabled else gc.disable)()


def test_loading_pauses_collection_and_freezes_what_it_loaded(collector):
    gc.enable()
    before = gc.get_freeze_count()
    with loading():
        assert not gc.isenabled()
        loaded = [{"row": i} for i in range(1000)]  # objects the collector tracks
    assert gc.isenabled()
    assert gc.get_freeze_count() >= before + len(loaded)
    collected = {id(o) for o in gc.get_objects()}  # the generations a collection walks
    assert not any(id(x) in collected for x in loaded)


def test_loading_leaves_a_disabled_collector_disabled_and_restores_on_error(collector):
    gc.disable()
    with pytest.raises(RuntimeError), loading():
        raise RuntimeError("import failed")
    assert not gc.isenabled()
    gc.enable()
    with pytest.raises(SystemExit), loading():  # a bad setting found while loading
        raise SystemExit(2)
    assert gc.isenabled()
