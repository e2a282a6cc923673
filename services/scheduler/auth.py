"""The front door's API keys and quotas as a gRPC server interceptor (the key ring and the
quota arithmetic are `services.scheduler.core.quota`).

A call to the public service or the admin service must carry ``authorization: Bearer <key>``
(or ``x-api-key: <key>``): a missing or unknown key is UNAUTHENTICATED, a key without ``admin``
calling the admin service PERMISSION_DENIED, a key over its rate or open-call limit
RESOURCE_EXHAUSTED with a ``retry-after-ms`` trailer. Health and reflection stay open (probes).
The key's name, never the key, goes on the call's span (``prism.api_key``) and on the
``prism_api_requests_total{key,code}`` counter. Stage services never take API keys: they are
reached only by the deployment's own processes (mutual TLS where configured).
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from opentelemetry import trace

from prism.runtime import metrics
from services.scheduler.core.quota import ApiKey, KeyRing, Quotas, Throttled
from services.scheduler.pipeline import StageError, abort

PUBLIC = "/prism.v1.PrismService/"
ADMIN = "/prism.v1.SchedulerAdminService/"


def presented_key(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for name, value in metadata or ():
        if isinstance(value, bytes):
            continue
        if name == "authorization" and value[:7].lower() == "bearer ":
            return value[7:].strip() or None
        if name == "x-api-key":
            return value.strip() or None
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, ring: KeyRing, quotas: Quotas | None = None):
        self.ring, self.quotas = ring, quotas or Quotas()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or not method.startswith((PUBLIC, ADMIN)):
            return handler
        admin = method.startswith(ADMIN)
        presented = presented_key(details.invocation_metadata)
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                lease, key = await self._admit(presented, admin, context)
                try:
                    return await inner(request, context)
                finally:
                    self._done(lease, key, context)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request, context) -> AsyncIterator[Any]:
                lease, key = await self._admit(presented, admin, context)
                try:
                    async for message in inner_stream(request, context):
                        yield message
                finally:
                    self._done(lease, key, context)

            return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer,
                                                        handler.response_serializer)
        return handler  # no client-streaming methods on these services

    async def _admit(self, presented: str | None, admin: bool, context: grpc.aio.ServicerContext):
        if presented is None:
            metrics.API_REQUESTS.labels("", "UNAUTHENTICATED").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "authorization: an API key is required ('authorization: Bearer <key>')")
        key = self.ring.lookup(presented)
        if key is None:
            metrics.API_REQUESTS.labels("", "UNAUTHENTICATED").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: unknown API key")
        trace.get_current_span().set_attribute("prism.api_key", key.name)
        if admin and not key.admin:
            metrics.API_REQUESTS.labels(key.name, "PERMISSION_DENIED").inc()
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"authorization: API key {key.name!r} may not call the admin service")
        try:
            return self.quotas.acquire(key), key
        except Throttled as exc:
            metrics.API_REQUESTS.labels(key.name, "RESOURCE_EXHAUSTED").inc()
            await abort(context, StageError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), retry_after_s=exc.retry_after_s))

    @staticmethod
    def _done(lease, key: ApiKey, context: grpc.aio.ServicerContext) -> None:
        lease.release()
        code = context.code()
        name = code.name if isinstance(code, grpc.StatusCode) else "OK" if code in (None, 0) else str(code)
        metrics.API_REQUESTS.labels(key.name, name).inc()
