"""Prism Python SDK: grpcio and protobuf only (numpy and PIL are used only when you pass such
objects; torch never).

::

    from prism.client import PrismClient

    with PrismClient("localhost:50051", timeout=60) as client:
        for chunk in client.generate("What is in the image?", images=["cat.png"], max_new_tokens=64):
            print(chunk.text, end="", flush=True)
        reply = client.complete(messages=[{"role": "user", "content": [
            {"type": "text", "text": "Transcribe:"}, {"type": "audio", "audio": "clip.wav"}]}])

Errors are :class:`PrismError` subclasses (``prism.client.errors``); ``AsyncPrismClient`` is the
asyncio twin; ``build_request`` gives the request proto alone.
"""

from prism.client.client import AsyncPrismClient, AsyncTokenStream, PrismClient, TokenStream
from prism.client.errors import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    PrismError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
    from_rpc_error,
)
from prism.client.media import to_audio, to_image, to_pcm
from prism.client.request import Reduce, build_chat, build_request
from prism.client.types import Completion, ModelInfo, ModelList, Reductions, Timing, TokenChunk, Usage

__all__ = [
    "Reduce",
    "Reductions",
    "AbortedError",
    "AlreadyExistsError",
    "AsyncPrismClient",
    "AsyncTokenStream",
    "CancelledError",
    "Completion",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "ModelInfo",
    "ModelList",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "PrismClient",
    "PrismError",
    "ResourceExhaustedError",
    "Timing",
    "TokenChunk",
    "TokenStream",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "Usage",
    "build_chat",
    "build_request",
    "from_rpc_error",
    "to_audio",
    "to_image",
    "to_pcm",
]
