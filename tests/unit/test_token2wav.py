"""stepaudio2.model.token2wav on tiny random folders written by its own ``tiny`` module.

Numerical agreement with the reference code is recorded in
services/model/token2wav/FAITHFULNESS.md (it needs the reference, so it is not a test here).
"""
import subprocess
import sys

import numpy as np
import pytest
import torch

from stepaudio2.runtime.errors import CheckpointError, InvalidArgument

SR, HOP, HOLD = 24000, 480, 3840


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine intra-op
    threads make these many small ops ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from stepaudio2.model.token2wav import make_tiny_token2wav

    return make_tiny_token2wav(tmp_path_factory.mktemp("t2w") / "model" / "token2wav", seed=0)


@pytest.fixture(scope="module")
def t2w(folder):
    from stepaudio2.model.token2wav import Token2Wav

    return Token2Wav.from_pretrained(folder.parent)          # a model folder holding token2wav/


def voice(seed, n_prompt=10):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 6561, (n_prompt,), generator=g), torch.randn(2 * n_prompt, 80, generator=g),
            torch.randn(192, generator=g))


def speech(seed, n):
    return torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def push_alternately(pairs):
    """Push the streams' chunks by the protocol, one chunk of each stream in turn."""
    bufs, outs = [list(t) for _, t in pairs], [[] for _ in pairs]
    while any(bufs):
        for (s, _), buf, got in zip(pairs, bufs, outs):
            if not buf:
                continue
            if len(buf) >= 28:
                got.append(s.push(buf[:28]))
                del buf[:25]
            else:
                got.append(s.push(buf, last=True))
                buf.clear()
    return outs


def run_stream(s, tokens):
    """The reference caller: 28 tokens per push, keep the last 3, remainder with last=True."""
    outs, buf = [], list(tokens)
    while len(buf) >= 28:
        outs.append(s.push(buf[:28]))
        buf = buf[25:]
    outs.append(s.push(buf, last=True))
    return outs


# ------------------------------------------------------------------ shapes, API
def test_offline_shapes_and_lengths(t2w, folder):
    from stepaudio2.model.token2wav import Token2Wav

    pt, pm, spk = voice(1)
    mel = t2w.flow_offline(speech(2, 37), pt, pm, spk)
    assert mel.shape == (80, 74) and torch.isfinite(mel).all()
    wav = t2w.vocode(mel)
    assert wav.shape == (74 * HOP,) and wav.dtype == torch.float32 and wav.abs().max() <= 0.99
    assert t2w.sample_rate == SR
    assert Token2Wav.from_pretrained(folder).flow_offline(speech(2, 37), pt, pm, spk).equal(mel)   # folder itself


def test_offline_noise_is_the_initial_x(t2w):
    pt, pm, spk = voice(1)
    toks = speech(2, 20)
    default = t2w.flow_offline(toks, pt, pm, spk)
    assert t2w.flow_offline(toks, pt, pm, spk, noise=t2w.noise[:, :60]).equal(default)
    other = t2w.flow_offline(toks, pt, pm, spk, noise=torch.randn(80, 60))
    assert not other.allclose(default)
    with pytest.raises(InvalidArgument, match="noise"):
        t2w.flow_offline(toks, pt, pm, spk, noise=torch.randn(80, 59))


def test_bad_inputs_are_invalid_arguments(t2w):
    pt, pm, spk = voice(1)
    with pytest.raises(InvalidArgument, match="prompt_mel"):
        t2w.flow_offline(speech(2, 5), pt, pm[:-1], spk)
    with pytest.raises(InvalidArgument, match="speaker_embedding"):
        t2w.flow_offline(speech(2, 5), pt, pm, spk[:100])
    with pytest.raises(InvalidArgument, match="6561"):
        t2w.flow_offline([1, 2, 6561], pt, pm, spk)
    with pytest.raises(InvalidArgument, match="mel"):
        t2w.vocode(torch.zeros(81, 4))


