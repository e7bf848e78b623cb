"""The voice library: named timbre prompts for token2wav, stored on disk or in S3.

Torch-free on purpose (numpy + soundfile only): the gateway and orchestrator list, read
and store voices without loading a model. Features are computed elsewhere
(:class:`stepaudio2.model.token2wav.features.VoiceEncoder`).

Layout, the same for both backends (``<prefix>`` is a folder or an S3 key prefix)::

    <prefix>/<voice_id>/voice.json      id, name, description, created, shapes, format version
    <prefix>/<voice_id>/features.npz    prompt_tokens int32 [N], prompt_mel float32 [2N, 80],
                                        speaker_embedding float32 [192]  (no pickles)
    <prefix>/<voice_id>/reference.wav   the recording the features came from

``voice.json`` is written last and removed first, so a voice is visible only when complete.
Our code speaks S3 only through the ``minio`` client.
"""
from __future__ import annotations

import abc
import io
import json
import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from stepaudio2.runtime.errors import InvalidArgument, NotFound, StepAudio2Error, Unavailable

VOICE_ID_RE = re.compile(r"[a-z0-9_-]{1,64}")
FORMAT_VERSION = 1
META_FILE, FEATURES_FILE, REFERENCE_FILE = "voice.json", "features.npz", "reference.wav"
MEL_BINS, SPEAKER_DIM, TOKEN_MEL_RATIO = 80, 192, 2
BUILTIN_VOICES = {
    "default_female": ("Default female", "Built-in voice (espeak-ng en-us+f3 reference clip)"),
    "default_male": ("Default male", "Built-in voice (espeak-ng en-us+m3 reference clip)"),
}
ASSETS_VOICES = Path(__file__).resolve().parents[2] / "assets" / "voices"


def check_voice_id(voice_id: Any) -> str:
    """The id itself when it is lowercase ``[a-z0-9_-]{1,64}``; else :class:`InvalidArgument`."""
    if not isinstance(voice_id, str) or not VOICE_ID_RE.fullmatch(voice_id):
        raise InvalidArgument(f"invalid voice id {voice_id!r}: use 1-64 characters from a-z, 0-9, '_' and '-'",
                              field="voice_id")
    return voice_id


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class CorruptVoice(StepAudio2Error):
    """A stored voice whose files are unreadable or inconsistent."""

    code = "INTERNAL"


@dataclass
class Voice:
    """One voice: what token2wav needs (prompt tokens, prompt mel with exactly 2 frames per
    token, speaker embedding) plus its name and description."""

    voice_id: str
    name: str
    description: str
    prompt_tokens: np.ndarray            # int32 [N]
    prompt_mel: np.ndarray               # float32 [2N, 80]
    speaker_embedding: np.ndarray        # float32 [192]
    created: str = field(default_factory=utc_now)   # ISO 8601, UTC
    owner: str = ""                      # the tenant that registered it ("" = built-in / no auth)

    def __post_init__(self):
        check_voice_id(self.voice_id)
        self.prompt_tokens = np.ascontiguousarray(np.asarray(self.prompt_tokens).reshape(-1), dtype=np.int32)
        self.prompt_mel = np.ascontiguousarray(self.prompt_mel, dtype=np.float32)
        self.speaker_embedding = np.ascontiguousarray(np.asarray(self.speaker_embedding).reshape(-1),
                                                      dtype=np.float32)
        n = self.prompt_tokens.shape[0]
        if n == 0:
            raise InvalidArgument("a voice needs at least one prompt token", field="prompt_tokens")
        if self.prompt_mel.shape != (TOKEN_MEL_RATIO * n, MEL_BINS):
            raise InvalidArgument(f"expected [{TOKEN_MEL_RATIO * n}, {MEL_BINS}] (2 frames per prompt token), "
                                  f"got {tuple(self.prompt_mel.shape)}", field="prompt_mel")
        if self.speaker_embedding.shape != (SPEAKER_DIM,):
            raise InvalidArgument(f"expected {SPEAKER_DIM} values, got {self.speaker_embedding.size}",
                                  field="speaker_embedding")

    # ------------------------------------------------------------ serialisation
    def metadata(self) -> dict:
        return {"voice_id": self.voice_id, "name": self.name, "description": self.description,
                "created": self.created, "num_prompt_tokens": int(self.prompt_tokens.shape[0]),
                "owner": self.owner, "format_version": FORMAT_VERSION}

    def meta_bytes(self) -> bytes:
        return (json.dumps(self.metadata(), indent=2, ensure_ascii=False) + "\n").encode()

    def features_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, prompt_tokens=self.prompt_tokens, prompt_mel=self.prompt_mel,
                 speaker_embedding=self.speaker_embedding)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, meta: bytes, features: bytes, where: str = "") -> Voice:
        try:
            m = json.loads(meta.decode())
            if m.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {m.get('format_version')!r} is not {FORMAT_VERSION}")
            with np.load(io.BytesIO(features), allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("prompt_tokens", "prompt_mel", "speaker_embedding")}
            return cls(voice_id=m["voice_id"], name=m["name"], description=m["description"],
                       created=m["created"], owner=str(m.get("owner") or ""), **arrays)
        except (ValueError, KeyError, TypeError, OSError, InvalidArgument) as e:
            raise CorruptVoice(f"stored voice {where or '?'} is unreadable: {e}") from None


