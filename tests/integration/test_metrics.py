"""Prometheus metrics after real requests: the scheduler's /metrics (this process's registry, so
every part's series) is scraped before and after; each counter moved by exactly what the
requests did: requests by outcome, tasks and tokens per stage, batches, KV bytes, generated
tokens, latency histograms."""
from __future__ import annotations

import asyncio
import json
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import png_bytes
from tests.integration.cluster import LocalCluster, chat, collect


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before, after, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_counters_move_by_what_the_requests_did(tiny_models):
    model_dir = tiny_models["llava"]
    async with LocalCluster(model_dir, [("encode",), ("prefill",), ("decode",)], metrics=True, slots=4) as c:
        port = c.scheduler.server.metrics_port
        assert port > 0
        enc, pre, dec = (c.named((s,))[0] for s in ("encode", "prefill", "decode"))
        batches = {n: len(c.worker(n, s).batch_sizes) for n, s in ((enc, "encode"), (pre, "prefill"), (dec, "decode"))}
        before = await asyncio.to_thread(scrape, port)
        results = await asyncio.gather(*(collect(c.stub, chat(f"metrics {i}", [png_bytes(20 + i)], 5, ignore_eos=True))
                                         for i in range(3)))
        with pytest.raises(grpc.aio.AioRpcError):
            await collect(c.stub, chat("bad", [b"not an image"], 5))
        c.parts["scaling"].step()
        after = await asyncio.to_thread(scrape, port)
        grown = {n: len(c.worker(n, s).batch_sizes) - batches[n]
                 for n, s in ((enc, "encode"), (pre, "prefill"), (dec, "decode"))}
    model = c.parts["servicer"].default_model
    lasts = [last for _, last in results]
    assert delta(before, after, "prism_requests_total", model=model, outcome="OK") == 3
    assert delta(before, after, "prism_requests_total", model=model, outcome="INVALID_ARGUMENT") == 1
    assert delta(before, after, "prism_generated_tokens_total", model=model) == 15
    assert delta(before, after, "prism_ttft_seconds_count", model=model) == 3
    assert delta(before, after, "prism_e2e_seconds_count", model=model) == 3
    for stage, name in (("encode", enc), ("prefill", pre), ("decode", dec)):
        assert delta(before, after, "prism_stage_tasks_total", stage=stage, instance=name) == 3, stage
        assert delta(before, after, "prism_stage_work_seconds_count", stage=stage, instance=name) == 3, stage
        assert delta(before, after, "prism_stage_queue_wait_seconds_count", stage=stage, instance=name) == 3
        assert delta(before, after, "prism_stage_batch_size_count", stage=stage, instance=name) == grown[name]
    assert delta(before, after, "prism_stage_tokens_total", stage="encode", instance=enc) == \
        sum(last.usage.image_tokens for last in lasts) == 3 * 64
    prompt = sum(last.usage.prompt_tokens for last in lasts)
    assert delta(before, after, "prism_stage_tokens_total", stage="prefill", instance=pre) == prompt
    assert delta(before, after, "prism_stage_tokens_total", stage="decode", instance=dec) == 3 * 4  # first from prefill
    # KV: K and V of every layer, fp32, for every prompt token
    text = json.loads((model_dir / "config.json").read_text())["text_config"]
    heads = text.get("num_key_value_heads") or text["num_attention_heads"]
    per_token = 2 * text["num_hidden_layers"] * heads * (text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]) * 4
    assert delta(before, after, "prism_kv_bytes_total", direction="sent", instance=pre) == prompt * per_token
    assert after[("prism_replicas", (("kind", "actual"), ("stage", "decode")))] == 1
