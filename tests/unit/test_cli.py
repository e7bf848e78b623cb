"""The `stepaudio2` console script, run as a user runs it (a subprocess)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, env=None):
    exe = shutil.which("stepaudio2", path=str(Path(sys.executable).parent))
    assert exe, "console script `stepaudio2` is not installed in this environment"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def test_make_tiny_checkpoint_info_and_transcribe(tmp_path):
    d = tmp_path / "ckpt"
    r = cli("make-tiny-checkpoint", d, "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert (d / "config.json").exists() and "wrote tiny checkpoint" in r.stdout
    info = json.loads(cli("info", d).stdout)
    assert info["tensors"] == len(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"])
    assert info["special_tokens"]["audio_patch"] - info["special_tokens"]["eot"] == 151690 - 151665
    r = cli("transcribe", ROOT / "assets" / "demo_digits.wav", "--model-dir", d, "--json", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["generated_tokens"] <= 5 and out["prompt_tokens"] > 40  # 3.4 s of audio = 43 patches + markup


def test_errors_are_one_line_with_the_reason(tmp_path):
    r = cli("transcribe", ROOT / "assets" / "demo_digits.wav", "--model-dir", tmp_path / "nope")
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"this is not audio at all" * 10)
    r = cli("make-tiny-checkpoint", tmp_path / "c")
    r = cli("transcribe", bad, "--model-dir", tmp_path / "c")
    assert r.returncode == 2 and "UNSUPPORTED_MEDIA" in r.stderr and "Traceback" not in r.stderr


def test_synthesize_writes_speech_for_every_code(tmp_path):
    import soundfile as sf

    d = tmp_path / "ckpt"
    assert cli("make-tiny-checkpoint", d).returncode == 0
    out = tmp_path / "hello.flac"
    # random weights: drive speech codes with the allowed-token set and min_tokens
    r = cli("synthesize", "Hello there.", "--model-dir", d, "--out", out, "--voice", "default_male",
            "--speech-only", "--min-tokens", 40, "--max-new-tokens", 40, "--seed", 3)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["speech_codes"] == 40
    x, sr = sf.read(out)
    assert sr == 24_000 and x.shape == (40 * 960,) and abs(x).max() > 0
    r = cli("synthesize", "Hello", "--model-dir", d, "--out", tmp_path / "x.ogg")
    assert r.returncode == 2 and ".wav, .flac or .mp3" in r.stderr and "Traceback" not in r.stderr
    r = cli("synthesize", "Hello", "--model-dir", ROOT / "assets" / "demo-checkpoint", "--out", tmp_path / "y.wav")
    assert r.returncode == 2 and "token2wav" in r.stderr and "Traceback" not in r.stderr
