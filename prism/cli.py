"""The ``prism`` command.

One typer app with a sub-app per command group; each command imports what it needs when it
runs, so ``prism --help`` stays fast and the client-only install can still show help. To add a
command group, build a ``typer.Typer`` below and register it with ``app.add_typer``; to add a
top-level command, decorate a function with ``@app.command()``.

    prism models make --family llava --size tiny --out models/tiny-llava
    python -m prism.cli models make --family qwen2-vl --out /tmp/qwen
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    name="prism",
    help="Prism: disaggregated encoder/prefill/decode serving for large multimodal models.",
    no_args_is_help=True,
    add_completion=False,
)

# ---- prism models ... -------------------------------------------------------------------------

models_app = typer.Typer(help="Build and inspect model checkpoints.", no_args_is_help=True)
app.add_typer(models_app, name="models")

# Kept in step with prism.models.builder (checked by its tests) so that --help needs no torch.
_FAMILIES = ("llava", "qwen2-vl", "qwen2.5-vl", "qwen2-audio")
_SIZES = ("tiny", "small")


def _one_of(name: str, choices: tuple[str, ...]):
    def check(value: str) -> str:
        if value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}", param_hint=name)
        return value

    return check


@models_app.command("make")
def models_make(
    family: str = typer.Option(..., "--family", help=f"Model family: {' | '.join(_FAMILIES)}.",
                               callback=_one_of("--family", _FAMILIES)),
    size: str = typer.Option("tiny", "--size", help=f"Model size: {' | '.join(_SIZES)}.",
                             callback=_one_of("--size", _SIZES)),
    out: Path = typer.Option(..., "--out", help="Directory to write the checkpoint into (created)."),
    seed: int = typer.Option(0, "--seed", help="Random seed for the weights."),
) -> None:
    """Build a seeded random checkpoint (weights, tokenizer, processor) that loads like a real one."""
    from prism.models.builder import make_model

    path = make_model(family, size, out, seed=seed)
    typer.echo(str(path))


# ---- prism keys ... ---------------------------------------------------------------------------

keys_app = typer.Typer(help="API keys of the front door.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new(
    name: str = typer.Argument(..., help="The caller's name, as it appears on spans and metrics."),
    rate: float = typer.Option(0.0, "--rate", help="Requests per second (0: unlimited)."),
    burst: int = typer.Option(0, "--burst", help="Requests at once above the rate (0: max(1, rate))."),
    concurrency: int = typer.Option(0, "--concurrency", help="Calls open at once (0: unlimited)."),
    admin: bool = typer.Option(False, "--admin", help="May call the scheduler's admin service."),
    add_to: Path | None = typer.Option(None, "--add-to", help="Append the entry to this key-ring file "
                                       "(created if missing) instead of printing it."),
) -> None:
    """Make an API key: prints the key once (give it to the caller) and its key-ring entry, which
    holds only the key's SHA-256 (give it to the scheduler: --api-keys-file or PRISM_SCHEDULER_API_KEYS)."""
    import json

    from services.scheduler.core.quota import KeyRing, KeyRingError, new_key

    try:
        key, entry = new_key(name, rate_per_s=rate, burst=burst, max_concurrent=concurrency, admin=admin)
        if add_to is not None:
            doc = json.loads(add_to.read_text()) if add_to.exists() else {"keys": []}
            doc["keys"].append(entry)
            KeyRing.from_json(json.dumps(doc))  # refuses a duplicate name before writing
            add_to.write_text(json.dumps(doc, indent=2) + "\n")
    except (KeyRingError, ValueError, KeyError, TypeError) as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(key)
    if add_to is None:
        typer.echo(json.dumps(entry), err=True)


# ---- prism up / prism demo ------------------------------------------------------------------

