"""One trace per request across the Redis hops: the scheduler's Generate span is the parent of
every stage's queue-wait and work spans, which the workers record from the trace context the
scheduler put in each queue message, with the request's counts as attributes."""
from __future__ import annotations

import pytest
from opentelemetry import trace

from tests.conftest import png_bytes, random_image
from tests.integration.cluster import LocalCluster, chat, collect
from tests.oracle import Oracle


STAGE_SPANS = {"prism.queue.encode", "prism.encode", "prism.queue.prefill", "prism.prefill",
               "prism.queue.decode", "prism.decode"}


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_one_request_is_one_trace_through_every_stage(tiny_models, exporter, backend, redis_url):
    layout = [("encode",), ("prefill",), ("decode",)]
    url = redis_url if backend == "redis" else ""
    async with LocalCluster(tiny_models["llava"], layout, redis_url=url, otel=True) as c:
        tokens, last = await collect(c.stub, chat("trace me", [png_bytes(5)], 6))
    assert tokens == Oracle(tiny_models["llava"]).chat("trace me", [random_image(5)], 6)
    spans = exporter.get_finished_spans()
    generate = [s for s in spans if s.name.endswith("PrismService/Generate") and s.kind == trace.SpanKind.SERVER]
    assert len(generate) == 1, [s.name for s in spans]
    root = generate[0]
    mine = [s for s in spans if s.context.trace_id == root.context.trace_id and s.name in STAGE_SPANS]
    by_name = {s.name: s for s in mine}
    assert sorted(by_name) == sorted(STAGE_SPANS) and len(mine) == len(STAGE_SPANS)  # once each
    for s in mine:  # children of the request's span, across the queue hop
        assert s.parent is not None and s.parent.span_id == root.context.span_id, s.name
        assert root.start_time <= s.start_time <= s.end_time <= root.end_time, s.name
    for stage in ("encode", "prefill", "decode"):  # the wait ends where the work begins
        assert by_name[f"prism.queue.{stage}"].end_time == by_name[f"prism.{stage}"].start_time
    rid = last.request_id
    r = root.attributes  # the request's own span says what was asked and what was served
    assert (r["prism.request_id"], r["prism.image_count"], r["prism.audio_count"]) == (rid, 1, 0)
    assert (r["prism.prompt_tokens"], r["prism.generated_tokens"]) == (last.usage.prompt_tokens, len(tokens))
    assert (r["prism.strategy"], tuple(r["prism.dropped_images"]), r["prism.attempts"]) == ("full", (), 1)
    enc, pre, dec = by_name["prism.encode"].attributes, by_name["prism.prefill"].attributes, by_name["prism.decode"].attributes
    assert enc["prism.task_id"] == f"{rid}/a1/encode0" and pre["prism.task_id"] == f"{rid}/a1/prefill"
    assert (enc["prism.image_count"], enc["prism.audio_count"], enc["prism.media_tokens"]) == (1, 0, 64)
    assert enc["prism.media_tokens"] == last.usage.image_tokens and enc["prism.batch_size"] == 1
    assert pre["prism.prompt_tokens"] == last.usage.prompt_tokens and pre["prism.media_items"] == 1
    assert dec["prism.generated_tokens"] == len(tokens) and dec["prism.compute_ms"] > 0
