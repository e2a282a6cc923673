"""Sync (:class:`PrismClient`) and asyncio (:class:`AsyncPrismClient`) clients of PrismService.

::

    with PrismClient("localhost:50051") as client:
        for chunk in client.generate("Describe the image.", images=["cat.png"], max_new_tokens=64):
            print(chunk.text, end="", flush=True)
        print(client.complete(messages=[{"role": "user", "content": "Hi"}]).text)

    async with AsyncPrismClient("localhost:50051") as client:
        async for chunk in client.generate("Hello"):
            ...

Failed calls raise :mod:`prism.client.errors` types. A stream stops cleanly after
``stream.cancel()`` (or leaving its ``with`` block), and the server sees the cancellation.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc

from prism.client.errors import from_rpc_error
from prism.client.request import Reduce, build_request
from prism.client.types import Completion, ModelList, TokenChunk
from prism.v1 import prism_pb2, prism_pb2_grpc

Metadata = Sequence[tuple[str, str | bytes]] | Mapping[str, str | bytes]

# The keyword arguments of generate()/complete() that go into the request.
_REQUEST_KWARGS = (
    "reduce",
    "messages",
    "images",
    "audios",
    "model",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "ttft_ms",
    "tpot_ms",
    "deadline_ms",
    "priority",
    "variant",
    "request_id",
    "add_generation_prompt",
)


def _metadata(metadata: Metadata | None) -> list[tuple[str, str | bytes]]:
    if not metadata:
        return []
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    return [(str(k).lower(), v) for k, v in items]


class _Base:
    def __init__(self, target: str, timeout: float | None, metadata: Metadata | None, credentials, options,
                 api_key: str | None = None):
        if not isinstance(target, str) or not target:
            raise TypeError("target must be a 'host:port' string")
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise TypeError("api_key must be a non-empty string")
        self.target = target
        self.timeout = timeout
        self.metadata = _metadata(metadata)
        if api_key is not None:  # sent with every call; the server keeps only its hash
            self.metadata.append(("authorization", f"Bearer {api_key.strip()}"))
        self._credentials = credentials
        self._options = list(options or ())

    def _call_args(self, timeout: float | None, metadata: Metadata | None) -> dict[str, Any]:
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "metadata": tuple(self.metadata + _metadata(metadata)) or None,
        }


class _Resume:
    """How a stream resumes after UNAVAILABLE (a scheduler restart): the same request is sent
    again (same request_id), the server replays the chunks it stored, and those the caller
    already has are skipped. Shared by the sync and asyncio streams."""

    def __init__(self, restart, max_resumes: int, delay_s: float):
        self._restart = restart
        self._left = max_resumes
        self._delay = delay_s
        self._received = 0  # chunks handed to the caller
        self._skip = 0  # replayed chunks still to skip after a resume

    def delay_for(self, err: grpc.RpcError) -> float | None:
        """Seconds to wait before resuming after `err`, or None when it cannot be resumed."""
        if (err.code() != grpc.StatusCode.UNAVAILABLE or self._restart is None or self._left <= 0
                or not self._received):  # refused before any chunk: the caller decides
            return None
        self._left -= 1
        delay, self._delay = self._delay, min(self._delay * 2, 8.0)
        return delay

    def restart(self):
        self._skip = self._received
        return self._restart()

    def deliver(self, msg) -> bool:
        """False for a replayed chunk the caller already has."""
        if self._skip > 0 and not msg.finish_reason:
            self._skip -= 1
            return False
        self._skip = 0
        self._received += 1
        return True


class TokenStream(Iterator[TokenChunk]):
    """Iterator over a sync ``Generate`` call. ``cancel()`` ends it (quietly) and cancels the
    call on the server; use it as a context manager to cancel an unfinished stream on exit.

    A stream that breaks with UNAVAILABLE (the scheduler restarted) is resumed: the same request
    (same ``request_id``) is sent again, the server replays the stream it stored, and the chunks
    already received are skipped, so the caller sees each token exactly once."""

    def __init__(self, call, restart=None, max_resumes: int = 6, resume_delay_s: float = 0.25):
        self._call = call
        self._resume = _Resume(restart, max_resumes, resume_delay_s)
        self._cancelled = False
        self._done = False

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> TokenChunk:
        while True:
            if self._done:
                raise StopIteration
            try:
                msg = next(self._call)
            except StopIteration:
                self._done = True
                raise
            except grpc.RpcError as e:
                if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                    self._done = True
                    raise StopIteration from None
                delay = self._resume.delay_for(e)
                if delay is not None:
                    time.sleep(delay)
                    self._call = self._resume.restart()
                    continue
                self._done = True
                raise from_rpc_error(e) from None
            if self._resume.deliver(msg):
                return TokenChunk.from_proto(msg)

    def cancel(self) -> None:
        """Stop the stream; the server's handler is cancelled."""
        if not self._done:
            self._cancelled = True
            self._call.cancel()

    close = cancel

    def collect(self) -> Completion:
        """Read the rest of the stream into one :class:`Completion`."""
        return Completion.from_chunks(list(self))

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


