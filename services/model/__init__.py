"""Step-Audio 2 in PyTorch: front end, encoder, adapter, Qwen2 decoder, tokenizer,
prompt builder, output parser, checkpoint I/O (PUBLIC_API.md, `stepaudio2.model`).

Nothing heavy is imported here: ``from stepaudio2.model import StepAudio2`` loads torch
on first use, while the torch-free modules (``audio``, ``tokenizer``, ``prompt``,
``parser``) stay light for the services (ARCHITECTURE.md, house rules).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

_LAZY = {
    "StepAudio2": "stepaudio2.model.modeling",
    "StepAudio2Net": "stepaudio2.model.modeling",
    "StepAudio2Config": "stepaudio2.model.config",
    "SamplingParams": "stepaudio2.model.sampling",
    "BatchGenerator": "stepaudio2.model.generation",
    "StepAudioTokenizer": "stepaudio2.model.tokenizer",
    "OutputParser": "stepaudio2.model.parser",
    "make_tiny_checkpoint": "stepaudio2.model.tiny",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from stepaudio2.model.config import StepAudio2Config  # noqa: F401
    from stepaudio2.model.generation import BatchGenerator  # noqa: F401
    from stepaudio2.model.modeling import StepAudio2, StepAudio2Net  # noqa: F401
    from stepaudio2.model.parser import OutputParser  # noqa: F401
    from stepaudio2.model.sampling import SamplingParams  # noqa: F401
    from stepaudio2.model.tiny import make_tiny_checkpoint  # noqa: F401
    from stepaudio2.model.tokenizer import StepAudioTokenizer  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stepaudio2.model' has no attribute {name!r}")
