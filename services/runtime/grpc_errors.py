"""Our error taxonomy on gRPC: the rich error model, in one place (reliability §2.7).

Every non-OK status our servicers send is a ``google.rpc.Status`` in the trailers with an
``ErrorInfo`` detail: ``reason`` is our stable error code (``INVALID_ARGUMENT``,
``UNSUPPORTED_MEDIA``, ``TOO_LARGE``...), ``domain`` is ``stepaudio2`` and
``metadata["field"]`` names the request field at fault when one is known (a
``BadRequest`` field violation says the same for generic clients). The gRPC status code
comes from :data:`stepaudio2.runtime.errors.ERROR_TABLE`.

Servicer methods wrap themselves in :func:`grpc_error_boundary`: our errors become their
status, cancellation propagates untouched, and any other exception is logged with an
error id and answered INTERNAL with only that id - internals never reach the caller.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import uuid
from typing import Any, Callable, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from stepaudio2.runtime.errors import StepAudio2Error

_LOGGER = logging.getLogger(__name__)

DOMAIN = "stepaudio2"


def rich_status(code: grpc.StatusCode, reason: str, message: str, *, field: str | None = None) -> grpc.Status:
    """A ``grpc.Status`` carrying ``google.rpc.Status`` with ErrorInfo (and BadRequest
    when a field is named) in its trailing metadata."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata={"field": field} if field else {})
    details = [info]
    if field:
        details.append(error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=message)]))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=packed))


def status_of(err: StepAudio2Error) -> grpc.Status:
    """The gRPC status of one of our errors (code from ERROR_TABLE, reason = ``err.code``)."""
    return rich_status(getattr(grpc.StatusCode, err.mapping.grpc), err.code, str(err), field=err.field)


async def abort_with_error(context: grpc.aio.ServicerContext, err: StepAudio2Error) -> NoReturn:
    """End the RPC with ``err``'s status (raises, as ``abort_with_status`` does)."""
    await context.abort_with_status(status_of(err))
    raise AssertionError("unreachable: abort_with_status raises")  # pragma: no cover


async def abort_internal(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> NoReturn:
    """Log an unexpected exception with a fresh error id; answer INTERNAL naming only the id."""
    error_id = uuid.uuid4().hex[:12]
    _LOGGER.error("unexpected error in %s (error id %s)", method, error_id, exc_info=exc)
    await context.abort_with_status(rich_status(
        grpc.StatusCode.INTERNAL, "INTERNAL", f"internal error (error id {error_id}); the server log has details"))
    raise AssertionError("unreachable: abort_with_status raises")  # pragma: no cover


def error_info(rpc_error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of a failed call, for clients and tests (None when absent)."""
    status = rpc_status.from_call(rpc_error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def _is_abort(exc: BaseException) -> bool:
    # grpc.aio raises AbortError out of context.abort*(); it must pass through untouched.
    return isinstance(exc, grpc.aio.AbortError)


async def _abort_for(context, exc: Exception, name: str) -> None:
    """The one mapping of an exception escaping a servicer method to the RPC's end."""
    if isinstance(exc, StepAudio2Error):
        await abort_with_error(context, exc)
    elif _is_abort(exc):
        raise exc
    else:
        await abort_internal(context, exc, name)


def grpc_error_boundary(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an async servicer method (``async def`` or async generator).

    StepAudio2Error -> its rich status; CancelledError (client cancel, deadline, server
    shutdown) propagates so grpc.aio tears the RPC down; other exceptions -> INTERNAL.
    """
    name = method.__qualname__

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await _abort_for(context, exc, name)
        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _abort_for(context, exc, name)
    return unary_wrapper