def test_deterministic_under_a_seed(t2w, tmp_path):
    from stepaudio2.model.token2wav import make_tiny_token2wav

    pt, pm, spk = voice(1)
    toks = speech(3, 30)
    mel = t2w.flow_offline(toks, pt, pm, spk)
    assert t2w.flow_offline(toks, pt, pm, spk).equal(mel)
    assert t2w.vocode(mel, deterministic=True).equal(t2w.vocode(mel, deterministic=True))
    torch.manual_seed(7)
    a = t2w.vocode(mel)
    torch.manual_seed(7)
    assert t2w.vocode(mel).equal(a)
    assert not t2w.vocode(mel).equal(a)          # the draws are random without a seed
    a1 = torch.load(make_tiny_token2wav(tmp_path / "a", seed=5) / "flow.pt", weights_only=True)
    a2 = torch.load(make_tiny_token2wav(tmp_path / "b", seed=5) / "flow.pt", weights_only=True)
    assert all(a1[k].equal(a2[k]) for k in a1)
    s1 = run_stream(t2w.stream(pt, pm, spk, deterministic=True), toks)
    s2 = run_stream(t2w.stream(pt, pm, spk, deterministic=True), toks)
    assert all(x.equal(y) for x, y in zip(s1, s2))


# -------------------------------------------------------------------- streaming
def test_streaming_protocol_lengths(t2w):
    pt, pm, spk = voice(1)
    n = 25 * 3 + 9
    outs = run_stream(t2w.stream(pt, pm, spk), speech(4, n))
    lens = [o.shape[0] for o in outs]
    assert lens[0] == int(0.84 * SR) and lens[1:-1] == [SR, SR]
    assert lens[-1] == (n - 75) * 2 * HOP + HOLD                 # the remainder plus the held-back 0.16 s
    assert sum(lens) == n * 2 * HOP                               # same length as offline
    assert all(o.dtype == torch.float32 and o.abs().max() <= 1.0 for o in outs)


def test_stream_state_rules(t2w):
    pt, pm, spk = voice(1)
    s = t2w.stream(pt, pm, spk)
    with pytest.raises(InvalidArgument, match="at least"):
        s.push(speech(1, 5))
    s.push(speech(1, 28))
    tail = s.push([], last=True)                                   # empty last push: the held-back tail
    assert tail.shape == (HOLD,) and s.finished
    with pytest.raises(InvalidArgument, match="finished"):
        s.push(speech(1, 28))
    with pytest.raises(InvalidArgument, match="prompt_tokens"):
        t2w.stream(pt[:2], pm[:4], spk)
    short = t2w.stream(pt, pm, spk, noise=torch.randn(80, 40))    # prompt 20 frames + one 50-frame chunk > 40
    with pytest.raises(InvalidArgument, match="noise"):
        short.push(speech(1, 28))


def _block_mask(blocks, repeat=1):
    ids = torch.cat([torch.full((n * repeat,), i) for i, n in enumerate(blocks)])
    return (ids[None, :] <= ids[:, None])[None]


