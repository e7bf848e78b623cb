"""Step-Audio 2 token2wav (detokenizer): speech tokens -> 24 kHz audio (PUBLIC_API.md).

``from stepaudio2.model.token2wav import Token2Wav``. Imports are lazy: importing this
package loads neither torch nor the model code until a name is used.

Modules: ``config`` (hyper-parameters, protocol constants), ``checkpoint`` (inert
``flow.yaml`` reading, strict ``flow.pt``/``hift.pt`` loading), ``encoder`` (token
encoder), ``dit`` (flow-matching estimator), ``flow`` (solver, offline and streaming,
caches), ``hift`` (vocoder), ``api`` (``Token2Wav``, streams, the batched
``Token2Wav.push_batch`` hook), ``features`` (``VoiceEncoder``: a reference clip ->
prompt tokens, CAM++ speaker embedding and prompt mel, through the two ONNX models),
``tiny`` (tiny random ``token2wav/`` folders, ONNX models included). Voices are stored by
the torch-free ``stepaudio2.runtime.voice_store``.

Not here yet (later parts of issue 4): the Triton ``token2wav`` / ``voice_encoder``
models and ``Synthesize``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

_LAZY = {
    "Token2Wav": "stepaudio2.model.token2wav.api",
    "Token2WavStream": "stepaudio2.model.token2wav.api",
    "VoiceEncoder": "stepaudio2.model.token2wav.features",
    "make_tiny_token2wav": "stepaudio2.model.token2wav.tiny",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from stepaudio2.model.token2wav.api import Token2Wav, Token2WavStream  # noqa: F401
    from stepaudio2.model.token2wav.features import VoiceEncoder  # noqa: F401
    from stepaudio2.model.token2wav.tiny import make_tiny_token2wav  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stepaudio2.model.token2wav' has no attribute {name!r}")
