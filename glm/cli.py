"""The `glm-pipeline` command.

    glm-pipeline run CONFIG [--set key=value ...] [--stage NAME]   run the pipeline (Prefect, embedded)
    glm-pipeline config CONFIG [--set ...]                          print the validated config
    glm-pipeline infer BUNDLE (--fill TEXT | --generate TEXT | --classify TEXT)
    glm-pipeline serve CONFIG [--cron "0 2 * * *"]                  one long-lived process with a schedule
    glm-pipeline verify RUN_DIR                                     re-hash every output; mark what fails for rebuild
    glm-pipeline deploy                                             register prefect.yaml's deployments (+ work pool)

Heavy imports (torch, prefect) happen inside the commands so `--help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

from glm.config import ConfigError, dump_config, load_config

STAGES = ("data", "pretrain", "finetune", "export", "all")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML file, or a name under configs/ (e.g. demo, tiny)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value by its dotted path, e.g. --set pretrain.steps=100 (repeatable)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm-pipeline", description="GLM data-to-model pipeline")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline (or one stage flow) in Prefect's embedded mode")
    _config_args(run)
    run.add_argument("--stage", choices=STAGES, default="all", help="run one stage flow instead of the whole pipeline")

    cfg = sub.add_parser("config", help="print the validated configuration")
    _config_args(cfg)

    infer = sub.add_parser("infer", help="try an exported ONNX bundle from the terminal")
    infer.add_argument("bundle", help="an export bundle directory (runs/NAME/export/bundle)")
    what = infer.add_mutually_exclusive_group(required=True)
    what.add_argument("--fill", metavar="TEXT", help="fill the [MASK]/[sMASK]/[gMASK] blanks in TEXT")
    what.add_argument("--generate", metavar="TEXT", help="continue TEXT (a [gMASK] is appended)")
    what.add_argument("--classify", metavar="TEXT", help="classify TEXT with a fine-tuned classifier bundle")
    infer.add_argument("--max-new-tokens", type=int, default=48)
    infer.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    infer.add_argument("--top-p", type=float, default=1.0)
    infer.add_argument("--seed", type=int, default=None)
    infer.add_argument("--int8", action="store_true", help="use the int8-quantized model if the bundle has one")

    verify = sub.add_parser("verify", help="re-hash every file of a run directory against its manifests")
    verify.add_argument("run_dir", help="a run directory (runs/NAME)")
    verify.add_argument("--no-mark", dest="mark", action="store_false",
                        help="only report; by default whatever fails is marked so the next run rebuilds it")

    serve = sub.add_parser("serve", help="serve the pipeline as a long-lived process with a cron schedule")
    _config_args(serve)
    serve.add_argument("--cron", default="0 2 * * *", help="cron schedule (default: nightly at 02:00)")

    sub.add_parser("deploy", help="register the deployments of prefect.yaml (in the current directory) on the "
                                  "Prefect server at PREFECT_API_URL, creating their work pool if missing")
    return parser


def _verify(run_dir: str, mark: bool) -> int:
    """One line per manifest or checkpoint; exit 1 if anything fails (and, with `mark`, mark it)."""
    from pathlib import Path

    from glm.stages import verify_run

    if not Path(run_dir).is_dir():
        raise ConfigError(f"run directory {run_dir!r} does not exist; pass a run directory such as runs/demo")
    report = verify_run(run_dir, mark=mark)
    if not report:
        print(f"{run_dir}: no manifests found (nothing has run there yet)")
        return 0
    for name, problems in report.items():
        print(f"{'ok    ' if not problems else 'FAILED'} {name}")
        for problem in problems:
            print(f"         {problem}")
    bad = [name for name, problems in report.items() if problems]
    if not bad:
        print(f"{run_dir}: {len(report)} checked, all intact")
        return 0
    what = "marked for rebuild: the next run rebuilds them" if mark else "not marked (--no-mark)"
    print(f"{run_dir}: {len(bad)} of {len(report)} failed; {what}")
    return 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # our own progress at INFO; libraries (GX, onnx, quantization) only when they warn
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("glm").setLevel(logging.INFO)
    try:
        if args.command == "config":
            print(dump_config(load_config(args.config, args.overrides)), end="")
            return 0
        if args.command == "run":
            cfg = load_config(args.config, args.overrides)  # validated before anything runs
            from flows.pipeline import run_stage

            run_stage(cfg, args.stage)
            return 0
        if args.command == "serve":
            cfg = load_config(args.config, args.overrides)
            from flows.pipeline import serve

            serve(cfg, cron=args.cron)
            return 0
        if args.command == "verify":
            return _verify(args.run_dir, args.mark)
        if args.command == "deploy":
            from pathlib import Path

            from flows.deploy import deploy

            return deploy(Path.cwd())
        if args.command == "infer":
            from glm.runtime import infer_command

            return infer_command(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
