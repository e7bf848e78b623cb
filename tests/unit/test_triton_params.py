"""Triton adapter helpers without Triton: defensive parameter reading (practice 5), request
parsing, error prefixes, metrics publishing with a fake ``pb_utils``, model repository
template filling, and the tritonserver command line / environment."""
from __future__ import annotations

import json
import re
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from stepaudio2.runtime.errors import CheckpointError, InvalidArgument, InvalidAudio, ResourceExhausted, StepAudio2Error
from stepaudio2.runtime.model_repo import (RepoOptions, available_models, build_model_repo, checkpoint_llm_dim,
                                          fill_template, pbtxt_string)
from stepaudio2.runtime.triton_params import (EngineMetrics, ModelConfigError, RequestCancelled, encode_audio_inputs,
                                              engine_stats, error_code_of, error_message, get_param, is_unset,
                                              model_device, model_parameters, parse_audio_input,
                                              parse_llm_request, split_audio_embeds, triton_error)


# -- parameters --------------------------------------------------------------------------------
def _config(**params):
    return json.dumps({"name": "m", "parameters": {k: {"string_value": v} for k, v in params.items()}})


@pytest.mark.parametrize("value,unset", [(None, True), ("", True), ("   ", True), ("${max_batch}", True),
                                         ("/a/${x}/b", True), ("0", False), ("auto", False), ("$5", False)])
def test_is_unset(value, unset):
    assert is_unset(value) is unset


def test_model_parameters_drop_unset_values():
    params = model_parameters(_config(model_dir="/ckpt", max_len="", num_threads="${num_threads}", dtype=" auto "))
    assert params == {"model_dir": "/ckpt", "dtype": "auto"}
    assert model_parameters({"name": "no params"}) == {}


def test_get_param_types_defaults_and_loud_failures():
    p = model_parameters(_config(max_batch="8", temp="0.5", flag="true", path="/x", empty="", tmpl="${a}"))
    assert get_param(p, "max_batch", int) == 8
    assert get_param(p, "temp", float) == 0.5
    assert get_param(p, "flag", bool) is True
    assert get_param(p, "path", Path) == Path("/x")
    assert get_param(p, "empty", int, None) is None          # empty = missing -> default
    assert get_param(p, "tmpl", int, 3) == 3                 # unfilled placeholder = missing
    for key in ("empty", "tmpl", "absent"):                  # required and missing: loud, names the key
        with pytest.raises(ModelConfigError, match=f"required model parameter '{key}' is missing"):
            get_param(p, key, int)
    with pytest.raises(ModelConfigError, match="'path'='/x' is not a valid int"):
        get_param(p, "path", int)
    with pytest.raises(ModelConfigError, match="must be one of"):
        get_param(p, "max_batch", int, choices=[1, 2])
    with pytest.raises(ModelConfigError, match=">= 16"):
        get_param(p, "max_batch", int, minimum=16)
    with pytest.raises(ModelConfigError, match="not a valid bool"):
        get_param({"b": "maybe"}, "b", bool)
    assert ModelConfigError("x").mapping.grpc == "FAILED_PRECONDITION"


def test_model_device():
    assert model_device({"model_instance_kind": "CPU", "model_instance_device_id": "0"}) == "cpu"
    assert model_device({"model_instance_kind": "GPU", "model_instance_device_id": "1"}) == "cuda:1"


# -- errors -------------------------------------------------------------------------------------------
def test_error_messages_carry_a_stable_prefix():
    assert error_message(InvalidArgument("must be in (0, 1]", field="top_p")) == \
        "INVALID_ARGUMENT: top_p: must be in (0, 1]"
    assert error_message(ResourceExhausted("queue full"), "r7") == "RESOURCE_EXHAUSTED: queue full [request id: r7]"
    assert error_message(ValueError("boom")) == "INTERNAL: boom"
    assert error_code_of("RESOURCE_EXHAUSTED: queue full") == "RESOURCE_EXHAUSTED"
    assert error_code_of("[request id: x] something else") is None


class _FakeTritonError:
    INVALID_ARG, UNAVAILABLE, CANCELLED, INTERNAL = "INVALID_ARG", "UNAVAILABLE", "CANCELLED", "INTERNAL"

    def __init__(self, message, code=None):
        self.message, self.code = message, code


