"""Adaptation live (issue 7) over a real redis-server: two variants of the model served side by
side (two tiny LLaVA checkpoints of different weights, so each variant's tokens are its own),
requests pinning one or taking any at or above their accuracy floor, and a new configuration
(cores and batch bound of running workers in place, the variant mix, a variant drained) applied
while requests stream: none fails, none is lost, every output equals its variant's
`model.generate`."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from prism.models.loading import ModelOptions
from prism.runtime.host import WorkerHost
from prism.v1 import worker_pb2, worker_pb2_grpc
from services.scheduler.core.adapt_control import Action
from services.worker.__main__ import specs as worker_specs
from services.worker.config import WorkerConfig
from tests.conftest import png_bytes, random_image
from tests.integration.cluster import LocalCluster, chat, collect, server
from tests.oracle import Oracle

STAGES = ("encode", "prefill", "decode")


@pytest.fixture(scope="module")
def variant_dirs(tiny_models, tmp_path_factory):
    from prism.models.builder import make_model

    other = make_model("llava", "tiny", tmp_path_factory.mktemp("variant") / "llava-b", seed=1)
    return {"a": tiny_models["llava"], "b": other}


@pytest.fixture(scope="module")
def oracles(variant_dirs):
    return {name: Oracle(path) for name, path in variant_dirs.items()}


async def add_variant_worker(c: LocalCluster, model_dir, variant: str, name: str) -> WorkerHost:
    config = WorkerConfig(model=ModelOptions(model_dir=model_dir, threads=1, variant=variant), stages=",".join(STAGES),
                          server=server(name), queue=c.queue_options, slots=c.slots, max_len=c.max_len, fetch_wait_s=2)
    host = WorkerHost(worker_specs(config), config.server, c.queue_options, model_name=model_dir.resolve().name,
                      threads=1, variant=variant, backend=c.backend(), handle_signals=False)
    await host.start()
    c.hosts[name] = host
    return host


async def compute_of(host: WorkerHost) -> worker_pb2.GetComputeResponse:
    async with grpc.aio.insecure_channel(host.address) as channel:
        return await worker_pb2_grpc.WorkerAdminServiceStub(channel).GetCompute(worker_pb2.GetComputeRequest())


async def test_config_applied_under_load_loses_no_request_and_every_variant_serves_its_own_tokens(
        variant_dirs, oracles, redis_url):
    spec = f"a={variant_dirs['a']}:0.6,b={variant_dirs['b']}:0.8"
    async with LocalCluster(variant_dirs["a"], [], redis_url=redis_url, slots=4,
                            scheduler_args={"variants": spec}) as c:
        hosts = {v: await add_variant_worker(c, variant_dirs[v], v, f"w-{v}") for v in ("a", "b")}
        await c.wait_workers(2)
        assert sorted(i.variant for i in c.parts["cluster"].instances) == ["a", "b"]

        # Unknown variant: refused before any work, the field named.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(c.stub, chat("x", variant="nope"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("variant: unknown variant 'nope'")

        cases = []  # (text, image seeds, max_new_tokens, pin, floor)
        for i in range(12):
            pin = ("a", "b", "", "")[i % 4]
            floor = 0.7 if i % 4 == 3 else 0.0
            cases.append((f"adapt {i}", [80 + i] if i % 3 == 0 else [], 4 + i % 3, pin, floor))

        def request(text, seeds, n, pin, floor):
            req = chat(text, [png_bytes(s) for s in seeds], n, variant=pin)
            req.selection.accuracy_floor = floor
            return req

        applier = c.parts["applier"]
        async with asyncio.timeout(180):
            streams = [asyncio.create_task(collect(c.stub, request(*case))) for case in cases[:8]]
            await asyncio.sleep(0.3)  # requests are in the stages now
            done = await applier.apply([
                Action("set_cores", "pipeline", "b", 1, 2), Action("set_batch", "pipeline", "b", 2, 4),
                Action("set_batch", "pipeline", "a", 1, 4), Action("set_share", "pipeline", "b", 3.0),
                Action("set_share", "pipeline", "a", 1.0)])
            assert done[:3] == ["w-b: set_cores 1", "w-b: set_batch 2", "w-a: set_batch 1"]
            streams += [asyncio.create_task(collect(c.stub, request(*case))) for case in cases[8:]]
            await asyncio.sleep(0.2)
            await applier.apply([Action("stop", "pipeline", "a", 0, 1)])  # traffic away at once
            results = await asyncio.gather(*streams)
            assert await applier.settle(now=1e9) == ["w-a: drained"]  # then drained, never killed

        served = {}
        for (text, seeds, n, pin, floor), (tokens, last) in zip(cases, results):
            variant = last.variant
            served[text] = variant
            assert variant in ("a", "b"), text
            if pin:
                assert variant == pin, text
            if floor:
                assert variant == "b", text  # only b reaches 0.7
            assert tokens == oracles[variant].chat(text, [random_image(s) for s in seeds], n), text
            assert last.finish_reason and last.usage.generated_tokens == len(tokens)
        assert {"a", "b"} <= set(served.values())

        share_b = (await compute_of(hosts["b"])).share
        assert (share_b.threads, share_b.max_batch, len(share_b.cpus)) == (1, 2, 1)
        assert (await compute_of(hosts["a"])).share.max_batch == 1
        assert c.worker("w-a", "decode").batch_sizes and max(c.worker("w-b", "decode").batch_sizes) <= 4
        assert dict(c.parts["applier"].mix.weights) == {"a": 0.0, "b": 3.0}
        assert [i.name for i in c.parts["cluster"].instances if i.draining] == ["w-a"]
        assert c.parts["pipeline"].inflight == {}

        # After the drain, a request pinning no variant goes to the live one.
        tokens, last = await collect(c.stub, chat("after", [], 5))
        assert last.variant == "b" and tokens == oracles["b"].chat("after", [], 5)


async def test_the_scheduler_adaptation_loop_solves_and_applies_a_configuration(variant_dirs, oracles, redis_url,
                                                                              tmp_path):
    """--adapt: once both variants have a worker, the loop's first solve picks b alone (more
    accurate at the same cost; a at rate ~0 is not worth a second core), so b's worker gets the
    configuration's batch bound in place, a is drained, and requests go to b with b's tokens."""
    import json

    from prism.v1 import admin_pb2
    from services.scheduler.config import AdaptOptions

    profile = tmp_path / "variants.json"
    profile.write_text(json.dumps({"variants": [
        {"name": "a", "stage": "pipeline", "accuracy": 0.6, "table": {"1": {"1": 50, "2": 60}, "2": {"1": 25, "2": 30}}},
        {"name": "b", "stage": "pipeline", "accuracy": 0.8, "table": {"1": {"1": 100, "2": 120}, "2": {"1": 50, "2": 60}}},
    ]}))
    adapt = AdaptOptions(adapt=True, adapt_profile=str(profile), adapt_slo_ms=1000.0, adapt_period_s=1.0,
                         adapt_stop_delay_s=0.0,
                         adapt_window_s=0.5, adapt_windows=2, adapt_stable_steps=1, adapt_max_replicas=1,
                         adapt_batches=(1, 2), adapt_cores=(1,), adapt_total_cores=2)
    spec = f"a={variant_dirs['a']}:0.6,b={variant_dirs['b']}:0.8"
    async with LocalCluster(variant_dirs["a"], [], redis_url=redis_url, slots=4,
                            scheduler_args={"variants": spec, "adapt": adapt}) as c:
        hosts = {v: await add_variant_worker(c, variant_dirs[v], v, f"w-{v}") for v in ("a", "b")}
        assert (await compute_of(hosts["b"])).share.max_batch == 0  # no bound of its own
        admin, loop = c.parts["admin"], c.parts["adaptation"]
        async with asyncio.timeout(60):
            while not loop.state.changes or c.parts["applier"].pending_stops:  # a drained in the same tick
                await asyncio.sleep(0.1)
        status = (await admin.GetStatus(admin_pb2.GetStatusRequest(), None)).adaptation
        assert [(w.stage, w.variant, w.replicas, w.cores, w.max_batch) for w in status.workers] == [
            ("pipeline", "b", 1, 1, 1)]
        assert status.solves >= 1 and status.changes == 1 and status.errors == 0 and status.cost_cores == 1
        assert status.last_reason in ("no configuration", "unchanged")  # later solves keep it
        assert list(status.last_actions)[-1] == "pipeline: drain and stop a"
        assert (await compute_of(hosts["b"])).share.max_batch == 1  # set in place, between batches
        assert [i.name for i in c.parts["cluster"].instances if i.draining] == ["w-a"]
        for k in range(3):
            tokens, last = await collect(c.stub, chat(f"adapted {k}", [], 4))
            assert last.variant == "b" and tokens == oracles["b"].chat(f"adapted {k}", [], 4)
        assert c.parts["pipeline"].inflight == {}


async def test_switching_to_a_variant_whose_workers_are_starting_fails_no_request(variant_dirs, oracles, redis_url):
    """The live benchmark's failures: a configuration moving the traffic from a (running) to b
    (its worker not started yet) drained a at once, so requests had no live variant and failed
    UNAVAILABLE. Now a keeps serving until b has a live worker, and is drained only then; a
    configuration bringing a back before that cancels its stop (its worker is never touched)."""
    spec = f"a={variant_dirs['a']}:0.6,b={variant_dirs['b']}:0.8"
    async with LocalCluster(variant_dirs["a"], [], redis_url=redis_url, slots=4,
                            scheduler_args={"variants": spec}) as c:
        await add_variant_worker(c, variant_dirs["a"], "a", "w-a")
        await c.wait_workers(1)
        applier = c.parts["applier"]
        cluster = c.parts["cluster"]

        def draining() -> list[str]:
            return [i.name for i in cluster.instances if i.draining]

        async with asyncio.timeout(180):
            first = [asyncio.create_task(collect(c.stub, chat(f"switch {k}", [], 4))) for k in range(3)]
            await asyncio.sleep(0.3)
            switch = [Action("start", "pipeline", "b", 1), Action("set_share", "pipeline", "b", 2.0),
                      Action("stop", "pipeline", "a", 0, 1)]
            await applier.apply(switch)
            results = await asyncio.gather(*first)
            assert await applier.settle(now=1e9) == [] and draining() == []  # b has no worker yet
            later = await asyncio.gather(*(collect(c.stub, chat(f"meanwhile {k}", [], 4)) for k in range(3)))
            results += later

            # Taken back before b came up: a's stop is cancelled, nothing drains, nothing restarts.
            done = await applier.apply([Action("start", "pipeline", "a", 1), Action("set_share", "pipeline", "a", 1.0),
                                        Action("stop", "pipeline", "b", 0, 1)])
            assert "pipeline/a: stop cancelled, its workers kept" in done
            assert applier.pending_stops.keys() == {("pipeline", "b")}
            assert await applier.settle(now=1e9) == [] and draining() == []

            await applier.apply(switch)  # and again to b, which now starts
            host_a = c.hosts["w-a"]
            await add_variant_worker(c, variant_dirs["b"], "b", "w-b")
            await c.wait_workers(2)
            await applier.apply([Action("set_cores", "pipeline", "b", 1)])  # the loop's catch-up on b's worker
            allowed = list((await compute_of(host_a)).allowed_cpus)
            # within the stop delay: a kept, idle, parked in place on b's cpu (no core of its own)
            assert await applier.settle(now=applier.clock()) == [f"w-a: parked on cpu {allowed[0]} until drained"]
            share = (await compute_of(host_a)).share
            assert (share.threads, list(share.cpus)) == (1, [allowed[0]])
            assert applier.parked == {("pipeline", "a")}
            assert await applier.settle(now=1e9) == ["w-a: drained"] and draining() == ["w-a"]
            after = await asyncio.gather(*(collect(c.stub, chat(f"after {k}", [], 4)) for k in range(2)))

        texts = [f"switch {k}" for k in range(3)] + [f"meanwhile {k}" for k in range(3)]
        for text, (tokens, last) in zip(texts, results):
            assert last.variant == "a" and tokens == oracles["a"].chat(text, [], 4), text
        for k, (tokens, last) in enumerate(after):
            assert last.variant == "b" and tokens == oracles["b"].chat(f"after {k}", [], 4)
        assert c.parts["pipeline"].inflight == {} and applier.pending_stops == {}