def _check_wav(wav_bytes: Any) -> bytes:
    if not isinstance(wav_bytes, (bytes, bytearray, memoryview)) or len(wav_bytes) == 0:
        raise InvalidArgument("the reference recording must be non-empty bytes", field="reference")
    return bytes(wav_bytes)


# ----------------------------------------------------------------------------- stores
class VoiceStore(abc.ABC):
    """put / get / list / delete voices by id."""

    @abc.abstractmethod
    def put(self, voice: Voice, wav_bytes: bytes) -> None:
        """Store (or replace) ``voice`` with its reference recording."""

    @abc.abstractmethod
    def get(self, voice_id: str) -> Voice:
        """The voice, or :class:`NotFound` naming the id."""

    @abc.abstractmethod
    def list(self) -> list[str]:
        """The ids of every stored voice, sorted."""

    @abc.abstractmethod
    def delete(self, voice_id: str) -> None:
        """Remove the voice, or :class:`NotFound` naming the id."""

    @abc.abstractmethod
    def reference(self, voice_id: str) -> bytes:
        """The stored reference recording, or :class:`NotFound`."""

    def exists(self, voice_id: str) -> bool:
        return check_voice_id(voice_id) in self.list()


def _not_found(voice_id: str) -> NotFound:
    return NotFound(f"voice {voice_id!r} does not exist", field="voice_id")