def test_triton_error_maps_codes_through_the_error_table():
    pb = types.SimpleNamespace(TritonError=_FakeTritonError)
    e = triton_error(pb, InvalidAudio("is empty", field="WAVEFORM"))
    assert (e.message, e.code) == ("INVALID_ARGUMENT: WAVEFORM: is empty", "INVALID_ARG")
    assert triton_error(pb, ResourceExhausted("full")).code == "UNAVAILABLE"
    assert triton_error(pb, RequestCancelled("gone")).code == "CANCELLED"
    assert triton_error(pb, RuntimeError("x")).code == "INTERNAL"

    class OldTritonError:  # a backend without codes: message only
        def __init__(self, message):
            self.message = message

    assert triton_error(types.SimpleNamespace(TritonError=OldTritonError), ResourceExhausted("full")).message == \
        "RESOURCE_EXHAUSTED: full"


# -- audio_encoder requests ---------------------------------------------------------------------------
def test_parse_audio_input():
    wav = np.zeros((1, 1600), np.float32)
    a = parse_audio_input(wav, None)
    assert a.kind == "waveform" and a.array.shape == (1600,)
    m = parse_audio_input(None, np.zeros((1, 128, 10), np.float32))
    assert m.kind == "mel" and m.array.shape == (128, 10)
    bad = [((None, None), "neither"), ((wav, np.zeros((128, 10), np.float32)), "both"),
           ((np.zeros((1, 0), np.float32), None), "is empty"),
           ((np.zeros((1, 30 * 16000 + 1), np.float32), None), "at most 30 s"),
           ((np.array([[0.0, np.nan]], np.float32), None), "NaN"),
           ((np.array([[0.0, np.inf]], np.float32), None), "NaN or infinite"),
           ((np.zeros((2, 100), np.float32), None), "batch dimension 1"),
           ((None, np.zeros((1, 80, 10), np.float32)), "must be [128, F]"),
           ((None, np.zeros((1, 128, 2), np.float32)), "frames"),
           ((None, np.zeros((1, 128, 3001), np.float32)), "frames")]
    for (w, mel), why in bad:
        with pytest.raises(InvalidAudio, match=re.escape(why)):
            parse_audio_input(w, mel)


def test_encode_audio_inputs_is_one_batched_call_equal_to_encode_chunks(tiny_model):
    clips = [np.sin(np.arange(n) * 0.01).astype(np.float32) for n in (16000, 9000)]
    calls = []
    real = tiny_model.encode_audio

    def counting(mels, lens):
        calls.append(np.asarray(mels).shape)
        return real(mels, lens)

    tiny_model.encode_audio = counting
    try:
        got = encode_audio_inputs(tiny_model, [parse_audio_input(clips[0], None),
                                               parse_audio_input(None, tiny_model.log_mel(clips[1]))])
    finally:
        del tiny_model.encode_audio
    assert len(calls) == 1 and calls[0][0] == 2
    want = tiny_model.encode_chunks(clips)   # the same batch composition -> the same padding
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w.numpy(), atol=1e-6, rtol=0)


# -- llm requests -------------------------------------------------------------------------------------------
def test_parse_llm_request():
    r = parse_llm_request({"INPUT_IDS": np.array([1, 2, 3], np.int32), "MAX_TOKENS": np.array([5], np.int32),
                           "TEMPERATURE": np.array([0.5], np.float32), "SEED": np.array([7], np.int64),
                           "STOP_IDS": np.array([9, 10], np.int32), "TOP_P": None,
                           "AUDIO_EMBEDS": np.zeros((4, 8), np.float32)}, llm_dim=8)
    assert r.input_ids == [1, 2, 3] and r.audio_embeds.shape == (4, 8)
    assert r.sampling == {"max_new_tokens": 5, "temperature": 0.5, "seed": 7, "stop_ids": [9, 10]}
    assert parse_llm_request({"INPUT_IDS": np.array([4])}, 8).sampling == {}


@pytest.mark.parametrize("inputs,why", [
    ({}, "INPUT_IDS: is required"),
    ({"INPUT_IDS": np.zeros(0, np.int32)}, "INPUT_IDS: is empty"),
    ({"INPUT_IDS": np.array([1.5])}, "INPUT_IDS: must be an integer tensor"),
    ({"INPUT_IDS": np.array([1]), "AUDIO_EMBEDS": np.zeros((2, 7), np.float32)}, "AUDIO_EMBEDS: must be [N, 8]"),
    ({"INPUT_IDS": np.array([1]), "AUDIO_EMBEDS": np.full((2, 8), np.nan, np.float32)}, "NaN"),
    ({"INPUT_IDS": np.array([1]), "MAX_TOKENS": np.array([1, 2], np.int32)}, "MAX_TOKENS: must hold exactly one"),
    ({"INPUT_IDS": np.array([1]), "TOP_P": np.array([1], np.int32)}, "TOP_P: must be a float tensor"),
    ({"INPUT_IDS": np.array([1]), "STOP_IDS": np.array([0.5], np.float32)}, "STOP_IDS: must be an integer"),
])
def test_parse_llm_request_rejects(inputs, why):
    with pytest.raises(InvalidArgument) as e:
        parse_llm_request(inputs, llm_dim=8)
    assert why in str(e.value)


