"""The goodput part of the scheduler benchmark: the same bursty mixed request sequence (the
burstiest window of a production trace, images overlaid with the multimodal shape, scaled to a
CPU-sized model) replayed against split, colocated and adaptive deployments of the small LLaVA,
each request carrying the same TTFT/TPOT SLO calibrated on the idle split deployment. Goodput is
the requests meeting both targets per second of trace time."""
from __future__ import annotations

import asyncio
import io
import os
import statistics
import time
from pathlib import Path

from benchmarks.common import GATE, SMALL_MODEL_DIR, TRACES_DIR, ensure_model, pct, rnd, say

MODEL_DIR = SMALL_MODEL_DIR
TRACE = TRACES_DIR / "azure_llm_2023_conv.csv"
IMAGE_SIDE = 224
DEPLOYMENTS = (  # name, layout, placement
    ("split", "split", "split"),
    ("colocated", "colocated", "colocated"),
    ("adaptive", "mixed", "adaptive"),
)


def goodput_sequence(args) -> tuple[list, dict]:
    """The replayed request sequence (module docstring) and how it was made."""
    from prism.bench.trace import ImageShape, burstiest_window, describe, load_trace, scale

    full = load_trace(args.trace, seed=args.seed, shape=ImageShape(period_s=args.image_period_s))
    window = burstiest_window(full, args.window_s)
    seq = scale(window, time_factor=args.time_factor, context_factor=1 / 8, max_context=args.max_context,
                min_context=8, generated_factor=1 / 8, max_generated=args.max_generated, min_generated=2,
                max_images=args.max_images)
    meta = {
        "trace": str(args.trace),
        "seed": args.seed,
        "trace_requests": len(full),
        "trace_rate_per_s": describe(full)["rate_per_s"],
        "window_s": args.window_s,
        "window_rate_per_s": rnd(len(window) / args.window_s, 2),
        "window_over_trace_rate": rnd(len(window) / args.window_s / describe(full)["rate_per_s"], 2),
        "image_overlay": {"period_s": args.image_period_s, "base_p": round(1 / 11, 4),
                          "burst_p": round(10 / 11, 4), "stay_p": 0.7},
        "window_before_scaling": describe(window),
        "scaling": {"time_factor": args.time_factor,
                    "context_tokens": f"x1/8, clipped to [8, {args.max_context}]",
                    "generated_tokens": f"x1/8, clipped to [2, {args.max_generated}], forced (ignore_eos)",
                    "max_images": args.max_images,
                    "image": f"{IMAGE_SIDE}x{IMAGE_SIDE} random PNG (seeded)"},
        "replayed": describe(seq),
        "trace_time_s": round(args.window_s * args.time_factor, 3),
        "pattern": "".join(str(r.num_images) for r in seq),
    }
    return seq, meta


def random_png(seed: int, side: int = IMAGE_SIDE) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class Prompts:
    """Text prompts of an exact token count (English-like corpus text, re-tokenised) and the
    seeded images, shared by all deployments."""

    def __init__(self, model_dir: Path, seed: int):
        from transformers import AutoTokenizer

        from prism.models.builder import english_corpus

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.model_max_length = 1 << 30  # the corpus is tokenised once, then sliced
        text = " ".join(english_corpus(400, seed=seed + 11))
        self.ids = self.tok(text, add_special_tokens=False)["input_ids"]
        self.seed = seed
        self._images: dict[int, bytes] = {}

    def text(self, k: int, tokens: int) -> str:
        start = (k * 97) % max(1, len(self.ids) - tokens)
        return self.tok.decode(self.ids[start:start + tokens]).strip()

    def image(self, k: int) -> bytes:
        if k not in self._images:
            self._images[k] = random_png(self.seed * 1000 + k)
        return self._images[k]

    def messages(self, k: int, tokens: int, images: int) -> list[dict]:
        content = [{"type": "image", "image": self.image(2 * k + j)} for j in range(images)]
        content.append({"type": "text", "text": self.text(k, tokens)})
        return [{"role": "user", "content": content}]


