"""Helpers for our Triton ``model.py`` adapters, so those stay thin (practices 1, 4, 5).

Torch-free (numpy only; ``pb_utils`` is passed in, never imported), so every rule here is
unit-tested without Triton or torch:

* :func:`model_parameters` / :func:`get_param` read a model config's ``parameters``
  defensively: an empty value or an unfilled ``${...}`` placeholder counts as *missing*,
  a missing required parameter or an unparsable value fails loudly, naming the key;
* :func:`parse_audio_input` validates one ``audio_encoder`` request (exactly one of
  WAVEFORM / MEL, non-empty, finite, at most 30 s); :func:`encode_audio_inputs` runs a
  whole batch of them through ONE encoder call;
* :func:`parse_llm_request` turns one ``llm`` request's tensors into ids, the flat
  audio embeddings and sampling keywords; :func:`split_audio_embeds` cuts the flat
  embeddings by the prompt's ``<audio_patch>`` run lengths;
* :func:`error_message` / :func:`triton_error` give every error sent to a Triton client
  a stable ``"<CODE>: "`` prefix (``INVALID_ARGUMENT:``, ``RESOURCE_EXHAUSTED:``...) and
  the mapped TritonError code, because errors inside a decoupled gRPC stream reach the
  client as text only;
* :class:`EngineMetrics` publishes the LLM engine's stats as Prometheus metrics.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from stepaudio2.model.audio import MAX_CLIP_SECONDS, N_MELS, SAMPLE_RATE
from stepaudio2.runtime.errors import InvalidArgument, InvalidAudio, StepAudio2Error
from stepaudio2.runtime.model_repo import PLACEHOLDER

MAX_WAVEFORM_SAMPLES = MAX_CLIP_SECONDS * SAMPLE_RATE
# The encoder has 1500 positions at 50 fps = 3000 mel frames (spec §1.3); it needs >= 3.
MAX_MEL_FRAMES = 2 * 1500
MIN_MEL_FRAMES = 3

_REQUIRED = object()


class ModelConfigError(StepAudio2Error):
    """A model configuration that cannot be used (a required parameter missing, a value
    that does not parse). Raised in ``initialize``: the model then fails to load."""

    code = "FAILED_PRECONDITION"


class RequestCancelled(StepAudio2Error):
    """The final answer of a request that was cancelled (by its client or at shutdown)."""

    code = "CANCELLED"


# ---------------------------------------------------------------------------------------
# config.pbtxt parameters
# ---------------------------------------------------------------------------------------
def is_unset(value: str | None) -> bool:
    """True for None, empty/blank strings and unfilled ``${...}`` template placeholders."""
    return value is None or not str(value).strip() or PLACEHOLDER.search(str(value)) is not None


def model_parameters(model_config: Mapping[str, Any] | str) -> dict[str, str]:
    """The ``parameters`` of a model config (the dict, or the JSON string Triton passes
    in ``args["model_config"]``) as ``{key: string_value}``, unset values dropped."""
    cfg = json.loads(model_config) if isinstance(model_config, str) else model_config
    out: dict[str, str] = {}
    for key, value in (cfg.get("parameters") or {}).items():
        s = value.get("string_value") if isinstance(value, Mapping) else value
        if not is_unset(s):
            out[key] = str(s).strip()
    return out


def _to_bool(s: str) -> bool:
    low = s.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {s!r}")


_CONVERTERS: dict[Any, Callable[[str], Any]] = {str: str, int: int, float: float, bool: _to_bool, Path: Path}


def get_param(params: Mapping[str, str], key: str, type_: type = str, default: Any = _REQUIRED, *,
              choices: Sequence[Any] | None = None, minimum: float | None = None) -> Any:
    """One parameter, converted to ``type_`` (str, int, float, bool or Path).

    Missing (absent, empty or ``${...}``) -> ``default``, or :class:`ModelConfigError`
    when no default is given. A value that does not convert, is not in ``choices`` or is
    below ``minimum`` is a :class:`ModelConfigError` naming the key and the value.
    """
    raw = params.get(key)
    if is_unset(raw):
        if default is _REQUIRED:
            raise ModelConfigError(f"required model parameter {key!r} is missing (empty or an unfilled "
                                   f"placeholder): build the repository with `stepaudio2 model-repo build`",
                                   field=key)
        return default
    conv = _CONVERTERS.get(type_)
    if conv is None:
        raise TypeError(f"unsupported parameter type {type_!r}")
    try:
        value = conv(str(raw).strip())
    except ValueError as e:
        raise ModelConfigError(f"model parameter {key!r}={raw!r} is not a valid {type_.__name__} ({e})",
                               field=key) from None
    if choices is not None and value not in choices:
        raise ModelConfigError(f"model parameter {key!r}={raw!r} must be one of {list(choices)}", field=key)
    if minimum is not None and value < minimum:
        raise ModelConfigError(f"model parameter {key!r}={raw!r} must be >= {minimum}", field=key)
    return value


def request_inputs(pb_utils, request, names: Sequence[str]) -> dict[str, np.ndarray | None]:
    """``name -> numpy array`` of a Triton request's inputs (None for an absent optional one)."""
    out = {}
    for name in names:
        t = pb_utils.get_input_tensor_by_name(request, name)
        out[name] = None if t is None else t.as_numpy()
    return out


