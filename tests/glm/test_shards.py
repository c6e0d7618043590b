import json
import os

import pyarrow as pa
import pytest

from glm.core import shards


def test_atomic_path_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "out.bin"
    shards.atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with shards.atomic_path(target) as tmp:
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_manifest_round_trip_and_verification(tmp_path):
    table = pa.table({"x": pa.array([1, 2, 3], pa.int32())})
    shard = shards.write_arrow(tmp_path / "part-00000.arrow", table)
    entry = shards.file_entry(shard, tmp_path, rows=3)
    shards.write_manifest(tmp_path, "demo", [entry], config={"a": 1}, stats={"rows": 3})
    m = shards.read_manifest(tmp_path)
    assert m["stage"] == "demo" and m["files"][0]["rows"] == 3 and m["files"][0]["path"] == "part-00000.arrow"
    assert shards.verify_manifest(tmp_path, deep=True) == []
    assert shards.read_arrow(shard).column("x").to_pylist() == [1, 2, 3]

    os.utime(shard, ns=(entry["mtime_ns"] + 10**9, entry["mtime_ns"] + 10**9))  # touched, unchanged: still fine
    assert shards.verify_manifest(tmp_path) == []

    original = shard.read_bytes()
    shard.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # same size, other content
    assert "content differs" in shards.verify_manifest(tmp_path)[0]  # its mtime moved: re-hashed
    os.utime(shard, ns=(entry["mtime_ns"], entry["mtime_ns"]))  # the mtime put back too: only a deep check sees it
    assert shards.verify_manifest(tmp_path) == []
    assert "content differs" in shards.verify_manifest(tmp_path, deep=True)[0]
    shard.unlink()
    assert "missing" in shards.verify_manifest(tmp_path)[0]


def test_a_manifest_cannot_name_files_outside_its_directory(tmp_path):
    (tmp_path / "outside.txt").write_text("x")
    stage = tmp_path / "stage"
    entry = shards.file_entry(tmp_path / "outside.txt", tmp_path)
    shards.write_manifest(stage, "demo", [{**entry, "path": "../outside.txt"}])
    assert "outside its directory" in shards.verify_manifest(stage)[0]


def test_the_manifest_digest_ignores_when_files_were_written_not_what_they_are(tmp_path):
    table = pa.table({"x": pa.array([1, 2, 3], pa.int32())})
    shard = shards.write_arrow(tmp_path / "part-00000.arrow", table)
    shards.write_manifest(tmp_path, "demo", [shards.file_entry(shard, tmp_path)])
    digest = shards.manifest_digest(tmp_path)
    os.utime(shard, ns=(1, 1))  # rewritten byte for byte later (a repaired shard): same digest
    shards.write_manifest(tmp_path, "demo", [shards.file_entry(shard, tmp_path)])
    assert shards.manifest_digest(tmp_path) == digest
    shards.write_arrow(shard, pa.table({"x": pa.array([1, 2, 4], pa.int32())}))
    shards.write_manifest(tmp_path, "demo", [shards.file_entry(shard, tmp_path)])
    assert shards.manifest_digest(tmp_path) != digest


def test_manifest_digest_changes_with_inputs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shards.write_manifest(a, "s", [], config={"k": 1})
    d1 = shards.manifest_digest(a)
    shards.write_manifest(b, "s", [], config={"k": 2}, inputs=[a])
    assert json.loads((b / "manifest.json").read_text())["inputs"][0]["sha256"] == d1
    shards.write_manifest(a, "s", [], config={"k": 3})
    assert shards.manifest_digest(a) != d1


def test_missing_and_corrupt_manifests_have_clear_errors(tmp_path):
    with pytest.raises(shards.ManifestError, match="has not finished"):
        shards.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(shards.ManifestError, match="not valid JSON"):
        shards.read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="re-run"):
        shards.read_arrow(tmp_path / "nope.arrow")