def test_split_audio_embeds_by_patch_runs():
    emb = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
    parts = split_audio_embeds(emb, [(3, 2), (9, 3)])
    assert [p.shape[0] for p in parts] == [2, 3]
    np.testing.assert_array_equal(np.concatenate(parts), emb)
    assert split_audio_embeds(None, []) == []
    with pytest.raises(InvalidArgument, match="has 4 rows but INPUT_IDS has 5 <audio_patch> positions in 2 runs"):
        split_audio_embeds(emb[:4], [(3, 2), (9, 3)])
    with pytest.raises(InvalidArgument, match="has 0 rows but INPUT_IDS has 2"):
        split_audio_embeds(None, [(0, 2)])
    with pytest.raises(InvalidArgument, match="has 5 rows but INPUT_IDS has 0"):
        split_audio_embeds(emb, [])


# -- metrics ---------------------------------------------------------------------------------------------
class _FakeMetric:
    def __init__(self, family):
        self.family, self.value = family, 0.0

    def set(self, v):
        self.value = v

    def increment(self, v):
        assert v > 0
        self.value += v


class _FakeFamily:
    GAUGE, COUNTER = "gauge", "counter"
    made: dict = {}

    def __init__(self, name, description, kind):
        self.name, self.kind = name, kind
        _FakeFamily.made[name] = self

    def Metric(self, labels):  # noqa: N802 - pb_utils' spelling
        assert labels == {"model": "llm", "version": "1"}
        self.metric = _FakeMetric(self)
        return self.metric


@dataclass
class _Stats:
    running: int = 0
    waiting: int = 0
    max_running: int = 0
    generated_tokens: int = 0
    completed: int = 0
    cancelled: int = 0
    rejected: int = 0
    errors: int = 0


def test_engine_metrics_publish_gauges_and_counter_increases():
    stats = _Stats()
    now = [0.0]
    pb = types.SimpleNamespace(MetricFamily=_FakeFamily, Logger=None)
    m = EngineMetrics(pb, lambda: stats, {"model": "llm", "version": "1"}, interval_s=0.2, clock=lambda: now[0])
    value = lambda name: _FakeFamily.made[name].metric.value  # noqa: E731
    assert _FakeFamily.made["stepaudio2_llm_running_batch"].kind == "gauge"
    assert _FakeFamily.made["stepaudio2_llm_generated_tokens_total"].kind == "counter"
    stats.running, stats.max_running, stats.generated_tokens = 3, 3, 10
    assert m.maybe_publish()                       # first publish
    assert value("stepaudio2_llm_running_batch") == 3
    stats.generated_tokens = 25
    now[0] = 0.1
    assert not m.maybe_publish()                   # throttled while busy
    assert m.maybe_publish(force=True)
    assert value("stepaudio2_llm_generated_tokens_total") == 25   # counters grow by the increase
    stats.running, stats.completed = 0, 4
    now[0] = 0.35
    assert m.maybe_publish()                       # the interval has passed
    assert value("stepaudio2_llm_running_batch") == 0
    assert value("stepaudio2_llm_max_running_batch") == 3
    assert value("stepaudio2_llm_completed_requests_total") == 4


def test_engine_stats_counts_the_live_batch():
    engine = types.SimpleNamespace(stats=_Stats(running=2, completed=1),
                                   gen=types.SimpleNamespace(running={"a": 1}))
    snap = engine_stats(engine)
    assert (snap.running, snap.completed) == (1, 1) and engine.stats.running == 2   # a copy


def test_engine_metrics_never_raise():
    logged = []

    class Broken(_FakeFamily):
        def Metric(self, labels):  # noqa: N802
            m = _FakeMetric(self)
            m.set = lambda v: (_ for _ in ()).throw(RuntimeError("ipc closed"))
            return m

    pb = types.SimpleNamespace(MetricFamily=Broken, Logger=types.SimpleNamespace(log_error=logged.append))
    m = EngineMetrics(pb, _Stats, {"model": "llm", "version": "1"})
    assert not m.maybe_publish(force=True) and not m.maybe_publish(force=True)
    assert len(logged) == 1 and "ipc closed" in logged[0]