def _chunked_recompute(t2w, pt, pm, spk, toks, chunk_sizes):
    """The streaming procedure computed over the whole sequence at once: block-causal
    attention masks (prompt, then one block per chunk), the prompt's dummy lookahead
    (its own first 3 tokens), zero lookahead after the last token, the noise read from
    offset 0 (no trim happens before the third chunk)."""
    import torch.nn.functional as F

    flow = t2w.flow
    enc = flow.encoder
    la = flow.pre_lookahead_len
    P, N = len(pt), len(toks)
    e_prompt = enc.embed(flow.input_embedding(torch.cat([pt, pt[:la]])[None]))
    e_gen = enc.embed(flow.input_embedding(torch.tensor(toks)[None]))
    pre = enc.pre_lookahead_layer
    y = torch.cat([F.leaky_relu(pre.conv1(e_prompt.transpose(1, 2))),
                   F.leaky_relu(pre.conv1(F.pad(e_gen.transpose(1, 2), (0, la))))], dim=2)
    x = pre.conv2(F.pad(y, (2, 0))).transpose(1, 2) + torch.cat([e_prompt[:, :P], e_gen], dim=1)
    mask = _block_mask([P] + chunk_sizes)
    pos = enc.pos.get(P + N, x.device, x.dtype)
    for layer in enc.encoders:
        x, _ = layer(x, pos, None, mask)
    x = enc.up_embed(enc.up_layer(x.transpose(1, 2)).transpose(1, 2))
    mask2 = _block_mask([P] + chunk_sizes, repeat=2)
    pos = enc.pos.get(2 * (P + N), x.device, x.dtype)
    for layer in enc.up_encoders:
        x, _ = layer(x, pos, None, mask2)
    mu = flow.encoder_proj(enc.after_norm(x)).transpose(1, 2)
    cond = torch.zeros_like(mu)
    cond[:, :, :2 * P] = pm.T
    x0 = flow.rand_noise[:, :, :mu.shape[2]]
    dit_mask = _block_mask([2 * P] + [2 * c for c in chunk_sizes])
    out = flow.decoder.solve(x0, mu, flow.speaker(spk[None]), cond, mask=dit_mask)
    return out[0, :, 2 * P:]


@torch.inference_mode()
def test_streaming_equals_direct_recomputation(t2w):
    pt, pm, spk = voice(11, n_prompt=9)
    toks = speech(12, 25 + 25 + 6)
    s = t2w.stream(pt, pm, spk, deterministic=True)
    outs, mels, buf = [], [], list(toks)
    while len(buf) >= 28:
        outs.append(s.push(buf[:28]))
        mels.append(s.last_mel)
        buf = buf[25:]
    outs.append(s.push(buf, last=True))
    mels.append(s.last_mel)
    full = _chunked_recompute(t2w, pt, pm, spk, toks, [25, 25, 6])
    assert torch.cat(mels, dim=1).shape == full.shape
    assert (torch.cat(mels, dim=1) - full).abs().max() < 1e-4

    # the vocoder side: previous 8 mel frames prepended, source tail reused, Hamming cross-fade
    window = torch.from_numpy(np.hamming(2 * HOLD))
    mel_tail, src_tail, speech_tail, expect = torch.zeros(1, 80, 0), None, None, []
    for i, m in enumerate(mels):
        mel = torch.cat([mel_tail, m[None]], dim=2)
        wav, src = t2w.hift(mel, src_tail, deterministic=True)
        if speech_tail is not None:
            wav[:, :HOLD] = (wav[:, :HOLD] * window[:HOLD] + speech_tail * window[HOLD:]).float()
        mel_tail, src_tail, speech_tail = mel[:, :, -8:], src[:, :, -HOLD:], wav[:, -HOLD:]
        expect.append(wav[0] if i == len(mels) - 1 else wav[0, :-HOLD])
    for got, want in zip(outs, expect):
        assert (got - want.clamp(-1, 1)).abs().max() < 1e-6


