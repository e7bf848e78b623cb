"""Continuous-batching LLM engine: one scheduler thread around a :class:`BatchGenerator`.

Callers (the Triton ``llm`` model, tests, benchmarks) ``submit`` requests from any
thread; the scheduler thread admits them at the next step, runs one decode step for the
whole running batch at a time, and hands each request its new tokens through a callback
(or a queue). Properties the serving stack relies on:

* a bounded wait queue: past ``max_queue`` waiting requests ``submit`` raises
  :class:`ResourceExhausted` at once instead of growing without limit;
* cancellation (``cancel`` or a polled ``is_cancelled``) stops a sequence within one
  step and frees its KV slot;
* chunked prefill (``prefill_budget`` prompt tokens per step) so newcomers never stall
  running streams for more than one step's worth of work;
* a failed step (e.g. out of memory) finishes the requests of that batch with an error
  and the engine keeps serving;
* every request gets exactly one final output (finished=True), on every path;
* with ``deliver_in_thread`` outputs are handed to the callbacks by a second thread
  that merges whatever queued up for a request into one output, so a slow consumer
  (e.g. Triton's response IPC) neither stalls the decode loop nor costs one message
  per token once it falls behind.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from stepaudio2.model.generation import BatchGenerator
from stepaudio2.model.sampling import SamplingParams
from stepaudio2.runtime.errors import InvalidArgument, ResourceExhausted, StepAudio2Error

log = logging.getLogger(__name__)


@dataclass
class EngineOutput:
    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None   # "stop" | "length" | "cancelled" | "error"
    error: StepAudio2Error | None = None


class RequestHandle:
    """What ``submit`` returns when no callback is given: iterate to get outputs."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.queue: "queue.SimpleQueue[EngineOutput]" = queue.SimpleQueue()

    def __iter__(self):
        while True:
            out = self.queue.get()
            yield out
            if out.finished:
                return

    def result(self, timeout: float | None = None) -> tuple[list[int], str | None]:
        """Block until finished; all generated ids and the finish reason."""
        ids: list[int] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            out = self.queue.get(timeout=left)
            ids += out.token_ids
            if out.finished:
                if out.error is not None:
                    raise out.error
                return ids, out.finish_reason


@dataclass
class _Submission:
    request_id: str
    input_ids: list[int]
    embeds: object
    params: SamplingParams
    emit: Callable[[EngineOutput], None]
    is_cancelled: Callable[[], bool] | None


@dataclass
class EngineStats:
    running: int = 0                   # sequences in the batch right now
    waiting: int = 0                   # submitted, not yet admitted
    max_running: int = 0               # the largest running batch seen
    steps: int = 0
    generated_tokens: int = 0
    completed: int = 0
    cancelled: int = 0
    errors: int = 0
    rejected: int = 0                  # submits refused because the queue was full
    batch_histogram: dict[int, int] = field(default_factory=dict)  # running size -> steps


