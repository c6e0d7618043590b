"""The `glm-pipeline` command.

    glm-pipeline run CONFIG [--set key=value ...] [--stage NAME]   run the pipeline (Prefect, embedded)
    glm-pipeline config CONFIG [--set ...]                          print the validated config
    glm-pipeline infer BUNDLE (--fill TEXT | --generate TEXT | --classify TEXT)
    glm-pipeline serve CONFIG [--cron "0 2 * * *"]                  one long-lived process with a schedule

Heavy imports (torch, prefect) happen inside the commands so `--help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from typing import Iterator

from glm.config import ConfigError, dump_config, load_config

STAGES = ("data", "pretrain", "finetune", "export", "all")


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived during `glm-pipeline run`."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise Stopped in the main thread, so that finally blocks (which kill a training
    subprocess), Prefect's crash report of the flow run and atexit (which stops Prefect's ephemeral
    server) all run. Python's default SIGTERM ends the process on the spot and leaves them undone.
    While a flow runs, Prefect's own SIGTERM handler reports the run Crashed first, then re-sends
    the signal to this one."""

    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # a background job (nohup, `cmd &`) keeps ignoring SIGINT
            previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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

    serve = sub.add_parser("serve", help="serve the pipeline as a long-lived process with a cron schedule")
    _config_args(serve)
    serve.add_argument("--cron", default="0 2 * * *", help="cron schedule (default: nightly at 02:00)")
    return parser


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # validated before anything runs
    from flows.ephemeral import detach_ephemeral_server
    from flows.pipeline import RunTimedOut, run_stage

    detach_ephemeral_server()
    try:
        run_stage(cfg, args.stage)
    except RunTimedOut as e:
        print(f"error: {e}", file=sys.stderr)
        return 124  # timeout(1)'s code
    return 0


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
            try:
                with _stop_on_signals():
                    return _run(args)
            except Stopped as e:
                print(f"glm-pipeline: stopped by {signal.Signals(e.signum).name}; re-run the same command to resume "
                      "from the last checkpoint", file=sys.stderr)
                return 128 + e.signum  # the shell's code for a process ended by that signal
        if args.command == "serve":
            cfg = load_config(args.config, args.overrides)
            from flows.pipeline import serve

            serve(cfg, cron=args.cron)
            return 0
        if args.command == "infer":
            from glm.runtime import infer_command

            return infer_command(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
