"""Build a Triton model repository from ``model_repository/`` (practice 5: one filler).

Each ``model_repository/<model>/config.pbtxt.tmpl`` holds ``${name}`` placeholders;
:func:`build_model_repo` copies the models to ``out_dir`` and writes each
``config.pbtxt`` with every placeholder filled. A placeholder without a value, or a
value no template uses, is an error: a repository is never half-filled.

Torch-free: ``llm_dim`` is read from the checkpoint's ``config.json``.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from stepaudio2.runtime.errors import CheckpointError, InvalidArgument

# ``${name}`` in a template (and, unfilled, in a config: triton_params treats it as unset).
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_DIR = ROOT / "model_repository"
TEMPLATE_NAME = "config.pbtxt.tmpl"
DEVICES = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RepoOptions:
    """Every value the templates may use, with its default and meaning."""

    device: str = "cpu"               # cpu | gpu -> instance_group kind
    instances: int = 1                # audio_encoder instances (the llm always has ONE: its engine batches)
    max_batch: int = 8                # audio_encoder max_batch_size (dynamic batching)
    queue_delay_us: int = 2000        # audio_encoder: how long the batcher waits to fill a batch
    llm_max_batch: int | None = None  # sequences decoded together by the llm engine (None: max_batch)
    llm_max_queue: int = 32           # llm requests waiting beyond that; more are refused (RESOURCE_EXHAUSTED)
    prefill_budget: int = 512         # prompt tokens prefilled per engine step (chunked prefill)
    stream_interval_ms: float = 8.0   # llm: tokens made within this window share one response (fewer IPC messages; +<=8 ms latency)
    kv_capacity: int = 256            # initial KV-cache length per slot (grows by doubling)
    max_len: int | None = None        # context limit per sequence (None: the checkpoint's max positions)
    dtype: str = "auto"               # weights dtype; auto keeps the checkpoint's torch_dtype
    num_threads: int | None = None    # torch intra-op threads per model instance (None: torch's default)
    t2w_max_batch: int = 8            # token2wav: streams' chunks run together in one execute()
    t2w_max_streams: int = 64         # token2wav: open streams (Triton's candidate sequences = the state table's bound)
    t2w_idle_timeout_s: float = 60.0  # token2wav: a stream without a chunk this long is freed (Triton + model)
    t2w_queue_delay_us: int = 1000    # token2wav: how long the sequence batcher waits to fill a batch
    t2w_noise_seed: int | None = None # token2wav: redraw the flow's fixed noise buffer from this seed (None: the default)
    voices_dir: str | None = None     # voice library folder (None: STEPAUDIO2_VOICES_* settings, S3 or local)
    voice_cache_items: int = 64       # token2wav: decoded voices kept in memory (LRU)
    t2w_prompt_cache_items: int = 4   # token2wav: voices whose prompt-filled flow cache is kept (real size ~0.4 GB each)
    builtin_voices: bool = True       # token2wav: register default_female/default_male when the library lacks them

    def validate(self) -> "RepoOptions":
        if self.device not in DEVICES:
            raise InvalidArgument(f"must be one of {sorted(DEVICES)}, got {self.device!r}", field="device")
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"must be one of {list(DTYPES)}, got {self.dtype!r}", field="dtype")
        if not self.t2w_idle_timeout_s > 0:
            raise InvalidArgument(f"must be > 0, got {self.t2w_idle_timeout_s!r}", field="t2w_idle_timeout_s")
        if self.t2w_prompt_cache_items < 0:
            raise InvalidArgument(f"must be >= 0, got {self.t2w_prompt_cache_items!r}", field="t2w_prompt_cache_items")
        if self.voice_cache_items < 0:
            raise InvalidArgument(f"must be >= 0, got {self.voice_cache_items!r}", field="voice_cache_items")
        for name in ("instances", "max_batch", "llm_max_queue", "prefill_budget", "kv_capacity", "t2w_max_batch",
                     "t2w_max_streams"):
            if int(getattr(self, name)) < 1:
                raise InvalidArgument(f"must be >= 1, got {getattr(self, name)!r}", field=name)
        for name in ("llm_max_batch", "max_len", "num_threads"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise InvalidArgument(f"must be >= 1, got {v!r}", field=name)
        if self.stream_interval_ms < 0:
            raise InvalidArgument(f"must be >= 0, got {self.stream_interval_ms!r}", field="stream_interval_ms")
        if self.queue_delay_us < 0:
            raise InvalidArgument(f"must be >= 0, got {self.queue_delay_us!r}", field="queue_delay_us")
        return self


def checkpoint_llm_dim(model_dir: Path) -> int:
    """The LLM hidden width (= the adapter's output width) from ``config.json``."""
    cfg_file = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
        dim = int(cfg["text_config"]["hidden_size"])
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_file} does not exist: --model-dir must be a Step-Audio 2 checkpoint folder") \
            from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_file} has no usable text_config.hidden_size ({e!r})") from None
    adapter = (cfg.get("audio_encoder_config") or {}).get("llm_dim")
    if adapter is not None and int(adapter) != dim:
        raise CheckpointError(f"{cfg_file}: audio_encoder_config.llm_dim {adapter} != text_config.hidden_size {dim}")
    return dim


