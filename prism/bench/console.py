"""`prism bench` on a terminal: a rich progress bar per replay and a summary table at the end."""
from __future__ import annotations

from prism.bench.run import BenchConfig, run_bench

__all__ = ["bench_with_progress"]


def bench_with_progress(target, cfg: BenchConfig) -> dict:
    """`run_bench` with a progress bar (requests finished out of sent, per replay) on stderr,
    then a table of the run's numbers; returns the report."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[bad]}"),
                  TimeElapsedColumn(), console=console) as bar:

        def progress(label: str, total: int):
            task = bar.add_task(label, total=total, bad="")
            failed = {"n": 0}

            def done(record) -> None:
                if not record.ok:
                    failed["n"] += 1
                bar.update(task, advance=1, bad=f"[red]{failed['n']} failed" if failed["n"] else "")
            return done

        report = run_bench(target, cfg, progress=progress, log=lambda msg: bar.console.log(msg))
    run = report["run"]
    table = Table(title=f"prism bench: {run['requests']} requests, rate scale {run['rate_scale']:g} "
                        f"({run['offered_rps']} req/s offered)")
    table.add_column("metric")
    for q in ("p50", "p90", "p99"):
        table.add_column(q, justify="right")
    for key, name in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("e2e_ms", "end to end (ms)")):
        table.add_row(name, *(str(run[key][q]) for q in ("p50", "p90", "p99")))
    Console().print(table)
    lines = [f"completed {run['completed']}/{run['sent']} (by status: {run['counts']}), "
             f"throughput {run['throughput_rps']} req/s, goodput {run['goodput_rps']} req/s, "
             f"SLO attainment {run['slo_attainment']}"]
    if "max_load" in report:
        m = report["max_load"]
        lines.append(f"max load at {m['target_attainment']:.0%} attainment: rate scale {m['max_rate_scale']} "
                     f"({m['max_offered_rps']} req/s offered, goodput {m['goodput_rps_at_max']} req/s)")
    for line in lines:
        Console().print(line)
    return report