def load_serving_model(args: Mapping[str, str], params: Mapping[str, str]):
    """The ``StepAudio2`` a model instance serves: ``model_dir``, ``dtype`` and
    ``num_threads`` parameters, the instance's device (audio_encoder and llm)."""
    from stepaudio2.model.modeling import load_for_serving
    from stepaudio2.runtime.model_repo import DTYPES

    return load_for_serving(get_param(params, "model_dir"),
                            dtype=get_param(params, "dtype", str, "auto", choices=DTYPES),
                            device=model_device(args),
                            num_threads=get_param(params, "num_threads", int, None, minimum=1))


def model_device(args: Mapping[str, str]) -> str:
    """Torch device of a model instance from Triton's ``initialize`` args."""
    if str(args.get("model_instance_kind", "CPU")).upper() == "GPU":
        return f"cuda:{int(args.get('model_instance_device_id', 0) or 0)}"
    return "cpu"


# ---------------------------------------------------------------------------------------
# errors sent to clients
# ---------------------------------------------------------------------------------------
def error_message(err: BaseException, request_id: str | None = None) -> str:
    """``"<CODE>: <reason>"``: the stable, machine-readable prefix clients classify by.
    Errors that are not ours are INTERNAL (their text still helps the operator).

    With a ``request_id`` the message ends with ``" [request id: <id>]"``: an error inside
    a gRPC stream reaches tritonclient's callback as text only, so a client with several
    requests on one stream can only tell them apart this way.
    """
    code = err.code if isinstance(err, StepAudio2Error) else "INTERNAL"
    return f"{code}: {err}" + (f" [request id: {request_id}]" if request_id else "")


def error_code_of(message: str) -> str | None:
    """The inverse of :func:`error_message` for clients: the code a message starts with."""
    m = re.match(r"^([A-Z_]+): ", message or "")
    return m.group(1) if m else None


# ---------------------------------------------------------------------------------------
# audio_encoder requests
# ---------------------------------------------------------------------------------------
@dataclass
class AudioInput:
    kind: str            # "waveform" (16 kHz samples [N]) or "mel" (log-mel [128, F])
    array: np.ndarray    # float32


def _drop_batch_dim(x: np.ndarray, rank: int) -> np.ndarray:
    # A model with max_batch_size > 0 sees each request's tensor with its batch dim.
    if x.ndim == rank + 1:
        if x.shape[0] != 1:
            raise InvalidAudio(f"one request must carry one clip (batch dimension 1), got shape {list(x.shape)}")
        x = x[0]
    return x


