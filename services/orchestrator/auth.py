"""API-key authentication for the public gRPC API (reliability §8.1).

* Keys are hashed at rest: the store keeps only ``sha256(key)`` per tenant; a presented
  key is hashed and compared with ``hmac.compare_digest`` against *every* stored hash (no
  early exit), so timing says nothing about which key or how much of it matched.
* Sources (all optional, merged): a settings string ``"tenant1:key1,tenant2:key2"``; a file
  of ``tenant:key`` lines; a directory with one file per tenant (a mounted Kubernetes
  Secret: file name = tenant id, each line one key). Anywhere a key goes, ``sha256:<hex>``
  gives its hash instead, so plaintext keys need never be written down.
* :class:`ApiKeyInterceptor` rejects calls without ``authorization: Bearer <key>`` with
  UNAUTHENTICATED (the same answer for a missing, malformed or unknown key); the health
  and reflection services are exempt. The tenant of an accepted key is available to the
  handler through :func:`current_tenant` - it comes only from the credential, never from
  the request body (reliability §8.2).
"""
from __future__ import annotations

import contextvars
import hashlib
import hmac
import inspect
import logging
import re
from pathlib import Path
from typing import Awaitable, Callable, Iterable

import grpc

from stepaudio2.runtime.errors import InvalidArgument, Unauthenticated
from stepaudio2.runtime.grpc_errors import status_of

_LOGGER = logging.getLogger(__name__)

HASH_PREFIX = "sha256:"
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Methods anyone may call: load balancers and probes have no key (reliability §8.1).
EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)

_tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("stepaudio2_tenant", default=None)


def current_tenant() -> str | None:
    """The authenticated tenant of the RPC being handled (None when auth is off)."""
    return _tenant.get()


def hash_key(key: str) -> str:
    """Hex sha256 of an API key: the only form in which keys are kept."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _digest_of(secret: str, where: str) -> bytes:
    """A key entry (raw key or ``sha256:<hex>``) -> the 32-byte digest."""
    secret = secret.strip()
    if secret.startswith(HASH_PREFIX):
        hexpart = secret[len(HASH_PREFIX):]
        if not _HEX64.match(hexpart):
            raise InvalidArgument(f"{where}: a pre-hashed key must be 'sha256:' followed by 64 hex digits")
        return bytes.fromhex(hexpart)
    if not secret:
        raise InvalidArgument(f"{where}: empty API key")
    return hashlib.sha256(secret.encode("utf-8")).digest()


def _check_tenant(tenant: str, where: str) -> str:
    tenant = tenant.strip()
    if not _TENANT.match(tenant):
        raise InvalidArgument(f"{where}: tenant id {tenant!r} must be 1-128 of A-Z a-z 0-9 . _ - "
                              "(starting with a letter or digit)")
    return tenant


class ApiKeyStore:
    """Tenants and the sha256 digests of their keys. Keys never stay in memory in clear."""

    def __init__(self) -> None:
        self._entries: list[tuple[bytes, str]] = []  # (digest, tenant)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tenants(self) -> set[str]:
        return {t for _, t in self._entries}

    def add(self, tenant: str, secret: str, *, where: str = "api key") -> None:
        """Add one key (raw, or ``sha256:<hex>``) for ``tenant``. The same key for two
        tenants is refused: it could not say who is calling."""
        tenant = _check_tenant(tenant, where)
        digest = _digest_of(secret, where)
        for d, t in self._entries:
            if hmac.compare_digest(d, digest):
                if t == tenant:
                    return
                raise InvalidArgument(f"{where}: the same API key is configured for tenants {t!r} and {tenant!r}")
        self._entries.append((digest, tenant))

    def authenticate(self, key: str) -> str | None:
        """The tenant of ``key``, or None. Compares with every stored digest, always."""
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found: str | None = None
        for d, tenant in self._entries:
            if hmac.compare_digest(d, digest):
                found = tenant
        return found

    # -- sources ---------------------------------------------------------------------------

    def add_pairs(self, lines: Iterable[str], *, source: str) -> None:
        """``tenant:key`` / ``tenant:sha256:<hex>`` entries; blank lines and ``#`` comments skipped."""
        for n, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            tenant, sep, secret = line.partition(":")
            if not sep:
                raise InvalidArgument(f"{source} entry {n}: expected 'tenant:key'")
            self.add(tenant, secret, where=f"{source} entry {n}")

    def add_string(self, value: str) -> None:
        """The settings form: ``"tenant1:key1,tenant2:key2"``."""
        self.add_pairs(value.split(","), source="api_keys setting")

    def add_file(self, path: str | Path) -> None:
        path = Path(path)
        try:
            text = path.read_text("utf-8")
        except OSError as exc:
            raise InvalidArgument(f"API key file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
        self.add_pairs(text.splitlines(), source=f"API key file {path.name!r}")

    def add_dir(self, path: str | Path) -> None:
        """A Kubernetes Secret volume: one file per tenant. The volume's own bookkeeping
        entries (``..data``, ``..2024_...`` and other dot names) are skipped; the visible
        names are symlinks into them and are followed."""
        path = Path(path)
        if not path.is_dir():
            raise InvalidArgument(f"API key directory {str(path)!r} does not exist or is not a directory")
        for f in sorted(path.iterdir()):
            if f.name.startswith(".") or not f.is_file():
                continue
            where = f"API key directory entry {f.name!r}"
            tenant = _check_tenant(f.name, where)
            try:
                lines = f.read_text("utf-8").splitlines()
            except OSError as exc:
                raise InvalidArgument(f"{where} cannot be read: {exc.strerror or exc}") from None
            keys = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
            if not keys:
                raise InvalidArgument(f"{where} holds no key")
            for k in keys:
                self.add(tenant, k, where=where)

    @classmethod
    def from_sources(cls, *, keys: str | None = None, file: str | Path | None = None,
                     directory: str | Path | None = None) -> "ApiKeyStore":
        store = cls()
        if keys:
            store.add_string(keys)
        if file:
            store.add_file(file)
        if directory:
            store.add_dir(directory)
        return store

    @classmethod
    def from_settings(cls, settings) -> "ApiKeyStore":
        """From an OrchestratorSettings (``api_keys``, ``api_keys_file``, ``api_keys_dir``)."""
        keys = settings.api_keys.get_secret_value() if settings.api_keys is not None else None
        return cls.from_sources(keys=keys, file=settings.api_keys_file, directory=settings.api_keys_dir)


def bearer_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The key of an ``authorization: Bearer <key>`` metadata entry, else None."""
    for name, value in metadata or ():
        if name.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, key = value.strip().partition(" ")
        if scheme.lower() == "bearer" and key.strip():
            return key.strip()
        return None
    return None


def _wrap(handler: grpc.RpcMethodHandler,
          wrap: Callable[[Callable], Callable]) -> grpc.RpcMethodHandler:
    """The same handler kind (unary/stream in and out) with its behaviour wrapped."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), handler.request_deserializer,
                                                   handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), handler.request_deserializer,
                                                    handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), handler.request_deserializer,
                                                 handler.response_serializer)


