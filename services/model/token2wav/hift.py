"""Mel -> 24 kHz waveform: the reference's ``HiFTGenerator`` (NSF source + ISTFTNet).

F0 from the mel (``ConvRNNF0Predictor``: 5 x [conv k3, ELU], Linear, abs) -> nearest
upsampling x480 -> NSF source (``SineGen2`` with 8 harmonics: per-frame phase increments
interpolated down and back up, amplitude 0.1, voiced where F0 > 10 Hz, noise std 0.003
voiced / 0.1/3 unvoiced; merged by Linear(9 -> 1) + tanh). The mel runs through
``conv_pre`` and 3 transposed-conv upsamplings (x8, x5, x3; LeakyReLU 0.1 before each),
each fused with the source's STFT (n_fft 16, hop 4) brought down by ``source_downs`` and
``source_resblocks``, then the mean of 3 Snake resblocks; LeakyReLU (0.01) -> ``conv_post``
-> log-magnitude (9 bins, exp, clipped at 100) and phase (sin) -> ``torch.istft`` ->
clamp to +-0.99. 480 samples per mel frame.

Weight norm is folded into plain weights when the checkpoint is loaded (the reference
keeps the parametrization; the arithmetic is the same ``torch._weight_norm``).

The random draws of the reference (initial harmonic phases ``torch.rand``, the additive
noise ``torch.randn_like`` and a discarded noise branch, in that order and memory layout,
from the global RNG unless a ``generator`` is given) are replaced by zeros when
``deterministic`` is set; otherwise a given RNG state gives the reference's exact output.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.signal import get_window
from torch import nn

from stepaudio2.model.token2wav.config import HiFTConfig


class Snake(nn.Module):
    """x + 1/(alpha + 1e-9) * sin^2(alpha x), per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha.unsqueeze(0).unsqueeze(-1)
        if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad):
            return x + (1.0 / (a + 1e-9)) * torch.pow(torch.sin(x * a), 2)
        # the same operations in the same order, in one buffer (pow(y, 2) is y * y; the
        # products and the final sum are commutative, so the values are bit-identical)
        y = x * a
        y.sin_()
        y.mul_(y)
        y.mul_(1.0 / (a + 1e-9))
        return y.add_(x)


def _padding(kernel: int, dilation: int = 1) -> int:
    return (kernel * dilation - dilation) // 2


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, 1, dilation=d, padding=_padding(kernel, d))
                                    for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel, 1, dilation=1, padding=_padding(kernel))
                                    for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = c2(a2(c1(a1(x)))).add_(x) if not torch.is_grad_enabled() else c2(a2(c1(a1(x)))) + x
        return x