def parse_audio_input(waveform: np.ndarray | None, mel: np.ndarray | None) -> AudioInput:
    """Validate one ``audio_encoder`` request; raise :class:`InvalidAudio` saying why."""
    if (waveform is None) == (mel is None):
        raise InvalidAudio("send exactly one of WAVEFORM (16 kHz mono samples) or MEL (log-mel [128, F]), got "
                           + ("both" if waveform is not None else "neither"))
    if waveform is not None:
        x = _drop_batch_dim(np.asarray(waveform), 1)
        if x.ndim != 1:
            raise InvalidAudio(f"must be 1-D samples, got shape {list(x.shape)}", field="WAVEFORM")
        if x.size == 0:
            raise InvalidAudio("is empty", field="WAVEFORM")
        if x.size > MAX_WAVEFORM_SAMPLES:
            raise InvalidAudio(f"has {x.size} samples ({x.size / SAMPLE_RATE:.2f} s); the encoder takes at "
                               f"most {MAX_CLIP_SECONDS} s at {SAMPLE_RATE} Hz: cut long audio into 25 s chunks",
                               field="WAVEFORM")
        if not np.isfinite(x).all():
            raise InvalidAudio("contains NaN or infinite samples", field="WAVEFORM")
        return AudioInput("waveform", x.astype(np.float32, copy=False))
    x = _drop_batch_dim(np.asarray(mel), 2)
    if x.ndim != 2 or x.shape[0] != N_MELS:
        raise InvalidAudio(f"must be [{N_MELS}, F], got shape {list(x.shape)}", field="MEL")
    if not MIN_MEL_FRAMES <= x.shape[1] <= MAX_MEL_FRAMES:
        raise InvalidAudio(f"has {x.shape[1]} frames; the encoder takes {MIN_MEL_FRAMES}..{MAX_MEL_FRAMES} "
                           f"(30 s)", field="MEL")
    if not np.isfinite(x).all():
        raise InvalidAudio("contains NaN or infinite values", field="MEL")
    return AudioInput("mel", x.astype(np.float32, copy=False))