class AsyncTokenStream:
    """Async iterator over a ``grpc.aio`` ``Generate`` call; see :class:`TokenStream` (it
    resumes the same way)."""

    def __init__(self, call, restart=None, max_resumes: int = 6, resume_delay_s: float = 0.25):
        self._call = call
        self._resume = _Resume(restart, max_resumes, resume_delay_s)
        self._cancelled = False
        self._done = False

    def __aiter__(self) -> AsyncTokenStream:
        return self

    async def __anext__(self) -> TokenChunk:
        while True:
            if self._done:
                raise StopAsyncIteration
            try:
                msg = await self._call.read()
            except asyncio.CancelledError:
                if self._cancelled:  # our own cancel(): end quietly
                    self._done = True
                    raise StopAsyncIteration from None
                raise
            except grpc.RpcError as e:
                if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                    self._done = True
                    raise StopAsyncIteration from None
                delay = self._resume.delay_for(e)
                if delay is not None:
                    await asyncio.sleep(delay)
                    self._call = self._resume.restart()
                    continue
                self._done = True
                raise from_rpc_error(e) from None
            if msg is grpc.aio.EOF:
                self._done = True
                raise StopAsyncIteration
            if self._resume.deliver(msg):
                return TokenChunk.from_proto(msg)

    def cancel(self) -> None:
        if not self._done:
            self._cancelled = True
            self._call.cancel()

    close = cancel

    async def collect(self) -> Completion:
        return Completion.from_chunks([c async for c in self])

    async def __aenter__(self) -> AsyncTokenStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()


class PrismClient(_Base):
    """Blocking client. ``timeout`` (seconds) and ``metadata`` apply to every call unless a call
    gives its own (call metadata is added to the client's). ``credentials``: a
    ``grpc.ChannelCredentials`` for TLS (insecure otherwise); ``options``: channel options;
    ``api_key``: the deployment's key for this caller (sent as ``authorization: Bearer``)."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        api_key: str | None = None,
    ):
        super().__init__(target, timeout, metadata, credentials, options, api_key)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=self._options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=self._options)
        self._stub = prism_pb2_grpc.PrismServiceStub(self._channel)

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Any] | None = None,
        images: Any = (),
        audios: Any = (),
        model: str = "",
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        ttft_ms: int = 0,
        tpot_ms: int = 0,
        deadline_ms: int = 0,
        priority: int = 0,
        reduce: Reduce | None = None,
        variant: str = "",
        request_id: str = "",
        add_generation_prompt: bool | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> TokenStream:
        """Stream tokens as they are generated (a :class:`TokenStream` of :class:`TokenChunk`).
        Request arguments as in :func:`prism.client.build_request`."""
        kw = {k: v for k, v in locals().items() if k in _REQUEST_KWARGS}
        kw["request_id"] = request_id or secrets.token_hex(12)  # the key a resumed stream re-attaches with
        req = build_request(prompt, **kw)
        args = self._call_args(timeout, metadata)
        return TokenStream(self._stub.Generate(req, **args), lambda: self._stub.Generate(req, **args))

    def complete(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Any] | None = None,
        images: Any = (),
        audios: Any = (),
        model: str = "",
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        ttft_ms: int = 0,
        tpot_ms: int = 0,
        deadline_ms: int = 0,
        priority: int = 0,
        reduce: Reduce | None = None,
        variant: str = "",
        request_id: str = "",
        add_generation_prompt: bool | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> Completion:
        """The whole completion at once (``GenerateUnary``)."""
        kw = {k: v for k, v in locals().items() if k in _REQUEST_KWARGS}
        req = prism_pb2.GenerateUnaryRequest(request=build_request(prompt, **kw))
        try:
            resp = self._stub.GenerateUnary(req, **self._call_args(timeout, metadata))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return Completion.from_proto(resp)

    def list_models(self, *, timeout: float | None = None, metadata: Metadata | None = None) -> ModelList:
        """The models this deployment serves and its default model."""
        try:
            resp = self._stub.ListModels(prism_pb2.ListModelsRequest(), **self._call_args(timeout, metadata))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return ModelList.from_proto(resp)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PrismClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncPrismClient(_Base):
    """asyncio client on ``grpc.aio`` (same arguments as :class:`PrismClient`). Create it inside
    the event loop that uses it."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        api_key: str | None = None,
    ):
        super().__init__(target, timeout, metadata, credentials, options, api_key)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=self._options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=self._options)
        self._stub = prism_pb2_grpc.PrismServiceStub(self._channel)

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Any] | None = None,
        images: Any = (),
        audios: Any = (),
        model: str = "",
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        ttft_ms: int = 0,
        tpot_ms: int = 0,
        deadline_ms: int = 0,
        priority: int = 0,
        reduce: Reduce | None = None,
        variant: str = "",
        request_id: str = "",
        add_generation_prompt: bool | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> AsyncTokenStream:
        """``async for chunk in client.generate(...)`` (an :class:`AsyncTokenStream`)."""
        kw = {k: v for k, v in locals().items() if k in _REQUEST_KWARGS}
        kw["request_id"] = request_id or secrets.token_hex(12)  # the key a resumed stream re-attaches with
        req = build_request(prompt, **kw)
        args = self._call_args(timeout, metadata)
        return AsyncTokenStream(self._stub.Generate(req, **args), lambda: self._stub.Generate(req, **args))

    async def complete(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Any] | None = None,
        images: Any = (),
        audios: Any = (),
        model: str = "",
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        ttft_ms: int = 0,
        tpot_ms: int = 0,
        deadline_ms: int = 0,
        priority: int = 0,
        reduce: Reduce | None = None,
        variant: str = "",
        request_id: str = "",
        add_generation_prompt: bool | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> Completion:
        kw = {k: v for k, v in locals().items() if k in _REQUEST_KWARGS}
        req = prism_pb2.GenerateUnaryRequest(request=build_request(prompt, **kw))
        try:
            resp = await self._stub.GenerateUnary(req, **self._call_args(timeout, metadata))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return Completion.from_proto(resp)

    async def list_models(
        self, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> ModelList:
        try:
            resp = await self._stub.ListModels(
                prism_pb2.ListModelsRequest(), **self._call_args(timeout, metadata)
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return ModelList.from_proto(resp)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncPrismClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


__all__ = ["AsyncPrismClient", "AsyncTokenStream", "PrismClient", "TokenStream"]