class LocalVoiceStore(VoiceStore):
    """Voices as folders under ``folder`` (created when missing)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _dir(self, voice_id: str) -> Path:
        return self.folder / check_voice_id(voice_id)

    def put(self, voice: Voice, wav_bytes: bytes) -> None:
        wav = _check_wav(wav_bytes)
        final = self._dir(voice.voice_id)
        tmp = Path(tempfile.mkdtemp(prefix=f".{voice.voice_id}.", dir=self.folder))
        try:
            (tmp / FEATURES_FILE).write_bytes(voice.features_bytes())
            (tmp / REFERENCE_FILE).write_bytes(wav)
            (tmp / META_FILE).write_bytes(voice.meta_bytes())
            if final.exists():
                old = final.with_name(f".{voice.voice_id}.old-{os.getpid()}-{threading.get_ident()}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def get(self, voice_id: str) -> Voice:
        d = self._dir(voice_id)
        try:
            meta = (d / META_FILE).read_bytes()
            feats = (d / FEATURES_FILE).read_bytes()
        except FileNotFoundError:
            raise _not_found(voice_id) from None
        return Voice.from_bytes(meta, feats, where=str(d))

    def reference(self, voice_id: str) -> bytes:
        d = self._dir(voice_id)
        if not (d / META_FILE).is_file():
            raise _not_found(voice_id)
        try:
            return (d / REFERENCE_FILE).read_bytes()
        except FileNotFoundError:
            raise _not_found(voice_id) from None

    def list(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir()
                      if VOICE_ID_RE.fullmatch(p.name) and (p / META_FILE).is_file())

    def exists(self, voice_id: str) -> bool:
        return (self._dir(voice_id) / META_FILE).is_file()

    def delete(self, voice_id: str) -> None:
        d = self._dir(voice_id)
        try:
            (d / META_FILE).unlink()
        except FileNotFoundError:
            raise _not_found(voice_id) from None
        shutil.rmtree(d, ignore_errors=True)


def _transport_errors() -> tuple[type[BaseException], ...]:
    try:
        from urllib3.exceptions import HTTPError       # minio's HTTP layer
    except ImportError:  # pragma: no cover
        return (OSError,)
    return (OSError, HTTPError)


_TRANSPORT_ERRORS = _transport_errors()
_MISSING_CODES = ("NoSuchKey", "NoSuchObject", "NotFound", "NoSuchBucket")


class S3VoiceStore(VoiceStore):
    """Voices under ``<prefix>/`` in an S3 bucket, through a ``minio.Minio`` client. The
    bucket is created when missing (``create_bucket``)."""

    def __init__(self, client, bucket: str, prefix: str = "voices", *, create_bucket: bool = True):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if create_bucket:
            self._call(lambda: client.bucket_exists(bucket) or client.make_bucket(bucket), "open the bucket")

    def _key(self, voice_id: str, name: str) -> str:
        vid = check_voice_id(voice_id)
        return f"{self.prefix}/{vid}/{name}" if self.prefix else f"{vid}/{name}"

    def _call(self, fn, what: str):
        from minio.error import MinioException

        try:
            return fn()
        except MinioException as e:
            raise Unavailable(f"voice store (s3://{self.bucket}) could not {what}: {e}") from None
        except _TRANSPORT_ERRORS as e:    # connection refused, timeouts, retries exhausted on 5xx
            raise Unavailable(f"voice store (s3://{self.bucket}) could not {what}: {e}") from None

    def _get_bytes(self, key: str, voice_id: str) -> bytes:
        from minio.error import MinioException, S3Error

        def fetch():
            resp = self.client.get_object(self.bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()
        try:
            return fetch()
        except S3Error as e:
            if e.code in _MISSING_CODES:
                raise _not_found(voice_id) from None
            raise Unavailable(f"voice store (s3://{self.bucket}) could not read {key}: {e}") from None
        except (MinioException, *_TRANSPORT_ERRORS) as e:
            raise Unavailable(f"voice store (s3://{self.bucket}) could not read {key}: {e}") from None

    def _put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self._call(lambda: self.client.put_object(self.bucket, key, io.BytesIO(data), len(data),
                                                  content_type=content_type), f"write {key}")

    def put(self, voice: Voice, wav_bytes: bytes) -> None:
        wav = _check_wav(wav_bytes)
        vid = voice.voice_id
        self._put_bytes(self._key(vid, FEATURES_FILE), voice.features_bytes(), "application/octet-stream")
        self._put_bytes(self._key(vid, REFERENCE_FILE), wav, "audio/wav")
        self._put_bytes(self._key(vid, META_FILE), voice.meta_bytes(), "application/json")

    def get(self, voice_id: str) -> Voice:
        meta = self._get_bytes(self._key(voice_id, META_FILE), voice_id)
        feats = self._get_bytes(self._key(voice_id, FEATURES_FILE), voice_id)
        return Voice.from_bytes(meta, feats, where=f"s3://{self.bucket}/{self._key(voice_id, '')}")

    def reference(self, voice_id: str) -> bytes:
        self._get_bytes(self._key(voice_id, META_FILE), voice_id)
        return self._get_bytes(self._key(voice_id, REFERENCE_FILE), voice_id)

    def list(self) -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        objs = self._call(lambda: list(self.client.list_objects(self.bucket, prefix=base, recursive=True)),
                          "list voices")
        ids = set()
        for o in objs:
            rest = o.object_name[len(base):]
            vid, _, name = rest.partition("/")
            if name == META_FILE and VOICE_ID_RE.fullmatch(vid):
                ids.add(vid)
        return sorted(ids)

    def exists(self, voice_id: str) -> bool:
        from minio.error import MinioException, S3Error

        key = self._key(voice_id, META_FILE)
        try:
            self.client.stat_object(self.bucket, key)
            return True
        except S3Error as e:
            if e.code in _MISSING_CODES:
                return False
            raise Unavailable(f"voice store (s3://{self.bucket}) could not stat {key}: {e}") from None
        except (MinioException, *_TRANSPORT_ERRORS) as e:
            raise Unavailable(f"voice store (s3://{self.bucket}) could not stat {key}: {e}") from None

    def delete(self, voice_id: str) -> None:
        if not self.exists(voice_id):
            raise _not_found(voice_id)
        for name in (META_FILE, FEATURES_FILE, REFERENCE_FILE):       # voice.json first: invisible at once
            key = self._key(voice_id, name)
            self._call(lambda k=key: self.client.remove_object(self.bucket, k), f"delete {key}")


class CachedVoiceStore(VoiceStore):
    """A bounded LRU cache of :meth:`get` results in front of another store (thread-safe).
    ``put`` and ``delete`` go through and update the cache; ``list`` is not cached."""

    def __init__(self, store: VoiceStore, max_items: int = 64, ttl_s: float | None = None, clock=None):
        if int(max_items) < 1:
            raise InvalidArgument(f"max_items must be at least 1, got {max_items}", field="max_items")
        import time

        self.store = store
        self.max_items = int(max_items)
        # Entries older than this are fetched again: another process (the orchestrator)
        # may delete or replace a voice; None = keep until evicted.
        self.ttl_s = ttl_s
        self._clock = clock or time.monotonic
        self._cache: OrderedDict[str, Voice] = OrderedDict()
        self._stamp: dict[str, float] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    def cached_ids(self) -> list[str]:
        with self._lock:
            return list(self._cache)

    def _fresh(self, voice_id: str) -> bool:
        """Cached recently enough (call with the lock held)."""
        return self.ttl_s is None or self._clock() - self._stamp.get(voice_id, float("-inf")) <= self.ttl_s

    def _remember(self, voice: Voice) -> None:
        with self._lock:
            self._cache[voice.voice_id] = voice
            self._stamp[voice.voice_id] = self._clock()
            self._cache.move_to_end(voice.voice_id)
            while len(self._cache) > self.max_items:
                old, _ = self._cache.popitem(last=False)
                self._stamp.pop(old, None)

    def get(self, voice_id: str) -> Voice:
        check_voice_id(voice_id)
        with self._lock:
            v = self._cache.get(voice_id)
            if v is not None and not self._fresh(voice_id):
                del self._cache[voice_id]
                self._stamp.pop(voice_id, None)
                v = None
            if v is not None:
                self._cache.move_to_end(voice_id)
                self.hits += 1
                return v
            self.misses += 1
        v = self.store.get(voice_id)
        self._remember(v)
        return v

    def put(self, voice: Voice, wav_bytes: bytes) -> None:
        self.store.put(voice, wav_bytes)
        self._remember(voice)

    def delete(self, voice_id: str) -> None:
        with self._lock:
            self._cache.pop(voice_id, None)
            self._stamp.pop(voice_id, None)
        self.store.delete(voice_id)

    def list(self) -> list[str]:
        return self.store.list()

    def exists(self, voice_id: str) -> bool:
        with self._lock:
            if voice_id in self._cache and self._fresh(voice_id):
                return True
        return self.store.exists(voice_id)

    def reference(self, voice_id: str) -> bytes:
        return self.store.reference(voice_id)


# ----------------------------------------------------------------------------- settings
class VoiceStoreSettings(BaseSettings):
    """``STEPAUDIO2_VOICES_*``. With ``S3_ENDPOINT`` set, voices live in S3; otherwise in
    ``LOCAL_FOLDER``."""

    model_config = SettingsConfigDict(env_prefix="STEPAUDIO2_VOICES_", extra="ignore")

    s3_endpoint: str | None = None          # "host:port", no scheme
    s3_access_key: str = ""
    s3_secret_key: SecretStr = SecretStr("")
    s3_bucket: str = "stepaudio2"
    s3_prefix: str = "voices"
    s3_secure: bool = False                 # https
    s3_region: str = "us-east-1"
    local_folder: Path = Path(".cache/voices")
    cache_items: int = 64                   # LRU of decoded voices; 0 disables the cache
    cache_ttl_s: float = 30.0               # cached voices older than this are re-read (deletes elsewhere)


def open_voice_store(settings: VoiceStoreSettings | None = None) -> VoiceStore:
    """The store the settings describe, behind an LRU cache unless ``cache_items`` is 0."""
    s = settings or VoiceStoreSettings()
    if s.s3_endpoint:
        from minio import Minio

        client = Minio(s.s3_endpoint, access_key=s.s3_access_key or None,
                       secret_key=s.s3_secret_key.get_secret_value() or None, secure=s.s3_secure, region=s.s3_region)
        store: VoiceStore = S3VoiceStore(client, s.s3_bucket, s.s3_prefix)
    else:
        store = LocalVoiceStore(s.local_folder)
    return CachedVoiceStore(store, s.cache_items, s.cache_ttl_s) if s.cache_items > 0 else store


# ----------------------------------------------------------------------------- built-ins
def ensure_builtin_voices(store: VoiceStore, encoder, assets_dir: str | Path | None = None) -> list[str]:
    """Register the built-in voices (``assets/voices/<id>.wav``) that ``store`` lacks, with
    features from ``encoder`` (a ``VoiceEncoder`` of the served checkpoint: features depend
    on its ONNX models). Returns the ids it added."""
    folder = Path(assets_dir) if assets_dir is not None else ASSETS_VOICES
    added = []
    for vid, (name, description) in BUILTIN_VOICES.items():
        if store.exists(vid):
            continue
        wav = (folder / f"{vid}.wav").read_bytes()
        voice = encoder.encode(wav, voice_id=vid, name=name, description=description)
        store.put(voice, wav)
        added.append(vid)
    return added