async def send(client, messages: list[dict], new_tokens: int, *, ttft_ms: int = 0, tpot_ms: int = 0,
               timeout: float = 300.0, request_id: str = "", **request_kw) -> dict:
    """One streaming request; client-side times (perf_counter) and the server's timing.
    `request_kw`: further `generate` arguments (deadline_ms, reduce, ...)."""
    from prism.client import PrismError

    sent = time.perf_counter()
    first = last = None
    n, timing, usage, code, message, reductions = 0, None, None, "OK", "", None
    try:
        async for chunk in client.generate(messages=messages, max_new_tokens=new_tokens, ignore_eos=True,
                                           ttft_ms=ttft_ms, tpot_ms=tpot_ms, timeout=timeout,
                                           request_id=request_id, **request_kw):
            now = time.perf_counter()
            if chunk.token_ids:
                first = now if first is None else first
                last = now
                n += len(chunk.token_ids)
            if chunk.timing is not None:
                timing = chunk.timing
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.reductions is not None:
                reductions = chunk.reductions
    except PrismError as exc:
        code, message = exc.code.name, exc.message[:300]
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not crash mid-replay
        code, message = type(exc).__name__, str(exc)[:300]
    end = time.perf_counter()
    return {
        "sent": sent, "end": end, "tokens": n, "code": code, "message": message,
        "ttft_ms": (first - sent) * 1000 if first is not None else None,
        "tpot_ms": (last - first) * 1000 / (n - 1) if first is not None and n > 1 else None,
        "e2e_ms": (end - sent) * 1000,
        "server_ttft_ms": timing.ttft_ms if timing else None,
        "server_tpot_ms": timing.tpot_ms if timing else None,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "image_tokens": usage.image_tokens if usage else None,
        "reductions": reductions,
    }


async def warm_up(address: str, prompts: Prompts, new_tokens: int) -> None:
    """Same warm-up for every deployment: a text and a 1-image request one at a time, then two
    concurrent bursts of 4 mixed requests (so both paths of a mixed layout run once)."""
    from prism.client import AsyncPrismClient

    async with AsyncPrismClient(address) as client:
        for k, images in ((900, 0), (901, 1)):
            r = await send(client, prompts.messages(k, 64, images), new_tokens)
            if r["code"] != "OK":
                raise RuntimeError(f"warm-up request failed: {r['code']} {r['message']}")
        for burst in range(2):
            rs = await asyncio.gather(*(send(client, prompts.messages(910 + 4 * burst + j, 64, j % 3),
                                             new_tokens) for j in range(4)))
            bad = [r for r in rs if r["code"] != "OK"]
            if bad:
                raise RuntimeError(f"warm-up burst failed: {bad[0]['code']} {bad[0]['message']}")


async def calibrate(address: str, prompts: Prompts, tokens: int, new_tokens: int, runs: int = 3) -> dict:
    """Idle single-request TTFT and TPOT of a 1-image request (median of `runs`)."""
    from prism.client import AsyncPrismClient

    rows = []
    async with AsyncPrismClient(address) as client:
        for k in range(runs):
            GATE.wait()
            r = await send(client, prompts.messages(950 + k, tokens, 1), new_tokens)
            if r["code"] != "OK" or r["ttft_ms"] is None or r["tpot_ms"] is None:
                raise RuntimeError(f"calibration request failed: {r['code']} {r['message']}")
            say(f"calibration {k + 1}/{runs}: ttft {r['ttft_ms']:.0f} ms, tpot {r['tpot_ms']:.1f} ms")
            rows.append(r)
    return {
        "request": {"images": 1, "text_tokens": tokens, "new_tokens": new_tokens,
                    "prompt_tokens": rows[0]["prompt_tokens"], "image_tokens": rows[0]["image_tokens"]},
        "runs": runs,
        "idle_ttft_ms": rnd(statistics.median(r["ttft_ms"] for r in rows), 1),
        "idle_tpot_ms": rnd(statistics.median(r["tpot_ms"] for r in rows), 2),
        "idle_ttft_ms_all": [rnd(r["ttft_ms"], 1) for r in rows],
        "idle_tpot_ms_all": [rnd(r["tpot_ms"], 2) for r in rows],
    }