def test_streaming_differs_from_offline_but_has_no_seams(t2w, folder):
    from stepaudio2.model.token2wav import Token2Wav

    pt, pm, spk = voice(21)
    toks = speech(22, 25 * 4 + 8)
    outs = run_stream(t2w.stream(pt, pm, spk, deterministic=True), toks)
    offline = t2w.vocode(t2w.flow_offline(toks, pt, pm, spk), deterministic=True)
    assert torch.cat(outs).shape == offline.shape
    assert not torch.allclose(torch.cat(outs), offline, atol=1e-3)        # causal chunks != full mask

    # Random tiny vocoders output near-white noise, where a seam cannot be told from any
    # other sample pair; keep only the two lowest ISTFT bins (DC, 1.5 kHz) so the signal is
    # smooth, then a seam shows as a jump. Control: a hard switch instead of the cross-fade.
    smooth = Token2Wav.from_pretrained(folder)
    with torch.no_grad():
        post = smooth.hift.conv_post
        post.weight[:9] *= 0.2
        post.bias[:9] = -30.0
        post.bias[:2] = 0.0
        post.weight[9:] *= 0.05

    def seam_ratio(window=None):
        if window is not None:
            smooth._window = window
        parts = run_stream(smooth.stream(pt, pm, spk, deterministic=True), toks)
        jumps = torch.cat(parts).diff().abs()
        seams = np.cumsum([p.shape[0] for p in parts])[:-1] - 1
        inside = torch.ones_like(jumps, dtype=torch.bool)
        inside[seams] = False
        return (jumps[seams].max() / jumps[inside].median()).item()

    assert seam_ratio() <= 3.0
    assert seam_ratio(torch.cat([torch.ones(HOLD), torch.zeros(HOLD)]).double()) > 3.0


def test_interleaved_streams_are_independent(t2w):
    va, vb = voice(31), voice(32, n_prompt=7)
    ta, tb = speech(33, 25 * 3 + 4), speech(34, 25 * 2 + 11)
    alone_a = run_stream(t2w.stream(*va, deterministic=True), ta)
    alone_b = run_stream(t2w.stream(*vb, deterministic=True), tb)
    sa, sb = t2w.stream(*va, deterministic=True), t2w.stream(*vb, deterministic=True)
    got_a, got_b = push_alternately([(sa, ta), (sb, tb)])
    assert len(got_a) == len(alone_a) and all(x.equal(y) for x, y in zip(got_a, alone_a))
    assert len(got_b) == len(alone_b) and all(x.equal(y) for x, y in zip(got_b, alone_b))


def test_push_batch_matches_single_streams(t2w):
    voices = [voice(41), voice(42, n_prompt=7), voice(43, n_prompt=12)]
    tokens = [speech(44, 25 * 3 + 5), speech(45, 25 + 10), speech(46, 25 * 2 + 17)]
    single = [run_stream(t2w.stream(*v, deterministic=True), t) for v, t in zip(voices, tokens)]
    streams = [t2w.stream(*v, deterministic=True) for v in voices]
    bufs = [list(t) for t in tokens]
    batched = [[] for _ in voices]
    while any(bufs):
        idx = [i for i, b in enumerate(bufs) if b]
        chunks = [bufs[i][:28] if len(bufs[i]) >= 28 else list(bufs[i]) for i in idx]
        lasts = [len(bufs[i]) < 28 for i in idx]
        for i, out in zip(idx, t2w.push_batch([streams[i] for i in idx], chunks, lasts)):
            batched[i].append(out)
            bufs[i] = bufs[i][25:] if len(bufs[i]) >= 28 else []
    for got, want in zip(batched, single):
        assert [g.shape for g in got] == [w.shape for w in want]
        # Batching pads chunks and caches of different lengths: float rounding, which the
        # vocoder's phase accumulation (cumsum of F0) amplifies in places. Bounds: the
        # PUBLIC_API streaming tolerance for the worst sample, and a mean 100x tighter
        # (seen: max 1e-3, mean 2e-5 on one CPU; max < 1e-4 on another).
        assert max((g - w).abs().max().item() for g, w in zip(got, want)) < 1e-2
        assert max((g - w).abs().mean().item() for g, w in zip(got, want)) < 1e-4
    with pytest.raises(InvalidArgument, match="once"):
        s = t2w.stream(*voices[0])
        t2w.push_batch([s, s], [speech(1, 28)] * 2)


# ------------------------------------------------------------------ checkpoints
def _tamper(path, fn):
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