def pad_mels(mels: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """[128, F_i] log-mels -> (zero right-padded batch [B, 128, F_max], F_i [B]) as
    ``StepAudio2.encode_audio`` takes them (the same padding ``encode_chunks`` uses)."""
    frames = np.array([m.shape[1] for m in mels], dtype=np.int64)
    batch = np.zeros((len(mels), mels[0].shape[0], int(frames.max())), dtype=np.float32)
    for i, m in enumerate(mels):
        batch[i, :, : m.shape[1]] = m
    return batch, frames


# ---------------------------------------------------------------------------------------
# llm requests
# ---------------------------------------------------------------------------------------
# Optional scalar inputs -> (SamplingParams field, numpy kind check).
SAMPLING_INPUTS: dict[str, tuple[str, type]] = {
    "MAX_TOKENS": ("max_new_tokens", int),
    "MIN_TOKENS": ("min_tokens", int),
    "TEMPERATURE": ("temperature", float),
    "TOP_P": ("top_p", float),
    "TOP_K": ("top_k", int),
    "REPETITION_PENALTY": ("repetition_penalty", float),
    "SEED": ("seed", int),
}


@dataclass
class LLMRequest:
    input_ids: list[int]
    audio_embeds: np.ndarray | None           # [N_total, llm_dim], every chunk in prompt order
    sampling: dict[str, Any] = field(default_factory=dict)   # SamplingParams keywords that were sent


def _scalar(name: str, x: np.ndarray, kind: type) -> Any:
    x = np.asarray(x).reshape(-1)
    if x.size != 1:
        raise InvalidArgument(f"must hold exactly one value, got {x.size}", field=name)
    v = x[0]
    if kind is int:
        if not np.issubdtype(x.dtype, np.integer):
            raise InvalidArgument(f"must be an integer tensor, got {x.dtype}", field=name)
        return int(v)
    if not np.issubdtype(x.dtype, np.floating):
        raise InvalidArgument(f"must be a float tensor, got {x.dtype}", field=name)
    return float(v)


def parse_llm_request(inputs: Mapping[str, np.ndarray | None], llm_dim: int) -> LLMRequest:
    """Validate the tensors of one ``llm`` request (absent optional inputs are None).

    Value checks of the sampling controls (top_p in (0, 1], ...) are left to
    ``SamplingParams.validate`` inside the engine, so they hold for every transport.
    """
    ids = inputs.get("INPUT_IDS")
    if ids is None:
        raise InvalidArgument("is required", field="INPUT_IDS")
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise InvalidArgument(f"must be an integer tensor, got {ids.dtype}", field="INPUT_IDS")
    ids = ids.reshape(-1)
    if ids.size == 0:
        raise InvalidArgument("is empty: a prompt needs at least one token", field="INPUT_IDS")
    embeds = inputs.get("AUDIO_EMBEDS")
    if embeds is not None:
        embeds = np.asarray(embeds, dtype=np.float32)
        if embeds.ndim != 2 or embeds.shape[1] != llm_dim:
            raise InvalidArgument(f"must be [N, {llm_dim}], got shape {list(embeds.shape)}", field="AUDIO_EMBEDS")
        if not np.isfinite(embeds).all():
            raise InvalidArgument("contains NaN or infinite values", field="AUDIO_EMBEDS")
    sampling: dict[str, Any] = {}
    for name, (key, kind) in SAMPLING_INPUTS.items():
        if inputs.get(name) is not None:
            sampling[key] = _scalar(name, inputs[name], kind)
    stop = inputs.get("STOP_IDS")
    if stop is not None:
        stop = np.asarray(stop)
        if not np.issubdtype(stop.dtype, np.integer):
            raise InvalidArgument(f"must be an integer tensor, got {stop.dtype}", field="STOP_IDS")
        sampling["stop_ids"] = [int(i) for i in stop.reshape(-1)]
    allowed = inputs.get("ALLOWED_TOKEN_IDS")
    if allowed is not None:
        sampling["allowed_token_ids"] = _int_list("ALLOWED_TOKEN_IDS", allowed)
        if not sampling["allowed_token_ids"]:
            raise InvalidArgument("is empty: allow at least one token (or leave it out)", field="ALLOWED_TOKEN_IDS")
    bias_ids, bias_values = inputs.get("LOGIT_BIAS_IDS"), inputs.get("LOGIT_BIAS_VALUES")
    if (bias_ids is None) != (bias_values is None):
        raise InvalidArgument("LOGIT_BIAS_IDS and LOGIT_BIAS_VALUES go together", field="LOGIT_BIAS_IDS")
    if bias_ids is not None:
        keys = _int_list("LOGIT_BIAS_IDS", bias_ids)
        vals = np.asarray(bias_values)
        if not np.issubdtype(vals.dtype, np.floating):
            raise InvalidArgument(f"must be a float tensor, got {vals.dtype}", field="LOGIT_BIAS_VALUES")
        vals = vals.reshape(-1)
        if vals.size != len(keys):
            raise InvalidArgument(f"has {vals.size} values for {len(keys)} LOGIT_BIAS_IDS", field="LOGIT_BIAS_VALUES")
        if not np.isfinite(vals).all():
            raise InvalidArgument("contains NaN or infinite values", field="LOGIT_BIAS_VALUES")
        sampling["logit_bias"] = {k: float(v) for k, v in zip(keys, vals)}
    return LLMRequest([int(i) for i in ids], embeds, sampling)


def _int_list(name: str, x: np.ndarray) -> list[int]:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise InvalidArgument(f"must be an integer tensor, got {x.dtype}", field=name)
    return [int(i) for i in x.reshape(-1)]


# ---------------------------------------------------------------------------------------
# token2wav and voice_encoder requests
# ---------------------------------------------------------------------------------------
@dataclass
class ChunkRequest:
    """One chunk of one token2wav stream (see ``stepaudio2.model.token2wav.serving``)."""

    stream_id: Any
    tokens: np.ndarray
    start: bool = False
    end: bool = False
    voice: str | None = None
    seed: int | None = None
    cancel: bool = False


def _flag(x: np.ndarray | None) -> bool:
    return x is not None and bool(np.asarray(x).reshape(-1)[:1].astype(bool).any())


def _string(name: str, x: np.ndarray | None) -> str | None:
    if x is None:
        return None
    flat = np.asarray(x, dtype=object).reshape(-1)
    if flat.size != 1:
        raise InvalidArgument(f"must hold exactly one string, got {flat.size}", field=name)
    v = flat[0]
    try:
        return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)
    except UnicodeDecodeError:
        raise InvalidArgument("is not valid UTF-8", field=name) from None


