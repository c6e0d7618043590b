"""Damaged outputs are noticed and rebuilt, nothing in a run directory can execute code, and
`glm-pipeline verify` finds what a quick check cannot (same size, mtime put back).

Each test damages a real run of the data stage (the tiny config, made smaller) the way a disk,
a careless user or an attacker would, then runs the pipeline again the way a user does.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from glm import stages
from glm.core.config import load_config
from glm.core.shards import read_manifest, verify_manifest
from tests.flows.conftest import SMALL
from tests.hostile.conftest import cli


@pytest.fixture
def data_run(tmp_path):
    """A finished data stage (plain runner, no Prefect) and its config."""
    cfg = load_config("configs/tiny.yaml", [*SMALL, "quality.enabled=false", f"run_dir={tmp_path / 'run'}"])
    stages.run_pipeline(cfg, "data")
    return cfg, stages.RunPaths(cfg.run_dir)


def _flip_byte_in_place(path: Path, keep_mtime: bool = False) -> None:
    """Change one byte in the middle of `path` (same size), optionally putting its mtime back."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0x5A]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*.arrow"))}


def test_a_same_size_edit_of_a_token_shard_is_rebuilt_and_nothing_downstream_reruns(data_run):
    cfg, paths = data_run
    before = _snapshot(paths.tokens)
    infill_before = _snapshot(paths.infill)
    infill_stamp = (paths.stamps / "infill.json").read_bytes()
    shard = paths.tokens / "train" / "part-00000.arrow"
    _flip_byte_in_place(shard)
    assert verify_manifest(paths.tokens)  # noticed without re-hashing everything: the mtime moved

    stages.run_pipeline(cfg, "data")
    assert _snapshot(paths.tokens) == before  # rebuilt byte for byte
    assert not verify_manifest(paths.tokens, deep=True)
    # the repaired shard has the content the manifest digest describes: the blank-infilling stage stays cached
    assert _snapshot(paths.infill) == infill_before
    assert (paths.stamps / "infill.json").read_bytes() == infill_stamp


def test_a_truncated_token_shard_is_rebuilt_instead_of_blocking_every_rerun(data_run):
    cfg, paths = data_run
    before = _snapshot(paths.tokens)
    shard = paths.tokens / "valid" / "part-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:100])
    stages.run_pipeline(cfg, "data")
    assert _snapshot(paths.tokens) == before


def test_a_corrupt_span_corruption_shard_is_rebuilt_even_though_its_metadata_still_reads(data_run):
    cfg, paths = data_run
    before = _snapshot(paths.infill)
    shard = sorted(paths.infill.glob("epoch-*/part-*.arrow"))[0]
    _flip_byte_in_place(shard)
    stages.run_pipeline(cfg, "data")
    assert _snapshot(paths.infill) == before
    assert not verify_manifest(paths.infill, deep=True)


def test_verify_finds_damage_that_kept_size_and_mtime_and_marks_it_for_rebuild(data_run):
    cfg, paths = data_run
    before = _snapshot(paths.tokens)
    _flip_byte_in_place(paths.tokens / "train" / "part-00000.arrow", keep_mtime=True)
    assert not verify_manifest(paths.tokens)  # invisible to the quick check, by construction

    found = cli("verify", str(paths.root), timeout=300)
    assert found.returncode == 1, found.stdout + found.stderr
    assert "FAILED tokens/manifest.json" in found.stdout and "train/part-00000.arrow" in found.stdout
    assert "ok     docs/manifest.json" in found.stdout and "Traceback" not in found.stderr

    stages.run_pipeline(cfg, "data")  # the marked shard is rebuilt
    assert _snapshot(paths.tokens) == before
    again = cli("verify", str(paths.root), timeout=300)
    assert again.returncode == 0 and "all intact" in again.stdout, again.stdout


def test_verify_names_a_missing_run_directory_in_one_line(tmp_path):
    done = cli("verify", str(tmp_path / "nope"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "does not exist" in done.stderr
    (tmp_path / "empty").mkdir()
    empty = cli("verify", str(tmp_path / "empty"))
    assert empty.returncode == 2 and "holds no stage manifest" in empty.stderr, empty.stderr


class _Payload:
    """Unpickling this creates a marker file: the proof that a load executed code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_nothing_in_a_run_directory_is_a_pickle_and_planted_pickles_never_run(data_run, tmp_path):
    cfg, paths = data_run
    assert not (paths.root / ".prefect-results").exists()
    for p in paths.root.rglob("*"):
        if p.is_file():
            assert p.read_bytes()[:2] not in (b"\x80\x04", b"\x80\x05"), f"{p} looks like a pickle"
    # replace every stamp and manifest-less JSON record with a pickle payload
    marker = tmp_path / "executed"
    payload = pickle.dumps(_Payload(marker))
    planted = list(paths.stamps.rglob("*.json"))
    assert planted
    for p in planted:
        p.write_bytes(payload)
    stages.run_pipeline(cfg, "data")
    assert not marker.exists()
    assert json.loads((paths.stamps / "ingest.json").read_text())["stage"] == "ingest"  # rebuilt as JSON
    assert read_manifest(paths.infill)["stage"]


def test_an_upstream_stage_rebuilt_byte_for_byte_leaves_everything_below_it_cached(data_run):
    """A damaged document shard and a deleted tokenizer are rebuilt identical: their digests (content,
    not write times or timings) do not move, so tokens, blank-infilling shards and their stamps stay."""
    cfg, paths = data_run
    downstream = {name: (paths.stamps / f"{name}.json").read_bytes() for name in ("tokenize", "infill")}
    infill_before = _snapshot(paths.infill)
    _flip_byte_in_place(next(paths.docs.glob("train/part-*.parquet")))
    (paths.tokenizer / "tokenizer.model").unlink()

    stages.run_pipeline(cfg, "data")
    assert not verify_manifest(paths.docs, deep=True) and not verify_manifest(paths.tokenizer, deep=True)
    assert {name: (paths.stamps / f"{name}.json").read_bytes() for name in downstream} == downstream
    assert _snapshot(paths.infill) == infill_before
