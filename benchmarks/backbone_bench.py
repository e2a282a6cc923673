"""Backbone benchmark: Prism's four processes against the monolithic model, on the `small` LLaVA.

Measures, in one run (speed targets are ratios against baselines measured in the same run):

1. single-request latency: one 224x224 image + a short chat prompt, greedy, a forced output
   length (``ignore_eos``), (a) monolithically in this process with the HF model's ``generate``
   (fp32, torch threads = --threads; timed from the PNG bytes, so image decoding, the chat
   template and the processor count, as they do in Prism's front door) and (b) through a
   deployment (``prism.launch.Deployment``), one request at a time, timed at the client with
   the generated ``PrismServiceStub`` (streaming ``Generate``). The two are interleaved run by
   run, so drifting background load hits both alike. Reports medians, the ratio (target <=
   1.15), TTFT, per-stage server timings and whether the tokens equal the monolith's.
2. KV transfer of a 1,000-token prompt against its prefill time: ``Prefill`` sent straight to
   the prefill service (``max_new_tokens`` 2, so it holds the KV), then, after READY, the whole
   KV pulled with ``FetchKv`` into preallocated slot buffers (``prism.engine.kv.SlotKV``), the
   way ``services/decode/worker.py`` does it (``prism.wire``: ``fetch_kv_method`` zero-copy
   parse + ``KvReceiver``) and, for reference, with the generated stub + ``ChunkAssembler``
   (protobuf parse). Also the overlapped
   case: FetchKv started when prefill reports RUNNING, as the scheduler arranges it; the "tail"
   is the time from READY until the last KV byte landed (when decode could activate).
3. decode throughput at batch 1, 4, 16: B concurrent text-only requests (~256-token prompts,
   forced output length) through the deployment. The decode window runs from the latest
   first token to the last token; throughput counts the tokens that arrived inside it. The
   full-batch window (latest first token to earliest last token) is reported too.

Prints progress on stderr and ONE JSON report on stdout (also written to --out).

Usage: python benchmarks/backbone_bench.py [--quick] [--out FILE] [--runs N] [--new-tokens N]
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import functools
import io
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "Describe the picture in detail."
LATENCY_TARGET = 1.15


def ensure_malloc_tunables() -> None:
    """Re-exec this script with GLIBC_TUNABLES merged in (glibc reads it at start only), so the
    client side of the KV pull gets the same tuned malloc as the services."""
    from prism.wire.bulk import malloc_tunables_active, malloc_tunables_env

    if malloc_tunables_active() or os.environ.get("PRISM_BENCH_REEXEC"):
        return
    env = malloc_tunables_env()
    env["PRISM_BENCH_REEXEC"] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env)


from benchmarks.common import GATE, SMALL_MODEL_DIR, ensure_model, finish_report, med, say  # noqa: E402


def test_image() -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:224, 0:224]
    base = np.stack([xx, yy, (xx + yy) // 2], axis=-1).astype(np.int16)
    pixels = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# ---- The monolithic baseline ---------------------------------------------------------------------

class Monolith:
    def __init__(self, model_dir: Path, threads: int):
        import torch

        from prism.models.loading import load_model

        torch.set_num_threads(threads)
        self.torch = torch
        self.loaded = load_model(model_dir, dtype="float32", device="cpu")
        self.model = self.loaded.model
        self.processor = self.loaded.adapter.load_processor()
        self.tokenizer = self.processor.tokenizer

    def generate(self, png: bytes, prompt: str, new_tokens: int) -> tuple[list[int], float]:
        """(generated ids, seconds) from encoded image bytes, greedy, EOS ignored."""
        from PIL import Image

        started = time.perf_counter()
        image = Image.open(io.BytesIO(png)).convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=text, images=[image], return_tensors="pt")
        gc = copy.deepcopy(self.model.generation_config)
        gc.eos_token_id, gc.do_sample, gc.max_new_tokens, gc.min_new_tokens = None, False, new_tokens, None
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, generation_config=gc)
        seconds = time.perf_counter() - started
        return out[0, inputs["input_ids"].shape[1]:].tolist(), seconds

    def reference_kv(self, ids: list[int], layers: tuple[int, ...]):
        """Keys of `layers` for a text prompt, [tokens, heads, dim], from the HF language model."""
        with self.torch.inference_mode():
            decoder = self.loaded.adapter.language_model(self.model)
            out = decoder(input_ids=self.torch.tensor([ids]), use_cache=True)
        cache = out.past_key_values
        return {layer: cache.layers[layer].keys[0].transpose(0, 1).contiguous() for layer in layers}


# ---- Clients -------------------------------------------------------------------------------------

def channel(address: str):
    import grpc

    return grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])


def chat_request(png: bytes, prompt: str, new_tokens: int):
    from prism.v1 import common_pb2, prism_pb2

    content = [prism_pb2.ContentPart(media=prism_pb2.MediaPart(image=prism_pb2.Image(data=png, mime_type="image/png"))),
               prism_pb2.ContentPart(text=prompt)]
    return prism_pb2.GenerateRequest(
        chat=prism_pb2.Chat(messages=[prism_pb2.ChatMessage(role="user", content=content)]),
        sampling=common_pb2.SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True))


def text_request(prompt: str, new_tokens: int):
    from prism.v1 import common_pb2, prism_pb2

    return prism_pb2.GenerateRequest(
        prompt=prompt, sampling=common_pb2.SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True))


async def generate(stub, request) -> dict:
    """One streaming Generate call: token arrival times (perf_counter), tokens, final timing."""
    started = time.perf_counter()
    marks, tokens, last = [], [], None
    async for msg in stub.Generate(request):
        now = time.perf_counter()
        if msg.token_ids:
            marks.append((now, len(msg.token_ids)))
            tokens.extend(msg.token_ids)
        if msg.finish_reason:
            last = msg
    ended = time.perf_counter()
    return {"start": started, "end": ended, "marks": marks, "tokens": tokens,
            "timing": last.timing if last is not None else None, "usage": last.usage if last is not None else None}


# ---- 1. Single-request latency -------------------------------------------------------------------

async def single_request(mono: Monolith, address: str, runs: int, new_tokens: int) -> dict:
    from prism.v1 import prism_pb2_grpc

    png = test_image()
    request = chat_request(png, PROMPT, new_tokens)
    mono_s, mono_ttft_s, prism_runs, mono_tokens = [], [], [], None
    async with channel(address) as ch:
        stub = prism_pb2_grpc.PrismServiceStub(ch)
        for i in range(runs + 1):  # run 0 warms both up
            await GATE.wait_async()
            mono_tokens, dt = mono.generate(png, PROMPT, new_tokens)
            await GATE.wait_async()
            _, ttft = mono.generate(png, PROMPT, 1)
            await GATE.wait_async()
            run = await generate(stub, request)
            tag = "warm-up" if i == 0 else f"run {i}/{runs}"
            say(f"single request {tag}: monolith {dt * 1000:.0f} ms (ttft {ttft * 1000:.0f}), "
                f"prism {(run['end'] - run['start']) * 1000:.0f} ms (ttft {(run['marks'][0][0] - run['start']) * 1000:.0f})")
            if i:
                mono_s.append(dt)
                mono_ttft_s.append(ttft)
                prism_runs.append(run)
    e2e = [(r["end"] - r["start"]) * 1000 for r in prism_runs]
    ttft = [(r["marks"][0][0] - r["start"]) * 1000 for r in prism_runs]
    mono_ms = statistics.median(mono_s) * 1000
    prism_ms = statistics.median(e2e)
    server = [r["timing"] for r in prism_runs if r["timing"] is not None]
    first = prism_runs[0]
    return {
        "request": {"image": "224x224 PNG", "prompt": PROMPT, "input": "chat template",
                    "prompt_tokens": first["usage"].prompt_tokens if first["usage"] else None,
                    "image_tokens": first["usage"].image_tokens if first["usage"] else None,
                    "new_tokens": new_tokens, "greedy": True, "ignore_eos": True},
        "runs": runs,
        "monolith_ms": round(mono_ms, 2),
        "monolith_ttft_ms": med([s * 1000 for s in mono_ttft_s]),
        "prism_e2e_ms": round(prism_ms, 2),
        "prism_ttft_ms": med(ttft),
        "prism_e2e_ms_all": [round(x, 1) for x in e2e],
        "monolith_ms_all": [round(s * 1000, 1) for s in mono_s],
        "ratio": round(prism_ms / mono_ms, 3),
        "target_ratio_max": LATENCY_TARGET,
        "meets_target": prism_ms / mono_ms <= LATENCY_TARGET,
        "prism_server_timing_ms": {  # medians of the final message's Timing
            "ttft": med([t.ttft_ms for t in server]), "e2e": med([t.e2e_ms for t in server]),
            "encode": med([t.encode_ms for t in server]), "prefill": med([t.prefill_ms for t in server]),
            "tpot": med([t.tpot_ms for t in server]),
        },
        "prism_client_tpot_ms": med([(r["marks"][-1][0] - r["marks"][0][0]) * 1000 / max(1, len(r["tokens"]) - 1)
                                     for r in prism_runs]),
        "tokens_equal": all(r["tokens"] == mono_tokens for r in prism_runs),
        "monolith_tokens": mono_tokens,
        "prism_tokens": first["tokens"] if not all(r["tokens"] == mono_tokens for r in prism_runs) else "same",
    }


# ---- 2. KV transfer vs prefill -------------------------------------------------------------------

class KvClient:
    """Prefill tasks straight to the prefill service and FetchKv into preallocated slots."""

    def __init__(self, address: str, layout, prompt_tokens: int):
        import torch

        from prism.engine.kv import SlotKV

        self.address, self.layout, self.tokens = address, layout, prompt_tokens
        self.kv = SlotKV(layout, slots=2, max_len=prompt_tokens + 64, dtype=torch.float32, device=torch.device("cpu"))
        self.uses = 0

    async def prefill(self, stub, ids: list[int], on_running=None) -> tuple[str, object, float, float]:
        """(request id, READY response, seconds from send to READY, perf_counter at READY)."""
        from prism.v1 import common_pb2, stages_pb2

        rid = f"kv-{uuid.uuid4().hex[:12]}"
        req = stages_pb2.PrefillRequest(header=stages_pb2.TaskHeader(request_id=rid), input_ids=ids,
                                        sampling=common_pb2.SamplingParams(max_new_tokens=2, temperature=0.0))
        started = time.perf_counter()
        async for ev in stub.Prefill(req):
            if ev.state == common_pb2.TASK_STATE_RUNNING and on_running is not None:
                on_running(rid)
            if ev.state == common_pb2.TASK_STATE_READY:
                now = time.perf_counter()
                return rid, ev, now - started, now
        raise RuntimeError("prefill stream ended before READY")

    async def fetch(self, ch, rid: str, mode: str) -> tuple[int, float, float]:
        """Pull the whole KV into a slot: (bytes, seconds, perf_counter when complete)."""
        import torch

        from prism.v1 import stages_pb2, stages_pb2_grpc
        from prism.wire import ChunkAssembler, KvReceiver, fetch_kv_method

        slot = self.uses % self.kv.slots
        self.uses += 1
        dest = functools.partial(self.kv.destination, slot)
        req = stages_pb2.FetchKvRequest(request_id=rid)
        started = time.perf_counter()
        if mode == "fast":  # what services/decode/worker.py does: zero-copy parse, one copy into the slot
            L = self.layout
            rx = KvReceiver(dest, num_layers=L.num_layers, num_kv_heads=L.num_kv_heads, head_dim=L.head_dim,
                            dtype=torch.float32, max_tokens=self.kv.max_len)
            await rx.consume_async(fetch_kv_method(ch)(req))
            nbytes = rx.bytes_received
        else:  # generated stub: protobuf parse, then one copy into the slot
            stub, asm, nbytes, done = stages_pb2_grpc.PrefillServiceStub(ch), {}, 0, False
            async for msg in stub.FetchKv(req):
                kind = msg.WhichOneof("kind")
                if kind == "header":
                    h = msg.header
                    asm = {(layer, part): ChunkAssembler(out=dest(layer, part, 0, h.prompt_tokens), field="kv")
                           for layer in range(h.num_layers) for part in (1, 2)}
                elif kind == "chunk":
                    asm[(msg.chunk.layer, msg.chunk.part)].add(msg.chunk.chunk)
                    nbytes += len(msg.chunk.chunk.data)
                elif kind == "trailer":
                    done = all(a.complete for a in asm.values())
            if not done:
                raise RuntimeError("FetchKv ended incomplete")
        now = time.perf_counter()
        self.last_slot = slot
        return nbytes, now - started, now


def corpus_ids(tokenizer, tokens: int, seed: int) -> list[int]:
    """`tokens` ids of English-like text (BOS first)."""
    from prism.models.builder import english_corpus

    ids, n = [], 50
    while len(ids) < tokens - 1:
        ids = tokenizer(" ".join(english_corpus(n, seed=seed)), add_special_tokens=False)["input_ids"]
        n *= 2
    return [tokenizer.bos_token_id, *ids[: tokens - 1]]


def transfer_summary(rows: list[dict], key: str) -> dict:
    return {
        "transfer_ms": med([r[key] for r in rows]),
        "gb_per_s": round(rows[0]["bytes"] / (statistics.median(r[key] for r in rows) / 1000) / 1e9, 3),
        "ratio_to_prefill": round(statistics.median(r[key] / r["compute_ms"] for r in rows), 4),
        "transfer_ms_all": [round(r[key], 1) for r in rows],
    }


async def kv_transfer(mono: Monolith, prefill_address: str, runs: int, tokens: int) -> dict:
    from prism.v1 import stages_pb2_grpc

    ids = corpus_ids(mono.tokenizer, tokens, seed=7)
    layout = mono.loaded.adapter.kv_layout
    client = KvClient(prefill_address, layout, tokens)
    modes = {"fast": "decode_worker_path", "stub": "plain_stub_path"}
    seq: dict[str, list[dict]] = {m: [] for m in modes}
    ovl: dict[str, list[dict]] = {m: [] for m in modes}
    check = None
    async with channel(prefill_address) as ch:
        stub = stages_pb2_grpc.PrefillServiceStub(ch)
        for i in range(runs + 1):  # run 0 warms up
            for mode in modes:  # prompt pass first, then the pure transfer
                await GATE.wait_async()
                rid, ev, wall, _ = await client.prefill(stub, ids)
                nbytes, secs, _ = await client.fetch(ch, rid, mode)
                if check is None:  # the KV that landed is the model's
                    ref = mono.reference_kv(ids, (0, layout.num_layers - 1))
                    diff = max(float((client.kv.k[layer][client.last_slot, :, :tokens].transpose(0, 1) - want)
                                     .abs().max()) for layer, want in ref.items())
                    check = {"layers_checked": sorted(ref), "max_abs_diff_vs_hf": diff, "ok": diff < 1e-3}
                say(f"kv sequential {mode} {'warm-up' if not i else f'run {i}/{runs}'}: prefill {ev.compute_ms:.0f} ms, "
                    f"transfer {secs * 1000:.1f} ms ({nbytes / secs / 1e9:.2f} GB/s)")
                if i:
                    seq[mode].append({"compute_ms": ev.compute_ms, "wall_ms": wall * 1000, "xfer": secs * 1000,
                                      "bytes": nbytes})
            for mode in modes:  # FetchKv started at RUNNING, as the scheduler does it
                tasks: dict[str, asyncio.Task] = {}

                def start(rid: str, mode=mode) -> None:
                    tasks.setdefault("fetch", asyncio.ensure_future(client.fetch(ch, rid, mode)))

                await GATE.wait_async()
                sent = time.perf_counter()
                rid, ev, wall, ready_at = await client.prefill(stub, ids, on_running=start)
                nbytes, secs, done_at = await tasks["fetch"]
                tail = (done_at - ready_at) * 1000
                say(f"kv overlapped {mode}: prefill {ev.compute_ms:.0f} ms, KV complete {tail:+.1f} ms after READY")
                if i:
                    ovl[mode].append({"compute_ms": ev.compute_ms, "tail": tail, "bytes": nbytes,
                                      "total": (done_at - sent) * 1000})
    rows = seq["fast"]
    seq_compute = statistics.median(r["compute_ms"] for m in modes for r in seq[m])
    return {
        "prompt_tokens": tokens,
        "bytes": rows[0]["bytes"],
        "bytes_per_token": rows[0]["bytes"] // tokens,
        "runs": runs,
        "prefill_compute_ms": round(seq_compute, 2),
        "prefill_send_to_ready_ms": med([r["wall_ms"] for m in modes for r in seq[m]]),
        "sequential": {name: transfer_summary(seq[m], "xfer") for m, name in modes.items()},
        "overlapped": {
            name: {
                "prefill_compute_ms": med([r["compute_ms"] for r in ovl[m]]),
                "prefill_slowdown_vs_sequential": round(statistics.median(r["compute_ms"] for r in ovl[m]) / seq_compute, 3),
                "kv_complete_after_ready_ms": med([r["tail"] for r in ovl[m]]),
                "send_to_kv_complete_ms": med([r["total"] for r in ovl[m]]),
                "kv_complete_after_ready_ms_all": [round(r["tail"], 1) for r in ovl[m]],
            }
            for m, name in modes.items()
        },
        "kv_check": check,
    }


# ---- 3. Decode throughput ------------------------------------------------------------------------

def tokens_between(run: dict, a: float, b: float) -> int:
    return sum(n for t, n in run["marks"] if a < t <= b)


def decode_stats(runs: list[dict], new_tokens: int) -> dict:
    t0 = min(r["start"] for r in runs)
    firsts = [r["marks"][0][0] for r in runs]
    lasts = [r["marks"][-1][0] for r in runs]
    latest_first, t_last, earliest_last = max(firsts), max(lasts), min(lasts)
    generated = sum(len(r["tokens"]) for r in runs)
    out = {
        "requests": len(runs),
        "prompt_tokens": int(statistics.median(r["usage"].prompt_tokens for r in runs)),
        "generated_tokens": generated,
        "all_forced_length": all(len(r["tokens"]) == new_tokens for r in runs),
        "ttft_ms_median": med([(f - r["start"]) * 1000 for f, r in zip(firsts, runs)]),
        "ttft_ms_max": round((latest_first - t0) * 1000, 1),
        "server_tpot_ms_median": med([r["timing"].tpot_ms for r in runs]),
        "e2e_tokens_per_s": round(generated / (max(r["end"] for r in runs) - t0), 2),
        "e2e_s": round(max(r["end"] for r in runs) - t0, 3),
    }
    window = t_last - latest_first
    if window > 0:
        counts = [tokens_between(r, latest_first, t_last) for r in runs]
        steps = max(counts)
        out.update({
            # window: latest first token -> last token; only tokens that arrived inside it count
            "decode_window_ms": round(window * 1000, 1),
            "decode_tokens_per_s": round(sum(counts) / window, 2),
            "decode_step_ms": round(window * 1000 / steps, 2),
            "mean_active_in_window": round(sum(counts) / steps, 2),
            # the literal formula: every token after each request's first over the same window;
            # overstates throughput when early requests finish before the last one starts
            "tokens_after_first_over_window_per_s": round(sum(len(r["tokens"]) - 1 for r in runs) / window, 2),
        })
    full = earliest_last - latest_first
    if full > 0 and max(tokens_between(r, latest_first, earliest_last) for r in runs) >= 3:
        counts = [tokens_between(r, latest_first, earliest_last) for r in runs]
        out["full_batch_window"] = {"ms": round(full * 1000, 1), "tokens_per_s": round(sum(counts) / full, 2),
                                    "step_ms": round(full * 1000 / max(counts), 2), "steps": max(counts)}
    else:
        out["full_batch_window"] = None  # some requests finished before the last one joined
    return out


async def decode_throughput(mono: Monolith, address: str, batches: list[int], new_tokens: int,
                            prompt_tokens: int) -> dict:
    from prism.v1 import prism_pb2_grpc

    tok = mono.tokenizer
    prompts = [tok.decode(corpus_ids(tok, prompt_tokens, seed=100 + j)[1:]) for j in range(max(batches))]
    out = {"new_tokens": new_tokens, "target_prompt_tokens": prompt_tokens}
    async with channel(address) as ch:
        stub = prism_pb2_grpc.PrismServiceStub(ch)
        await generate(stub, text_request(prompts[0], 4))  # warm the text-only path
        for b in batches:
            await GATE.wait_async()
            runs = await asyncio.gather(*(generate(stub, text_request(prompts[j], new_tokens)) for j in range(b)))
            out[f"batch_{b}"] = stats = decode_stats(list(runs), new_tokens)
            say(f"decode batch {b}: {stats.get('decode_tokens_per_s')} tok/s in the decode window, "
                f"step {stats.get('decode_step_ms')} ms, e2e {stats['e2e_tokens_per_s']} tok/s")
    return out


# ---- Main ----------------------------------------------------------------------------------------

class Profiler:
    """`py-spy record` (raw collapsed stacks, with idle frames) of every stage process during one
    part; py-spy's sampling costs CPU, so numbers from a profiled run are not comparable."""

    def __init__(self, out_dir: Path | None, pids: dict[str, int], part: str):
        self.procs = []
        if out_dir is None:
            return
        import shutil
        import subprocess

        out_dir.mkdir(parents=True, exist_ok=True)
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        for stage, pid in pids.items():
            self.procs.append(subprocess.Popen(
                [spy, "record", "-p", str(pid), "-f", "raw", "-r", "200", "--idle", "--threads",
                 "-o", str(out_dir / f"{part}-{stage}.txt")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def __enter__(self) -> "Profiler":
        time.sleep(1.0 if self.procs else 0)  # let py-spy attach
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            proc.wait(30)


async def run_all(args, mono: Monolith, endpoints: dict[str, str], pids: dict[str, int], report: dict) -> None:
    if "latency" in args.parts:
        say("1/3 single-request latency: monolith vs Prism")
        with Profiler(args.py_spy, pids, "latency"):
            report["single_request"] = await single_request(mono, endpoints["scheduler"], args.runs, args.new_tokens)
    if "kv" in args.parts:
        say("2/3 KV transfer vs prefill")
        with Profiler(args.py_spy, pids, "kv"):
            report["kv_transfer"] = await kv_transfer(mono, next(a for n, a in endpoints.items() if n.startswith("prefill")), args.kv_runs, args.kv_tokens)
    if "decode" in args.parts:
        say("3/3 decode throughput")
        with Profiler(args.py_spy, pids, "decode"):
            report["decode_throughput"] = await decode_throughput(mono, endpoints["scheduler"], args.batches,
                                                                  args.decode_tokens, args.prompt_tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: fewer runs and tokens")
    p.add_argument("--out", type=Path, help="also write the JSON report here")
    p.add_argument("--model-dir", type=Path, default=SMALL_MODEL_DIR)
    p.add_argument("--threads", type=int, default=2, help="torch threads: monolith and each stage")
    p.add_argument("--runs", type=int, default=5, help="single-request runs (after a warm-up)")
    p.add_argument("--new-tokens", type=int, default=32, help="forced output length, single request")
    p.add_argument("--kv-runs", type=int, default=5)
    p.add_argument("--kv-tokens", type=int, default=1000)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--decode-tokens", type=int, default=64, help="forced output length, decode throughput")
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt length, decode throughput")
    p.add_argument("--parts", default="latency,kv,decode", help="comma-separated subset of latency,kv,decode")
    p.add_argument("--quiet-wait", type=float, default=120.0,
                   help="seconds to wait for an idle machine before each measured run (0: never wait)")
    p.add_argument("--py-spy", type=Path, metavar="DIR", help="profile the stage processes into DIR (py-spy)")
    p.add_argument("--log-dir", type=Path, default=ROOT / ".bench" / "logs" / "backbone")
    args = p.parse_args()
    ensure_malloc_tunables()
    if args.quick:
        args.runs, args.new_tokens, args.kv_runs, args.decode_tokens = 1, 8, 1, 16
    args.parts = set(args.parts.split(","))
    GATE.max_wait_s = args.quiet_wait

    import torch

    from prism.launch import Deployment, DeploymentOptions

    model_dir = ensure_model(args.model_dir)
    report: dict = {
        "benchmark": "backbone", "model": "llava small (fp32)", "model_dir": str(model_dir), "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads_per_stage": args.threads,
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                    "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)")},
    }
    started = time.time()
    say(f"loading the monolith ({model_dir})")
    mono = Monolith(model_dir, args.threads)
    options = DeploymentOptions(model_dir=model_dir, threads=args.threads, slots=16, max_len=2048, log_dir=args.log_dir)
    report["deployment"] = {"threads": args.threads, "slots": 16, "max_len": 2048, "logs": str(args.log_dir)}
    say("starting the deployment (encoder, prefill, decode, scheduler)")
    with Deployment(options) as dep:
        report["deployment"]["endpoints"] = dep.endpoints()
        pids = {name: child.pid for name, child in dep.supervisor.children.items()}
        asyncio.run(run_all(args, mono, dep.endpoints(), pids, report))
    finish_report(report, args.out, started)


if __name__ == "__main__":
    main()