# -- model repository ----------------------------------------------------------------------------------------
def _ckpt(tmp_path, hidden=64, adapter=64):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"text_config": {"hidden_size": hidden},
                                               "audio_encoder_config": {"llm_dim": adapter}}))
    return d


def test_fill_template_refuses_unknown_placeholders():
    assert fill_template("a: ${x} b: ${y}", {"x": "1", "y": "2"}) == "a: 1 b: 2"
    with pytest.raises(InvalidArgument, match="t.pbtxt uses placeholders with no value: nope"):
        fill_template("a: ${x} ${nope}", {"x": "1"}, source="t.pbtxt")
    with pytest.raises(InvalidArgument, match="malformed placeholder"):
        fill_template("a: ${x} ${bad-name}", {"x": "1"})
    assert pbtxt_string('a"b\\c') == 'a\\"b\\\\c'


def test_checkpoint_llm_dim(tmp_path):
    assert checkpoint_llm_dim(_ckpt(tmp_path, 96, 96)) == 96
    with pytest.raises(StepAudio2Error, match="does not exist"):
        checkpoint_llm_dim(tmp_path / "nowhere")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 8},
                                                            "audio_encoder_config": {"llm_dim": 16}}))
    with pytest.raises(StepAudio2Error, match="llm_dim 16 != text_config.hidden_size 8"):
        checkpoint_llm_dim(tmp_path / "x")