class LLMEngine:
    def __init__(self, model, max_batch: int = 8, max_queue: int = 32, prefill_budget: int | None = 512,
                 capacity: int = 256, max_len: int | None = None, idle_wait_s: float = 0.05,
                 deliver_in_thread: bool = False, stream_interval_s: float = 0.0):
        self.model = model
        self.gen = BatchGenerator(model, max_batch=max_batch, capacity=capacity, max_len=max_len,
                                  keep_finished=False, prefill_budget=prefill_budget)
        self.max_queue = max_queue
        self.idle_wait_s = idle_wait_s
        self.stats = EngineStats()
        self._inbox: list[_Submission] = []
        self._cancels: set[str] = set()
        self._emit: dict[str, Callable[[EngineOutput], None]] = {}
        self._polls: dict[str, Callable[[], bool]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._outbox: "queue.SimpleQueue | None" = queue.SimpleQueue() if deliver_in_thread else None
        # With the delivery thread: wait this long after an output before handing it
        # over, so tokens of the next steps ride in the same message (vLLM's "stream
        # interval"). Costs at most this much latency per message.
        self.stream_interval_s = stream_interval_s
        self._delivery: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> "LLMEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
            self._thread.start()
        if self._outbox is not None and self._delivery is None:
            self._delivery = threading.Thread(target=self._delivery_loop, name="llm-engine-delivery", daemon=True)
            self._delivery.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the scheduler; unfinished requests get a final 'cancelled' output."""
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._delivery is not None:
            self._outbox.put(None)  # after everything the scheduler delivered
            self._delivery.join(timeout)
            self._delivery = None

    # -- requests --------------------------------------------------------------------
    def submit(self, request_id: str, input_ids, audio_embeds: Sequence = (), params: SamplingParams | None = None,
               on_output: Callable[[EngineOutput], None] | None = None,
               is_cancelled: Callable[[], bool] | None = None) -> RequestHandle | None:
        """Queue a request. Raises InvalidArgument (bad request) or ResourceExhausted
        (queue full) in the caller's thread; otherwise outputs arrive through
        ``on_output`` (called from the scheduler thread) or the returned handle."""
        ids, embeds, params = self.gen.prepare(input_ids, audio_embeds, params)
        handle = None
        if on_output is None:
            handle = RequestHandle(request_id)
            on_output = handle.queue.put
        with self._lock:
            if self._stop:
                raise ResourceExhausted("the engine is shutting down")
            if request_id in self._emit:
                raise InvalidArgument(f"request id {request_id!r} is already active", field="request_id")
            waiting = len(self._inbox) + len(self.gen.pending)
            if waiting >= self.max_queue:
                self.stats.rejected += 1
                raise ResourceExhausted(f"the LLM queue is full ({waiting} requests waiting, limit "
                                        f"{self.max_queue}); retry later")
            self._inbox.append(_Submission(request_id, ids, embeds, params, on_output, is_cancelled))
            self._emit[request_id] = on_output
            self.stats.waiting = waiting + 1
            self._wake.notify_all()
        return handle

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancels.add(request_id)
            self._wake.notify_all()

    # -- the scheduler -----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._inbox and not self._cancels and not self.gen.active:
                    self._wake.wait(self.idle_wait_s)
                if self._stop:
                    break
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, set()
            for s in inbox:
                self.gen.add(s.request_id, s.input_ids, params=s.params, embeds=s.embeds)
                if s.is_cancelled is not None:
                    self._polls[s.request_id] = s.is_cancelled
            for rid, poll in list(self._polls.items()):
                try:
                    if poll():
                        cancels.add(rid)
                except Exception:  # a broken poll must not kill the scheduler
                    cancels.add(rid)
            for rid in cancels:
                if self.gen.cancel(rid):
                    self.stats.cancelled += 1
                    self._deliver(EngineOutput(rid, [], True, "cancelled"))
            self.stats.running = len(self.gen.running)
            self.stats.waiting = len(self.gen.pending)
            if not self.gen.active:
                continue
            try:
                outs = self.gen.step()
            except Exception as e:  # noqa: BLE001 - any failure of a batched forward
                log.exception("engine step failed; failing the requests of this batch")
                err = e if isinstance(e, StepAudio2Error) else StepAudio2Error(f"generation step failed: {e}")
                for rid in self.gen.abort_all("error"):
                    self.stats.errors += 1
                    self._deliver(EngineOutput(rid, [], True, "error", err))
                continue
            self.stats.steps += 1
            running = len(self.gen.running) + sum(1 for o in outs if o.finished and o.finish_reason != "cancelled")
            self.stats.running = len(self.gen.running)
            self.stats.max_running = max(self.stats.max_running, running)
            self.stats.batch_histogram[running] = self.stats.batch_histogram.get(running, 0) + 1
            self.stats.waiting = len(self.gen.pending)
            merged: dict[str, EngineOutput] = {}
            for o in outs:
                m = merged.setdefault(o.request_id, EngineOutput(o.request_id, []))
                if o.token_id is not None:
                    m.token_ids.append(o.token_id)
                    self.stats.generated_tokens += 1
                if o.finished:
                    m.finished, m.finish_reason = True, o.finish_reason
                    self.stats.completed += 1
            for m in merged.values():
                self._deliver(m)
        # shutting down: every unfinished request still gets its final output
        for rid in self.gen.abort_all("cancelled"):
            self._deliver(EngineOutput(rid, [], True, "cancelled"))
        with self._lock:
            leftover, self._inbox = self._inbox, []
        for s in leftover:
            self._deliver(EngineOutput(s.request_id, [], True, "cancelled"))

    def _deliver(self, out: EngineOutput) -> None:
        emit = self._emit.get(out.request_id)
        if out.finished:
            with self._lock:
                self._emit.pop(out.request_id, None)
            self._polls.pop(out.request_id, None)
        if emit is None:
            return
        if self._outbox is not None:
            self._outbox.put((emit, out))
        else:
            self._call(emit, out)

    def _call(self, emit: Callable[[EngineOutput], None], out: EngineOutput) -> None:
        try:
            emit(out)
        except Exception:  # a caller's broken callback must not stop the batch
            log.exception("output callback of request %s failed; cancelling it", out.request_id)
            if not out.finished:
                self.cancel(out.request_id)

    def _delivery_loop(self) -> None:
        """Hand outputs to their callbacks; whatever queued up meanwhile for one request
        is merged into a single output (tokens in order, the final flag last)."""
        while True:
            items = [self._outbox.get()]
            if self.stream_interval_s > 0 and items[0] is not None:
                time.sleep(self.stream_interval_s)
            while True:
                try:
                    items.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            merged: dict[str, tuple] = {}
            done = False
            for item in items:
                if item is None:
                    done = True
                    continue
                emit, out = item
                key = (out.request_id, id(emit))  # an id may be reused by a later request
                if key in merged:
                    m = merged[key][1]
                    m.token_ids = m.token_ids + out.token_ids
                    if out.finished:
                        m.finished, m.finish_reason, m.error = True, out.finish_reason, out.error
                else:
                    merged[key] = (emit, EngineOutput(out.request_id, list(out.token_ids), out.finished,
                                                                 out.finish_reason, out.error))
            for emit, out in merged.values():
                self._call(emit, out)
            if done:
                return
