"""pyproject lists every sub-package of services/ (the package-dir mapping needs it)."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"stepaudio2" + ("." + ".".join(p.parent.relative_to(ROOT / "services").parts)
                             if p.parent != ROOT / "services" else "")
             for p in (ROOT / "services").rglob("__init__.py")}
    assert found == listed


def test_generated_protos_import():
    from stepaudio2.v1 import common_pb2

    chunk = common_pb2.AudioChunk(data=b"x", encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000)
    assert common_pb2.AudioChunk.FromString(chunk.SerializeToString()).sample_rate_hz == 16000