async def replay(address: str, seq: list, prompts: Prompts, slo: dict, timeout: float) -> list[dict]:
    """Sends every request of `seq` at its arrival time (open loop); returns their results."""
    from prism.client import AsyncPrismClient

    loop = asyncio.get_running_loop()
    results: list[dict | None] = [None] * len(seq)
    done = {"n": 0}

    # made ahead, so that image encoding does not delay the sends
    bodies = [prompts.messages(k, req.context_tokens, req.num_images) for k, req in enumerate(seq)]
    async with AsyncPrismClient(address) as client:
        t0 = loop.time() + 0.2

        async def one(k: int, req) -> None:
            await asyncio.sleep(max(0.0, t0 + req.arrival_s - loop.time()))
            late = loop.time() - (t0 + req.arrival_s)
            r = await send(client, bodies[k], req.generated_tokens,
                           ttft_ms=slo["ttft_ms"], tpot_ms=slo["tpot_ms"], timeout=timeout)
            r.update(index=k, arrival_s=req.arrival_s, images=req.num_images, text_tokens=req.context_tokens,
                     new_tokens=req.generated_tokens, send_late_ms=late * 1000)
            results[k] = r
            done["n"] += 1
            if r["code"] != "OK":
                say(f"  request {k} ({req.num_images} img): {r['code']} {r['message'][:120]}")

        async def progress() -> None:
            while done["n"] < len(seq):
                await asyncio.sleep(10)
                say(f"  {done['n']}/{len(seq)} requests finished, t = {loop.time() - t0:.0f} s")

        ticker = asyncio.create_task(progress())
        try:
            await asyncio.gather(*(one(k, r) for k, r in enumerate(seq)))
        finally:
            ticker.cancel()
    return [r for r in results if r is not None]


def is_good(r: dict, slo: dict) -> bool:
    """Completed with all its tokens, TTFT and TPOT (client-measured) within the targets."""
    return (r["code"] == "OK" and r["tokens"] == r["new_tokens"] and r["ttft_ms"] is not None
            and r["ttft_ms"] <= slo["ttft_ms"] and (r["tpot_ms"] is None or r["tpot_ms"] <= slo["tpot_ms"]))


def summarise(results: list[dict], slo: dict, trace_time_s: float) -> dict:
    ok = [r for r in results if r["code"] == "OK" and r["tokens"] == r["new_tokens"]]
    good = [r for r in ok if is_good(r, slo)]
    ttft = sorted(r["ttft_ms"] for r in ok if r["ttft_ms"] is not None)
    tpot = sorted(r["tpot_ms"] for r in ok if r["tpot_ms"] is not None)
    codes: dict[str, int] = {}
    for r in results:
        codes[r["code"]] = codes.get(r["code"], 0) + 1

    def by(kind: str, rows: list[dict]) -> dict:
        sel = [r for r in rows if (r["images"] > 0) == (kind == "image")]
        g = [r for r in sel if r in good]
        t = sorted(r["ttft_ms"] for r in sel if r["ttft_ms"] is not None and r in ok)
        return {"requests": len(sel), "good": len(g), "ttft_p50_ms": rnd(pct(t, 0.5), 1)}

    first, last_end = min(r["sent"] for r in results), max(r["end"] for r in results)
    return {
        "requests": len(results),
        "completed": len(ok),
        "good": len(good),
        "goodput_per_s": round(len(good) / trace_time_s, 4),
        "slo_attainment": round(len(good) / len(results), 4) if results else None,
        "ttft_ok": sum(1 for r in ok if r["ttft_ms"] is not None and r["ttft_ms"] <= slo["ttft_ms"]),
        "tpot_ok": sum(1 for r in ok if r["tpot_ms"] is None or r["tpot_ms"] <= slo["tpot_ms"]),
        "ttft_p50_ms": rnd(pct(ttft, 0.5), 1),
        "ttft_p99_ms": rnd(pct(ttft, 0.99), 1),
        "tpot_p50_ms": rnd(pct(tpot, 0.5), 2),
        "tpot_p99_ms": rnd(pct(tpot, 0.99), 2),
        "e2e_p50_ms": rnd(pct(sorted(r["e2e_ms"] for r in ok), 0.5), 1),
        "codes": dict(sorted(codes.items())),
        "text_only": by("text", results),
        "with_images": by("image", results),
        "makespan_s": round(last_end - first, 2),
        "max_send_late_ms": rnd(max(r["send_late_ms"] for r in results), 1),
    }


