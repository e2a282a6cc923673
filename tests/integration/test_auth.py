"""API keys and quotas at the front door, on real servers: a missing or wrong key is refused
with UNAUTHENTICATED naming the metadata, a key over its rate or open-call quota is throttled
(RESOURCE_EXHAUSTED with a retry hint) while another key is served normally, the admin service
needs an admin key, health stays open for probes, and the key's name -- never the key -- is on
the call's span and on the per-key counter."""
from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prism.client import AsyncPrismClient
from prism.runtime.metrics import REGISTRY
from prism.v1 import admin_pb2
from services.scheduler.core.quota import new_key
from tests.integration.cluster import LocalCluster, chat, collect
from tests.oracle import Oracle


@pytest.fixture(scope="module")
def oracle(tiny_models) -> Oracle:
    return Oracle(tiny_models["llava"])


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[str, dict]]:
    return {"fast": new_key("fast"), "slow": new_key("slow", rate_per_s=0.01, burst=1),
            "single": new_key("single", max_concurrent=1), "ops": new_key("ops", admin=True)}


def ring_json(keys) -> str:
    return json.dumps({"keys": [entry for _, entry in keys.values()]})


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def count(key: str, code: str) -> float:
    return REGISTRY.get_sample_value("prism_api_requests_total", {"key": key, "code": code}) or 0.0


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    return exc.value


async def test_keys_are_required_and_named_on_spans_never_shown(tiny_models, oracle, keys, exporter, tmp_path):
    key_file = tmp_path / "keys.json"
    key_file.write_text(ring_json(keys))
    async with LocalCluster(tiny_models["llava"], [("prefill",), ("decode",)], otel=True,
                            scheduler_args={"api_keys_file": key_file}) as c:
        none = await refused(c.stub.GenerateUnary(chat("hello", [], 4)))
        assert none.code() is grpc.StatusCode.UNAUTHENTICATED and "authorization" in none.details()
        wrong = await refused(c.stub.GenerateUnary(chat("hello", [], 4), metadata=auth("prism_not-a-key")))
        assert wrong.code() is grpc.StatusCode.UNAUTHENTICATED and "unknown API key" in wrong.details()
        ok_before = count("fast", "OK")
        client = AsyncPrismClient(c.scheduler.address, api_key=keys["fast"][0])
        try:
            result = await client.complete(messages=[{"role": "user", "content": "hello"}], max_new_tokens=4)
        finally:
            await client.close()
        assert list(result.token_ids) == oracle.chat("hello", [], 4)
        assert count("fast", "OK") == ok_before + 1
        health = health_pb2_grpc.HealthStub(c.channel)  # probes need no key
        assert (await health.Check(health_pb2.HealthCheckRequest(service="prism.v1.PrismService"))).status == \
            health_pb2.HealthCheckResponse.SERVING
        spans = [s for s in exporter.get_finished_spans() if s.name.endswith("GenerateUnary")]
        assert [s.attributes.get("prism.api_key") for s in spans if s.attributes.get("prism.api_key")] == ["fast"]
        secrets = [k for k, _ in keys.values()]
        for span in exporter.get_finished_spans():
            assert not any(secret in str(v) for v in span.attributes.values() for secret in secrets), span.name


async def test_a_key_over_its_quota_is_throttled_while_another_is_served(tiny_models, oracle, keys):
    async with LocalCluster(tiny_models["llava"], [("prefill",), ("decode",)],
                            scheduler_args={"api_keys": ring_json(keys)}) as c:
        tokens, _ = await collect(c.stub, chat("first", [], 3), metadata=auth(keys["slow"][0]))
        assert tokens == oracle.chat("first", [], 3)
        call = c.stub.GenerateUnary(chat("second", [], 3), metadata=auth(keys["slow"][0]))
        over = await refused(call)
        assert over.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "rate_per_s" in over.details()
        hint = dict(await call.trailing_metadata())["retry-after-ms"]
        assert int(hint) > 1000  # 0.01 requests/s: the next token is ~100 s away
        assert count("slow", "RESOURCE_EXHAUSTED") >= 1
        # Another key at the same moment is served as usual.
        tokens, _ = await collect(c.stub, chat("second", [], 3), metadata=auth(keys["fast"][0]))
        assert tokens == oracle.chat("second", [], 3)

        # One open call at a time for "single": a second is refused while the first streams,
        # and admitted once the first has ended.
        first = c.stub.Generate(chat("count up", [], 300, ignore_eos=True), metadata=auth(keys["single"][0]))
        async with asyncio.timeout(60):
            async for _ in first:
                break
        busy = await refused(c.stub.GenerateUnary(chat("busy", [], 2), metadata=auth(keys["single"][0])))
        assert busy.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent" in busy.details()
        first.cancel()
        async with asyncio.timeout(30):
            while True:
                try:
                    tokens, _ = await collect(c.stub, chat("after", [], 3), metadata=auth(keys["single"][0]))
                    break
                except grpc.aio.AioRpcError as exc:  # the cancelled call's lease is released as it ends
                    assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                    await asyncio.sleep(0.05)
        assert tokens == oracle.chat("after", [], 3)


async def test_admin_service_needs_an_admin_key(tiny_models, keys):
    async with LocalCluster(tiny_models["llava"], [("prefill",), ("decode",)],
                            scheduler_args={"api_keys": ring_json(keys)}) as c:
        request = admin_pb2.GetStatusRequest()
        assert (await refused(c.admin.GetStatus(request))).code() is grpc.StatusCode.UNAUTHENTICATED
        denied = await refused(c.admin.GetStatus(request, metadata=auth(keys["fast"][0])))
        assert denied.code() is grpc.StatusCode.PERMISSION_DENIED and "'fast'" in denied.details()
        status = await c.admin.GetStatus(request, metadata=auth(keys["ops"][0]))
        assert status.in_flight == 0
