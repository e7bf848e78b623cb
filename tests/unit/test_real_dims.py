"""The model at the REAL Step-Audio-2-mini dims, built on the meta device (no memory):
every tensor name and shape must be the checkpoint's (spec §5.3)."""
import re

from stepaudio2.model.config import StepAudio2Config, mini_config_dict
from stepaudio2.model.modeling import expected_shapes


def spec_tensors() -> dict[str, tuple]:
    """Spec §5.3 written out independently of our modules."""
    t = {}
    d, ff, v, kv = 3584, 18944, 158720, 4 * 128
    t["model.embed_tokens.weight"] = (v, d)
    for i in range(28):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = (d, d)
        t[p + "self_attn.q_proj.bias"] = (d,)
        t[p + "self_attn.k_proj.weight"] = (kv, d)
        t[p + "self_attn.k_proj.bias"] = (kv,)
        t[p + "self_attn.v_proj.weight"] = (kv, d)
        t[p + "self_attn.v_proj.bias"] = (kv,)
        t[p + "self_attn.o_proj.weight"] = (d, d)
        t[p + "mlp.gate_proj.weight"] = (ff, d)
        t[p + "mlp.up_proj.weight"] = (ff, d)
        t[p + "mlp.down_proj.weight"] = (d, ff)
        t[p + "input_layernorm.weight"] = (d,)
        t[p + "post_attention_layernorm.weight"] = (d,)
    t["model.norm.weight"] = (d,)
    t["lm_head.weight"] = (v, d)
    s = 1280
    t["encoder.conv1.weight"] = (s, 128, 3)
    t["encoder.conv1.bias"] = (s,)
    t["encoder.conv2.weight"] = (s, s, 3)
    t["encoder.conv2.bias"] = (s,)
    t["encoder.positional_embedding.weight"] = (1500, s)
    for i in range(32):
        p = f"encoder.blocks.{i}."
        for n in ("query", "value", "out"):
            t[p + f"attn.{n}.weight"] = (s, s)
            t[p + f"attn.{n}.bias"] = (s,)
        t[p + "attn.key.weight"] = (s, s)
        for ln in ("attn_ln", "mlp_ln"):
            t[p + f"{ln}.weight"] = (s,)
            t[p + f"{ln}.bias"] = (s,)
        t[p + "mlp.0.weight"] = (4 * s, s)
        t[p + "mlp.0.bias"] = (4 * s,)
        t[p + "mlp.2.weight"] = (s, 4 * s)
        t[p + "mlp.2.bias"] = (s,)
    t["encoder.after_norm.weight"] = (s,)
    t["encoder.after_norm.bias"] = (s,)
    t["adapter.conv.weight"] = (s, s, 3)
    t["adapter.conv.bias"] = (s,)
    t["adapter.linear1.weight"] = (2048, s)
    t["adapter.linear1.bias"] = (2048,)
    t["adapter.linear2.weight"] = (d, 2048)
    t["adapter.linear2.bias"] = (d,)
    return t


def test_real_mini_tensor_names_and_shapes():
    shapes = expected_shapes(StepAudio2Config.from_dict(mini_config_dict()))
    want = spec_tensors()
    assert len(want) == 832
    assert len(shapes) == 832
    assert {k: tuple(v) for k, v in shapes.items()} == want
    llm = [k for k in shapes if re.match(r"^(model\.|lm_head\.)", k)]
    enc = [k for k in shapes if k.startswith("encoder.")]
    ada = [k for k in shapes if k.startswith("adapter.")]
    assert (len(llm), len(enc), len(ada)) == (339, 487, 6)


def test_real_mini_parameter_count():
    shapes = expected_shapes(StepAudio2Config.from_dict(mini_config_dict()))
    total = sum(v.numel() for v in shapes.values())
    # spec §5.4: ~7.663 B LLM + 0.637 B encoder + 0.015 B adapter = ~8.32 B
    assert 8.30e9 < total < 8.34e9
