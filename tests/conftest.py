import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A deterministic tiny random checkpoint in the real on-disk format."""
    from stepaudio2.model.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "step-audio-2-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from stepaudio2.model import StepAudio2

    return StepAudio2.from_pretrained(tiny_ckpt)
