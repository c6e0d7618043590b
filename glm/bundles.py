"""Versioned bundles, the atomic `current`, and the blessing gate (docs/architecture.md, "Bundles").

Every verified export becomes an immutable version directory; apps load `current`, a symlink:

    export/versions/v0001/  model.onnx ... config.json SHA256SUMS verification.json lineage.json
    export/versions/v0002/  ...
    export/current -> versions/v0002      switched by os.replace of a temporary symlink (atomic on POSIX)
    export/bundle  -> current             the old path, kept for existing users and apps
    export/promotions.jsonl               every switch of current: time, from, to, why

A version's lineage.json records where it came from (data, tokenizer, checkpoints, code, config,
the fine-tuning run chosen and why, test metrics, time) and the gate's decision: blessed or not,
and why. A version is never modified after it is renamed into versions/; only `current` moves.

Why a symlink: a reader that resolves `current` once (glm.runtime.Bundle.load does) sees either the
old or the new version directory, each complete and checked, never a half-replaced one, and the
rename that switches it cannot leave `current` missing. Pruning never removes the version
`current` points to; a reader that resolved a version that is pruned under it sees the directory
vanish, and glm.runtime retries on the new `current`.

The gate (`decide`) is plain logic over numbers the export stage measures (glm.stages.verify_and_promote):
it never imports Prefect; tasks/ only publishes its decision (artifact, events, the flow run's state).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterator

from glm.core.safety import fsync_dir, remove_tree
from glm.core.shards import atomic_write_json

VERSIONS = "versions"
CURRENT = "current"
LEGACY = "bundle"  # export/bundle: a directory before versions existed, now a symlink to current
LINEAGE = "lineage.json"
PROMOTIONS = "promotions.jsonl"
LOCK = ".versions.lock"
_NAME = re.compile(r"^v(\d{4,})$")


class BundleVersionError(ValueError):
    """A version that does not exist or cannot become current (bad input: one line says why)."""


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- reading


def versions_dir(export_dir: str | Path) -> Path:
    return Path(export_dir) / VERSIONS


def version_names(export_dir: str | Path) -> list[str]:
    """Version directory names, oldest first (v0001, v0002, ...)."""
    root = versions_dir(export_dir)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink() and _NAME.match(p.name)]
    return sorted(names, key=lambda n: int(n[1:]))


def current_version(export_dir: str | Path) -> str | None:
    """The version `current` points to, or None (no blessed version yet)."""
    try:
        target = os.readlink(Path(export_dir) / CURRENT)
    except OSError:
        return None
    name = Path(target).name
    return name if _NAME.match(name) else None


def read_lineage(export_dir: str | Path, version: str) -> dict[str, Any]:
    path = versions_dir(export_dir) / version / LINEAGE
    try:
        lineage = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"version": version, "blessed": False, "reason": f"{LINEAGE} missing or unreadable"}
    return (
        lineage if isinstance(lineage, dict) else {"version": version, "blessed": False, "reason": f"{LINEAGE} is not an object"}
    )


def list_versions(export_dir: str | Path) -> list[dict[str, Any]]:
    """Every version's lineage, oldest first, with "current" (bool) added."""
    current = current_version(export_dir)
    return [read_lineage(export_dir, name) | {"version": name, "current": name == current} for name in version_names(export_dir)]


def headline(lineage: dict[str, Any]) -> tuple[str, float | None]:
    """(metric name, value) of a version: its test metric on its own run's test split."""
    m = lineage.get("metric") or {}
    return m.get("name", "?"), m.get("value")


# --------------------------------------------------------------------------- writing (under the export lock)