def parse_t2w_request(inputs: Mapping[str, np.ndarray | None], correlation_id: Any = None) -> ChunkRequest:
    """Validate one ``token2wav`` request: TOKENS, the sequence controls START / END /
    CORRID (Triton fills them), and the optional VOICE, SEED, CANCEL."""
    corr = inputs.get("CORRID")
    stream_id = int(np.asarray(corr).reshape(-1)[0]) if corr is not None else correlation_id
    if stream_id in (None, 0, ""):
        raise InvalidArgument("a token2wav request must belong to a sequence (set a non-zero sequence id)",
                              field="sequence_id")
    tokens = inputs.get("TOKENS")
    if tokens is None:
        raise InvalidArgument("is required", field="TOKENS")
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise InvalidArgument(f"must be an integer tensor, got {tokens.dtype}", field="TOKENS")
    seed = inputs.get("SEED")
    return ChunkRequest(stream_id=stream_id, tokens=tokens.reshape(-1).astype(np.int64),
                        start=_flag(inputs.get("START")), end=_flag(inputs.get("END")),
                        voice=_string("VOICE", inputs.get("VOICE")),
                        seed=None if seed is None else _scalar("SEED", seed, int),
                        cancel=_flag(inputs.get("CANCEL")))


def parse_voice_request(inputs: Mapping[str, np.ndarray | None]) -> bytes:
    """The reference recording of one ``voice_encoder`` request (AUDIO: file bytes)."""
    audio = inputs.get("AUDIO")
    if audio is None:
        raise InvalidArgument("is required", field="AUDIO")
    flat = np.asarray(audio, dtype=object).reshape(-1)
    if flat.size != 1 or not isinstance(flat[0], (bytes, bytearray)) or len(flat[0]) == 0:
        raise InvalidArgument("must hold one non-empty audio file (WAV, FLAC or OGG bytes)", field="AUDIO")
    return bytes(flat[0])


