"""Checkpoint folders: the real file layout, deterministic tiny writes, strict loading
whose errors name the tensor or file."""
import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepaudio2.model import StepAudio2
from stepaudio2.model.tiny import make_tiny_checkpoint
from stepaudio2.runtime.errors import CheckpointError

REAL_FILES = {"config.json", "model.safetensors.index.json", "vocab.json", "merges.txt", "added_tokens.json",
              "tokenizer_config.json", "special_tokens_map.json"}


def digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def test_tiny_checkpoint_has_the_real_layout(tiny_ckpt):
    names = {p.name for p in tiny_ckpt.iterdir()}
    assert REAL_FILES <= names
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) >= 2 and all(s.startswith("model-0000") and f"-of-{len(shards):05d}" in s for s in shards)
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["model_type"] == "step_audio_2" and cfg["architectures"] == ["StepAudio2ForCausalLM"]
    assert set(cfg["text_config"]) >= {"hidden_size", "intermediate_size", "num_attention_heads",
                                       "num_attention_groups", "num_key_value_heads", "num_hidden_layers",
                                       "max_seq_len", "max_position_embeddings", "vocab_size", "rms_norm_eps",
                                       "rope_theta", "eos_token_id", "pad_token_id"}
    assert set(cfg["audio_encoder_config"]) == {"n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head",
                                                "n_audio_layer", "n_codebook_size", "llm_dim", "kernel_size",
                                                "adapter_stride"}
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    stored = {}
    for s in shards:
        stored.update(load_file(tiny_ckpt / s))
    assert set(stored) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert stored["adapter.linear1.weight"].shape[0] == 2048  # hard-coded in the reference (spec §1.4)
    assert not torch.equal(stored["lm_head.weight"], stored["model.embed_tokens.weight"])  # untied


def test_tiny_checkpoint_is_deterministic(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", seed=3)
    b = make_tiny_checkpoint(tmp_path / "b", seed=3)
    c = make_tiny_checkpoint(tmp_path / "c", seed=4)
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, d)
    return d


def _shard_of(d, name):
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_missing_shard_is_named(ckpt_copy):
    shard = _shard_of(ckpt_copy, "lm_head.weight")
    (ckpt_copy / shard).unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard} .* is missing"):
        StepAudio2.from_pretrained(ckpt_copy)


def _rewrite(d, name, fn):
    shard = _shard_of(d, name)
    tensors = load_file(d / shard)
    fn(tensors)
    save_file(tensors, str(d / shard), metadata={"format": "pt"})
    return shard


def test_wrong_shape_is_named(ckpt_copy):
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(ckpt_copy, name, lambda t: t.__setitem__(name, t[name][:-1].clone()))
    with pytest.raises(CheckpointError, match=rf"tensor {name} has shape \[31, 64\] .* expected \[32, 64\]"):
        StepAudio2.from_pretrained(ckpt_copy)


def test_unexpected_tensor_is_named(ckpt_copy):
    name = "encoder.blocks.0.attn.key.bias"  # the reference's key has no bias (spec §1.3)
    shard = _rewrite(ckpt_copy, "encoder.conv1.weight", lambda t: t.__setitem__(name, torch.zeros(64)))
    idx = json.loads((ckpt_copy / "model.safetensors.index.json").read_text())
    idx["weight_map"][name] = shard
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=f"unexpected tensor {name}"):
        StepAudio2.from_pretrained(ckpt_copy)


def test_missing_tensor_is_named(ckpt_copy):
    name = "adapter.linear2.bias"
    _rewrite(ckpt_copy, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"tensor {name} is listed .* but missing from"):
        StepAudio2.from_pretrained(ckpt_copy)
    idx = json.loads((ckpt_copy / "model.safetensors.index.json").read_text())
    del idx["weight_map"][name]
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=f"tensor {name} is missing from the checkpoint"):
        StepAudio2.from_pretrained(ckpt_copy)


def test_config_errors_are_named(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    del cfg["audio_encoder_config"]["n_audio_layer"]
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="audio_encoder_config.n_audio_layer is missing"):
        StepAudio2.from_pretrained(ckpt_copy)
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        StepAudio2.from_pretrained(ckpt_copy)


def _mapped_file(ptr: int) -> str | None:
    """The file behind the memory mapping holding address ``ptr`` (Linux /proc)."""
    for line in open("/proc/self/maps"):
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5] if len(parts) > 5 else None
    return None


def test_loaded_weights_are_views_of_the_mapped_files(tiny_ckpt):
    """No second copy: in the stored dtype, every parameter lives in a page mapped from
    its shard file, not in anonymous memory."""
    m = StepAudio2.from_pretrained(tiny_ckpt)
    wm = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    for name, p in m.net.state_dict().items():
        assert (_mapped_file(p.data_ptr()) or "").endswith(wm[name]), name
    w = m.net.model.embed_tokens.weight
    ref = load_file(tiny_ckpt / wm["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    assert torch.equal(w, ref)
    # a dtype change must copy: then the parameters are anonymous memory
    m16 = StepAudio2.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    assert _mapped_file(m16.net.lm_head.weight.data_ptr()) != _mapped_file(m.net.lm_head.weight.data_ptr())