def test_build_model_repo_fills_every_placeholder(tmp_path):
    ckpt = _ckpt(tmp_path, 64, 64)
    # An ASR-only checkpoint serves the two LLM models; asking for token2wav names what is missing.
    assert sorted(p.name for p in build_model_repo(ckpt, tmp_path / "asr").iterdir()) == ["audio_encoder", "llm"]
    with pytest.raises(CheckpointError, match="token2wav/flow.yaml"):
        build_model_repo(ckpt, tmp_path / "asr", models=["token2wav"])
    (ckpt / "token2wav").mkdir()
    for name in ("flow.yaml", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2_25hz.onnx"):
        (ckpt / "token2wav" / name).write_bytes(b"")     # only their presence is checked here
    out = build_model_repo(ckpt, tmp_path / "repo", device="gpu", max_batch=4, instances=2,
                           llm_max_queue=3, queue_delay_us=500)
    assert sorted(p.name for p in out.iterdir()) == available_models() == ["audio_encoder", "llm", "token2wav",
                                                                            "voice_encoder"]
    enc = (out / "audio_encoder" / "config.pbtxt").read_text()
    llm = (out / "llm" / "config.pbtxt").read_text()
    t2w = (out / "token2wav" / "config.pbtxt").read_text()
    venc = (out / "voice_encoder" / "config.pbtxt").read_text()
    assert "${" not in enc + llm + t2w + venc
    assert "kind: KIND_GPU" in t2w and "sequence_batching" in t2w and "oldest" in t2w
    assert "kind: KIND_CPU" in venc          # ONNX Runtime on CPU whatever the device
    assert "max_batch_size: 4" in enc and "max_queue_delay_microseconds: 500" in enc
    assert "count: 2" in enc and "kind: KIND_GPU" in enc and "dims: [ -1, 64 ]" in enc
    assert "max_batch_size: 0" in llm and "decoupled: true" in llm and "count: 1" in llm
    assert f'string_value: "{ckpt.resolve()}"' in llm
    assert 'key: "max_batch" value: { string_value: "4" }' in llm      # llm_max_batch defaults to max_batch
    assert 'key: "max_queue" value: { string_value: "3" }' in llm
    assert 'key: "max_len" value: { string_value: "" }' in llm          # unset -> the model's default
    assert (out / "llm" / "1" / "model.py").is_file() and not list(out.rglob("*.tmpl"))
    # What the model reads back from that config: empty values are missing.
    params = model_parameters({"parameters": _pbtxt_params(llm)})
    assert get_param(params, "max_len", int, None) is None and get_param(params, "max_batch", int) == 4
    # A subset, on CPU, with the llm's own batch size.
    out2 = build_model_repo(ckpt, tmp_path / "repo2", models=["llm"], llm_max_batch=2)
    llm2 = (out2 / "llm" / "config.pbtxt").read_text()
    assert [p.name for p in out2.iterdir()] == ["llm"] and "KIND_CPU" in llm2
    assert 'key: "max_batch" value: { string_value: "2" }' in llm2


def _pbtxt_params(text):
    return {k: {"string_value": v} for k, v in re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', text)}


def test_build_model_repo_refuses_bad_input(tmp_path):
    ckpt = _ckpt(tmp_path)
    with pytest.raises(InvalidArgument, match="unknown model repository options: bogus"):
        build_model_repo(ckpt, tmp_path / "r", bogus=1)
    with pytest.raises(InvalidArgument, match="device"):
        build_model_repo(ckpt, tmp_path / "r", device="tpu")
    with pytest.raises(InvalidArgument, match="unknown models"):
        build_model_repo(ckpt, tmp_path / "r", models=["token2wav_x"])
    with pytest.raises(InvalidArgument, match="max_batch"):
        build_model_repo(ckpt, tmp_path / "r", max_batch=0)
    templates = tmp_path / "templates"
    (templates / "m" / "1").mkdir(parents=True)
    (templates / "m" / "config.pbtxt.tmpl").write_text("max_batch_size: ${max_batch}\nx: ${not_a_value}\n")
    with pytest.raises(InvalidArgument, match="m/config.pbtxt.tmpl uses placeholders with no value: not_a_value"):
        build_model_repo(ckpt, tmp_path / "r", template_dir=templates)
    assert not (tmp_path / "r").exists()            # nothing half-written
    assert RepoOptions().validate().llm_max_queue == 32


def test_model_repo_build_cli(tmp_path, capsys):
    from stepaudio2.cli import main

    ckpt = _ckpt(tmp_path)
    assert main(["model-repo", "build", "--model-dir", str(ckpt), "--device", "cpu", "--out",
                 str(tmp_path / "repo"), "--max-batch", "2", "--llm-max-queue", "5", "--models", "llm"]) == 0
    assert "wrote model repository" in capsys.readouterr().out
    assert 'key: "max_queue" value: { string_value: "5" }' in (tmp_path / "repo" / "llm" / "config.pbtxt").read_text()


# -- the tritonserver process (no process started here) ------------------------------------------------------------
def test_triton_command_and_environment(tmp_path):
    pytest.importorskip("pytriton")
    import sys
    import sysconfig

    from stepaudio2.runtime.triton import TritonServer, find_triton, make_backend_dir, triton_environment

    inst = find_triton()
    backends = make_backend_dir(inst, tmp_path / "backends")
    links = sorted(p.name for p in (backends / "python").iterdir())
    assert links == ["libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"]
    assert all((backends / "python" / n).is_symlink() for n in links)   # copies would lose the stub's RPATH
    env = triton_environment(inst, cpu_threads=1, base={"PATH": "/usr/bin"})
    assert env["LD_LIBRARY_PATH"].split(":")[:2] == [sysconfig.get_config_var("LIBDIR"), str(inst.libs)]
    assert env["PATH"].split(":")[0] == str(Path(sys.prefix) / "bin") and env["OMP_NUM_THREADS"] == "1"
    s = TritonServer(tmp_path, http_port=18000, grpc_port=18001, metrics_port=18002, work_dir=tmp_path / "w")
    cmd = s.command()
    for flag in ("--http-port=18000", "--grpc-port=18001", "--metrics-port=18002", "--allow-metrics=true",
                 "--allow-gpu-metrics=false", "--metrics-address=127.0.0.1", "--exit-timeout-secs=10",
                 f"--model-repository={tmp_path.resolve()}"):
        assert flag in cmd
    assert s.urls.grpc == "127.0.0.1:18001" and s.urls.metrics == "http://127.0.0.1:18002/metrics"


def test_ngc_docker_command(tmp_path):
    from stepaudio2.runtime.triton import NGC_IMAGE, ngc_docker_command

    cmd = ngc_docker_command(tmp_path / "repo", model_dir=tmp_path / "ckpt")
    assert cmd[:5] == ["docker", "run", "--rm", "--gpus", "all"] and NGC_IMAGE in cmd
    assert cmd[cmd.index(NGC_IMAGE) + 1] == "tritonserver"
    assert f"--model-repository={(tmp_path / 'repo').resolve()}" in cmd


def test_process_group_liveness_ignores_zombies():
    import os
    import subprocess
    import time

    from stepaudio2.runtime.triton import _group_alive

    assert _group_alive(os.getpgrp())
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert _group_alive(child.pid)
        child.kill()
        deadline = time.monotonic() + 10
        while _group_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _group_alive(child.pid)      # killed, not yet reaped: a zombie does not count
    finally:
        child.kill()
        child.wait()