@pytest.mark.parametrize("file,edit,message", [
    ("flow.pt", lambda sd: sd.pop("encoder.after_norm.weight"), "missing tensor 'encoder.after_norm.weight'"),
    ("flow.pt", lambda sd: sd.update({"encoder.extra.weight": torch.zeros(2)}),
     "unexpected tensor 'encoder.extra.weight'"),
    ("flow.pt", lambda sd: sd.update({"decoder.estimator.in_proj.weight": torch.zeros(32, 321)}),
     "'decoder.estimator.in_proj.weight' has shape (32, 321), expected (32, 320)"),
    ("hift.pt", lambda sd: sd.pop("ups.1.weight_g"), "missing tensor 'ups.1.weight_g'"),
    ("hift.pt", lambda sd: sd.pop("m_source.l_linear.bias"), "missing tensor 'm_source.l_linear.bias'"),
    ("hift.pt", lambda sd: sd.update({"resblocks.0.convs1.0.weight_v": torch.zeros(16, 16, 5)}),
     "'resblocks.0.convs1.0.weight_v' has shape (16, 16, 5), expected (16, 16, 3)"),
    ("hift.pt", lambda sd: sd.update({"source_downs.0.weight": torch.zeros(1)}), "source_downs.0.weight"),
    ("hift.pt", lambda sd: sd.update({"bogus": torch.zeros(1)}), "unexpected tensor 'bogus'"),
])
def test_loader_errors_name_the_tensor(tmp_path, file, edit, message):
    from stepaudio2.model.token2wav import Token2Wav, make_tiny_token2wav

    d = make_tiny_token2wav(tmp_path / "token2wav", seed=1)
    _tamper(d / file, edit)
    with pytest.raises(CheckpointError) as e:
        Token2Wav.from_pretrained(d)
    assert message in str(e.value)


def test_both_weight_norm_forms_and_prefix_load_the_same(tmp_path):
    from stepaudio2.model.token2wav import Token2Wav, make_tiny_token2wav

    mel = torch.randn(80, 12, generator=torch.Generator().manual_seed(0))
    wavs = []
    for form, prefix in (("weight_g", ""), ("parametrizations", "generator."), ("folded", "")):
        d = make_tiny_token2wav(tmp_path / form, seed=2, weight_norm_form=form, hift_prefix=prefix)
        keys = torch.load(d / "hift.pt", weights_only=True).keys()
        assert any(k.startswith(prefix + "conv_pre.") for k in keys)
        wavs.append(Token2Wav.from_pretrained(d).vocode(mel, deterministic=True))
    assert wavs[0].equal(wavs[1])                       # the same g and v, two layouts
    assert (wavs[0] - wavs[2]).abs().max() < 1e-3       # folded offline: rounding only


def test_yaml_tags_are_never_executed(tmp_path, folder):
    from stepaudio2.model.token2wav import Token2Wav
    from stepaudio2.model.token2wav.checkpoint import flow_config_from_data, parse_flow_yaml

    marker = tmp_path / "pwned"
    text = (folder / "flow.yaml").read_text()
    attacks = {
        "python_tag": f"boom: !!python/object/apply:os.system ['touch {marker}']\n" + text,
        "new_tag": text.replace("!new:cosyvoice2.flow.flow.CausalMaskedDiffWithXvec",
                                f"!new:os.system\n    command: touch {marker}\n    _x:", 1),
        "nested_new": text.replace("!new:cosyvoice2.flow.decoder_dit.DiT", "!new:subprocess.Popen"),
        "apply_tag": f"boom: !apply:os.system ['touch {marker}']\n" + text,
    }
    for name, bad in attacks.items():
        d = tmp_path / name
        d.mkdir()
        for f in ("flow.pt", "hift.pt"):
            (d / f).write_bytes((folder / f).read_bytes())
        (d / "flow.yaml").write_text(bad)
        if name == "apply_tag":     # harmless data where nobody reads it: loads, runs nothing
            Token2Wav.from_pretrained(d)
        else:
            with pytest.raises(CheckpointError):
                Token2Wav.from_pretrained(d)
        assert not marker.exists(), name
    data = parse_flow_yaml("width: 32\n" + text.replace("input_size: 32\n    output_size", "input_size: !ref <width>\n"
                                                        "    output_size", 1))
    assert flow_config_from_data(data).input_size == 32
    with pytest.raises(CheckpointError, match="flow.encoder.num_blocks"):
        flow_config_from_data(parse_flow_yaml(text.replace("num_blocks: 2", "num_blocks: !name:os.getcwd")))
    with pytest.raises(CheckpointError, match="not a supported setting"):
        flow_config_from_data(parse_flow_yaml(text.replace("num_blocks: 2", "num_blocks: 2\n        extra: 1")))