class F0Predictor(nn.Module):
    """``ConvRNNF0Predictor``: condnet indices 0, 2, 4, 6, 8 are the convs (ELU between)."""

    def __init__(self, in_channels: int, cond_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return torch.abs(self.classifier(self.condnet(mel).transpose(1, 2)).squeeze(-1))


class SourceModule(nn.Module):
    """``SourceModuleHnNSF2`` / ``SineGen2`` (the 24 kHz variant the reference selects)."""

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.cfg = cfg
        self.l_linear = nn.Linear(cfg.nb_harmonics + 1, 1)

    def forward(self, f0_up: torch.Tensor, deterministic: bool = False,
                generator: torch.Generator | Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
        """f0 upsampled to samples ``[B, L, 1]`` -> excitation ``[B, L, 1]``.

        ``generator`` may be a list with one generator per row (batched streams): each row
        then draws exactly what it would draw alone, in the same order."""
        cfg = self.cfg
        rows = generator if isinstance(generator, (list, tuple)) else None
        if rows is not None and len(rows) != f0_up.shape[0]:
            raise ValueError(f"{len(rows)} generators for a batch of {f0_up.shape[0]}")
        scale = cfg.upsample_scale
        harmonics = torch.arange(1, cfg.nb_harmonics + 2, dtype=torch.float32, device=f0_up.device).view(1, 1, -1)
        fn = f0_up * harmonics
        rad = (fn / cfg.sampling_rate) % 1
        if deterministic:
            rand_ini = torch.zeros(fn.shape[0], fn.shape[2], device=fn.device)
        else:
            rand_ini = (torch.rand(fn.shape[0], fn.shape[2], generator=generator, device=fn.device) if rows is None
                        else torch.cat([torch.rand(1, fn.shape[2], generator=g, device=fn.device) for g in rows]))
        rand_ini[:, 0] = 0
        rad[:, 0, :] = rad[:, 0, :] + rand_ini
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / scale, mode="linear").transpose(1, 2)
        phase = torch.cumsum(rad, dim=1) * 2 * np.pi
        phase = F.interpolate(phase.transpose(1, 2) * scale, scale_factor=scale, mode="linear").transpose(1, 2)
        sines = torch.sin(phase) * cfg.nsf_alpha
        uv = (f0_up > cfg.nsf_voiced_threshold).type(torch.float32)
        if deterministic:
            waves = sines * uv
        else:
            noise_amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
            # like the reference's randn_like: same memory layout as ``sines`` (channels-first
            # strides), so a given RNG state yields the same noise as upstream
            if rows is None:
                noise = noise_amp * torch.empty_like(sines).normal_(generator=generator)
            else:
                noise = noise_amp * torch.cat([torch.empty_like(sines[i:i + 1]).normal_(generator=g)
                                               for i, g in enumerate(rows)])
            waves = sines * uv + noise
            # upstream also draws (and discards) a noise branch of uv's shape; draw it too so
            # that successive calls consume the RNG exactly as the reference does
            if rows is None:
                torch.empty_like(uv).normal_(generator=generator)
            else:
                for i, g in enumerate(rows):
                    torch.empty_like(uv[i:i + 1]).normal_(generator=g)
        return torch.tanh(self.l_linear(waves))


class HiFT(nn.Module):
    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.cfg = cfg
        base = cfg.base_channels
        self.m_source = SourceModule(cfg)
        self.conv_pre = nn.Conv1d(cfg.in_channels, base, 7, 1, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(base // 2 ** i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        n_bins = cfg.n_fft + 2
        down_rates = [1] + list(cfg.upsample_rates[::-1][:-1])
        cum = np.cumprod(down_rates)[::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(cum, cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)):
            ch = base // 2 ** (i + 1)
            u = int(u)
            self.source_downs.append(nn.Conv1d(n_bins, ch, 1, 1) if u == 1 else
                                     nn.Conv1d(n_bins, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, tuple(d)))
        self.resblocks = nn.ModuleList()
        for i in range(len(self.ups)):
            ch = base // 2 ** (i + 1)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(ResBlock(ch, k, tuple(d)))
        self.conv_post = nn.Conv1d(ch, n_bins, 7, 1, padding=3)
        self.f0_predictor = F0Predictor(cfg.in_channels, cfg.f0_cond_channels)
        window = torch.from_numpy(get_window("hann", cfg.n_fft, fftbins=True).astype(np.float32))
        self.register_buffer("stft_window", window, persistent=False)

    def source(self, mel: torch.Tensor, deterministic: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """mel ``[B, 80, F]`` -> excitation ``[B, 1, F*480]``."""
        f0 = self.f0_predictor(mel)
        f0_up = F.interpolate(f0[:, None], scale_factor=float(self.cfg.upsample_scale), mode="nearest").transpose(1, 2)
        return self.m_source(f0_up, deterministic, generator).transpose(1, 2)

    def decode(self, mel: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        spec = torch.view_as_real(torch.stft(s.squeeze(1), cfg.n_fft, cfg.hop_len, cfg.n_fft, window=self.stft_window,
                                             return_complex=True))
        s_stft = torch.cat([spec[..., 0], spec[..., 1]], dim=1)
        x = self.conv_pre(mel)
        nk = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = self.resblocks[i * nk](x)
            for j in range(1, nk):
                xs += self.resblocks[i * nk + j](x)
            x = xs / nk
        x = self.conv_post(F.leaky_relu(x))
        half = cfg.n_fft // 2 + 1
        magnitude = torch.clip(torch.exp(x[:, :half]), max=1e2)
        phase = torch.sin(x[:, half:])
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        wav = torch.istft(spec, cfg.n_fft, cfg.hop_len, cfg.n_fft, window=self.stft_window)
        return torch.clamp(wav, -cfg.audio_limit, cfg.audio_limit)

    def forward(self, mel: torch.Tensor, cache_source: torch.Tensor | None = None, deterministic: bool = False,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mel ``[B, 80, F]`` -> (waveform ``[B, F*480]``, excitation ``[B, 1, F*480]``).
        ``cache_source`` ``[B, 1, n]`` replaces the first n excitation samples (streaming)."""
        s = self.source(mel, deterministic, generator)
        if cache_source is not None and cache_source.shape[2] > 0:
            s[:, :, :cache_source.shape[2]] = cache_source
        return self.decode(mel, s), s
