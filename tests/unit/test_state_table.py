"""StateTable / Sweeper: the bounded, idle-expiring per-stream state table (torch-free)."""
import threading
import time

import pytest

from stepaudio2.runtime.errors import InvalidArgument, ResourceExhausted
from stepaudio2.runtime.state_table import StateTable, Sweeper, TableStats


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def _table(max_items=3, idle=10.0, **kw):
    clock = FakeClock()
    drops = []
    table = StateTable(max_items, idle, clock=clock, on_drop=lambda k, v, why: drops.append((k, v, why)), **kw)
    return table, clock, drops


def _counts(s: TableStats) -> dict:
    return dict(vars(s))


# ----------------------------------------------------------------------------- basics
def test_add_get_pop_and_stats():
    table, _, drops = _table()
    table.add("a", 1)
    table.add("b", 2)
    assert len(table) == 2 and "a" in table and "b" in table and "c" not in table
    assert table.keys() == ["a", "b"]
    assert table.get("a") == 1 and table.get("b") == 2
    assert table.get("c") is None
    assert table.pop("a") == 1                      # default reason: finished
    assert table.pop("a") is None                   # already gone: nothing counted
    assert table.pop("b", "cancelled") == 2
    assert len(table) == 0
    assert _counts(table.snapshot()) == dict(live=0, max_live=2, started=2, finished=1, cancelled=1, expired=0,
                                             refused=0)
    assert drops == [("a", 1, "finished"), ("b", 2, "cancelled")]


def test_snapshot_is_a_copy():
    table, _, _ = _table()
    table.add("a", 1)
    snap = table.snapshot()
    table.add("b", 2)
    assert snap.live == 1 and snap.started == 1
    assert table.snapshot().live == 2 and table.snapshot().started == 2


def test_max_live_is_the_peak():
    table, _, _ = _table(max_items=5)
    for k in "abcd":
        table.add(k, k)
    for k in "abc":
        table.pop(k)
    table.add("e", "e")
    s = table.snapshot()
    assert s.live == 2 and s.max_live == 4 and s.started == 5 and s.finished == 3


@pytest.mark.parametrize("max_items, idle", [(0, 1.0), (-1, 1.0), (1, 0), (1, -2.0), (1, float("nan"))])
def test_bad_construction(max_items, idle):
    with pytest.raises(InvalidArgument):
        StateTable(max_items, idle)


def test_replacing_a_key_counts_a_cancel():
    table, _, drops = _table()
    table.add("a", "old")
    table.add("a", "new")
    assert len(table) == 1 and table.get("a") == "new"
    s = table.snapshot()
    assert s.started == 2 and s.cancelled == 1 and s.live == 1
    assert drops == [("a", "old", "cancelled")]


def test_clear_cancels_everything():
    table, _, drops = _table()
    table.add("a", 1)
    table.add("b", 2)
    table.clear()
    assert len(table) == 0
    s = table.snapshot()
    assert s.cancelled == 2 and s.live == 0
    assert sorted(d[2] for d in drops) == ["cancelled", "cancelled"]


# ----------------------------------------------------------------------------- idle expiry
def test_idle_expiry_with_a_fake_clock():
    table, clock, drops = _table(idle=10.0)
    table.add("a", 1)
    clock.advance(5)
    table.add("b", 2)
    clock.advance(5)
    assert table.expire() == []                      # a is exactly at the timeout: not yet "longer than"
    clock.advance(0.5)
    assert table.expire() == ["a"]                   # a idle 10.5 s, b 5.5 s
    assert "a" not in table and table.get("b") == 2
    clock.advance(9.9)                               # b was just used by get(): 9.9 s idle
    assert table.expire() == []
    clock.advance(0.2)
    assert table.expire() == ["b"]
    s = table.snapshot()
    assert s.expired == 2 and s.live == 0 and s.finished == 0 and s.cancelled == 0
    assert drops == [("a", 1, "expired"), ("b", 2, "expired")]


