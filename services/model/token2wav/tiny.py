"""Tiny random ``token2wav/`` folders in the released on-disk format.

``flow.yaml`` with the real structure and HyperPyYAML tags (tiny widths), ``flow.pt``
and ``hift.pt`` with the real tensor names. The vocoder's weight-normalised convs are
written as ``weight_g``/``weight_v`` (the old ``torch.nn.utils.weight_norm`` form) by
default or as ``parametrizations.weight.original0/1``; the loader accepts both. The
protocol widths (80 mel bins, 192-d speaker embedding, 6561 codes, 480 samples per frame)
are the real ones.

The two ONNX pieces (``campplus.onnx``, ``speech_tokenizer_v2_25hz.onnx``) are exported
with ``torch.onnx.export(dynamo=False)`` from tiny random modules with the released
files' interface (names, dtypes, dynamic axes; see :data:`CAMPPLUS_IO`,
:data:`TOKENIZER_IO`), so :class:`~stepaudio2.model.token2wav.features.VoiceEncoder` runs
on them exactly as on the real ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stepaudio2.model.token2wav.checkpoint import (FLOW_PT, FLOW_YAML, HIFT_PT, ONNX_FILES, WN_FORMS,
                                                   hift_weight_norm_convs)
from stepaudio2.model.token2wav.config import DiTConfig, EncoderConfig, FlowConfig, HiFTConfig


@dataclass(frozen=True)
class TinyToken2WavDims:
    width: int = 32                 # token embedding / encoder width
    heads: int = 2
    linear_units: int = 64
    num_blocks: int = 2
    num_up_blocks: int = 2
    dit_hidden: int = 32
    dit_depth: int = 2
    dit_heads: int = 2
    dit_head_dim: int = 16
    hift_base: int = 32
    f0_channels: int = 32


def tiny_flow_config(d: TinyToken2WavDims = TinyToken2WavDims()) -> FlowConfig:
    enc = EncoderConfig(input_size=d.width, output_size=d.width, num_blocks=d.num_blocks,
                        num_up_blocks=d.num_up_blocks, attention_heads=d.heads, linear_units=d.linear_units)
    est = DiTConfig(depth=d.dit_depth, num_heads=d.dit_heads, head_dim=d.dit_head_dim, hidden_size=d.dit_hidden)
    return FlowConfig(input_size=d.width, encoder=enc, estimator=est)


def tiny_hift_config(d: TinyToken2WavDims = TinyToken2WavDims()) -> HiFTConfig:
    return HiFTConfig(base_channels=d.hift_base, f0_cond_channels=d.f0_channels)


def _yaml_scalar(v) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, str):
        return repr(v)
    return repr(v)


def flow_yaml_text(cfg: FlowConfig) -> str:
    """``flow.yaml`` as the released file lays it out: one ``flow`` node built with
    ``!new:`` tags for the flow, encoder, CFM decoder and DiT estimator."""
    lines = ["# token2wav flow model (HyperPyYAML)", "flow: !new:cosyvoice2.flow.flow.CausalMaskedDiffWithXvec"]
    top = {k: getattr(cfg, k) for k in ("input_size", "output_size", "spk_embed_dim", "output_type", "vocab_size")}
    lines += [f"    {k}: {_yaml_scalar(v)}" for k, v in top.items()]
    lines.append("    encoder: !new:cosyvoice2.transformer.upsample_encoder_v2.UpsampleConformerEncoderV2")
    enc = dataclasses.asdict(cfg.encoder)
    enc.pop("activation_type")      # the released file leaves it at its default (swish)
    lines += [f"        {k}: {_yaml_scalar(v)}" for k, v in enc.items()]
    lines.append("    decoder: !new:cosyvoice2.flow.flow_matching.CausalConditionalCFM")
    lines.append(f"        inference_cfg_rate: {_yaml_scalar(cfg.inference_cfg_rate)}")
    lines.append("        estimator: !new:cosyvoice2.flow.decoder_dit.DiT")
    lines += [f"            {k}: {_yaml_scalar(v)}" for k, v in dataclasses.asdict(cfg.estimator).items()]
    return "\n".join(lines) + "\n"


def randomize(module: nn.Module, g: torch.Generator) -> None:
    """Deterministic, well-scaled random weights: N(0, 1/fan_in) matrices and kernels,
    small biases, LayerNorm gains near 1, Snake alphas in [0.5, 1.5]."""
    with torch.no_grad():
        for mname, m in module.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                if isinstance(m, nn.LayerNorm):
                    p.copy_((1.0 if pname == "weight" else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
                elif pname == "alpha":
                    p.copy_(0.5 + torch.rand(p.shape, generator=g))
                elif pname == "bias" or pname.startswith("pos_bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                elif isinstance(m, nn.Embedding):
                    p.copy_(torch.randn(p.shape, generator=g))
                else:
                    fan_in = p[0].numel() if not isinstance(m, nn.ConvTranspose1d) else p.shape[0] * p.shape[2]
                    p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
                if mname == "f0_predictor.classifier" and pname == "bias":
                    p.fill_(150.0)        # a voiced F0 (Hz), so the harmonic source is exercised


def random_flow_state(cfg: FlowConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    from stepaudio2.model.token2wav.flow import Flow

    flow = Flow(cfg)
    randomize(flow, torch.Generator().manual_seed(seed))
    return {k: v.clone() for k, v in flow.state_dict().items()}


def random_hift_state(cfg: HiFTConfig, seed: int = 0, weight_norm_form: str = "weight_g",
                      prefix: str = "") -> dict[str, torch.Tensor]:
    """hift.pt contents; weight-normalised convs as (g, v) in the chosen form
    (``weight_g``: old ``weight_g``/``weight_v``; ``parametrizations``: ``original0``/``original1``;
    ``folded``: plain ``weight``)."""
    from stepaudio2.model.token2wav.hift import HiFT

    g = torch.Generator().manual_seed(seed + 1)
    hift = HiFT(cfg)
    randomize(hift, g)
    sd = {k: v.clone() for k, v in hift.state_dict().items()}
    if weight_norm_form != "folded":
        gname, vname = WN_FORMS[0] if weight_norm_form == "weight_g" else WN_FORMS[1]
        for name in hift_weight_norm_convs(cfg):
            w = sd.pop(f"{name}.weight")
            dims = tuple(range(1, w.dim()))
            norm = w.norm(dim=dims, keepdim=True)
            scale = 0.5 + torch.rand(norm.shape, generator=g)       # v need not be unit-norm
            sd[f"{name}.{vname}"] = w * scale
            sd[f"{name}.{gname}"] = norm
    return {prefix + k: v for k, v in sd.items()}


# ----------------------------------------------------------------------------- ONNX
# The released files' interfaces (what the reference feeds them, token2wav.py / the
# S3Tokenizer ONNX test / CosyVoice frontends; names also used by the TensorRT profile of
# the yuekaizhang fork: CAM++ input "input"):
#   campplus.onnx:                 input  "input"  float32 [batch, frames, 80]  (Kaldi fbank)
#                                  output "output" float32 [batch, 192]
#   speech_tokenizer_v2_25hz.onnx: inputs "feats" float32 [batch, 128, frames] (log-mel),
#                                         "feats_length" int32 [batch]
#                                  output "indices" int64 [batch, 1, tokens]  (25 Hz codes)
CAMPPLUS_IO = {"inputs": {"input": ("float32", ("batch", "frames", 80))},
               "outputs": {"output": ("float32", ("batch", 192))}}
TOKENIZER_IO = {"inputs": {"feats": ("float32", ("batch", 128, "frames")), "feats_length": ("int32", ("batch",))},
                "outputs": {"indices": ("int64", ("batch", 1, "tokens"))}}
ONNX_OPSET = 17


class TinyCampPlus(nn.Module):
    """fbank [B, T, 80] -> 192-d embedding: a frame-wise MLP, mean and std pooling over
    time (as CAM++'s statistics pooling), a linear head."""

    def __init__(self, width: int = 32, emb: int = 192):
        super().__init__()
        self.frame = nn.Sequential(nn.Linear(80, width), nn.ReLU(), nn.Linear(width, width))
        self.head = nn.Linear(2 * width, emb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.frame(x)
        mean = h.mean(dim=1)
        std = (h - mean.unsqueeze(1)).pow(2).mean(dim=1).add(1e-5).sqrt()
        return self.head(torch.cat([mean, std], dim=-1))


class TinyS3Tokenizer(nn.Module):
    """log-mel [B, 128, T] + lengths -> 25 Hz codes in [0, 6561): padding masked from the
    lengths, two stride-2 convs (k=3, p=1; T -> ceil(ceil(T/2)/2)) as the real tokenizer's
    subsampling, a projection to 8 channels and FSQ (3 levels each: 3^8 = 6561 codes)."""

    def __init__(self, width: int = 32, levels: int = 3, channels: int = 8):
        super().__init__()
        self.conv1 = nn.Conv1d(128, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.proj = nn.Linear(width, channels)
        self.levels = levels
        self.register_buffer("radix", torch.tensor([levels ** i for i in range(channels)], dtype=torch.long))

    def forward(self, feats: torch.Tensor, feats_length: torch.Tensor) -> torch.Tensor:
        t = torch.arange(feats.shape[2], device=feats.device)
        mask = (t.unsqueeze(0) < feats_length.to(torch.long).unsqueeze(1)).to(feats.dtype)
        h = torch.nn.functional.gelu(self.conv1(feats * mask.unsqueeze(1)))
        h = torch.nn.functional.gelu(self.conv2(h))
        z = torch.tanh(self.proj(h.transpose(1, 2)))                  # [B, T', 8] in (-1, 1)
        q = torch.round(z * (self.levels // 2)).to(torch.long) + self.levels // 2    # {0, 1, 2}
        return (q * self.radix).sum(dim=-1).unsqueeze(1)               # [B, 1, T'] int64


def _export(module: nn.Module, args: tuple, path: Path, io: dict) -> None:
    import warnings

    names_in, names_out = list(io["inputs"]), list(io["outputs"])
    axes = {}
    for name, (_, shape) in {**io["inputs"], **io["outputs"]}.items():
        axes[name] = {i: d for i, d in enumerate(shape) if isinstance(d, str)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), input_names=names_in, output_names=names_out,
                          dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)


def write_tiny_onnx(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Export tiny random ``campplus.onnx`` and ``speech_tokenizer_v2_25hz.onnx`` into
    ``folder`` (deterministic under ``seed``); returns their paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed + 2)
    camp, tok = TinyCampPlus(), TinyS3Tokenizer()
    for m in (camp, tok):
        randomize(m, g)
    with torch.no_grad():
        tok.proj.weight.mul_(4.0)          # spread the codes over the FSQ levels
    camp_path, tok_path = out / ONNX_FILES[0], out / ONNX_FILES[1]
    _export(camp, (torch.randn(1, 50, 80),), camp_path, CAMPPLUS_IO)
    _export(tok, (torch.randn(1, 128, 100), torch.tensor([100], dtype=torch.int32)), tok_path, TOKENIZER_IO)
    return camp_path, tok_path


def make_tiny_token2wav(path: str | Path, seed: int = 0, *, dims: TinyToken2WavDims = TinyToken2WavDims(),
                        weight_norm_form: str = "weight_g", hift_prefix: str = "",
                        flow_cfg: FlowConfig | None = None, onnx: bool = True) -> Path:
    """Write ``flow.yaml``, ``flow.pt``, ``hift.pt`` and (``onnx``) the two tiny ONNX
    models into the folder ``path`` (created); deterministic under ``seed``. ``flow_cfg``
    overrides the tiny flow widths (e.g. the released ones for numerical checks).
    Returns the folder."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = flow_cfg or tiny_flow_config(dims)
    (out / FLOW_YAML).write_text(flow_yaml_text(cfg))
    torch.save(random_flow_state(cfg, seed), out / FLOW_PT)
    torch.save(random_hift_state(tiny_hift_config(dims), seed, weight_norm_form, hift_prefix), out / HIFT_PT)
    if onnx:
        write_tiny_onnx(out, seed)
    return out