def template_values(model_dir: Path, opts: RepoOptions) -> dict[str, str]:
    """Placeholder name -> text, for every placeholder our templates may use."""
    def opt(v: Any) -> str:      # optional values: empty = unset (the model uses its default)
        return "" if v is None else str(v)

    return {
        "model_dir": pbtxt_string(str(Path(model_dir).resolve())),
        "llm_dim": str(checkpoint_llm_dim(model_dir)),
        "instance_kind": DEVICES[opts.device],
        "instances": str(opts.instances),
        "max_batch": str(opts.max_batch),
        "queue_delay_us": str(opts.queue_delay_us),
        "llm_max_batch": str(opts.llm_max_batch or opts.max_batch),
        "llm_max_queue": str(opts.llm_max_queue),
        "prefill_budget": str(opts.prefill_budget),
        "stream_interval_ms": str(opts.stream_interval_ms),
        "kv_capacity": str(opts.kv_capacity),
        "max_len": opt(opts.max_len),
        "dtype": opts.dtype,
        "num_threads": opt(opts.num_threads),
        "t2w_max_batch": str(opts.t2w_max_batch),
        "t2w_max_streams": str(opts.t2w_max_streams),
        "t2w_idle_us": str(int(round(opts.t2w_idle_timeout_s * 1e6))),
        "t2w_queue_delay_us": str(opts.t2w_queue_delay_us),
        "t2w_noise_seed": opt(opts.t2w_noise_seed),
        "voices_dir": pbtxt_string(str(Path(opts.voices_dir).resolve())) if opts.voices_dir else "",
        "voice_cache_items": str(opts.voice_cache_items),
        "t2w_prompt_cache_items": str(opts.t2w_prompt_cache_items),
        "builtin_voices": "true" if opts.builtin_voices else "false",
    }


def pbtxt_string(s: str) -> str:
    """Escape a value that goes inside a double-quoted protobuf text string."""
    return s.replace("\\", "\\\\").replace('"', '\\"')


def fill_template(text: str, values: Mapping[str, str], *, source: str = "template") -> str:
    """Replace every ``${name}``; an unknown name is an error naming it and ``source``."""
    missing = sorted({m.group(1) for m in PLACEHOLDER.finditer(text)} - set(values))
    if missing:
        raise InvalidArgument(f"{source} uses placeholders with no value: {', '.join(missing)}",
                              field="model_repository")
    out = PLACEHOLDER.sub(lambda m: values[m.group(1)], text)
    if "${" in out:
        raise InvalidArgument(f"{source} has a malformed placeholder near {out[out.index('${'):][:40]!r}",
                              field="model_repository")
    return out


# What a checkpoint needs for each optional model (token2wav_checkpoint_format.md).
T2W_FILES = ("flow.yaml", "flow.pt", "hift.pt")
VOICE_FILES = ("campplus.onnx", "speech_tokenizer_v2_25hz.onnx")


def _t2w_folder(model_dir: Path) -> Path:
    return model_dir / "token2wav" if (model_dir / "token2wav").is_dir() else model_dir


def checkpoint_models(model_dir: str | Path) -> dict[str, str | None]:
    """model -> None when ``model_dir`` can serve it, else why not. ``audio_encoder`` and
    ``llm`` need the LLM checkpoint; ``token2wav`` the ``token2wav/`` flow + vocoder files;
    ``voice_encoder`` its two ONNX models (an ASR-only checkpoint has neither)."""
    folder = _t2w_folder(Path(model_dir))

    def missing(names):
        gone = [n for n in names if not (folder / n).is_file()]
        return None if not gone else f"{model_dir} has no token2wav/{', token2wav/'.join(gone)}"

    return {"audio_encoder": None, "llm": None, "token2wav": missing(T2W_FILES), "voice_encoder": missing(VOICE_FILES)}


def available_models(template_dir: Path = TEMPLATE_DIR) -> list[str]:
    return sorted(p.parent.name for p in Path(template_dir).glob(f"*/{TEMPLATE_NAME}"))


def build_model_repo(model_dir: str | Path, out_dir: str | Path, device: str = "cpu", max_batch: int = 8,
                     instances: int = 1, *, models: Sequence[str] | None = None,
                     template_dir: str | Path = TEMPLATE_DIR, **options: Any) -> Path:
    """Write a ready-to-serve Triton model repository to ``out_dir``; return its path.

    ``options`` are :class:`RepoOptions` fields (``queue_delay_us``, ``llm_max_batch``,
    ``llm_max_queue``, ``prefill_budget``, ``kv_capacity``, ``max_len``, ``dtype``,
    ``num_threads``, the ``t2w_*`` and voice options); an unknown one is an error.
    ``models`` picks a subset of the template models (default: every model the checkpoint
    can serve, see :func:`checkpoint_models`). Models already in ``out_dir`` are replaced.
    """
    unknown = sorted(set(options) - set(RepoOptions.__dataclass_fields__))
    if unknown:
        raise InvalidArgument(f"unknown model repository options: {', '.join(unknown)}", field="options")
    opts = RepoOptions(device=device, max_batch=max_batch, instances=instances, **options).validate()
    model_dir, template_dir, out_dir = Path(model_dir), Path(template_dir), Path(out_dir)
    values = template_values(model_dir, opts)
    names = available_models(template_dir)
    if not names:
        raise InvalidArgument(f"no */{TEMPLATE_NAME} under {template_dir}", field="template_dir")
    servable = checkpoint_models(model_dir)
    if models is None:      # every model this checkpoint can serve
        chosen = [n for n in names if servable.get(n) is None]
    else:
        chosen = list(models)
    bad = sorted(set(chosen) - set(names))
    if bad:
        raise InvalidArgument(f"unknown models {bad}; available: {names}", field="models")
    for name in chosen:
        if servable.get(name):
            raise CheckpointError(f"cannot serve {name!r}: {servable[name]}")
    # Fill everything first, so a bad template leaves out_dir untouched.
    configs = {name: fill_template((template_dir / name / TEMPLATE_NAME).read_text(), values,
                                   source=f"{name}/{TEMPLATE_NAME}") for name in chosen}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        dst = out_dir / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(template_dir / name, dst,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", TEMPLATE_NAME))
        (dst / "config.pbtxt").write_text(configs[name])
    return out_dir
