"""Strict, inert loading of a ``token2wav/`` folder (token2wav_checkpoint_format.md).

* ``flow.yaml`` is HyperPyYAML. It is read with a ``yaml.SafeLoader`` subclass that turns
  ``!new:``/``!name:``/``!ref`` (and any other ``!`` tag) into plain :class:`Tagged` data:
  no tag is ever resolved to a Python object, and the standard ``!!python/...`` tags are
  refused by the safe loader. Only the four known classes are accepted, by name.
* ``flow.pt`` and ``hift.pt`` are read with ``torch.load(weights_only=True)``.
* Every tensor is checked against the model built from the config: a missing, unexpected
  or wrong-shaped tensor is a :class:`CheckpointError` naming it.
* ``hift.pt``: a ``generator.`` prefix is stripped; weight-normalised convs may come as
  ``weight_g``/``weight_v``, as ``parametrizations.weight.original0``/``original1`` or
  already folded as ``weight``, one complete form per conv; they are folded at load.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from stepaudio2.model.token2wav.config import DiTConfig, EncoderConfig, FlowConfig, HiFTConfig, MEL_BINS
from stepaudio2.runtime.errors import CheckpointError

FLOW_YAML, FLOW_PT, HIFT_PT = "flow.yaml", "flow.pt", "hift.pt"
ONNX_FILES = ("campplus.onnx", "speech_tokenizer_v2_25hz.onnx")

# node -> the class its tag must name (module paths vary between forks; the class may not).
_CLASSES = {
    "flow": "CausalMaskedDiffWithXvec",
    "flow.encoder": "UpsampleConformerEncoderV2",
    "flow.decoder": "CausalConditionalCFM",
    "flow.decoder.estimator": "DiT",
}


# ----------------------------------------------------------------------------- yaml
@dataclass(frozen=True)
class Tagged:
    """A tagged YAML node kept as data: ``tag`` ('!new:pkg.Class', '!ref', ...) and its
    constructed ``value`` (dict, list or str)."""

    tag: str
    value: Any


class InertLoader(yaml.SafeLoader):
    """SafeLoader that records HyperPyYAML tags instead of acting on them."""


def _construct_tagged(loader: InertLoader, tag_suffix: str, node: yaml.Node, prefix: str) -> Tagged:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return Tagged(prefix + tag_suffix, value)


for _prefix in ("!new:", "!name:", "!apply:", "!include:"):
    InertLoader.add_multi_constructor(
        _prefix, lambda loader, suffix, node, _p=_prefix: _construct_tagged(loader, suffix, node, _p))
InertLoader.add_multi_constructor("!", lambda loader, suffix, node: _construct_tagged(loader, suffix, node, "!"))


def parse_flow_yaml(text: str) -> Any:
    """The document as plain data (dicts, lists, scalars, :class:`Tagged`). Never runs code."""
    try:
        return yaml.load(text, Loader=InertLoader)  # noqa: S506 - InertLoader is a SafeLoader
    except yaml.YAMLError as e:
        raise CheckpointError(f"{FLOW_YAML} is not valid (safe) YAML: {e}") from None


def _resolve_ref(expr: str, root: dict, where: str) -> Any:
    m = re.fullmatch(r"\s*<([A-Za-z_][\w\-]*)((?:\[[^\]]+\])*)>\s*", expr)
    if not m:
        raise CheckpointError(f"{FLOW_YAML}: {where} uses an unsupported !ref expression {expr!r}")
    value: Any = root.get(m.group(1), _MISSING)
    for key in re.findall(r"\[([^\]]+)\]", m.group(2)):
        value = value.get(key, _MISSING) if isinstance(value, dict) else _MISSING
    if value is _MISSING:
        raise CheckpointError(f"{FLOW_YAML}: {where} refers to {expr!r}, which is not defined")
    return value


_MISSING = object()


def _plain(value: Any, root: dict, where: str) -> Any:
    """A scalar setting: resolves simple ``!ref <key>`` lookups; any other tag is an error."""
    if isinstance(value, Tagged):
        if value.tag == "!ref" and isinstance(value.value, str):
            return _plain(_resolve_ref(value.value, root, where), root, where)
        raise CheckpointError(f"{FLOW_YAML}: {where} is a {value.tag} node where a plain value is expected")
    return value


def _component(node: Any, name: str, root: dict) -> dict:
    if isinstance(node, Tagged) and node.tag == "!ref":
        node = _resolve_ref(str(node.value), root, name)
    expected = _CLASSES[name]
    if not (isinstance(node, Tagged) and node.tag.startswith("!new:") and isinstance(node.value, dict)):
        raise CheckpointError(f"{FLOW_YAML}: {name} must be a '!new:...{expected}' mapping")
    cls = node.tag[len("!new:"):]
    if cls.rsplit(".", 1)[-1] != expected:
        raise CheckpointError(f"{FLOW_YAML}: {name} is {node.tag!r}; only {expected} is supported")
    return node.value


def _fill(cls, values: dict, name: str, root: dict, skip: tuple[str, ...] = ()):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in values.items():
        if key in skip:
            continue
        if key not in fields:
            raise CheckpointError(f"{FLOW_YAML}: {name}.{key} is not a supported setting")
        v = _plain(raw, root, f"{name}.{key}")
        default = fields[key].default
        try:
            if isinstance(default, bool):
                if not isinstance(v, bool):
                    raise ValueError
            elif isinstance(default, int):
                if isinstance(v, bool) or int(v) != v:
                    raise ValueError
                v = int(v)
            elif isinstance(default, float):
                v = float(v)
            elif isinstance(default, str):
                v = str(v)
        except (TypeError, ValueError):
            raise CheckpointError(f"{FLOW_YAML}: {name}.{key} has an invalid value {v!r}") from None
        kwargs[key] = v
    return cls(**kwargs)


def flow_config_from_data(data: Any) -> FlowConfig:
    if not isinstance(data, dict) or "flow" not in data:
        raise CheckpointError(f"{FLOW_YAML} has no top-level 'flow' entry")
    flow = _component(data["flow"], "flow", data)
    for key in ("encoder", "decoder"):
        if key not in flow:
            raise CheckpointError(f"{FLOW_YAML}: flow.{key} is missing")
    if "input_embedding" in flow and flow["input_embedding"] is not None:
        raise CheckpointError(f"{FLOW_YAML}: flow.input_embedding is not supported (the default Embedding is)")
    enc = _fill(EncoderConfig, _component(flow["encoder"], "flow.encoder", data), "flow.encoder", data)
    dec = _component(flow["decoder"], "flow.decoder", data)
    if "estimator" not in dec:
        raise CheckpointError(f"{FLOW_YAML}: flow.decoder.estimator is missing")
    est = _fill(DiTConfig, _component(dec["estimator"], "flow.decoder.estimator", data), "flow.decoder.estimator",
                data)
    cfg_rate = _fill(_CFGRate, dec, "flow.decoder", data, skip=("estimator",)).inference_cfg_rate
    top = _fill(_FlowTop, flow, "flow", data, skip=("encoder", "decoder", "input_embedding"))
    cfg = FlowConfig(**dataclasses.asdict(top), encoder=enc, estimator=est, inference_cfg_rate=cfg_rate)
    validate_flow_config(cfg)
    return cfg


@dataclass(frozen=True)
class _CFGRate:
    inference_cfg_rate: float = 0.7


@dataclass(frozen=True)
class _FlowTop:
    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    output_type: str = "mel"
    vocab_size: int = 6561


def validate_flow_config(cfg: FlowConfig) -> None:
    """Reject settings this implementation (like the reference graph) cannot honour."""
    e = cfg.encoder
    fixed = {
        "flow.output_type": (cfg.output_type, "mel"),
        "flow.output_size": (cfg.output_size, MEL_BINS),
        "flow.encoder.input_layer": (e.input_layer, "linear"),
        "flow.encoder.pos_enc_layer_type": (e.pos_enc_layer_type, "rel_pos_espnet"),
        "flow.encoder.selfattention_layer_type": (e.selfattention_layer_type, "rel_selfattn"),
        "flow.encoder.normalize_before": (e.normalize_before, True),
        "flow.encoder.activation_type": (e.activation_type, "swish"),
        "flow.encoder.input_size": (e.input_size, cfg.input_size),
        "flow.encoder.output_size": (e.output_size, e.input_size),
        "flow.encoder.up_scale_factor": (e.up_scale_factor, float(e.up_stride)),
        "flow.decoder.estimator.in_channels": (cfg.estimator.in_channels, 4 * cfg.output_size),
        "flow.decoder.estimator.out_channels": (cfg.estimator.out_channels, cfg.output_size),
    }
    for name, (got, want) in fixed.items():
        if got != want:
            raise CheckpointError(f"{FLOW_YAML}: {name} = {got!r} is not supported (expected {want!r})")
    if e.output_size % e.attention_heads:
        raise CheckpointError(f"{FLOW_YAML}: flow.encoder.output_size {e.output_size} is not divisible by "
                              f"attention_heads {e.attention_heads}")
    if e.pre_lookahead_len < 1:
        raise CheckpointError(f"{FLOW_YAML}: flow.encoder.pre_lookahead_len must be >= 1")


def load_flow_config(folder: Path) -> FlowConfig:
    path = folder / FLOW_YAML
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    return flow_config_from_data(parse_flow_yaml(path.read_text()))


# -------------------------------------------------------------------------- tensors
def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        try:                              # zip-format files are memory-mapped (no second copy)
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)    # legacy (non-zip) format
    except Exception as e:  # noqa: BLE001 - unpickling refusals and corrupt files alike
        raise CheckpointError(f"{path.name} cannot be read as a weights-only torch file: {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path.name} does not hold a state dict")
    bad = sorted(str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{path.name} entry {bad[0]!r} is not a tensor")
    return sd


def check_tensors(what: str, expected: dict[str, torch.Size], got: dict[str, torch.Tensor]) -> None:
    """Strict name and shape check; the error names the (first few) offending tensors."""
    missing = sorted(set(expected) - set(got))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{what} is missing tensor {missing[0]!r}{more}")
    unexpected = sorted(set(got) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{what} has unexpected tensor {unexpected[0]!r}{more}")
    for name in sorted(expected):
        if tuple(got[name].shape) != tuple(expected[name]):
            raise CheckpointError(f"{what} tensor {name!r} has shape {tuple(got[name].shape)}, "
                                  f"expected {tuple(expected[name])}")


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_tensors(what, expected, state)
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


# ----------------------------------------------------------------------------- hift
WN_FORMS = (("weight_g", "weight_v"), ("parametrizations.weight.original0", "parametrizations.weight.original1"))


def hift_weight_norm_convs(cfg: HiFTConfig) -> list[str]:
    """Names (no suffix) of the convs the reference wraps in weight norm."""
    names = ["conv_pre", "conv_post"] + [f"ups.{i}" for i in range(len(cfg.upsample_rates))]
    names += [f"f0_predictor.condnet.{2 * i}" for i in range(5)]
    n_res = len(cfg.upsample_rates) * len(cfg.resblock_kernel_sizes)
    for prefix, count, dil in (("resblocks", n_res, cfg.resblock_dilation_sizes),
                               ("source_resblocks", len(cfg.source_resblock_kernel_sizes),
                                cfg.source_resblock_dilation_sizes)):
        for i in range(count):
            for j in range(len(dil[i % len(dil)])):
                names += [f"{prefix}.{i}.convs1.{j}", f"{prefix}.{i}.convs2.{j}"]
    return names


def strip_generator_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("generator."):] if k.startswith("generator.") else k: v for k, v in sd.items()}


def _wn_pair(sd: dict, name: str) -> tuple[str, str] | None:
    for g, v in WN_FORMS:
        if f"{name}.{g}" in sd or f"{name}.{v}" in sd:
            return f"{name}.{g}", f"{name}.{v}"
    return None


def hift_config_from_state(sd: dict[str, torch.Tensor]) -> HiFTConfig:
    """The widths the checkpoint was built with (everything else is the reference default)."""
    def out_channels(name: str) -> int:
        pair = _wn_pair(sd, name)
        key = pair[1] if pair else f"{name}.weight"
        if key not in sd or sd[key].dim() != 3:
            raise CheckpointError(f"{HIFT_PT} is missing tensor {name + '.weight_v'!r} "
                                  f"(or {name + '.parametrizations.weight.original1'!r})")
        return int(sd[key].shape[0])

    return HiFTConfig(base_channels=out_channels("conv_pre"), f0_cond_channels=out_channels("f0_predictor.condnet.0"))


def fold_hift_state(sd: dict[str, torch.Tensor], cfg: HiFTConfig,
                    expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Fold weight norm (w = g * v / ||v||, norm over all dims but 0) into ``.weight``,
    checking that each weight-normalised conv comes in exactly one complete form and that
    ``v``/``g`` have the shapes the model needs (``expected``: the module's state shapes)."""
    sd = dict(sd)
    for name in hift_weight_norm_convs(cfg):
        forms = [(g, v) for g, v in ((f"{name}.{a}", f"{name}.{b}") for a, b in WN_FORMS) if g in sd or v in sd]
        plain = f"{name}.weight" in sd
        if len(forms) + plain > 1:
            raise CheckpointError(f"{HIFT_PT}: conv {name!r} has weights in more than one form")
        if not forms:
            continue                      # plain .weight, or missing (reported by the name check)
        g, v = forms[0]
        for key in (v, g):
            if key not in sd:
                raise CheckpointError(f"{HIFT_PT} is missing tensor {key!r}")
        want = tuple(expected[f"{name}.weight"])
        want_g = (want[0],) + (1,) * (len(want) - 1)
        if tuple(sd[v].shape) != want:
            raise CheckpointError(f"{HIFT_PT} tensor {v!r} has shape {tuple(sd[v].shape)}, expected {want}")
        if tuple(sd[g].shape) != want_g:
            raise CheckpointError(f"{HIFT_PT} tensor {g!r} has shape {tuple(sd[g].shape)}, expected {want_g}")
        wv, wg = sd.pop(v).float(), sd.pop(g).float()
        sd[f"{name}.weight"] = torch._weight_norm(wv, wg, 0)
    return sd


def resolve_folder(path: str | Path) -> Path:
    """``path`` is the token2wav folder itself or a model folder holding ``token2wav/``."""
    p = Path(path)
    if (p / FLOW_YAML).is_file():
        return p
    if (p / "token2wav" / FLOW_YAML).is_file():
        return p / "token2wav"
    raise CheckpointError(f"{p} is neither a token2wav folder nor a model folder with token2wav/ "
                          f"(no {FLOW_YAML} found)")
