"""Prism against what a user would run instead, on this machine, in one run: the same model
directory, the same cores and the same open-loop request sequence (a window of a production
trace with images overlaid, `prism.bench`) for every engine.

Engines:

* ``hf_generate``: the monolithic Hugging Face model's ``generate`` in this process, one request
  at a time (requests queue in arrival order; TTFT counts the wait from arrival);
* ``transformers_serve``: ``transformers serve`` on the model directory (its own venv,
  ``--tf-venv``), OpenAI chat completions streamed over HTTP (no ignore-EOS there: its output
  lengths are not forced, and its records are not checked for length);
* ``vllm_cpu``: vLLM's CPU build (``--vllm-venv``, made by ``/work/shared/peers/setup_vllm_cpu.sh``),
  OpenAI chat completions with ``ignore_eos``;
* ``prism_colocated``, ``prism_split``, ``prism_adaptive``: Prism with every stage in one
  process, one process per stage, and both with the scheduler's adaptive placement
  (`prism.launch.Deployment`), replayed through the SDK with ``ignore_eos``.

Each engine gets a warm-up of two requests, then the sequence; the report has each engine's
summary (`prism.bench.stats.summarize`: TTFT/TPOT/e2e quantiles, throughput, goodput at the SLO,
attainment) and the ratios of every engine against ``hf_generate`` and ``transformers_serve``
(throughput, goodput and max load: higher is better; TTFT: lower is better). With ``--search``
it also searches each engine's largest rate scale meeting the SLO (expensive). A peer whose venv
is missing, or that fails to start, is reported with the reason and the run goes on.

    .venv/bin/python benchmarks/peers_bench.py --out .bench/peers.json            # full
    .venv/bin/python benchmarks/peers_bench.py --quick                            # smoke run
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, SMALL_MODEL_DIR, TRACES_DIR, finish_report, say  # noqa: E402
from benchmarks.common import ensure_model as ensure_small  # noqa: E402
from prism.bench import stats  # noqa: E402
from prism.bench.run import BenchConfig, requests_at  # noqa: E402
from prism.bench.stats import RequestRecord  # noqa: E402
from prism.bench.trace import ImageShape, TraceRequest, describe, load_trace  # noqa: E402
from prism.bench.workload import ModelLimits, Workload  # noqa: E402

ENGINES = ("hf_generate", "transformers_serve", "vllm_cpu", "prism_colocated", "prism_split", "prism_adaptive")
BASELINES = ("hf_generate", "transformers_serve")
PRISM = {"prism_colocated": ("colocated", "colocated"), "prism_split": ("split", "split"),
         "prism_adaptive": ("mixed", "adaptive")}
PEERS_DIR = ROOT / ".bench" / "peers"
#: The tiny LLaVA with 32-wide attention heads: vLLM's CPU attention has no kernel for the
#: tiny's 16 ("Unsupported CPU attention configuration: head_dim=16").
PEER_MODEL_DIR = ROOT / ".bench" / "models" / "llava-tiny-h32"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=PEER_MODEL_DIR,
                   help="LLaVA checkpoint (hub key layout, chat template); the default is built when missing "
                        "(e.g. .bench/models/llava-small for the small one)")
    p.add_argument("--trace", type=Path, default=TRACES_DIR / "azure_llm_2023_conv.csv")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--rate-scale", type=float, default=0.1, help="multiplies the trace's arrival rate")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of each replay")
    p.add_argument("--max-generated", type=int, default=32)
    p.add_argument("--image-side", type=int, default=0, help="0: drawn from the multimodal trace's shape")
    p.add_argument("--ttft-slo", type=float, default=1000.0, help="ms")
    p.add_argument("--tpot-slo", type=float, default=100.0, help="ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--search", action="store_true", help="also search each engine's max rate scale at the SLO")
    p.add_argument("--search-probes", type=int, default=4)
    p.add_argument("--target", type=float, default=0.9, help="SLO attainment the search must reach")
    p.add_argument("--threads", type=int, default=1, help="torch threads per Prism stage process")
    p.add_argument("--colocated-threads", type=int, default=2, help="torch threads of Prism's all-stage worker")
    p.add_argument("--hf-threads", type=int, default=2, help="torch threads of the in-process generate")
    p.add_argument("--tf-venv", type=Path, default=PEERS_DIR / "tf-venv")
    p.add_argument("--vllm-venv", type=Path, default=PEERS_DIR / "vllm-venv")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds a peer server may take to start")
    p.add_argument("--log-dir", type=Path, default=PEERS_DIR / "logs")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="a short smoke run (8 s replays, 8 output tokens)")
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.max_generated, a.search_probes = 8.0, 8, 3
    a.engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    unknown = set(a.engines) - set(ENGINES)
    if unknown:
        p.error(f"--engines: unknown {', '.join(sorted(unknown))} (known: {', '.join(ENGINES)})")
    return a


def ensure_model(model_dir: Path) -> Path:
    """The model to serve; the tiny LLaVA with 32-wide heads (built, seeded) when it is the
    default and missing, the small one when it is `SMALL_MODEL_DIR`."""
    if (model_dir / "config.json").is_file():
        return model_dir
    if model_dir == SMALL_MODEL_DIR:
        return ensure_small(model_dir)
    if model_dir != PEER_MODEL_DIR:
        raise SystemExit(f"--model-dir: {model_dir} has no config.json")
    from dataclasses import replace

    from prism.models import builder

    say(f"building the tiny LLaVA with 32-wide heads into {model_dir}")
    builder.DIMS.setdefault("tiny-h32", replace(builder.DIMS["tiny"], heads=2, tower_heads=2))
    return builder.make_model("llava", "tiny-h32", model_dir, seed=0)


# ---- engines: each serves a request list open loop and returns one record per request --------


class PrismEngine:
    """A Prism deployment (layout, placement) for the duration of a `with` block."""

    def __init__(self, name: str, args):
        from prism.launch import Deployment, DeploymentOptions

        layout, placement = PRISM[name]
        extra = {"worker": ["--threads", str(args.colocated_threads)]}
        self.dep = Deployment(DeploymentOptions(model_dir=args.model_dir, layout=layout, placement=placement,
                                                threads=args.threads, slots=16, max_len=2048,
                                                log_dir=args.log_dir / name, extra_args=extra))
        self.info = {"layout": layout, "placement": placement, "threads_per_stage_process": args.threads,
                     "all_stage_worker_threads": args.colocated_threads}

    def __enter__(self):
        self.dep.start()
        self.info["processes"] = sorted(self.dep.workers()) + ["scheduler"]
        return self

    def __exit__(self, *exc):
        self.dep.stop()

    def limits(self) -> ModelLimits:
        from prism.bench.replay import probe_limits

        return probe_limits(self.dep.address)

    def serve(self, reqs: list[TraceRequest], workload: Workload) -> list[RequestRecord]:
        from prism.bench.replay import replay

        return replay(self.dep.address, reqs, workload=workload, timeout_s=600)


class HFGenerate:
    """The monolithic model in this process: `generate`, one request at a time."""

    def __init__(self, name: str, args):
        self.args = args
        self.info = {"threads": args.hf_threads, "served": "one request at a time, in arrival order"}

    def __enter__(self):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        torch.set_num_threads(self.args.hf_threads)
        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(self.args.model_dir)
        self.model = AutoModelForImageTextToText.from_pretrained(self.args.model_dir, dtype=torch.float32).eval()
        return self

    def __exit__(self, *exc):
        del self.model

    def _one(self, text: str, images: list[bytes], n: int, clock) -> tuple[float | None, int]:
        from PIL import Image
        from transformers.generation.streamers import BaseStreamer

        first: list[float] = []

        class Timing(BaseStreamer):
            calls = 0

            def put(self, value):
                self.calls += 1
                if self.calls == 2 and not first:  # the first put is the prompt
                    first.append(clock())

            def end(self):
                pass

        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        content = [{"type": "image"} for _ in pil] + [{"type": "text", "text": text}]
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                    add_generation_prompt=True)
        inputs = self.processor(text=[prompt], images=pil or None, return_tensors="pt")
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      streamer=Timing())
        return (first[0] if first else None), int(out.shape[1] - inputs["input_ids"].shape[1])

    def serve(self, reqs: list[TraceRequest], workload: Workload) -> list[RequestRecord]:
        bodies = [(workload.text(k, r), workload.images(k, r)) for k, r in enumerate(reqs)]
        t0 = time.perf_counter() + 0.2

        def clock() -> float:
            return time.perf_counter() - t0

        out = []
        for k, r in enumerate(reqs):
            wait = r.arrival_s - clock()
            if wait > 0:
                time.sleep(wait)
            status, message, first, tokens = "OK", "", None, 0
            try:
                first, tokens = self._one(*bodies[k], r.generated_tokens, clock)
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                status, message = type(exc).__name__, str(exc)[:300]
            # queued from its arrival: the wait behind earlier requests is part of its latency
            out.append(RequestRecord(arrival_s=r.arrival_s, sent_s=r.arrival_s, first_token_s=first,
                                     done_s=clock(), tokens=tokens, status=status,
                                     expected_tokens=r.generated_tokens, num_images=r.num_images, message=message))
        return out


class OpenAIServer:
    """A peer serving OpenAI chat completions, started as a process of its own venv."""

    def __init__(self, name: str, args):
        self.name, self.args = name, args
        self.port = 8101 if name == "vllm_cpu" else 8102
        self.proc: subprocess.Popen | None = None
        self.log_path = args.log_dir / f"{name}.log"
        venv = args.vllm_venv if name == "vllm_cpu" else args.tf_venv
        self.exe = venv / "bin" / ("vllm" if name == "vllm_cpu" else "transformers")
        self.ignore_eos = name == "vllm_cpu"
        model = str(args.model_dir.resolve())
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1")
        if name == "vllm_cpu":
            self.model_name = "prism-peer"
            self.argv = [str(self.exe), "serve", model, "--served-model-name", self.model_name, "--host", "127.0.0.1",
                         "--port", str(self.port), "--dtype", "float32", "--max-model-len", "2048",
                         "--limit-mm-per-prompt", json.dumps({"image": 8}), "--mm-processor-cache-gb", "0",
                         "--no-enable-prefix-caching"]
            env.update(VLLM_CPU_KVCACHE_SPACE="2", VLLM_NO_USAGE_STATS="1")
        else:
            self.model_name = model  # transformers serve: the request names the directory
            hf_home = PEERS_DIR / "hf-home"
            (hf_home / "hub").mkdir(parents=True, exist_ok=True)
            self.argv = [str(self.exe), "serve", model, "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1",
                         "--port", str(self.port)]
            env.update(HF_HOME=str(hf_home))
        self.env = env
        self.info = {"command": " ".join(self.argv), "ignore_eos": self.ignore_eos}

    def missing(self) -> str | None:
        if not self.exe.exists():
            setup = ("/work/shared/peers/setup_vllm_cpu.sh " + str(self.args.vllm_venv) if self.name == "vllm_cpu"
                     else f"python3 -m venv {self.args.tf_venv} && {self.args.tf_venv}/bin/pip install "
                          "'torch==2.13.0' 'transformers[serving]==5.23.0' pillow")
            return f"{self.exe} not found; install it with: {setup}"
        return None

    def __enter__(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True, cwd=str(PEERS_DIR))
        until = time.monotonic() + self.args.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > until:
                raise RuntimeError(f"{self.name} not ready after {self.args.start_timeout:.0f} s: {self.log_tail()}")
            time.sleep(1.0)
        return self

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its workers
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def _one(self, text: str, images: list[bytes], n: int, clock) -> tuple[float, float | None, float, int, str, str]:
        content = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(b).decode()}}
                   for b in images]
        content.append({"type": "text", "text": text})
        body = {"model": self.model_name, "messages": [{"role": "user", "content": content}], "max_tokens": n,
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body.update(ignore_eos=True, min_tokens=n)
        sent = clock()
        first, chunks, usage, status, message = None, 0, None, "OK", ""
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                status, message = f"HTTP_{resp.status}", resp.read()[:300].decode(errors="replace")
            else:
                for line in resp:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        break
                    obj = json.loads(payload)
                    if obj.get("error"):  # the server failed mid-stream (HTTP 200 already sent)
                        err = obj["error"]
                        status, message = "STREAM_ERROR", str(err.get("message", err) if isinstance(err, dict) else err)[:300]
                        break
                    if obj.get("usage"):
                        usage = obj["usage"]
                    for choice in obj.get("choices") or ():
                        if (choice.get("delta") or {}).get("content"):
                            first = clock() if first is None else first
                            chunks += 1
            conn.close()
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            status, message = type(exc).__name__, str(exc)[:300]
        tokens = int(usage.get("completion_tokens", chunks)) if usage else chunks
        if status == "OK" and tokens == 0:
            status, message = "NO_TOKENS", "the stream ended without a token"
        return sent, first, clock(), tokens, status, message

    def serve(self, reqs: list[TraceRequest], workload: Workload) -> list[RequestRecord]:
        bodies = [(workload.text(k, r), workload.images(k, r)) for k, r in enumerate(reqs)]
        t0 = time.perf_counter() + 0.3

        def clock() -> float:
            return time.perf_counter() - t0

        def one(k: int) -> RequestRecord:
            r = reqs[k]
            wait = r.arrival_s - clock()
            if wait > 0:
                time.sleep(wait)
            sent, first, done, tokens, status, message = self._one(*bodies[k], r.generated_tokens, clock)
            return RequestRecord(arrival_s=r.arrival_s, sent_s=sent, first_token_s=first, done_s=done, tokens=tokens,
                                 status=status, expected_tokens=r.generated_tokens if self.ignore_eos else 0,
                                 num_images=r.num_images, message=message)

        with ThreadPoolExecutor(max_workers=max(1, len(reqs))) as pool:
            return list(pool.map(one, range(len(reqs))))


def make_engine(name: str, args):
    if name in PRISM:
        return PrismEngine(name, args)
    if name == "hf_generate":
        return HFGenerate(name, args)
    return OpenAIServer(name, args)


# ---- the run ------------------------------------------------------------------------------------


def warmup_requests() -> list[TraceRequest]:
    return [TraceRequest(0.0, 64, 4, 0), TraceRequest(0.0, 160, 4, 1)]


def measure(engine, name: str, args, cfg: BenchConfig, trace, limits: ModelLimits, workload: Workload,
            seq: list[TraceRequest]) -> dict:
    warm = engine.serve(warmup_requests(), workload)
    bad = [r for r in warm if not r.ok]
    if bad:
        raise RuntimeError(f"warm-up failed: {bad[0].status} {bad[0].message}")

    def run_at(reqs: list[TraceRequest]) -> dict:
        records = engine.serve(reqs, workload)
        duration = max(args.duration, max(r.arrival_s for r in reqs))
        s = stats.summarize(records, ttft_slo_ms=args.ttft_slo, tpot_slo_ms=args.tpot_slo, duration_s=duration)
        s["offered_rps"] = round(len(reqs) / duration, 4)
        s["mean_tokens"] = round(sum(r.tokens for r in records) / max(1, len(records)), 2)
        s["errors"] = sorted({f"{r.status}: {r.message[:160]}" for r in records if not r.ok})[:5]
        return s

    say(f"{name}: replaying {len(seq)} requests over {args.duration:g} s")
    out = run_at(seq) | {"rate_scale": args.rate_scale}
    say(f"{name}: {out['completed']}/{out['requests']} completed, {out['good']} good, "
        f"ttft p50 {out['ttft_ms']['p50']} ms p99 {out['ttft_ms']['p99']} ms, tpot p50 {out['tpot_ms']['p50']} ms")
    if args.search:
        cache = {args.rate_scale: out}

        def attainment(s: float):
            if s not in cache:
                say(f"{name}: search at rate scale {s:.4g}")
                cache[s] = run_at(requests_at(trace, cfg, limits, s)) | {"rate_scale": s}
            return cache[s]["slo_attainment"] or 0.0

        found = stats.max_load(attainment, target=args.target, start=args.rate_scale, max_probes=args.search_probes,
                               max_scale=args.rate_scale * 256, min_scale=args.rate_scale / 256)
        out["max_load"] = found.as_dict() | {
            "max_offered_rps": cache[found.best]["offered_rps"] if found.best is not None else None}
    return out


def ratios(engines: dict) -> dict:
    def metric(e: dict, key: str):
        if key == "max_scale":
            return (e.get("max_load") or {}).get("max_scale")
        if key.startswith("ttft_"):
            return e["ttft_ms"][key.split("_")[1]]
        return e.get(key)

    out: dict = {}
    for base in BASELINES:
        b = engines.get(base)
        if not b or "error" in b or "skipped" in b:
            continue
        for name, e in engines.items():
            if name == base or "error" in e or "skipped" in e:
                continue
            row = {}
            for key, label in (("throughput_rps", "throughput_x"), ("goodput_rps", "goodput_x"),
                               ("slo_attainment", "attainment_x"), ("ttft_p50", "ttft_p50_x"),
                               ("ttft_p99", "ttft_p99_x"), ("max_scale", "max_load_x")):
                x, y = metric(e, key), metric(b, key)
                row[label] = round(x / y, 3) if x is not None and y else None
            if row["max_load_x"] is not None:
                # the search stopped before this engine failed (or before the baseline did):
                # the ratio is then a lower (upper) bound
                open_e = e["max_load"]["first_failing_scale"] is None
                open_b = b["max_load"]["first_failing_scale"] is None
                row["max_load_x_bound"] = {(False, False): "bracketed", (True, False): "lower",
                                           (False, True): "upper", (True, True): "unknown"}[(open_e, open_b)]
            out[f"{name}_over_{base}"] = row
    return out


def main(argv=None) -> int:
    args = parse(argv)
    started = time.time()
    args.model_dir = ensure_model(args.model_dir)
    cfg = BenchConfig(trace=args.trace, out_dir=PEERS_DIR / "out", rate_scale=args.rate_scale,
                      duration_s=args.duration, ttft_slo_ms=args.ttft_slo, tpot_slo_ms=args.tpot_slo, seed=args.seed,
                      max_generated=args.max_generated, image_side=args.image_side, plots=False)
    trace = load_trace(args.trace, seed=args.seed, shape=ImageShape())
    # the model's limits as Prism reports them (ListModels and three probes), used by every engine
    say("probing the model's limits through a colocated Prism deployment")
    with PrismEngine("prism_colocated", args) as probe:
        limits = probe.limits()
    limits = ModelLimits(**{**limits.__dict__, "max_images": min(limits.max_images, 8)})
    workload = Workload(limits, seed=args.seed, image_side_px=args.image_side)
    seq = requests_at(trace, cfg, limits, args.rate_scale)
    report: dict = {
        "model_dir": str(args.model_dir),
        "machine": {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "quick": args.quick,
        "slo": {"ttft_ms": args.ttft_slo, "tpot_ms": args.tpot_slo, "target_attainment": args.target},
        "sequence": {"trace": str(args.trace), "seed": args.seed, "rate_scale": args.rate_scale,
                     "duration_s": args.duration, "model_limits": limits.__dict__, "requests": describe(seq)},
        "engines": {},
    }
    for name in args.engines:
        engine = make_engine(name, args)
        why = engine.missing() if hasattr(engine, "missing") else None
        if why:
            say(f"{name}: skipped: {why}")
            report["engines"][name] = {"skipped": why}
            continue
        say(f"{name}: starting")
        t = time.perf_counter()
        try:
            with engine:
                start_s = round(time.perf_counter() - t, 1)
                out = measure(engine, name, args, cfg, trace, limits, workload, seq)
                report["engines"][name] = {"start_s": start_s, **engine.info, **out}
        except Exception as exc:  # noqa: BLE001 - one engine failing must not lose the others
            detail = f"{type(exc).__name__}: {exc}"
            say(f"{name}: FAILED: {detail[:400]}")
            report["engines"][name] = {"error": detail[:3000], **engine.info}
            if isinstance(engine, OpenAIServer):  # the server's own words (e.g. vLLM's RuntimeError)
                lines = engine.log_tail(200_000).splitlines()
                report["engines"][name]["log_errors"] = [ln[-400:] for ln in lines if "Error" in ln][-8:]
    report["ratios"] = ratios(report["engines"])
    report["command"] = "python benchmarks/peers_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    finish_report(report, args.out, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