@contextlib.contextmanager
def locked(export_dir: str | Path) -> Iterator[None]:
    """An exclusive flock over versions and `current`: a promotion from the command line and the export
    stage never interleave (readers take no lock: they only resolve the symlink)."""
    Path(export_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(export_dir) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def next_version(export_dir: str | Path) -> str:
    names = version_names(export_dir)
    return f"v{int(names[-1][1:]) + 1 if names else 1:04d}"


def _swap_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` atomically: a new symlink under a temporary name, renamed over it."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)  # rename(2): readers see the old link or the new one, never none
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)


def adopt_legacy(export_dir: str | Path) -> str | None:
    """A run exported before versions existed has a real directory export/bundle: it becomes the first
    version (v0001, blessed as what was in use) and export/bundle a symlink to `current`. Returns its name."""
    export_dir = Path(export_dir)
    for link, target in ((CURRENT, None), (LEGACY, CURRENT)):
        _relink_copy(export_dir, link, target)
    legacy = export_dir / LEGACY
    if legacy.is_symlink() or not legacy.is_dir():
        return None
    name = next_version(export_dir)
    versions_dir(export_dir).mkdir(parents=True, exist_ok=True)
    lineage = {"version": name, "time": now(), "blessed": True, "reason": "exported before versioned bundles (adopted as it was)"}
    atomic_write_json(legacy / LINEAGE, lineage)
    os.rename(legacy, versions_dir(export_dir) / name)  # the only moment export/bundle is missing: once, at upgrade
    _swap_symlink(export_dir / CURRENT, f"{VERSIONS}/{name}")
    _swap_symlink(export_dir / LEGACY, CURRENT)
    return name


def _relink_copy(export_dir: Path, link: str, target: str | None) -> None:
    """A run directory copied with its symlinks followed (shutil.copytree's default) turns `current` and
    `bundle` into real directories: one that is a copy of an existing version becomes the symlink again."""
    path = export_dir / link
    if path.is_symlink() or not path.is_dir():
        return
    try:
        version = json.loads((path / LINEAGE).read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError, AttributeError):
        return  # not a copy of a version: a pre-versions export/bundle, adopted by the caller
    if not isinstance(version, str) or not _NAME.match(version) or not (versions_dir(export_dir) / version).is_dir():
        return
    remove_tree(path, inside=export_dir)
    _swap_symlink(path, target or f"{VERSIONS}/{version}")


def add_version(export_dir: str | Path, directory: str | Path, name: str) -> Path:
    """Rename a complete, checked bundle directory (its lineage.json written) into versions/NAME."""
    target = versions_dir(export_dir) / name
    if target.exists():
        raise FileExistsError(f"{target} exists; versions are never overwritten")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(directory, target)
    fsync_dir(target.parent)
    return target


def set_current(export_dir: str | Path, version: str, why: str) -> None:
    """Point `current` (and export/bundle, through it) at `version`, atomically; log it in promotions.jsonl.

    The version's files are checked against its SHA256SUMS first: only a complete bundle becomes current.
    """
    from glm.runtime import BundleError, check_bundle_files

    export_dir = Path(export_dir)
    where = versions_dir(export_dir) / version
    if not _NAME.match(version) or not where.is_dir():
        known = ", ".join(version_names(export_dir)) or "none"
        raise BundleVersionError(f"no bundle version {version!r} under {versions_dir(export_dir)} (versions: {known})")
    try:
        check_bundle_files(where)
    except BundleError as e:
        raise BundleVersionError(f"version {version} cannot become current: {e}") from None
    before = current_version(export_dir)
    _swap_symlink(export_dir / CURRENT, f"{VERSIONS}/{version}")
    legacy = export_dir / LEGACY
    if not legacy.is_symlink() and not legacy.exists():
        _swap_symlink(legacy, CURRENT)
    record = {"time": now(), "from": before, "to": version, "why": why}
    with open(export_dir / PROMOTIONS, "a", encoding="utf-8") as f:  # append-only log, one JSON object a line
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def promote(export_dir: str | Path, version: str, why: str = "promoted by hand") -> str:
    """Make `version` current (by hand: a version the gate refused may be promoted, one that failed
    export verification may not). Returns the version that was current before."""
    with locked(export_dir):
        lineage = read_lineage(export_dir, version) if (versions_dir(export_dir) / version).is_dir() else {}
        if lineage.get("verified") is False:
            raise BundleVersionError(f"version {version} failed export verification; it cannot become current")
        before = current_version(export_dir)
        set_current(export_dir, version, why)
        return before or "none"


def rollback_target(export_dir: str | Path) -> str:
    """The newest blessed version older than current: where `--rollback` goes."""
    current = current_version(export_dir)
    names = version_names(export_dir)
    if current is None:
        raise BundleVersionError(f"no current bundle under {export_dir}; nothing to roll back from")
    older = [n for n in names if int(n[1:]) < int(current[1:]) and read_lineage(export_dir, n).get("blessed")]
    if not older:
        raise BundleVersionError(f"no blessed version older than the current {current}; use --promote VERSION")
    return older[-1]


def prune(export_dir: str | Path, keep_last: int, keep_blessed: bool = True) -> list[str]:
    """Remove old versions: keep the newest `keep_last`, every blessed one (keep_blessed) and always
    the current one. Returns the removed names. Call under `locked`."""
    names = version_names(export_dir)
    current = current_version(export_dir)
    keep = set(names[-keep_last:]) if keep_last > 0 else set()
    keep |= {current} if current else set()
    if keep_blessed:
        keep |= {n for n in names if read_lineage(export_dir, n).get("blessed")}
    removed = [n for n in names if n not in keep]
    for name in removed:
        remove_tree(versions_dir(export_dir) / name, inside=versions_dir(export_dir))
    return removed


# --------------------------------------------------------------------------- the blessing gate


def decide(
    *,
    verified: bool | None,
    failures: list[str] | None = None,
    collapsed: bool,
    metric: str,
    higher_is_better: bool,
    value: float | None,
    current: dict[str, Any] | None,
    compared: dict[str, Any] | None,
    baselines: dict[str, float],
    max_drop: float,
    floor: str,
) -> dict[str, Any]:
    """Blessed or not, why, and every check: {"blessed", "reason", "checks": [{check, passed, detail}]}.

    `compared` is the new and the current model's metric on the same examples, measured by the same
    scorer ({"new", "current", "examples", "how"}); {"error": why} when the new bundle could not be
    scored (refused); None when there is no current version or the current one could not be
    compared (then the check says so and does not block). `floor`: "none", "majority" or
    "linear" (the TF-IDF baseline the report computes); a cloze metric must be at least that baseline.
    """
    checks: list[dict[str, Any]] = []

    def check(name: str, passed: bool, detail: str) -> None:
        checks.append({"check": name, "passed": passed, "detail": detail})

    if verified is True:
        check("verification", True, "export verified against PyTorch")
    elif verified is None:
        check("verification", False, "export verification was skipped (export.verify is false)")
    else:
        check("verification", False, "export verification failed: " + "; ".join(failures or ["see verification.json"]))
    check("collapse", not collapsed, "the kept model collapsed to one label" if collapsed else "no collapse")
    if value is None:
        check("metric", False, f"no test {metric} recorded")
    if current is None:
        check("vs-current", True, "no current version: the first version is blessed when its other checks pass")
    elif compared is None:
        check("vs-current", True, f"not compared with current {current.get('version')} (see lineage.compared)")
    elif "error" in compared:
        check("vs-current", False, compared["error"])
    else:
        new, cur = compared["new"], compared["current"]
        drop = (cur - new) if higher_is_better else (new - cur)
        ok = drop <= max_drop + 1e-12
        words = (
            f"{metric} {new:.4f} vs current {current.get('version')} {cur:.4f} on the same {compared['examples']} test examples"
        )
        check("vs-current", ok, f"{words} ({compared['how']}); allowed drop {max_drop:g}")
    if floor != "none" and value is not None:
        base = baselines.get(floor)
        if base is None:
            check(f"floor-{floor}", True, f"no {floor} baseline recorded (seq2seq, or none computed)")
        else:
            ok = value >= base if higher_is_better else value <= base
            check(f"floor-{floor}", ok, f"{metric} {value:.4f} vs {floor} baseline {base:.4f}")
    failed = [c for c in checks if not c["passed"]]
    reason = "; ".join(c["detail"] for c in failed) if failed else "passed: " + "; ".join(c["detail"] for c in checks)
    return {"blessed": not failed, "reason": reason, "checks": checks}


# --------------------------------------------------------------------------- the versions report


def versions_table(versions: list[dict[str, Any]]) -> str:
    """A Markdown table of versions, newest first: what `glm-pipeline bundles` prints, and the report's."""
    rows = ["| version | time | test metric | blessed | why | current |", "|---|---|---|---|---|---|"]
    for v in reversed(versions):
        name, value = headline(v)
        metric = f"{name} {value:.4f}" if isinstance(value, (int, float)) else "-"
        why = str(v.get("reason", "")).replace("|", "/")
        rows.append(
            f"| {v['version']} | {v.get('time', '-')} | {metric} | {'yes' if v.get('blessed') else 'NO'} | {why} | "
            f"{'<- current' if v.get('current') else ''} |"
        )
    return "\n".join(rows)


def write_versions_report(export_dir: str | Path, latest: dict[str, Any]) -> list[Path]:
    """export/report.md (the gate's decision on this run's version, then every version) and
    export/versions.png (each version's test metric over time, blessed or refused). Returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from glm.core.shards import atomic_write_bytes, atomic_write_text

    export_dir = Path(export_dir)
    versions = list_versions(export_dir)
    status = (
        "blessed and current" if latest.get("current") else ("blessed, not current" if latest.get("blessed") else "NOT promoted")
    )
    lines = [
        f"# Bundle versions: {latest.get('version')} {status}",
        "",
        f"**Gate:** {latest.get('reason')}",
        "",
        *[f"- {'pass' if c['passed'] else 'FAIL'} {c['check']}: {c['detail']}" for c in latest.get("checks", [])],
        "",
        f"Current: {current_version(export_dir) or 'none'}. Switch with `glm-pipeline bundles RUN_DIR --promote VERSION` "
        "or `--rollback`.",
        "",
        versions_table(versions),
        "",
        "![test metric per version](versions.png)",
        "",
    ]
    report = atomic_write_text(export_dir / "report.md", "\n".join(lines))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    points = [(i, v, headline(v)[1]) for i, v in enumerate(versions) if isinstance(headline(v)[1], (int, float))]
    if points:
        ax.plot([i for i, _, _ in points], [y for _, _, y in points], color="0.6", zorder=1)
        for blessed, marker, label in ((True, "o", "blessed"), (False, "x", "refused")):
            pts = [(i, y) for i, v, y in points if bool(v.get("blessed")) == blessed]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=label, zorder=2)
        ax.set_xticks([i for i, _, _ in points], [v["version"] for _, v, _ in points], rotation=45, fontsize=7)
        ax.set_ylabel(f"test {headline(points[-1][1])[0]}")
        ax.legend(fontsize=8)
    ax.set_title("test metric per bundle version (its own run's test split)", fontsize=9)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    plot = atomic_write_bytes(export_dir / "versions.png", buf.getvalue())
    return [report, plot]


def score_bundle(bundle_dir: str | Path, examples: list[dict[str, Any]]) -> float:
    """Test accuracy of a classifier bundle on labelled examples ({text, text_pair, label}), scored by glm.runtime
    (what an app would get): how the gate compares two versions when the labelled data changed."""
    from glm.runtime import Bundle

    bundle = Bundle.load(bundle_dir, providers=["CPUExecutionProvider"])
    if bundle.classifier is None:
        raise ValueError(f"bundle {bundle_dir} is not a classifier")
    pairs = [e.get("text_pair") for e in examples]
    got = bundle.classify_batch([e["text"] for e in examples], pairs if any(p is not None for p in pairs) else None)
    return sum(g.label == e["label"] for g, e in zip(got, examples)) / max(len(examples), 1)