def split_audio_embeds(embeds: np.ndarray | None, runs: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Cut the concatenated audio embeddings into one array per ``<audio_patch>`` run.

    ``runs`` are the prompt's ``(start, length)`` runs (``patch_runs``). The rows must
    match the total run length exactly; a mismatch names both counts.
    """
    total = sum(n for _, n in runs)
    rows = 0 if embeds is None else int(embeds.shape[0])
    if rows != total:
        raise InvalidArgument(f"AUDIO_EMBEDS has {rows} rows but INPUT_IDS has {total} <audio_patch> positions "
                              f"in {len(runs)} runs", field="AUDIO_EMBEDS")
    out, at = [], 0
    for _, n in runs:
        out.append(embeds[at: at + n])
        at += n
    return out


def encode_audio_inputs(model, inputs: Sequence[AudioInput]) -> list[np.ndarray]:
    """ONE batched encoder call for a batch of requests -> one [N_i, llm_dim] float32
    array each. Waveforms go through ``model.log_mel`` first; the padded batch then goes
    through ``model.encode_audio`` exactly as ``StepAudio2.encode_chunks`` does it."""
    mels = [a.array if a.kind == "mel" else model.log_mel(a.array) for a in inputs]
    batch, frames = pad_mels(mels)
    embeds, lens = model.encode_audio(batch, frames)
    return [embeds[i, : int(n)].float().cpu().numpy() for i, n in enumerate(lens)]


# ---------------------------------------------------------------------------------------
# Triton python-backend glue (``pb_utils`` is passed in: this module never imports it)
# ---------------------------------------------------------------------------------------
def triton_error(pb_utils, err: BaseException, request_id: str | None = None):
    """A ``pb_utils.TritonError`` with our stable message prefix and the mapped code
    (ERROR_TABLE's ``triton`` column), when the installed backend supports codes."""
    message = error_message(err, request_id)
    name = err.mapping.triton if isinstance(err, StepAudio2Error) else "INTERNAL"
    code = getattr(pb_utils.TritonError, name, None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def engine_stats(engine) -> Any:
    """A snapshot of ``engine.stats`` whose ``running`` is the live batch size: the stats
    field is refreshed only by a decode step, so right after a cancellation (no further
    step) it would still count the cancelled sequence."""
    import copy

    s = copy.copy(engine.stats)
    gen = getattr(engine, "gen", None)
    if gen is not None and hasattr(gen, "running"):
        s.running = len(gen.running)
    return s


class EngineMetrics:
    """Publishes an ``LLMEngine``'s stats as Prometheus metrics through the Python
    backend's custom-metrics API (``pb_utils.MetricFamily``), served on Triton's
    ``/metrics`` endpoint. ``max_running`` is a gauge of the largest batch ever decoded,
    so short peaks are not lost between samples.

    Publishing happens only on the threads that serve requests (``execute`` and the
    engine's output callback), throttled to one update per ``interval_s``, plus one for
    every finished request, BEFORE its final response is sent (so a client that got its
    final response sees the counters that include it, and the engine going idle is
    always visible). Never
    from a timer thread: every metric update is an IPC round trip to the server, and
    one that is in flight when the server unloads the model (the stub answers the
    finalize request before it calls ``finalize``) never returns and leaves the stub
    process hung, orphaned, after the server exits (seen with Triton 2.51).
    """

    GAUGES = {
        "running": ("stepaudio2_llm_running_batch", "Sequences in the LLM engine's running batch"),
        "max_running": ("stepaudio2_llm_max_running_batch", "Largest running batch the LLM engine has decoded"),
        "waiting": ("stepaudio2_llm_waiting_requests", "LLM requests queued, not yet admitted to the batch"),
    }
    COUNTERS = {
        "generated_tokens": ("stepaudio2_llm_generated_tokens_total", "Tokens generated by the LLM engine"),
        "completed": ("stepaudio2_llm_completed_requests_total", "LLM requests finished (stop or length)"),
        "cancelled": ("stepaudio2_llm_cancelled_requests_total", "LLM requests cancelled before finishing"),
        "rejected": ("stepaudio2_llm_rejected_requests_total", "LLM requests refused because the queue was full"),
        "errors": ("stepaudio2_llm_failed_requests_total", "LLM requests finished by a failed engine step"),
    }

    def __init__(self, pb_utils, stats_fn: Callable[[], Any], labels: Mapping[str, str], interval_s: float = 0.2,
                 clock: Callable[[], float] | None = None):
        import threading
        import time

        self._log = pb_utils.Logger
        self._stats = stats_fn
        self._interval = interval_s
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._failed = False
        self._closed = False
        fam = pb_utils.MetricFamily
        # The families must outlive their metrics: the backend refuses every operation on a
        # Metric whose MetricFamily object was garbage-collected. Keep both.
        self._families = {k: fam(name=n, description=d, kind=fam.GAUGE) for k, (n, d) in self.GAUGES.items()}
        self._families.update({k: fam(name=n, description=d, kind=fam.COUNTER)
                               for k, (n, d) in self.COUNTERS.items()})
        self._gauges = {k: self._families[k].Metric(labels=dict(labels)) for k in self.GAUGES}
        self._counters = {k: self._families[k].Metric(labels=dict(labels)) for k in self.COUNTERS}
        self._published = {k: 0 for k in self.COUNTERS}

    def close(self) -> None:
        """No more updates (call first thing in ``finalize``: see the class docstring)."""
        self._closed = True

    def maybe_publish(self, force: bool = False) -> bool:
        """Publish when forced or when ``interval_s`` has passed since the last time.
        Never raises: metrics must not fail a request."""
        if self._closed or not (force or self._clock() - self._last >= self._interval):
            return False
        try:
            self.publish()
            return True
        except Exception as e:  # noqa: BLE001
            if not self._failed:  # say it once, not on every update
                self._log.log_error(f"publishing LLM engine metrics failed: {e!r}")
            self._failed = True
            return False

    def publish(self) -> None:
        """Copy the current stats into the metrics (counters by their increase)."""
        with self._lock:
            self._last = self._clock()
            s = self._stats()
            for k, g in self._gauges.items():
                g.set(float(getattr(s, k)))
            for k, c in self._counters.items():
                v = int(getattr(s, k))
                if v > self._published[k]:
                    c.increment(float(v - self._published[k]))
                    self._published[k] = v