def test_package_import_is_lazy():
    code = "import sys, stepaudio2.model.token2wav as t; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_streams_from_one_prefill_equal_fresh_streams_and_stay_independent(t2w):
    v = voice(51)
    a_tokens, b_tokens = speech(52, 25 * 2 + 9), speech(53, 25 + 4)
    want_a = run_stream(t2w.stream(*v, deterministic=True), a_tokens)
    want_b = run_stream(t2w.stream(*v, deterministic=True), b_tokens)
    prefill = t2w.prefill(*v)
    att_before = prefill.cache.dit_att.clone()       # the live K/V region (the slack is uninitialised)
    sa = t2w.stream_from(prefill, deterministic=True)
    sb = t2w.stream_from(prefill, deterministic=True)
    got_a, got_b = push_alternately([(sa, a_tokens), (sb, b_tokens)])   # each stream must own its caches
    assert len(got_a) == len(want_a) and all(x.equal(y) for x, y in zip(got_a, want_a))
    assert len(got_b) == len(want_b) and all(x.equal(y) for x, y in zip(got_b, want_b))
    assert prefill.cache.dit_att.equal(att_before), "streams must not write into the shared prefill"
    other = type(t2w)(t2w.flow, t2w.hift)
    with pytest.raises(InvalidArgument, match="another"):
        other.stream_from(prefill)


def test_push_batch_vocodes_equal_shapes_together_with_per_stream_generators(t2w):
    """Same-shaped chunks share ONE vocoder call; seeded streams still get exactly their
    own random draws (the same audio as alone, up to batched-conv rounding)."""
    v = voice(61)
    tokens = [speech(62 + i, 25 * 2 + 3) for i in range(3)]
    alone = [run_stream(t2w.stream(*v, generator=torch.Generator().manual_seed(100 + i)), t)
             for i, t in enumerate(tokens)]
    prefill = t2w.prefill(*v)
    streams = [t2w.stream_from(prefill, generator=torch.Generator().manual_seed(100 + i)) for i in range(3)]
    calls = []
    real = t2w.hift.forward

    def counting(mel, *a, **k):
        calls.append(mel.shape[0])
        return real(mel, *a, **k)

    t2w.hift.forward = counting
    try:
        got = [[] for _ in tokens]
        bufs = [list(t) for t in tokens]
        while any(bufs):
            chunks = [b[:28] if len(b) >= 28 else list(b) for b in bufs]
            lasts = [len(b) < 28 for b in bufs]
            for g, out in zip(got, t2w.push_batch(streams, chunks, lasts)):
                g.append(out)
            bufs = [b[25:] if len(b) >= 28 else [] for b in bufs]
    finally:
        del t2w.hift.forward
    assert calls and all(n == 3 for n in calls), f"vocoder batch sizes {calls}"
    for g, a in zip(got, alone):
        assert [x.shape for x in g] == [y.shape for y in a]
        # batched-estimator rounding as in test_push_batch_matches_single_streams; a wrong
        # generator would change the random phases: differences of order 0.1-1
        assert max((x - y).abs().max().item() for x, y in zip(g, a)) < 1e-2
        assert max((x - y).abs().mean().item() for x, y in zip(g, a)) < 1e-4