def test_get_refreshes_and_reorders():
    table, clock, _ = _table(idle=10.0)
    table.add("a", 1)
    table.add("b", 2)
    clock.advance(8)
    table.get("a")                                    # a is now the freshest
    clock.advance(3)
    assert table.expire() == ["b"]
    assert table.keys() == ["a"]


def test_expire_reclaims_every_stale_entry_even_after_a_refreshed_one():
    table, clock, _ = _table(max_items=5, idle=10.0)
    for k in "abcd":
        table.add(k, k)
        clock.advance(1)
    table.get("b")
    clock.advance(20)
    assert sorted(table.expire()) == ["a", "b", "c", "d"]


# ----------------------------------------------------------------------------- full table
def test_full_table_refuses_without_evicting_live_streams():
    table, clock, drops = _table(max_items=2, idle=10.0)
    table.add("a", 1)
    table.add("b", 2)
    clock.advance(10)                                 # at, not past, the timeout
    with pytest.raises(ResourceExhausted) as e:
        table.add("c", 3)
    assert "max_streams 2" in str(e.value)
    assert table.keys() == ["a", "b"] and "c" not in table
    s = table.snapshot()
    assert s.refused == 1 and s.started == 2 and s.live == 2 and s.expired == 0
    assert drops == []


def test_full_table_first_reclaims_expired_entries():
    table, clock, drops = _table(max_items=2, idle=10.0)
    table.add("a", 1)
    clock.advance(6)
    table.add("b", 2)
    clock.advance(6)                                  # a idle 12 s, b 6 s
    table.add("c", 3)
    assert table.keys() == ["b", "c"]
    s = table.snapshot()
    assert s.expired == 1 and s.refused == 0 and s.started == 3 and s.live == 2 and s.max_live == 2
    assert drops == [("a", 1, "expired")]


def test_replacing_in_a_full_table_is_not_refused():
    table, _, _ = _table(max_items=2)
    table.add("a", 1)
    table.add("b", 2)
    table.add("b", 3)                                 # the old b is dropped first: room for the new one
    assert table.get("b") == 3 and len(table) == 2
    assert table.snapshot().refused == 0


def test_on_drop_errors_do_not_break_the_table():
    def boom(*_):
        raise RuntimeError("hook failed")

    clock = FakeClock()
    table = StateTable(2, 1.0, clock=clock, on_drop=boom)
    table.add("a", 1)
    assert table.pop("a") == 1
    table.add("b", 2)
    clock.advance(2)
    assert table.expire() == ["b"]
    assert len(table) == 0


def test_thread_safety_smoke():
    table = StateTable(10_000, 60.0)
    errors = []

    def worker(n):
        try:
            for i in range(300):
                key = (n, i)
                table.add(key, i)
                assert table.get(key) == i
                if i % 2:
                    table.pop(key)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = table.snapshot()
    assert s.started == 1200 and s.finished == 600 and len(table) == 600 == s.live


# ----------------------------------------------------------------------------- sweeper
def test_sweeper_expires_entries_in_the_background():
    drops = []
    table = StateTable(4, 0.1, on_drop=lambda k, v, why: drops.append((k, why)))
    table.add("a", 1)
    table.add("b", 2)
    sweeper = Sweeper(table, 0.05).start()
    try:
        deadline = time.monotonic() + 20.0           # generous: the machine may be busy
        while len(table) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(table) == 0
        assert sorted(drops) == [("a", "expired"), ("b", "expired")]
        assert table.snapshot().expired == 2
    finally:
        sweeper.close()
    assert not sweeper._thread.is_alive()


def test_sweeper_close_stops_the_thread():
    table = StateTable(4, 60.0)
    sweeper = Sweeper(table, 0.01).start()            # clamped to >= 0.05 s
    assert sweeper._interval == pytest.approx(0.05)
    sweeper.close()
    assert not sweeper._thread.is_alive()
    sweeper.close()                                    # closing twice is harmless
