import json

import pyarrow as pa
import pytest

from glm import shards


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

    shard.write_bytes(shard.read_bytes()[:-1] + b"\x00")  # same size, other content
    assert shards.verify_manifest(tmp_path) == []
    assert "content hash" in shards.verify_manifest(tmp_path, deep=True)[0]
    shard.unlink()
    assert "missing" in shards.verify_manifest(tmp_path)[0]


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
