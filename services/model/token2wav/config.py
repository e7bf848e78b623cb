"""Hyper-parameters of the token2wav flow model and the HiFT vocoder.

``flow.yaml`` (HyperPyYAML in the released checkpoint) is turned into :class:`FlowConfig`
by :mod:`stepaudio2.model.token2wav.checkpoint` without executing any tag. The vocoder
has no config file: the reference builds ``HiFTGenerator()`` with its defaults, so
:class:`HiFTConfig` holds those defaults and the loader reads only the widths
(``base_channels``, the F0 predictor's width) from the tensors of ``hift.pt``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Fixed by the protocol of the reference (spec section 3.6, token2wav.py).
SAMPLE_RATE = 24000
MEL_BINS = 80
TOKEN_MEL_RATIO = 2             # 25 Hz tokens -> 50 Hz mel frames (encoder up_stride)
SAMPLES_PER_FRAME = 480         # 50 Hz mel -> 24 kHz audio
CHUNK_TOKENS = 25               # tokens per streaming chunk (1 s)
N_TIMESTEPS = 10                # Euler steps
NOISE_FRAMES = 50 * 600         # the reference's fixed noise buffer: 600 s of 50 Hz frames
DIT_CACHE_TAIL_FRAMES = 100     # DiT attention cache kept beyond the prompt length
HIFT_MEL_CACHE_FRAMES = 8       # 160 ms of mel carried into the next vocoder call
HIFT_SOURCE_CACHE = HIFT_MEL_CACHE_FRAMES * SAMPLES_PER_FRAME   # 3840 samples


@dataclass(frozen=True)
class EncoderConfig:
    """``UpsampleConformerEncoderV2`` arguments (names as in ``flow.yaml``)."""

    input_size: int = 512
    output_size: int = 512
    input_layer: str = "linear"
    pre_lookahead_len: int = 3
    num_blocks: int = 6
    num_up_blocks: int = 4
    up_stride: int = 2
    up_scale_factor: float = 2.0
    attention_heads: int = 8
    pos_enc_layer_type: str = "rel_pos_espnet"
    selfattention_layer_type: str = "rel_selfattn"
    key_bias: bool = True
    linear_units: int = 2048
    dropout_rate: float = 0.1
    positional_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    normalize_before: bool = True
    activation_type: str = "swish"


@dataclass(frozen=True)
class DiTConfig:
    """``DiT`` estimator arguments (names as in ``flow.yaml``)."""

    in_channels: int = 320
    out_channels: int = 80
    mlp_ratio: float = 4.0
    depth: int = 16
    num_heads: int = 8
    head_dim: int = 64
    hidden_size: int = 512


@dataclass(frozen=True)
class FlowConfig:
    """``CausalMaskedDiffWithXvec`` + ``CausalConditionalCFM`` arguments."""

    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    output_type: str = "mel"
    vocab_size: int = 6561
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    estimator: DiTConfig = field(default_factory=DiTConfig)
    inference_cfg_rate: float = 0.7


@dataclass(frozen=True)
class HiFTConfig:
    """``HiFTGenerator()`` defaults, as ``token2wav.py`` builds it."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = SAMPLE_RATE
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    n_fft: int = 16
    hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_cond_channels: int = 512

    @property
    def upsample_scale(self) -> int:
        """Samples per mel frame: prod(upsample_rates) * hop_len (480)."""
        n = self.hop_len
        for r in self.upsample_rates:
            n *= r
        return n
