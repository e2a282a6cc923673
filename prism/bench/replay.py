"""Open-loop replay of a request list against a running Prism deployment (the gRPC adapter of
the benchmark: the statistics are in `prism.bench.stats`, the bodies in `prism.bench.workload`).

Every request is sent at its arrival time, whether or not earlier ones finished (asyncio, one
channel), streams its tokens with the output length forced (``ignore_eos``), and becomes one
`RequestRecord` with times measured on the client from the run's start.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prism.bench.stats import RequestRecord
from prism.bench.trace import TraceRequest
from prism.bench.workload import ModelLimits, Workload

__all__ = ["Target", "probe_limits", "replay", "replay_async"]


@dataclass(frozen=True)
class Target:
    """Where and how to call the deployment."""

    address: str
    """host:port of the scheduler."""
    tls_ca: Path | None = None
    """CA certificate (PEM) to trust: the call uses TLS when set."""
    tls_server_name: str = "prism"
    """Name the server's certificate is checked under (with `tls_ca`)."""
    api_key: str | None = None
    """Sent as ``authorization: Bearer`` on every call."""

    def __post_init__(self) -> None:
        if not self.address or ":" not in self.address:
            raise ValueError(f"address: {self.address!r} is not host:port")
        if self.tls_ca is not None and not Path(self.tls_ca).is_file():
            raise ValueError(f"tls_ca: {self.tls_ca} is not a file")

    def client(self):
        from prism.client import AsyncPrismClient

        kw: dict = {"api_key": self.api_key}
        if self.tls_ca is not None:
            from prism.runtime.tls import ClientTls

            tls = ClientTls(Path(self.tls_ca), None, None, self.tls_server_name)
            kw.update(credentials=tls.credentials(), options=tls.options())
        return AsyncPrismClient(self.address, **kw)


def _target(address: str | Target) -> Target:
    return address if isinstance(address, Target) else Target(address)


async def _one(client, messages: list[dict], new_tokens: int, t0: float, arrival_s: float, *,
               timeout_s: float, slo: tuple[int, int], num_images: int) -> RequestRecord:
    from prism.client import PrismError

    loop = asyncio.get_running_loop()
    sent = loop.time() - t0
    first = None
    tokens, status, message = 0, "OK", ""
    try:
        async for chunk in client.generate(messages=messages, max_new_tokens=new_tokens, ignore_eos=True,
                                           ttft_ms=slo[0], tpot_ms=slo[1], timeout=timeout_s):
            if chunk.token_ids:
                if first is None:
                    first = loop.time() - t0
                tokens += len(chunk.token_ids)
    except PrismError as exc:
        status, message = exc.code.name, exc.message[:300]
    except Exception as exc:  # noqa: BLE001 - a load generator records, it does not stop mid-run
        status, message = type(exc).__name__, str(exc)[:300]
    return RequestRecord(arrival_s=arrival_s, sent_s=sent, first_token_s=first, done_s=loop.time() - t0,
                         tokens=tokens, status=status, expected_tokens=new_tokens, num_images=num_images,
                         message=message)


async def replay_async(address: str | Target, requests: Sequence[TraceRequest], *,
                       workload: Workload | None = None, timeout_s: float = 300.0,
                       send_slo: tuple[int, int] = (0, 0), start_delay_s: float = 0.2,
                       on_record: Callable[[RequestRecord], None] | None = None) -> list[RequestRecord]:
    """`replay` inside a running event loop."""
    target = _target(address)
    workload = workload or Workload()
    # bodies made before the clock starts, so that building images does not delay the sends
    bodies = [workload.messages(k, r) for k, r in enumerate(requests)]
    loop = asyncio.get_running_loop()
    records: list[RequestRecord | None] = [None] * len(requests)
    async with target.client() as client:
        t0 = loop.time() + start_delay_s

        async def one(k: int, r: TraceRequest) -> None:
            await asyncio.sleep(max(0.0, t0 + r.arrival_s - loop.time()))
            rec = await _one(client, bodies[k], r.generated_tokens, t0, r.arrival_s, timeout_s=timeout_s,
                             slo=send_slo, num_images=r.num_images)
            records[k] = rec
            if on_record is not None:
                on_record(rec)

        await asyncio.gather(*(one(k, r) for k, r in enumerate(requests)))
    return [r for r in records if r is not None]


def replay(address: str | Target, requests: Sequence[TraceRequest], *, workload: Workload | None = None,
           timeout_s: float = 300.0, send_slo: tuple[int, int] = (0, 0), start_delay_s: float = 0.2,
           on_record: Callable[[RequestRecord], None] | None = None) -> list[RequestRecord]:
    """Replays `requests` open loop against the deployment at `address` (a ``host:port`` or a
    `Target` with TLS and an API key): request ``k`` is sent ``arrival_s`` seconds after the
    run's start with ``workload.messages(k, request)`` as its body and exactly
    ``generated_tokens`` to generate (``ignore_eos``). `send_slo`: (ttft_ms, tpot_ms) put on
    each request for the scheduler's admission (0: none). `on_record` is called as each request
    ends (progress). Returns one record per request, in request order; no call raises."""
    return asyncio.run(replay_async(address, requests, workload=workload, timeout_s=timeout_s,
                                    send_slo=send_slo, start_delay_s=start_delay_s, on_record=on_record))


async def _probe(target: Target, timeout_s: float) -> ModelLimits:
    async with target.client() as client:
        models = await client.list_models(timeout=timeout_s)
        info = next((m for m in models.models if m.name == models.default_model), models.models[0])
        w = Workload(ModelLimits(max_context=max(8, info.max_context_tokens)))
        usage = {}
        probes = {"short": (w.words(0, 16), 0), "long": (w.words(1, 80), 0)}
        if info.max_images_per_request > 0:
            probes["image"] = (w.words(0, 16), 1)
        for name, (text, images) in probes.items():
            content = [{"type": "image", "image": w.image(10_000, j)} for j in range(images)]
            content.append({"type": "text", "text": text})
            done = await client.complete(messages=[{"role": "user", "content": content}], max_new_tokens=1,
                                         timeout=timeout_s)
            usage[name] = done.usage
    words_short, words_long = 16, 80
    slope = (usage["long"].prompt_tokens - usage["short"].prompt_tokens) / (words_long - words_short)
    slope = max(0.05, slope)
    overhead = max(0, round(usage["short"].prompt_tokens - slope * words_short))
    image_tokens = usage["image"].image_tokens if "image" in usage else 0
    return ModelLimits(max_context=max(8, info.max_context_tokens),
                       max_new_tokens=max(1, info.max_new_tokens_limit or 1024),
                       max_images=max(0, info.max_images_per_request), tokens_per_word=round(slope, 4),
                       prompt_overhead=overhead, image_tokens=image_tokens)


def probe_limits(address: str | Target, *, timeout_s: float = 120.0) -> ModelLimits:
    """What the deployment serves (ListModels) and, from three one-token requests, prompt
    tokens per word of the workload's text, the template's tokens and tokens per image."""
    return asyncio.run(_probe(_target(address), timeout_s))
