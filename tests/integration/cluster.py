"""A whole Prism deployment inside the test process: worker hosts and the scheduler on real gRPC
servers on port 0, with their queues either in memory (one shared Backend) or in a real Redis
(each process part with its own connection, as separate processes would have), so tests can
look at the workers' state."""
from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import grpc

from prism.models.loading import ModelOptions
from prism.runtime.backend import Backend, QueueOptions
from prism.runtime.host import StageSpec, WorkerHost
from prism.runtime.server import ServerConfig
from prism.runtime.stagework import RunningStage, start_stage
from prism.v1 import admin_pb2, admin_pb2_grpc, common_pb2, prism_pb2, prism_pb2_grpc
from services.scheduler.app import build as build_scheduler
from services.scheduler.config import Policy, SchedulerConfig
from services.worker.__main__ import specs as worker_specs
from services.worker.config import WorkerConfig


def chat(text: str, images: list[bytes] = (), max_new_tokens: int = 6, ignore_eos: bool = False,
         **kw) -> prism_pb2.GenerateRequest:
    """A chat request: the images (encoded bytes) then the text, in one user message."""
    content = [prism_pb2.ContentPart(media=prism_pb2.MediaPart(image=prism_pb2.Image(data=b))) for b in images]
    content.append(prism_pb2.ContentPart(text=text))
    return prism_pb2.GenerateRequest(
        chat=prism_pb2.Chat(messages=[prism_pb2.ChatMessage(role="user", content=content)]),
        sampling=common_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos), **kw)


async def collect(stub, request, metadata=None) -> tuple[list[int], prism_pb2.GenerateResponse]:
    """All tokens of a Generate stream, and its last message."""
    tokens, last = [], None
    async for message in stub.Generate(request, metadata=metadata):
        tokens.extend(message.token_ids)
        last = message
    return tokens, last


def server(name: str = "", otel: bool = False, metrics: bool = False) -> ServerConfig:
    cfg = ServerConfig(port=0, otel=otel, drain_grace_s=5, metrics_port=0 if metrics else -1)
    return replace(cfg, worker_name=name) if name else cfg


class LocalCluster:
    """Workers (each a tuple of stages) and a scheduler in this process."""

    def __init__(self, model_dir: Path, workers: list[tuple[str, ...]], *, redis_url: str = "",
                 placement: str = "adaptive", slots: int = 2, max_len: int = 512,
                 queue: QueueOptions | None = None, policy: Policy | None = None, worker_args: dict | None = None,
                 selection_profile: str = "", otel: bool = False, metrics: bool = False,
                 scheduler_args: dict | None = None, tls=None):
        self.model_dir = Path(model_dir)
        self.layout = list(workers)
        self.queue_options = queue or QueueOptions(redis_url=redis_url, heartbeat_s=0.2, worker_ttl_s=1.0)
        self.policy = policy or Policy(placement=placement)
        self.slots, self.max_len = slots, max_len
        self.worker_args = worker_args or {}
        self.selection_profile = selection_profile
        self.scheduler_args = scheduler_args or {}  # more SchedulerConfig fields (api_keys...)
        self.tls = tls  # prism.runtime.tls.CertPaths: mutual TLS between stages, TLS at the front door
        self.otel = otel  # OpenTelemetry interceptors on every server (spans go to the global provider)
        self.metrics = metrics  # the scheduler serves /metrics (this process's registry: every part's series)
        self.shared = None if self.queue_options.redis_url else Backend(self.queue_options)
        self.hosts: dict[str, WorkerHost] = {}
        self.scheduler: RunningStage | None = None
        self.channel: grpc.aio.Channel | None = None
        self._seq = 0

    def backend(self) -> Backend:
        return self.shared or Backend(self.queue_options)

    async def add_worker(self, stages: tuple[str, ...], name: str | None = None) -> WorkerHost:
        self._seq += 1
        name = name or f"{'+'.join(stages)}-{self._seq}"
        config = WorkerConfig(model=ModelOptions(model_dir=self.model_dir, threads=1), stages=",".join(stages),
                              server=self._tls(server(name, self.otel), mutual=True), queue=self.queue_options, slots=self.slots, max_len=self.max_len,
                              fetch_wait_s=2, **self.worker_args)
        specs: list[StageSpec] = worker_specs(config)
        host = WorkerHost(specs, config.server, self.queue_options, model_name=self.model_dir.resolve().name,
                          threads=1, backend=self.backend(), handle_signals=False)
        await host.start()
        self.hosts[name] = host
        return host

    async def start(self) -> "LocalCluster":
        for stages in self.layout:
            await self.add_worker(stages)
        config = SchedulerConfig(model_dir=self.model_dir, max_context=self.max_len,
                                 server=self._tls(server("scheduler", self.otel, self.metrics), mutual=False),
                                 queue=self.queue_options, policy=self.policy, request_lease_s=2.0,
                                 selection_profile=self.selection_profile, **self.scheduler_args)
        self.scheduler = await start_stage(config.server, await build_scheduler(config, self.backend()),
                                           handle_signals=False)
        if self.tls is None:
            self.channel = grpc.aio.insecure_channel(self.scheduler.address)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=self.tls.ca.read_bytes())
            self.channel = grpc.aio.secure_channel(self.scheduler.address, creds)
        await self.wait_workers(len(self.hosts))
        return self

    def _tls(self, cfg: ServerConfig, *, mutual: bool) -> ServerConfig:
        if self.tls is None:
            return cfg
        return replace(cfg, tls_cert=self.tls.cert, tls_key=self.tls.key, tls_ca=self.tls.ca if mutual else None)

    @property
    def parts(self) -> dict:
        return self.scheduler.app.parts

    @property
    def stub(self) -> prism_pb2_grpc.PrismServiceStub:
        return prism_pb2_grpc.PrismServiceStub(self.channel)

    @property
    def admin(self) -> admin_pb2_grpc.SchedulerAdminServiceStub:
        return admin_pb2_grpc.SchedulerAdminServiceStub(self.channel)

    async def status(self) -> admin_pb2.GetStatusResponse:
        return await self.admin.GetStatus(admin_pb2.GetStatusRequest())

    async def wait_workers(self, count: int, timeout: float = 10.0) -> None:
        cluster = self.parts["cluster"]
        until = asyncio.get_running_loop().time() + timeout
        while len(cluster.instances) < count:
            if asyncio.get_running_loop().time() > until:
                raise TimeoutError(f"scheduler sees {len(cluster.instances)} of {count} workers")
            await cluster.refresh()
            await asyncio.sleep(0.05)

    def worker(self, name: str, stage: str):
        return self.hosts[name].apps[stage].parts["worker"]

    def engine(self, name: str, stage: str):
        return self.hosts[name].apps[stage].parts["engine"]

    def named(self, stages: tuple[str, ...]) -> list[str]:
        kind = "+".join(stages)
        return [n for n in self.hosts if n.rsplit("-", 1)[0] == kind]

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.scheduler is not None:
            await self.scheduler.stop()
        for host in self.hosts.values():
            await host.stop()
        if self.shared is not None:
            await self.shared.close()

    async def __aenter__(self) -> "LocalCluster":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()
