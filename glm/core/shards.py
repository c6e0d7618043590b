"""Shards and manifests: how stages talk to each other through files.

Every stage writes its files to temporary names and renames them into place, then
writes `manifest.json` last. A stage is done iff its manifest exists and checks out,
which gives resumability, idempotence and cache keys (the manifest's digest) for free.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import tempfile
import tokenize
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from glm.core.contracts import FileEntry, Manifest, T, check

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # glm/ (this module is glm/core/shards.py)


class ManifestError(RuntimeError):
    """A manifest is missing, unreadable or does not match the files on disk."""


class CorruptShardError(ManifestError):
    """A shard's content is impossible (an id out of range, inconsistent positions or shapes).

    Reading the same bytes again gives the same answer, so a retry cannot help: the file has to
    be rebuilt. Built from (path, problem) so that it pickles across processes unchanged.
    """

    def __init__(self, path: str | Path, problem: str):
        super().__init__(str(path), problem)
        self.path, self.problem = str(path), problem

    def __str__(self) -> str:
        return (
            f"{self.path} is corrupt: {self.problem}; delete it and re-run, "
            "or run `glm-pipeline verify RUN_DIR` on the run directory that holds it"
        )


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes owner-only files; give outputs the ordinary umask-based mode
        umask = os.umask(0)
        os.umask(umask)
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def remove_stale_temporaries(directory: str | Path) -> int:
    """Delete `.NAME.*.tmp` files a crashed writer left behind; returns how many."""
    n = 0
    for p in Path(directory).rglob(".*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


# --------------------------------------------------------------------------- hashing


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


_SKIPPED_TOKENS = {tokenize.COMMENT, tokenize.NL, tokenize.ENCODING, tokenize.TYPE_COMMENT}
_LINE_STARTS = {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}


def code_of(source: bytes) -> bytes:
    """The tokens of a module that can change what it does: no comments, docstrings or layout.

    Editing a comment or a docstring, or reformatting, keeps every stage cached; any change to
    a name, literal or operator re-runs the stages that use the module. A token scan, not
    ast.parse, because CPython 3.11's AST constructor fails when threads
    parse concurrently (cache keys are computed in task-runner threads).
    """
    kept: list[str] = []
    tokens = list(tokenize.tokenize(io.BytesIO(source).readline))
    for i, tok in enumerate(tokens):
        if tok.type in _SKIPPED_TOKENS:
            continue
        if (
            tok.type == tokenize.STRING
            and (i == 0 or tokens[i - 1].type in _LINE_STARTS)
            and i + 1 < len(tokens)
            and tokens[i + 1].type in (tokenize.NEWLINE, tokenize.ENDMARKER)
        ):
            continue  # a string that is a whole statement: a docstring (it does nothing)
        kept.append(tok.string if tok.type not in (tokenize.INDENT, tokenize.DEDENT) else f"<{tok.type}>")
    return "\x00".join(kept).encode()


def code_version() -> str:
    """Hash of the `glm` package sources: part of every cache key, so a code change re-runs stages."""
    h = hashlib.sha256()
    for p in sorted(_PACKAGE_DIR.rglob("*.py")):
        h.update(p.relative_to(_PACKAGE_DIR).as_posix().encode())
        h.update(code_of(p.read_bytes()))
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- Arrow / Parquet


def write_arrow(path: str | Path, table: pa.Table) -> Path:
    """Write an Arrow IPC file (uncompressed, so readers can memory-map it zero-copy)."""
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    return Path(path)


def read_arrow(path: str | Path, memory_map: bool = True) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Arrow shard {path} does not exist; re-run the stage that writes it")
    source = pa.memory_map(str(path), "r") if memory_map else pa.OSFile(str(path), "rb")
    try:
        return ipc.open_file(source).read_all()
    except pa.ArrowInvalid as e:
        raise ManifestError(f"Arrow shard {path} is unreadable ({e}); delete it and re-run the stage") from None


def write_parquet(path: str | Path, table: pa.Table) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowInvalid) as e:
        raise ManifestError(f"Parquet shard {path} is unreadable ({e}); delete it and re-run the stage") from None


# --------------------------------------------------------------------------- manifests


def file_entry(path: str | Path, root: str | Path, **extra: Any) -> FileEntry:
    """Describe one output file: its path relative to the stage directory, size, mtime and content hash.

    The mtime lets a check notice any change made through the file system without re-hashing
    (a byte flipped in place keeps the size but not the mtime); the hash decides when it moved.
    """
    path, root = Path(path), Path(root)
    st = path.stat()
    return {
        "path": path.relative_to(root).as_posix(),
        "bytes": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": sha256_file(path),
        **extra,
    }


def check_file(path: Path, entry: dict[str, Any], deep: bool = False) -> str | None:
    """What is wrong with `path` against its manifest entry (None when it checks out).

    Size first; then the content hash whenever the mtime moved (or was never recorded), or always
    with `deep`: a touched but unchanged file passes, a same-size edit does not.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path}: missing"
    if not path.is_file():
        return f"{path}: not a regular file"
    if st.st_size != entry.get("bytes"):
        return f"{path}: {st.st_size} bytes, manifest says {entry.get('bytes')}"
    if (deep or st.st_mtime_ns != entry.get("mtime_ns")) and sha256_file(path) != entry.get("sha256"):
        return f"{path}: content differs from its manifest (sha256)"
    return None