@app.command("up")
def up(
    model: Path = typer.Option(..., "--model", help="Checkpoint directory to serve."),
    port: int = typer.Option(50051, "--port", help="Scheduler (public) port; 0 picks a free one."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address every service listens on."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16."),
    device: str = typer.Option("cpu", "--device", help="torch device for the stages, e.g. cuda:0."),
    threads: int = typer.Option(1, "--threads", help="torch threads per stage process (0: torch's default)."),
    slots: int = typer.Option(16, "--slots", help="Decode slots (requests decoded at once)."),
    max_len: int = typer.Option(2048, "--max-len", help="Tokens per request: prompt plus generated."),
    log_dir: Path = typer.Option(None, "--log-dir", help="Where each service's log goes (default: a temp dir)."),
    redis_url: str = typer.Option("", "--redis-url", help="Redis for the queues; empty starts a local redis-server (append-only)."),
    layout: str = typer.Option("split", "--layout", help="split (a process per stage), colocated (one process, all stages) or mixed."),
    placement: str = typer.Option("adaptive", "--placement", help="Scheduler placement: adaptive, split or colocated."),
    autoscale: bool = typer.Option(False, "--autoscale/--no-autoscale", help="Start and stop stage workers to match the scheduler's desired replicas."),
    min_replicas: int = typer.Option(1, "--min-replicas", help="Autoscaling: fewest workers per stage."),
    max_replicas: int = typer.Option(4, "--max-replicas", help="Autoscaling: most workers per stage."),
    tls: bool = typer.Option(False, "--tls/--no-tls", help="Make a throwaway CA and certificate: mutual TLS between "
                             "the services, TLS at the front door (callers trust <log-dir>/tls/ca.pem)."),
    variant: list[str] = typer.Option([], "--variant", help="A variant served side by side, NAME=DIR[:ACCURACY] "
                                      "(repeatable): its own workers (--variant NAME), the scheduler's --variants."),
    variant_dtype: list[str] = typer.Option([], "--variant-dtype", help="NAME=DTYPE of a variant (repeatable; "
                                            "default --dtype), e.g. bf16=bfloat16 for a bf16 variant of one checkpoint."),
    scheduler_arg: list[str] = typer.Option([], "--scheduler-arg", help="An extra scheduler argument (repeatable), "
                                            "e.g. --scheduler-arg=--adapt --scheduler-arg=--adapt-profile=variants.json."),
) -> None:
    """Start Redis (unless --redis-url), the stage workers and the scheduler as processes on
    loopback; Ctrl-C stops them."""
    import signal
    import threading

    from prism.launch import Deployment, DeploymentOptions

    bad = [v for v in variant_dtype if "=" not in v]
    if bad:
        raise typer.BadParameter(f"expected NAME=DTYPE, got {bad[0]!r}", param_hint="--variant-dtype")
    try:
        options = DeploymentOptions(model_dir=model, dtype=dtype, device=device, threads=threads, slots=slots,
                                max_len=max_len, host=host, port=port, log_dir=log_dir, redis_url=redis_url,
                                layout=layout, placement=placement, autoscale=autoscale, min_replicas=min_replicas,
                                max_replicas=max_replicas, tls=tls, variants=tuple(variant),
                                variant_dtypes=dict(v.split("=", 1) for v in variant_dtype if "=" in v),
                                extra_args={"scheduler": list(scheduler_arg)} if scheduler_arg else {})
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--variant") from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # explicitly: a process started in the background by a shell inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler (Ctrl-C or kill -INT would do nothing)
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    deployment = Deployment(options)
    try:
        typer.echo(f"starting Prism for {model} (logs in {deployment.log_dir})")
        deployment.start()
        from urllib.parse import urlsplit

        where = urlsplit(deployment.redis_url)  # never print its password
        typer.echo(f"  {'redis':<14} {where.scheme}://{where.hostname}:{where.port}{where.path}"
                   f"{' (password-protected)' if where.password else ''}")
        if deployment.certs is not None:
            typer.echo(f"  {'tls':<14} mutual TLS between services; callers trust {deployment.certs.ca}")
        for name, address in deployment.endpoints().items():
            typer.echo(f"  {name:<14} {address}")
        typer.echo(f"serving on {deployment.address}; Ctrl-C to stop")
        while not stop.wait(0.5):
            dead = [n for n in ("scheduler",) if not deployment.supervisor[n].alive()]
            if dead:
                typer.echo(f"service(s) exited: {', '.join(dead)}; stopping (see logs in {deployment.log_dir})", err=True)
                raise typer.Exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        typer.echo("stopping")
        deployment.stop()


