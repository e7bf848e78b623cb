"""`stepaudio2 demo` as a user runs it (a subprocess): the whole stack starts, the bundled
WAV is transcribed over HTTP and gRPC, and with a checkpoint that has token2wav/ the
transcript is spoken back through POST /v1/audio/speech into a WAV file."""
import shutil
import subprocess
import sys
from pathlib import Path

import soundfile as sf


def test_demo_with_a_speaking_checkpoint_writes_the_reply(tmp_path):
    from stepaudio2.model.tiny import make_tiny_checkpoint

    # "tiny-checkpoint" in the path: the demo knows the weights are random and drives the
    # speech codes with the allowed-token set (50 codes = 2 s).
    ckpt = make_tiny_checkpoint(tmp_path / "tiny-checkpoint", seed=0)
    exe = shutil.which("stepaudio2", path=str(Path(sys.executable).parent))
    out = tmp_path / "reply.wav"
    r = subprocess.run([exe, "demo", "--model-dir", str(ckpt), "--speech-out", str(out)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "TTS of" in r.stdout and "random weights: noise" in r.stdout
    data = out.read_bytes()
    assert data[:4] == b"RIFF" and (len(data) - 44) // 2 == 50 * 960
    # the streamed WAV header says "size unknown"; the samples are plain PCM16 after it
    assert sf.info(out).samplerate == 24_000