def write_manifest(
    directory: str | Path,
    stage: str,
    files: list[dict[str, Any]],
    *,
    config: dict[str, Any] | None = None,
    inputs: list[str | Path] = (),
    stats: dict[str, Any] | None = None,
) -> Path:
    """Close a stage: list its files, the config and inputs that made them, and statistics. Written last."""
    directory = Path(directory)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "stage": stage,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "config": config or {},
        "config_sha256": sha256_json(config or {}),
        "inputs": [{"manifest": str(Path(p)), "sha256": manifest_digest(p)} for p in inputs],
        "files": sorted(files, key=lambda f: f["path"]),
        "stats": stats or {},
    }
    return atomic_write_json(directory / MANIFEST, manifest)


def _manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path / MANIFEST if path.is_dir() or path.suffix != ".json" else path


def read_manifest(path: str | Path) -> Manifest:
    mp = _manifest_path(path)
    if not mp.is_file():
        raise ManifestError(f"no manifest at {mp}: the stage that writes it has not finished; run it first")
    try:
        manifest = json.loads(mp.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ManifestError(f"manifest {mp} is not valid JSON ({e}); delete it and re-run the stage") from None
    if manifest.get("manifest_version", 0) > MANIFEST_VERSION:
        raise ManifestError(
            f"manifest {mp} has version {manifest['manifest_version']}, newer than this code; upgrade glm-pipeline"
        )
    return manifest


_NOT_CONTENT = ("created",)  # fields of other JSON outputs that say when, not what


def manifest_digest(path: str | Path) -> str:
    """Content hash of a manifest (which itself hashes every file): the input part of cache keys.

    Only what the outputs ARE counts: the stage, its config, its inputs' digests and its files
    (path, size, content hash and per-file facts), not when or how fast they were written
    (created, mtimes, timings in stats, the code version, where the inputs live). A stage rebuilt
    byte for byte (after damage, or after a code change that did not change its output) gives the
    same digest, so the stages downstream of it stay cached and training resumes exactly.
    """
    mp = _manifest_path(path)
    try:
        manifest = json.loads(mp.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return sha256_file(mp)  # not ours to interpret: any change counts
    if not isinstance(manifest, dict):
        return sha256_file(mp)
    if not isinstance(manifest.get("files"), list):  # another JSON output (a validation report)
        return sha256_json({k: v for k, v in manifest.items() if k not in _NOT_CONTENT})
    inputs = manifest.get("inputs") if isinstance(manifest.get("inputs"), list) else []
    content = {
        "manifest_version": manifest.get("manifest_version"),
        "stage": manifest.get("stage"),
        "config": manifest.get("config"),
        "inputs": [i.get("sha256") if isinstance(i, dict) else i for i in inputs],
        "files": [{k: v for k, v in f.items() if k != "mtime_ns"} if isinstance(f, dict) else f for f in manifest["files"]],
    }
    return sha256_json(content)


def verify_manifest(path: str | Path, deep: bool = False) -> list[str]:
    """Problems with a stage's outputs ([] when it checks out). `deep` re-hashes every file."""
    mp = _manifest_path(path)
    try:
        manifest = read_manifest(mp)
    except ManifestError as e:
        return [str(e)]
    files = manifest.get("files")
    if not isinstance(files, list):
        return [f"manifest {mp} has no file list; delete it and re-run the stage"]
    problems = []
    for f in files:
        if not isinstance(f, dict) or not isinstance(f.get("path"), str):
            problems.append(f"manifest {mp} has a malformed file entry {f!r}")
            continue
        p = mp.parent / f["path"]
        if not _inside(p, mp.parent):
            problems.append(f"manifest {mp} names {f['path']!r}, outside its directory")
        elif (problem := check_file(p, f, deep=deep)) is not None:
            problems.append(problem)
    return problems


def _inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def stage_is_complete(directory: str | Path, deep: bool = False) -> bool:
    return not verify_manifest(directory, deep=deep)


def read_stats(path: str | Path, shape: type[T]) -> T:
    """The stats of the manifest at `path` (a stage directory or its manifest.json), checked against `shape`."""
    return check(shape, read_manifest(path)["stats"], f"the stats of {_manifest_path(path)}")
