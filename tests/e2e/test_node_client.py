"""The protos are the contract: a Node.js client (@grpc/grpc-js, protos loaded at run time)
streams Generate from a running scheduler and workers, gets the same tokens as the monolithic
model, joins the caller's W3C trace, and reads a field-named error status."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.cluster import LocalCluster
from tests.oracle import Oracle

pytestmark = [pytest.mark.e2e]

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"
TRACE_ID, CALLER_SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


@pytest.fixture(scope="module")
def node() -> str:
    binary = shutil.which("node")
    assert binary, "node is missing (scripts/bootstrap.sh installs nodejs and npm)"
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=600)
    return binary


async def run_node(node: str, *args: str) -> tuple[int, list[dict]]:
    proc = await asyncio.create_subprocess_exec(node, str(NODE_DIR / "generate.js"), *args,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode in (0, 1), err.decode()
    return proc.returncode, [json.loads(line) for line in out.decode().splitlines()]


async def test_node_client_streams_exact_tokens_in_the_callers_trace(tiny_models, node, exporter, tmp_path):
    from opentelemetry import trace

    model_dir = tiny_models["llava"]
    async with LocalCluster(model_dir, [("prefill",), ("decode",)], otel=True) as c:
        code, lines = await run_node(node, c.scheduler.address, "A short story about", "--max-new-tokens", "6",
                                     "--traceparent", f"00-{TRACE_ID}-{CALLER_SPAN}-01")
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"not an image at all")
        bad_code, bad_lines = await run_node(node, c.scheduler.address, "look", "--image", str(bad))
    assert code == 0
    *chunks, done = lines
    assert done["done"] and done["token_ids"] == [t for ch in chunks for t in ch["token_ids"]]
    assert done["token_ids"] == Oracle(model_dir).generate("A short story about", [], 6)
    assert done["usage"]["generated_tokens"] == len(done["token_ids"]) and done["finish_reason"] != "FINISH_REASON_UNSPECIFIED"
    assert len(chunks) >= 2  # streamed, not one reply
    spans = [s for s in exporter.get_finished_spans() if s.kind == trace.SpanKind.SERVER
             and s.name.endswith("PrismService/Generate") and f"{s.context.trace_id:032x}" == TRACE_ID]
    assert len(spans) == 1 and f"{spans[0].parent.span_id:016x}" == CALLER_SPAN
    assert bad_code == 1 and bad_lines[-1]["error"] == "INVALID_ARGUMENT" and "media[0]" in bad_lines[-1]["details"]