@app.command("demo")
def demo(
    models_dir: Path = typer.Option(Path(".models"), "--models-dir", help="Where the tiny demo models are kept."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", help="Tokens to generate per request."),
    threads: int = typer.Option(1, "--threads", help="torch threads per stage process."),
) -> None:
    """Build the tiny models if missing, bring the system up, send real requests, print timings."""
    from prism.demo import run_demo

    run_demo(models_dir, max_new_tokens=max_new_tokens, threads=threads)


# ---- prism profile --------------------------------------------------------------------------

@app.command("profile")
def profile(
    model: Path = typer.Option(..., "--model", help="Checkpoint directory to profile."),
    eval_file: Path = typer.Option(None, "--eval", help="JSONL eval set (prompt or messages, images/audios, answer, match)."),
    accuracy_file: Path = typer.Option(None, "--accuracy-file", help="JSON {reduction_id: accuracy} instead of an eval set."),
    batch_sizes: str = typer.Option("1,4,8", "--batch-sizes", help="Comma-separated batch sizes to time each stage at."),
    out: Path = typer.Option(None, "--out", help="Profile file to write (default: MODEL/prism-profile.json)."),
    allow: str = typer.Option("all", "--allow", help="Reductions to score: all, none, or a comma list of drop_images, "
                                                     "downscale_images, trim_audio, drop:image, drop:audio."),
    max_new_tokens: int = typer.Option(0, "--max-new-tokens", help="Tokens generated per eval output (0: longest answer + 4)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cuda:0."),
    image_side: int = typer.Option(224, "--image-side", help="Side in pixels of the random images the encoder is timed on."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="Prompt length the prefill is timed on."),
    decode_context: int = typer.Option(128, "--decode-context", help="Tokens in each decode slot while decode is timed."),
    repeats: int = typer.Option(3, "--repeats", help="Timed runs per measurement (the median is kept)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed runs before each measurement."),
    sim_out: Path = typer.Option(None, "--sim-out", help="Also write a simulator profile (prism simulate --profile) "
                                 "of this model: stage latencies by batch and tokens, measured here."),
    sim_threads: int = typer.Option(1, "--sim-threads", help="torch threads per stage worker for the simulator profile."),
    sim_shared_cores: int = typer.Option(0, "--sim-shared-cores", help="Cores the stage processes share (0: each "
                                         "worker its own device, e.g. one GPU each)."),
) -> None:
    """Measure stage costs and per-reduction accuracy for deadline-driven modality selection;
    write the profile file and print a summary."""
    if eval_file is not None and accuracy_file is not None:
        raise typer.BadParameter("give --eval or --accuracy-file, not both", param_hint="--eval")
    try:
        sizes = tuple(int(b) for b in batch_sizes.split(",") if b.strip())
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        raise typer.BadParameter(f"{batch_sizes!r} is not a comma list of integers >= 1", param_hint="--batch-sizes")
    if not (model / "config.json").is_file():
        raise typer.BadParameter(f"{model} has no config.json", param_hint="--model")
    from rich.console import Console

    from prism.profiling.accuracy import EvalError, parse_allow
    from prism.profiling.cost import CostSettings
    from prism.profiling.profile import build_profile, summary_tables
    from prism.profiling.schema import save

    try:
        parse_allow(allow)
        settings = CostSettings(batch_sizes=sizes, image_side=image_side, prompt_tokens=prompt_tokens,
                                decode_context=decode_context, repeats=repeats, warmup=warmup)
    except ValueError as exc:
        raise typer.BadParameter(str(exc))
    try:
        from prism.profiling.engines import Engines

        engines = Engines(model, dtype=dtype, device=device)
        result = build_profile(model, eval_path=eval_file, accuracy_file=accuracy_file, allow=allow,
                               settings=settings, max_new_tokens=max_new_tokens or None, dtype=dtype, device=device,
                               engines=engines)
    except EvalError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    path = save(result, out or model / "prism-profile.json")
    if sim_out is not None:
        from prism.profiling.sim import measure_sim_profile
        from prism.sim.profile import save as save_sim

        sim = measure_sim_profile(engines, settings=settings, threads=sim_threads,
                                  shared_cores=sim_shared_cores or None)
        typer.echo(f"wrote {save_sim(sim, sim_out)}")
    console = Console()
    for table in summary_tables(result):
        console.print(table)
    typer.echo(f"wrote {path}")



@app.command("bench")
def bench(
    address: str = typer.Option("127.0.0.1:50051", "--address", help="The deployment's scheduler, host:port."),
    trace: Path = typer.Option(..., "--trace", help="CSV with TIMESTAMP, ContextTokens, GeneratedTokens (NumImages optional)."),
    out: Path = typer.Option(Path("bench-out"), "--out", help="Directory for report.json and the PNG plots."),
    rate_scale: float = typer.Option(0.05, "--rate-scale", help="Multiplies the trace's arrival rate."),
    duration: float = typer.Option(60.0, "--duration", help="Seconds each replay lasts."),
    ttft_slo: float = typer.Option(2000.0, "--ttft-slo", help="TTFT target, ms."),
    tpot_slo: float = typer.Option(200.0, "--tpot-slo", help="Time per output token target, ms."),
    start: float = typer.Option(-1.0, "--start", help="Seconds into the trace to start at (negative: its burstiest window)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the NumImages overlay and of the request bodies."),
    max_generated: int = typer.Option(64, "--max-generated", help="Cap on the forced output tokens."),
    context_factor: float = typer.Option(1 / 8, "--context-factor", help="Traced prompt tokens are multiplied by this."),
    generated_factor: float = typer.Option(1 / 8, "--generated-factor", help="Traced output tokens are multiplied by this."),
    image_side: int = typer.Option(0, "--image-side", help="Image side in pixels (0: drawn from the multimodal trace's shape)."),
    search: bool = typer.Option(False, "--search/--no-search", help="Also search the largest rate scale meeting --target."),
    target: float = typer.Option(0.9, "--target", help="SLO attainment the max-load search must reach."),
    search_probes: int = typer.Option(6, "--search-probes", help="At most this many replays in the search."),
    send_slo: bool = typer.Option(False, "--send-slo/--no-send-slo", help="Put the SLO on each request (admission may refuse)."),
    tls_ca: Path = typer.Option(None, "--tls-ca", help="CA (PEM) to trust: call over TLS."),
    tls_server_name: str = typer.Option("prism", "--tls-server-name", help="Name the server's certificate is checked under."),
    api_key: str = typer.Option(None, "--api-key", envvar="PRISM_API_KEY", help="API key (or PRISM_API_KEY)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write latency CDF and goodput PNGs."),
) -> None:
    """Replay a request trace against a running deployment and report latency, goodput and SLO attainment."""
    from prism.bench.console import bench_with_progress
    from prism.bench.replay import Target
    from prism.bench.run import BenchConfig

    try:
        target_ = Target(address, tls_ca=tls_ca, tls_server_name=tls_server_name, api_key=api_key)
        cfg = BenchConfig(trace=trace, out_dir=out, rate_scale=rate_scale, duration_s=duration, ttft_slo_ms=ttft_slo,
                          tpot_slo_ms=tpot_slo, start_s=None if start < 0 else start, seed=seed,
                          max_generated=max_generated, context_factor=context_factor,
                          generated_factor=generated_factor, image_side=image_side, search=search,
                          target_attainment=target, search_probes=search_probes, send_slo=send_slo, plots=plots)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    report = bench_with_progress(target_, cfg)
    typer.echo(f"wrote {out / 'report.json'}")
    if report["run"]["completed"] == 0:
        raise typer.Exit(1)

# ---- prism simulate -------------------------------------------------------------------------

@app.command("simulate")
def simulate_cmd(
    profile: str = typer.Option(..., "--profile", help="Simulator profile (JSON path, or a shipped name such as "
                                "modserve-a100-llama32-11b-vision)."),
    trace: Path = typer.Option(..., "--trace", help="Trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens[, NumImages])."),
    cluster: str = typer.Option("encode+prefill+decode@tp4x32", "--cluster",
                                help="Instances: comma list of STAGES[@tpN]xCOUNT, e.g. encode@tp1x32,prefill@tp4x12,decode@tp4x12."),
    rate_scale: float = typer.Option(1.0, "--rate-scale", help="Arrival rate multiplier (times divided by it)."),
    duration: float = typer.Option(300.0, "--duration", help="Seconds of the trace to replay (after --start)."),
    start: str = typer.Option("", "--start", help="Where in the trace to start: seconds from its first request, or a timestamp."),
    placement: str = typer.Option("adaptive", "--placement", help="Scheduler placement: adaptive, split or colocated."),
    slots: int = typer.Option(128, "--slots", help="Decode slots per decode instance."),
    ttft_slo_ms: float = typer.Option(2000.0, "--ttft-slo-ms", help="TTFT target for goodput and attainment."),
    tpot_slo_ms: float = typer.Option(200.0, "--tpot-slo-ms", help="TPOT (TBT) target for goodput and attainment."),
    max_new_tokens: int = typer.Option(0, "--max-new-tokens", help="Clip generated tokens per request (0: as traced)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the image overlay drawn where the trace has no NumImages."),
    out: Path = typer.Option(None, "--out", help="Also write the JSON statistics here."),
    selection_profile: Path = typer.Option(None, "--selection-profile", help="Modality selection: a `prism profile` "
                                           "file or JSON {reduction_id: accuracy}; requests with images may then "
                                           "have images dropped down to their floor (the live selector's program)."),
    floors: str = typer.Option("0.6,0.75,0.85", "--floors", help="Accuracy floors, one drawn per request with "
                               "images (seeded by --seed)."),
    deadline_s: float = typer.Option(0.0, "--deadline-s", help="Deadline budget per request, seconds (0: none)."),
    selection_kinds: str = typer.Option("drop_images,drop_modality", "--selection-kinds", help="Reductions the "
                                        "simulated family offers: drop_images, drop_modality, downscale_images."),
) -> None:
    """Simulate a deployment on a trace with the real scheduler core and a latency profile;
    prints the same JSON statistics as `prism bench` (with --selection-profile or --deadline-s
    also goodput at deadline and floor, mean accuracy and the strategies used)."""
    import json

    from prism.bench.trace import load_trace, scale
    from prism.sim.profile import SimProfileError, load
    from prism.sim.run import parse_cluster, requests_from_trace, run_summary
    from prism.sim.simulator import SimConfig

    if rate_scale <= 0 or duration <= 0:
        raise typer.BadParameter("must be > 0", param_hint="--rate-scale/--duration")
    try:
        prof = load(profile)
    except (OSError, SimProfileError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--profile")
    try:
        specs = parse_cluster(cluster, slots=slots)
        config = SimConfig(instances=specs, placement=placement)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--cluster")
    try:
        floor_list = [float(f) for f in floors.split(",") if f.strip()]
        if any(not 0.0 <= f <= 1.0 for f in floor_list):
            raise ValueError
    except ValueError:
        raise typer.BadParameter(f"{floors!r} is not a comma list of numbers in [0, 1]", param_hint="--floors")
    if deadline_s < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--deadline-s")
    if selection_profile is not None:
        from dataclasses import replace as _replace

        from prism.profiling.schema import ProfileError
        from prism.sim.selection import SelectionConfig, load_selection_profile

        try:
            sel = load_selection_profile(selection_profile)
        except (OSError, ProfileError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--selection-profile")
        try:
            kinds = frozenset(k.strip() for k in selection_kinds.split(",") if k.strip())
            config = _replace(config, selection=SelectionConfig(sel, kinds=kinds))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--selection-kinds")
    begin = float(start) if start.replace(".", "", 1).isdigit() else (start or None)
    reqs = load_trace(trace, seed=seed, start=begin, duration_s=duration)
    reqs = scale(reqs, time_factor=1 / rate_scale)
    requests = requests_from_trace(reqs, max_new_tokens=max_new_tokens or None)
    if selection_profile is not None or deadline_s:
        from prism.sim.run import with_selection
        from prism.sim.selection import SimReduce

        down = "downscale_images" in selection_kinds
        requests = with_selection(requests, floors=floor_list, seed=seed, deadline_s=deadline_s or None,
                                  reduce=SimReduce(drop_images=True, drop_all_images=True, downscale_images=down))
    stats = run_summary(requests, config, prof, ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms,
                        duration_s=duration / rate_scale)
    stats["config"] = {"profile": profile, "trace": str(trace), "cluster": cluster, "gpus": config.gpus,
                       "rate_scale": rate_scale, "duration_s": duration, "placement": placement, "slots": slots,
                       "selection_profile": str(selection_profile) if selection_profile else None,
                       "floors": floor_list, "deadline_s": deadline_s or None}
    text = json.dumps(stats, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    typer.echo(text)


if __name__ == "__main__":
    app()
