"""Checkpoint folders in the Hugging Face layout of Step-Audio-2-mini (PUBLIC_API.md).

Reading is strict and memory-mapped: the model is built on the ``meta`` device (no
memory), every tensor of ``model.safetensors.index.json`` is checked by name and shape
against it (a missing, unexpected or wrong-shaped tensor is a :class:`CheckpointError`
naming it), and the safetensors views - pages of the mmapped shard files - are assigned
as the parameters without a copy when the stored dtype is the wanted one. So loading
the bf16 mini costs about its file size in RSS, not twice that.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stepaudio2.runtime.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json",
                   "special_tokens_map.json")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(d: str | torch.dtype | None) -> torch.dtype | None:
    if d is None or isinstance(d, torch.dtype):
        return d
    try:
        return DTYPES[str(d).replace("torch.", "")]
    except KeyError:
        raise CheckpointError(f"unsupported dtype {d!r}; use one of {sorted(DTYPES)}") from None


def weight_map(model_dir: Path) -> dict[str, str]:
    """tensor name -> shard file name."""
    index = model_dir / INDEX_NAME
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{INDEX_NAME} is malformed: {e}") from None
        for shard in sorted(set(wm.values())):
            if not (model_dir / shard).exists():
                raise CheckpointError(f"shard {shard} listed in {INDEX_NAME} is missing from {model_dir}")
        return wm
    single = model_dir / SINGLE_NAME
    if single.exists():
        with safe_open(single, framework="pt") as f:
            return {k: SINGLE_NAME for k in f.keys()}
    raise CheckpointError(f"no {INDEX_NAME} or {SINGLE_NAME} in {model_dir}")


def load_state_dict(model_dir: str | Path, expected: dict[str, torch.Size], dtype: torch.dtype | None = None,
                    ) -> dict[str, torch.Tensor]:
    """Read every tensor of the checkpoint, checked against ``expected`` name -> shape.

    With ``dtype`` None or equal to the stored dtype the returned tensors are views of
    the memory-mapped files (no copy).
    """
    model_dir = Path(model_dir)
    wm = weight_map(model_dir)
    missing = sorted(set(expected) - set(wm))
    unexpected = sorted(set(wm) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]} is missing from the checkpoint{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"unexpected tensor {unexpected[0]} in the checkpoint{more}")
    by_shard: dict[str, list[str]] = {}
    for name, shard in wm.items():
        by_shard.setdefault(shard, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for shard, names in sorted(by_shard.items()):
        try:
            f = safe_open(model_dir / shard, framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"shard {shard} cannot be read: {e}") from None
        with f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"tensor {name} is listed in {INDEX_NAME} but missing from {shard}")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(expected[name]):
                    raise CheckpointError(f"tensor {name} has shape {list(shape)} in {shard}, "
                                          f"expected {list(expected[name])}")
                t = f.get_tensor(name)
                if dtype is not None and t.dtype != dtype:
                    t = t.to(dtype)
                out[name] = t
    return out


def save_checkpoint(state: dict[str, torch.Tensor], config: dict, out_dir: str | Path,
                    max_shard_bytes: int = 5 * 1024**3) -> list[str]:
    """Write ``config.json`` + ``model-0000i-of-0000n.safetensors`` + the index.

    Tensors go to shards in name order, a new shard starting when the current one would
    pass ``max_shard_bytes`` (the real mini has 4 shards of ~5 GB, spec §5.1).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    total = 0
    for name in sorted(state):
        t = state[name].detach().contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
        total += nbytes
    n = len(shards)
    names, wm = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        _readable(out_dir / fname)
        names.append(fname)
        wm.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(wm.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return names


def _readable(path: Path) -> None:
    """safetensors writes files 0600; a checkpoint is read by other users and by
    containers running as another uid, so give it the umask's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def checkpoint_bytes(model_dir: str | Path) -> int:
    model_dir = Path(model_dir)
    return sum(os.path.getsize(model_dir / s) for s in set(weight_map(model_dir).values()))
