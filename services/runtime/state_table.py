"""A bounded, idle-expiring table of per-stream state (torch-free).

Streaming models keep state per stream (token2wav's flow and vocoder caches). The
table is never an unbounded dict: at most ``max_items`` entries, each dropped when its
stream ends, is cancelled, or stays idle longer than ``idle_timeout_s``. When the table
is full, a new stream first reclaims expired entries; if none has expired it is refused
(:class:`ResourceExhausted`), so live streams are never evicted behind their owner's back.

Thread-safe: Triton's ``execute`` and a sweeper thread may use it at once.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Generic, Hashable, TypeVar

from stepaudio2.runtime.errors import InvalidArgument, ResourceExhausted

V = TypeVar("V")


@dataclass
class TableStats:
    live: int = 0              # entries now
    max_live: int = 0          # the most ever held at once
    started: int = 0           # entries added
    finished: int = 0          # removed by their last chunk
    cancelled: int = 0         # removed by a cancel (or a failed chunk)
    expired: int = 0           # removed after the idle timeout
    refused: int = 0           # adds refused because the table was full


class StateTable(Generic[V]):
    """``key -> value`` with a size bound and an idle timeout (see the module docstring)."""

    def __init__(self, max_items: int, idle_timeout_s: float, *, clock: Callable[[], float] = time.monotonic,
                 on_drop: Callable[[Hashable, V, str], Any] | None = None):
        if int(max_items) < 1:
            raise InvalidArgument(f"must be >= 1, got {max_items!r}", field="max_items")
        if not idle_timeout_s > 0:
            raise InvalidArgument(f"must be > 0, got {idle_timeout_s!r}", field="idle_timeout_s")
        self.max_items = int(max_items)
        self.idle_timeout_s = float(idle_timeout_s)
        self._clock = clock
        self._on_drop = on_drop
        self._items: OrderedDict[Hashable, tuple[V, float]] = OrderedDict()   # oldest use first
        self._lock = threading.Lock()
        self.stats = TableStats()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._items)

    def snapshot(self) -> TableStats:
        with self._lock:
            return TableStats(**vars(self.stats))

    # ------------------------------------------------------------------ changes
    def add(self, key: Hashable, value: V) -> None:
        """Insert (or replace: a stream restarted under the same key) ``key``."""
        dropped = []
        with self._lock:
            now = self._clock()
            if key in self._items:
                dropped.append((key, self._items.pop(key)[0], "cancelled"))
                self.stats.cancelled += 1
            if len(self._items) >= self.max_items:
                dropped += self._expire_locked(now)
            if len(self._items) >= self.max_items:
                self.stats.refused += 1
                self.stats.live = len(self._items)
                raise ResourceExhausted(f"{len(self._items)} streams are open, the most this model keeps "
                                        f"(max_streams {self.max_items}); retry when one ends")
            self._items[key] = (value, now)
            self.stats.started += 1
            self.stats.live = len(self._items)
            self.stats.max_live = max(self.stats.max_live, self.stats.live)
        self._dropped(dropped)

    def get(self, key: Hashable) -> V | None:
        """The value, marked as just used; None when absent (ended, expired, never added)."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items[key] = (item[0], self._clock())
            self._items.move_to_end(key)
            return item[0]

    def pop(self, key: Hashable, why: str = "finished") -> V | None:
        """Remove ``key`` (``why``: finished | cancelled); None when absent."""
        with self._lock:
            item = self._items.pop(key, None)
            if item is not None:
                setattr(self.stats, why, getattr(self.stats, why) + 1)
                self.stats.live = len(self._items)
        if item is not None:
            self._dropped([(key, item[0], why)])
            return item[0]
        return None

    def expire(self) -> list[Hashable]:
        """Drop every entry idle for longer than the timeout; returns their keys."""
        with self._lock:
            dropped = self._expire_locked(self._clock())
        self._dropped(dropped)
        return [k for k, _, _ in dropped]

    def clear(self) -> None:
        with self._lock:
            dropped = [(k, v, "cancelled") for k, (v, _) in self._items.items()]
            self.stats.cancelled += len(dropped)
            self._items.clear()
            self.stats.live = 0
        self._dropped(dropped)

    # ----------------------------------------------------------------- internals
    def _expire_locked(self, now: float) -> list[tuple[Hashable, V, str]]:
        out = []
        while self._items:
            key, (value, used) = next(iter(self._items.items()))
            if now - used <= self.idle_timeout_s:
                break                      # ordered by last use: the rest are fresher
            del self._items[key]
            out.append((key, value, "expired"))
        self.stats.expired += len(out)
        self.stats.live = len(self._items)
        return out

    def _dropped(self, dropped) -> None:
        if self._on_drop is None:
            return
        for key, value, why in dropped:
            try:
                self._on_drop(key, value, why)
            except Exception:  # noqa: BLE001 - a logging hook must not break the table
                pass


class Sweeper:
    """A daemon thread calling ``table.expire()`` every ``interval_s`` until closed.

    It touches only the table (plain Python state): no Triton API calls from it."""

    def __init__(self, table: StateTable, interval_s: float):
        self._table = table
        self._interval = max(0.05, float(interval_s))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state-table-sweeper", daemon=True)

    def start(self) -> "Sweeper":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._table.expire()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self._interval + 1)