def run_deployment(name: str, layout: str, placement: str, args, seq: list, prompts: Prompts,
                   slo: dict | None, trace_time_s: float) -> tuple[dict, dict | None]:
    """Starts one deployment, warms it up, calibrates the SLO when `slo` is None, replays the
    sequence and stops it. Returns (its report, the SLO)."""
    from prism.launch import Deployment, DeploymentOptions

    # the all-stage worker gets its own thread count (argparse: the last --threads wins)
    extra = {"worker": ["--threads", str(args.colocated_threads)]}
    options = DeploymentOptions(model_dir=args.model_dir, layout=layout, placement=placement,
                                threads=args.stage_threads, slots=16, max_len=2048,
                                log_dir=args.log_dir / name, extra_args=extra)
    say(f"goodput {name}: starting (layout {layout}, placement {placement})")
    started = time.perf_counter()
    out: dict = {"layout": layout, "placement": placement}
    with Deployment(options) as dep:
        out["start_s"] = round(time.perf_counter() - started, 1)
        out["workers"] = sorted(dep.workers())
        say(f"goodput {name}: up in {out['start_s']} s ({', '.join(out['workers'])}); warming up")
        asyncio.run(warm_up(dep.address, prompts, args.max_generated))
        calibration = None
        if slo is None:
            tokens = int(statistics.median(r.context_tokens for r in seq))
            calibration = asyncio.run(calibrate(dep.address, prompts, tokens, args.max_generated))
            slo = {"ttft_ms": max(1, round(args.ttft_slo_x * calibration["idle_ttft_ms"])),
                   "tpot_ms": max(1, round(args.tpot_slo_x * calibration["idle_tpot_ms"])),
                   "calibrated_on": name, "ttft_x": args.ttft_slo_x, "tpot_x": args.tpot_slo_x,
                   "calibration": calibration}
            say(f"SLO: ttft {slo['ttft_ms']} ms, tpot {slo['tpot_ms']} ms")
        before = dict(dep.status().placements)
        out["cpu_busy_before"] = round(GATE.wait(), 3)
        out["loadavg_before"] = [round(x, 2) for x in os.getloadavg()]
        say(f"goodput {name}: replaying {len(seq)} requests over {seq[-1].arrival_s:.0f} s")
        results = asyncio.run(replay(dep.address, seq, prompts, slo, args.request_timeout))
        status = dep.status()
        after = dict(status.placements)
        out.update(summarise(results, slo, trace_time_s))
        out["paths"] = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))}
        out["paths_incl_warmup"] = dict(sorted(after.items()))
        out["dead_letters"] = status.dead_letters
        out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        out["per_request"] = [
            {"i": r["index"], "at_s": round(r["arrival_s"], 2), "img": r["images"], "txt": r["text_tokens"],
             "new": r["new_tokens"], "code": r["code"], "tokens": r["tokens"],
             "ttft_ms": rnd(r["ttft_ms"], 1), "tpot_ms": rnd(r["tpot_ms"], 1),
             "server_ttft_ms": rnd(r["server_ttft_ms"], 1), "good": is_good(r, slo)}
            for r in sorted(results, key=lambda r: r["index"])]
    say(f"goodput {name}: {out['good']}/{out['requests']} good, goodput {out['goodput_per_s']}/s, "
        f"ttft p50 {out['ttft_p50_ms']} ms p99 {out['ttft_p99_ms']} ms, paths {out['paths']}")
    return out, slo


def goodput(args) -> dict:
    ensure_model(args.model_dir)
    seq, meta = goodput_sequence(args)
    say(f"goodput sequence: {len(seq)} requests over {seq[-1].arrival_s:.0f} s, images per request "
        f"{meta['pattern']}")
    prompts = Prompts(args.model_dir, args.seed)
    trace_time_s = meta["trace_time_s"]
    report: dict = {"model": "llava small (fp32)", "model_dir": str(args.model_dir), "sequence": meta,
                    "threads": {"single_stage_worker": args.stage_threads,
                                "all_stage_worker": args.colocated_threads},
                    "slo": None, "placements": {}}
    slo = None
    for name, layout, placement in DEPLOYMENTS:
        if name not in args.deployments:
            continue
        out, slo = run_deployment(name, layout, placement, args, seq, prompts, slo, trace_time_s)
        report["placements"][name] = out
    report["slo"] = {k: v for k, v in slo.items()} if slo else None
    p = report["placements"]

    def ratio(a: str, b: str, key: str):
        if a in p and b in p and p[b][key]:
            return round(p[a][key] / p[b][key], 3)
        return None

    report["ratios"] = {
        "goodput_adaptive_over_split": ratio("adaptive", "split", "goodput_per_s"),
        "goodput_adaptive_over_colocated": ratio("adaptive", "colocated", "goodput_per_s"),
        "attainment_adaptive_over_split": ratio("adaptive", "split", "slo_attainment"),
        "attainment_adaptive_over_colocated": ratio("adaptive", "colocated", "slo_attainment"),
        "ttft_p99_adaptive_over_split": ratio("adaptive", "split", "ttft_p99_ms"),
        "ttft_p99_adaptive_over_colocated": ratio("adaptive", "colocated", "ttft_p99_ms"),
    }
    return report


