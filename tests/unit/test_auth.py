"""API keys: hashed at rest, constant-time compare, every source, the gRPC interceptor."""
import asyncio
import hashlib

import grpc
import pytest

from stepaudio2.orchestrator.auth import ApiKeyInterceptor, ApiKeyStore, bearer_key, current_tenant, hash_key
from stepaudio2.runtime.errors import InvalidArgument
from stepaudio2.runtime.grpc_errors import error_info


def test_keys_are_kept_only_as_sha256():
    store = ApiKeyStore.from_sources(keys="acme:s3cret-key,globex:other-key")
    assert store.authenticate("s3cret-key") == "acme"
    assert store.authenticate("other-key") == "globex"
    assert store.authenticate("s3cret-ke") is None and store.authenticate("") is None
    state = repr(vars(store)).encode()
    assert b"s3cret-key" not in state and b"other-key" not in state
    assert hashlib.sha256(b"s3cret-key").digest() in [d for d, _ in store._entries]
    assert hash_key("s3cret-key") == hashlib.sha256(b"s3cret-key").hexdigest()


def test_compare_is_constant_time_over_all_hashes(monkeypatch):
    import hmac as hmac_module

    from stepaudio2.orchestrator import auth

    store = ApiKeyStore.from_sources(keys="a:k1,b:k2,c:k3")
    calls = []
    real = hmac_module.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda x, y: calls.append(1) or real(x, y))
    assert store.authenticate("k1") == "a"      # matches the first one, still compares all
    assert len(calls) == 3
    calls.clear()
    assert store.authenticate("nope") is None
    assert len(calls) == 3


def test_file_with_plain_and_prehashed_keys(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text(f"# tenants\n\nacme:plain-key\nglobex:sha256:{hash_key('hashed-key')}\n")
    store = ApiKeyStore.from_sources(file=f)
    assert store.authenticate("plain-key") == "acme"
    assert store.authenticate("hashed-key") == "globex"
    assert store.authenticate(f"sha256:{hash_key('hashed-key')}") is None  # the hash is not a key


def test_kubernetes_secret_directory(tmp_path):
    # The layout kubelet writes: a timestamped dir, the ..data symlink, one symlink per key.
    real = tmp_path / "..2026_01_01_00_00_00.123"
    real.mkdir()
    (real / "acme").write_text("key-a1\nkey-a2\n")
    (real / "globex").write_text(f"sha256:{hash_key('key-g')}")
    (tmp_path / "..data").symlink_to(real.name)
    for name in ("acme", "globex"):
        (tmp_path / name).symlink_to(f"..data/{name}")
    store = ApiKeyStore.from_sources(directory=tmp_path)
    assert store.tenants == {"acme", "globex"}
    assert store.authenticate("key-a1") == store.authenticate("key-a2") == "acme"
    assert store.authenticate("key-g") == "globex"


def test_sources_merge():
    store = ApiKeyStore.from_sources(keys="a:k1")
    store.add("b", "k2")
    store.add("a", "k1")  # the same entry twice is fine
    assert len(store) == 2


@pytest.mark.parametrize("keys, match", [
    ("acme", "expected 'tenant:key'"),
    ("acme:", "empty API key"),
    ("bad tenant:k", "tenant id"),
    ("acme:sha256:abc", "64 hex digits"),
    ("a:same,b:same", "the same API key"),
])
def test_bad_sources_fail_loudly(keys, match):
    with pytest.raises(InvalidArgument, match=match):
        ApiKeyStore.from_sources(keys=keys)


def test_missing_file_and_dir(tmp_path):
    with pytest.raises(InvalidArgument, match="cannot be read"):
        ApiKeyStore.from_sources(file=tmp_path / "nope")
    with pytest.raises(InvalidArgument, match="not a directory"):
        ApiKeyStore.from_sources(directory=tmp_path / "nope")
    (tmp_path / "acme").write_text("\n# nothing\n")
    with pytest.raises(InvalidArgument, match="holds no key"):
        ApiKeyStore.from_sources(directory=tmp_path)


def test_bearer_parsing():
    assert bearer_key([("authorization", "Bearer abc")]) == "abc"
    assert bearer_key([("x", "y"), ("authorization", "bearer  abc ")]) == "abc"
    assert bearer_key([("authorization", "Basic abc")]) is None
    assert bearer_key([("authorization", "Bearer ")]) is None
    assert bearer_key([]) is None and bearer_key(None) is None


# -- the interceptor on a real grpc.aio server (generic handlers, no proto needed) ----------

def _identity(x):
    return x


async def _with_server(store, body):
    async def whoami(request, context):
        return (current_tenant() or "-").encode()

    async def whoami_stream(request, context):
        for _ in range(2):
            yield (current_tenant() or "-").encode()

    handlers = grpc.method_handlers_generic_handler("test.Svc", {
        "Who": grpc.unary_unary_rpc_method_handler(whoami, _identity, _identity),
        "WhoStream": grpc.unary_stream_rpc_method_handler(whoami_stream, _identity, _identity),
    })
    health = grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(whoami, _identity, _identity),
    })
    server = grpc.aio.server(interceptors=[ApiKeyInterceptor(store)])
    server.add_generic_rpc_handlers([handlers, health])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await body(channel)
    finally:
        await server.stop(0)


def test_interceptor_rejects_and_sets_tenant():
    store = ApiKeyStore.from_sources(keys="acme:good-key")

    async def body(channel):
        who = channel.unary_unary("/test.Svc/Who")
        who_stream = channel.unary_stream("/test.Svc/WhoStream")
        assert await who(b"", metadata=[("authorization", "Bearer good-key")], timeout=5) == b"acme"
        got = [m async for m in who_stream(b"", metadata=[("authorization", "Bearer good-key")], timeout=5)]
        assert got == [b"acme", b"acme"]
        for md in ([], [("authorization", "Bearer wrong")], [("authorization", "good-key")]):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await who(b"", metadata=md, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert error_info(e.value).reason == "UNAUTHENTICATED"
            with pytest.raises(grpc.aio.AioRpcError) as e:
                [m async for m in who_stream(b"", metadata=md, timeout=5)]
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health is exempt: no key needed, and no tenant is set.
        assert await channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5) == b"-"

    asyncio.run(_with_server(store, body))
