"""The continuous-batching engine in-process: concurrent requests batch together and
each gets its own exact result; bounded queue; cancellation frees the slot; a bad
request fails alone; shutdown finishes everyone."""
import threading

import pytest

from stepaudio2.model.engine import LLMEngine
from stepaudio2.model.generation import generate_full_recompute
from stepaudio2.model.prompt import asr_messages, build_prompt
from stepaudio2.model.sampling import SamplingParams
from stepaudio2.runtime.errors import InvalidArgument, ResourceExhausted

from .test_model import speechlike


@pytest.fixture(scope="module")
def prompts(tiny_model):
    out = []
    for i in range(8):
        p = build_prompt(tiny_model.tokenizer, asr_messages(speechlike(0.6 + 0.3 * i, seed=20 + i)))
        out.append((p.input_ids, tiny_model.encode_chunks(p.audio_chunks)))
    return out


@pytest.mark.parametrize("deliver_in_thread", [False, True])
def test_concurrent_requests_batch_and_match_in_process_greedy(tiny_model, prompts, deliver_in_thread):
    eng = LLMEngine(tiny_model, max_batch=8, prefill_budget=64, deliver_in_thread=deliver_in_thread).start()
    try:
        results = {}

        def run(i):
            h = eng.submit(f"r{i}", *prompts[i], SamplingParams(max_new_tokens=10))
            results[i] = h.result(timeout=120)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, (ids, audio) in enumerate(prompts):
            assert results[i][0] == generate_full_recompute(tiny_model, ids, audio, max_new_tokens=10), i
        assert eng.stats.max_running > 1
        assert eng.stats.completed == 8 and eng.gen.free_slots == 8
    finally:
        eng.stop()


def test_queue_full_is_resource_exhausted(tiny_model, prompts):
    eng = LLMEngine(tiny_model, max_batch=1, max_queue=2)  # not started: nothing drains
    h1 = eng.submit("a", *prompts[0], SamplingParams(max_new_tokens=3))
    h2 = eng.submit("b", *prompts[1], SamplingParams(max_new_tokens=3))
    with pytest.raises(ResourceExhausted, match="queue is full"):
        eng.submit("c", *prompts[2], SamplingParams(max_new_tokens=3))
    assert eng.stats.rejected == 1
    eng.start()
    try:
        assert len(h1.result(timeout=60)[0]) == 3 and len(h2.result(timeout=60)[0]) == 3
        assert eng.submit("c", *prompts[2], SamplingParams(max_new_tokens=3)).result(timeout=60)[1] == "length"
    finally:
        eng.stop()


def test_cancel_stops_within_a_step_and_frees_the_slot(tiny_model, prompts):
    eng = LLMEngine(tiny_model, max_batch=1).start()
    try:
        first = threading.Event()
        outs = []

        def on_out(o):
            outs.append(o)
            first.set()

        eng.submit("long", *prompts[0], SamplingParams(max_new_tokens=2000, min_tokens=2000), on_output=on_out)
        assert first.wait(60)
        eng.cancel("long")
        nxt = eng.submit("next", *prompts[1], SamplingParams(max_new_tokens=3))
        assert len(nxt.result(timeout=60)[0]) == 3           # the freed slot serves the next request
        assert outs[-1].finished and outs[-1].finish_reason == "cancelled"
        assert sum(len(o.token_ids) for o in outs) < 2000
        assert eng.stats.cancelled == 1
    finally:
        eng.stop()


def test_polled_cancellation(tiny_model, prompts):
    eng = LLMEngine(tiny_model, max_batch=2).start()
    try:
        flag = threading.Event()
        h = eng.submit("p", *prompts[0], SamplingParams(max_new_tokens=2000, min_tokens=2000), is_cancelled=flag.is_set)
        got = next(iter(h))
        assert got.token_ids
        flag.set()
        ids, reason = h.result(timeout=60)
        assert reason == "cancelled" and eng.gen.free_slots == 2
    finally:
        eng.stop()


def test_bad_request_fails_alone(tiny_model, prompts):
    eng = LLMEngine(tiny_model, max_batch=2).start()
    try:
        with pytest.raises(InvalidArgument, match="audio_embeds"):
            eng.submit("bad", prompts[0][0], [], SamplingParams(max_new_tokens=3))
        with pytest.raises(InvalidArgument):
            eng.submit("bad2", prompts[0][0], prompts[0][1], SamplingParams(top_p=2.0))
        ids, reason = eng.submit("good", *prompts[0], SamplingParams(max_new_tokens=4)).result(timeout=60)
        assert ids == generate_full_recompute(tiny_model, *prompts[0], max_new_tokens=4)
    finally:
        eng.stop()


def test_stop_gives_every_request_a_final_output(tiny_model, prompts):
    eng = LLMEngine(tiny_model, max_batch=1).start()
    h1 = eng.submit("x", *prompts[0], SamplingParams(max_new_tokens=2000, min_tokens=2000))
    h2 = eng.submit("y", *prompts[1], SamplingParams(max_new_tokens=5))
    next(iter(h1))
    eng.stop()
    assert h1.result(timeout=10)[1] == "cancelled"
    assert h2.result(timeout=10)[1] == "cancelled"
    with pytest.raises(ResourceExhausted, match="shutting down"):
        eng.submit("z", *prompts[2])


def test_delivery_thread_merges_what_queued_up_and_keeps_order(tiny_model, prompts):
    """A slow consumer gets fewer, larger outputs - the same tokens, in order, final last."""
    import time

    eng = LLMEngine(tiny_model, max_batch=1, deliver_in_thread=True).start()
    try:
        outs, done = [], threading.Event()

        def slow(o):
            time.sleep(0.02)
            outs.append(o)
            if o.finished:
                done.set()

        eng.submit("s", *prompts[0], SamplingParams(max_new_tokens=40, min_tokens=40), on_output=slow)
        assert done.wait(60)
        ids = [t for o in outs for t in o.token_ids]
        assert ids == tiny_model.generate(*prompts[0], max_new_tokens=40, min_tokens=40)
        assert len(ids) == 40 and len(outs) < 40
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    finally:
        eng.stop()