def _is_async_gen(fn: Callable) -> bool:
    return inspect.isasyncgenfunction(fn)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid bearer key (UNAUTHENTICATED with ErrorInfo reason
    ``UNAUTHENTICATED``); sets :func:`current_tenant` for the handler of an accepted one."""

    def __init__(self, store: ApiKeyStore, exempt_prefixes: tuple[str, ...] = EXEMPT_PREFIXES):
        self.store = store
        self.exempt_prefixes = exempt_prefixes

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(self.exempt_prefixes):
            return handler
        key = bearer_key(handler_call_details.invocation_metadata)
        tenant = self.store.authenticate(key) if key is not None else None
        if tenant is None:
            reason = "missing API key: send 'authorization: Bearer <key>' metadata" if key is None \
                else "invalid API key"
            _LOGGER.debug("rejected a call to %s: %s", method, reason)
            return _wrap(handler, lambda fn: _reject(fn, reason))
        return _wrap(handler, lambda fn: _with_tenant(fn, tenant))


def _reject(fn: Callable, reason: str) -> Callable:
    status = status_of(Unauthenticated(reason))
    if _is_async_gen(fn):
        async def reject_stream(request, context):
            await context.abort_with_status(status)
            yield  # pragma: no cover - makes this an async generator like the handler
        return reject_stream

    async def reject(request, context):
        await context.abort_with_status(status)
    return reject


def _with_tenant(fn: Callable, tenant: str) -> Callable:
    # The contextvar is set inside the handler's own task, so it is seen by everything the
    # handler awaits (and by tasks it creates, which copy the context).
    if _is_async_gen(fn):
        async def stream(request, context):
            _tenant.set(tenant)
            async for item in fn(request, context):
                yield item
        return stream

    async def call(request, context):
        _tenant.set(tenant)
        result = fn(request, context)
        return await result if inspect.isawaitable(result) else result
    return call
