"""`python -m benchmarks` lists the benchmarks; `python -m benchmarks NAME [--quick]` runs one.

Each benchmark is a module `benchmarks/NAME.py` whose docstring's first line describes it and
whose `run(quick=False)` yields result dicts; they are printed as one JSON object per line with
at least name, metric, value, unit (and reference, ratio where it compares side by side).
A module with options of its own defines `add_arguments(parser)`; they are passed to its `run`.
A result with status "fail" (a check, e.g. gpu_check) makes the command exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path

REQUIRED = ("name", "metric", "value", "unit")


def available() -> dict[str, str]:
    found = {}
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"benchmarks.{info.name}")
        if callable(getattr(module, "run", None)):
            found[info.name] = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
    return found


def run(name: str, quick: bool = False, **options):
    module = importlib.import_module(f"benchmarks.{name}")
    for result in module.run(quick=quick, **options):
        missing = [k for k in REQUIRED if k not in result]
        if missing:
            raise ValueError(f"benchmark {name} produced a result without {missing}: {result}")
        yield result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help="benchmark to run; omit to list them")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    args, rest = parser.parse_known_args(argv)
    benches = available()
    if args.name is None:
        width = max(map(len, benches), default=0)
        for name, doc in sorted(benches.items()):
            print(f"{name:<{width}}  {doc}")
        return 0
    if args.name not in benches:
        print(f"unknown benchmark {args.name!r}; available: {', '.join(sorted(benches))}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.{args.name}")
    options: dict = {}
    if hasattr(module, "add_arguments"):
        own = argparse.ArgumentParser(prog=f"python -m benchmarks {args.name}")
        module.add_arguments(own)
        options = vars(own.parse_args(rest))
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    failed = False
    for result in run(args.name, quick=args.quick, **options):
        failed |= result.get("status") == "fail"
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
