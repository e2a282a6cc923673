"""``prism profile``: measure a model's stage costs and per-reduction accuracies into a profile
file (prism/profiling/schema.py), and summarise it for people."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from prism.profiling.accuracy import evaluate, file_sha256, load_accuracy_file, load_eval, parse_allow
from prism.profiling.cost import CostSettings, measure_costs
from prism.profiling.engines import Engines
from prism.profiling.schema import STAGES, AccuracySource, ModelInfo, Profile
from prism.profiling.tables import build_tables

__all__ = ["build_profile", "summary_tables"]


def build_profile(model_dir: str | Path, *, eval_path: str | Path | None = None,
                  accuracy_file: str | Path | None = None, allow: str = "all",
                  settings: CostSettings = CostSettings(), max_new_tokens: int | None = None,
                  dtype: str = "float32", device: str = "cpu", engines: Engines | None = None) -> Profile:
    """Load `model_dir` once, measure every stage's cost at `settings.batch_sizes`, and the
    accuracy of every reduction `allow` permits on the eval set at `eval_path` (or read them
    from `accuracy_file`; neither: no accuracies)."""
    if eval_path is not None and accuracy_file is not None:
        raise ValueError("give an eval set or an accuracy file, not both")
    allowed = parse_allow(allow)
    engines = engines or Engines(model_dir, dtype=dtype, device=device)
    accuracy: dict = {}
    source = None
    if accuracy_file is not None:
        accuracy = load_accuracy_file(accuracy_file)
        source = AccuracySource("file", str(accuracy_file), file_sha256(accuracy_file))
    elif eval_path is not None:
        examples = load_eval(eval_path, engines.adapter, engines.processor)
        result = evaluate(engines, examples, allowed, max_new_tokens=max_new_tokens)
        accuracy = result.accuracy
        source = AccuracySource("eval", str(eval_path), file_sha256(eval_path), examples=len(examples),
                                max_new_tokens=result.max_new_tokens, allow=allow)
    costs = measure_costs(engines, settings)
    model = ModelInfo(name=Path(model_dir).name, family=engines.adapter.family, dtype=dtype,
                      device=engines.device)
    profile = Profile(model=model, costs=costs, accuracy=accuracy, source=source, settings=settings.as_dict())
    tables = build_tables(profile, engines.adapter, engines.processor, image_side=settings.image_side,
                          seed=settings.seed)
    return dataclasses.replace(profile, tables=tables)


def summary_tables(profile: Profile) -> list[Any]:
    """Rich tables: stage costs per batch size, accuracy per reduction."""
    from rich.table import Table

    m = profile.model
    costs = Table(title=f"{m.name} ({m.family}, {m.dtype}, {m.device}): stage costs")
    costs.add_column("stage")
    costs.add_column("batch", justify="right")
    costs.add_column("ms/token", justify="right")
    costs.add_column("ms/call", justify="right")
    costs.add_column("tokens/call", justify="right")
    for stage in STAGES:
        for batch, c in profile.costs.get(stage, {}).items():
            costs.add_row(stage, str(batch), f"{c.ms_per_token:.4f}", f"{c.ms_per_call:.3f}",
                          str(c.tokens_per_call))
    src = profile.source
    title = "accuracy per reduction" + (f" ({src.kind}: {Path(src.path).name}, sha256 {src.sha256[:12]})" if src else "")
    acc = Table(title=title)
    acc.add_column("reduction")
    acc.add_column("accuracy", justify="right")
    acc.add_column("n", justify="right")
    for rid, e in profile.accuracy.items():
        acc.add_row(rid, f"{e.accuracy:.3f}", "-" if e.n is None else str(e.n))
    if not profile.accuracy:
        acc.add_row("(none: pass --eval or --accuracy-file)", "", "")
    out = [costs, acc]
    t = profile.tables
    if t:
        table = Table(title=f"cheapest strategy meeting each floor ({t['decode_tokens']} tokens generated)")
        table.add_column(t["size"])
        for floor in t["floors"]:
            table.add_column(f">= {floor:g}")
        for size, row in t["rows"].items():
            table.add_row(size, *[row.get(f"{floor:g}") or "-" for floor in t["floors"]])
        out.append(table)
    return out
