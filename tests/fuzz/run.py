"""Coverage-guided fuzzing of one target with atheris (libFuzzer):

    python -m tests.fuzz.run TARGET [--models DIR ...] [libFuzzer flags, e.g. -max_total_time=60]

A crash (any exception the target does not allow), a hang (-timeout, seconds per input) or
memory growth past -rss_limit_mb ends the run with a non-zero status and the input saved as
crash-*/timeout-*/oom-* in the working directory. `request` needs model directories (built with
`prism models make`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    import atheris

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target")
    parser.add_argument("--models", nargs="*", type=Path, default=[], help="model directories for `request`")
    args, libfuzzer = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    with atheris.instrument_imports():
        from tests.fuzz import targets
    if args.models:
        targets.load_models({p.name: p for p in args.models})
    target = targets.TARGETS[args.target]
    atheris.Setup([sys.argv[0], *libfuzzer], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
