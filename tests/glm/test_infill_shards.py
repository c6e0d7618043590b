"""Packing token shards into rows and writing blank-infilling shards."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from glm.core import shards
from glm.core.config import InfillingConfig
from glm.core.special_tokens import NUM_SPECIAL, SPECIAL
from glm.data import infill_shards, infilling
from glm.data.infill_shards import (
    build_infilling_dataset,
    expand_samples,
    packing_plan,
    read_rows,
)

CFG = InfillingConfig(seq_len=64, epochs=2, samples_per_shard=16)


def write_token_shards(
    root: Path,
    docs_per_split: dict[str, list[list[np.ndarray]]],
    id_type: pa.DataType = pa.uint16(),
    vocab_size: int | None = None,
) -> Path:
    """A token stage directory: root/{split}/part-NNNNN.arrow (`tokens` column) and its manifest
    (which records vocab_size, as the token stage does, when given)."""
    files = []
    for split, parts in docs_per_split.items():
        for i, docs in enumerate(parts):
            table = pa.table({"tokens": pa.array([d.tolist() for d in docs], pa.list_(id_type))})
            path = shards.write_arrow(root / split / f"part-{i:05d}.arrow", table)
            files.append(shards.file_entry(path, root, docs=len(docs), tokens=int(sum(len(d) for d in docs))))
    shards.write_manifest(root, "tokens", files, stats={"vocab_size": vocab_size} if vocab_size else None)
    return root


def flip_in_place(path: Path, old: bytes, new: bytes) -> None:
    """Overwrite the only occurrence of `old` in the file with `new` (same size), keeping its size and
    mtime: damage only a content check can see, as from a failing disk."""
    st = path.stat()
    data = path.read_bytes()
    assert data.count(old) == 1 and len(new) == len(old)
    with open(path, "r+b") as f:
        f.seek(data.index(old))
        f.write(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def random_docs(rng: np.random.Generator, n: int, max_len: int = 150) -> list[np.ndarray]:
    """Documents of Zipf-ish lengths (some longer than a row, some empty) with regular ids."""
    lengths = np.minimum(rng.zipf(1.6, n) * 7, max_len) - (rng.random(n) < 0.05) * max_len
    return [rng.integers(NUM_SPECIAL, 3000, max(int(k), 0)).astype(np.uint16) for k in lengths]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, list[list[np.ndarray]]]]:
    rng = np.random.default_rng(0)
    docs = {"train": [random_docs(rng, 40) for _ in range(3)], "valid": [random_docs(rng, 30)]}
    return write_token_shards(tmp_path_factory.mktemp("tokens"), docs, vocab_size=3000), docs


def stream(docs: list[np.ndarray]) -> np.ndarray:
    """Documents in order, each followed by <eos>, empty ones dropped: what packing must produce."""
    return np.concatenate([np.append(d, SPECIAL.eos) for d in docs if len(d)]).astype(np.int32)


def unpack(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([r[:n] for r, n in zip(rows, lengths)])


def split_documents(tokens: np.ndarray) -> list[tuple[int, ...]]:
    ends = np.flatnonzero(tokens == SPECIAL.eos)
    return [tuple(d) for d in np.split(tokens, ends + 1)[:-1]]


# --------------------------------------------------------------------------- packing


def test_validation_packing_is_the_document_stream_cut_into_rows(corpus):
    tokens_dir, docs = corpus
    plan = packing_plan(tokens_dir, "valid", 23, seed=0, epoch=0, shuffle=False)
    expected = stream(docs["valid"][0])
    assert plan.n_tokens == len(expected) and plan.n_rows == -(-len(expected) // 23)
    assert plan.n_empty_docs == sum(len(d) == 0 for d in docs["valid"][0]) > 0
    rows, lengths = read_rows(plan, 0, plan.n_rows)
    assert rows.shape == (plan.n_rows, 23) and rows.dtype == np.int32
    assert (lengths[:-1] == 23).all() and 1 <= lengths[-1] <= 23  # only the last row is partial
    assert (rows[-1, lengths[-1] :] == SPECIAL.pad).all()
    np.testing.assert_array_equal(unpack(rows, lengths), expected)  # long documents continue in the next row


def test_training_packing_shuffles_documents_per_epoch_deterministically(corpus):
    tokens_dir, docs = corpus
    all_docs = sorted(tuple(d.tolist()) + (SPECIAL.eos,) for part in docs["train"] for d in part if len(d))
    packed = {}
    for epoch in (0, 1):
        plan = packing_plan(tokens_dir, "train", 31, seed=5, epoch=epoch, shuffle=True)
        rows, lengths = read_rows(plan, 0, plan.n_rows)
        packed[epoch] = unpack(rows, lengths)
        assert sorted(split_documents(packed[epoch])) == all_docs  # every document exactly once
        again = read_rows(packing_plan(tokens_dir, "train", 31, seed=5, epoch=epoch, shuffle=True), 0, plan.n_rows)
        np.testing.assert_array_equal(again[0], rows)
    assert not np.array_equal(packed[0], packed[1])


def test_any_row_range_reads_the_same_rows_as_the_whole(corpus):
    # each output shard is an independent unit of work, so a row range must not depend on its neighbours
    tokens_dir, _ = corpus
    plan = packing_plan(tokens_dir, "train", 29, seed=1, epoch=3, shuffle=True)
    rows, lengths = read_rows(plan, 0, plan.n_rows)
    ranges = [(i, 1) for i in range(plan.n_rows)] + [(5, 17), (plan.n_rows - 30, 30), (11, 0)]
    for first, n in ranges:
        part_rows, part_lengths = read_rows(plan, first, n)
        np.testing.assert_array_equal(part_rows, rows[first : first + n])
        np.testing.assert_array_equal(part_lengths, lengths[first : first + n])
    with pytest.raises(ValueError, match="outside"):
        read_rows(plan, plan.n_rows - 1, 2)


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("mix", [{"token": 1.0}, {"token": 0.3, "sentence": 0.3, "document": 0.2, "causal": 0.2}])
def test_derived_columns_reproduce_the_builder(mix):
    cfg = InfillingConfig(seq_len=96, objective_mix=mix)
    rng = np.random.default_rng(1)
    width = infilling.input_length(cfg)
    rows = rng.integers(NUM_SPECIAL, 500, (64, width)).astype(np.int32)  # (N, L_in)
    rows[rng.random(rows.shape) < 0.02] = SPECIAL.eos
    lengths = rng.integers(1, width + 1, 64)  # (N,)
    rows[np.arange(width) >= lengths[:, None]] = SPECIAL.pad
    batch, _ = infilling.build_samples(rows, lengths, cfg, seed=3, epoch=0, first_index=0, sentence_end_ids=[10, 11])
    derived = expand_samples(batch.input_ids.astype(np.int64), batch.sep.astype(np.int64), batch.length.astype(np.int64))
    np.testing.assert_array_equal(derived["targets"], batch.targets)
    np.testing.assert_array_equal(derived["loss_mask"], batch.loss_mask)
    np.testing.assert_array_equal(derived["block_position_ids"], batch.block_position_ids)
    table, explicit = infill_shards.encode_samples(batch, "uint16", cfg.seq_len)
    assert explicit == [] and table.column_names == list(infill_shards.STORED)
    task = table.column("task").to_numpy()
    # a fallback keeps the objective it was drawn as (its loss group); only its layout becomes causal
    assert (task[batch.objective != infilling.CAUSAL] == batch.objective[batch.objective != infilling.CAUSAL]).all()
    assert set(task.tolist()) <= {infilling.OBJECTIVES.index(name) for name in mix}
    assert table.schema.field("input_ids").type == pa.list_(pa.uint16(), cfg.seq_len)
    assert table.schema.field("position_ids").type == pa.list_(pa.uint16(), cfg.seq_len)


def test_a_column_the_layout_cannot_derive_is_stored():
    # a literal <sop> inside a masked span breaks the derivation: the shard must store the truth
    cfg = InfillingConfig(seq_len=64)
    width = infilling.input_length(cfg)
    rows = np.full((4, width), SPECIAL.sop, np.int32)  # (N, L_in)
    batch, _ = infilling.build_samples(rows, np.full(4, width), cfg, seed=0, epoch=0, first_index=0)
    table, explicit = infill_shards.encode_samples(batch, "uint32", cfg.seq_len)
    assert set(explicit) == {"targets", "block_position_ids"}
    assert table.schema.field("input_ids").type == pa.list_(pa.uint32(), cfg.seq_len)
    stored = table.column("targets").combine_chunks().flatten().to_numpy().reshape(4, cfg.seq_len)
    np.testing.assert_array_equal(stored, batch.targets)


# --------------------------------------------------------------------------- the stage


def test_dataset_shards_hold_the_builder_samples_of_the_packed_rows(corpus, tmp_path):
    tokens_dir, _ = corpus
    manifest = json.loads(build_infilling_dataset(tokens_dir, tmp_path, CFG, progress=False).read_text())
    assert manifest["stage"] == "infill" and shards.verify_manifest(tmp_path, deep=True) == []
    assert manifest["inputs"][0]["sha256"] == shards.manifest_digest(tokens_dir)
    stats = manifest["stats"]
    row_len = infilling.input_length(CFG)
    for e, epoch in enumerate(stats["epochs"]):
        plan = packing_plan(tokens_dir, "train", row_len, seed=CFG.seed, epoch=e, shuffle=True)
        assert epoch["samples"] == plan.n_rows and epoch["shards"] == -(-plan.n_rows // CFG.samples_per_shard)
        assert epoch["tokens"] == plan.n_tokens and epoch["pad_tokens"] == plan.n_rows * row_len - plan.n_tokens
    assert stats["token_shards"]["train"]["empty_docs"] == plan.n_empty_docs > 0
    assert sorted(p.name for p in (tmp_path / "epoch-001").iterdir()) == [
        infill_shards.part_name(i) for i in range(stats["epochs"][1]["shards"])
    ]
    assert stats["builder"]["train"]["samples"] == sum(e["samples"] for e in stats["epochs"])
    assert stats["shards_with_explicit_columns"] == 0
    # the disk cost stays a small multiple of the raw token shards
    assert 1.0 < stats["disk_ratio"] < 4.0 and stats["bytes_per_token"] < 10

    # the second shard of epoch 1, decoded from disk, equals the builder run on its packed rows
    plan = packing_plan(tokens_dir, "train", row_len, seed=CFG.seed, epoch=1, shuffle=True)
    rows, lengths = read_rows(plan, 16, 16)
    expected, _ = infilling.build_samples(rows, lengths, CFG, seed=CFG.seed, epoch=1, first_index=16)
    table = shards.read_arrow(tmp_path / "epoch-001" / infill_shards.part_name(1))
    cols = {n: table.column(n).combine_chunks() for n in table.column_names}
    ids = cols["input_ids"].flatten().to_numpy().reshape(16, CFG.seq_len).astype(np.int64)
    sep, length = cols["sep"].to_numpy().astype(np.int64), cols["length"].to_numpy().astype(np.int64)
    decoded = expand_samples(ids, sep, length)
    np.testing.assert_array_equal(ids, expected.input_ids)
    np.testing.assert_array_equal(cols["position_ids"].flatten().to_numpy().reshape(16, -1), expected.position_ids)
    np.testing.assert_array_equal(decoded["targets"], expected.targets)
    np.testing.assert_array_equal(cols["objective"].to_numpy(), expected.objective)
    np.testing.assert_array_equal(cols["task"].to_numpy(), expected.task)


def test_rebuild_is_idempotent_and_resumes_after_a_crash(corpus, tmp_path, monkeypatch):
    tokens_dir, _ = corpus
    cfg = CFG.model_copy(update={"epochs": 1})
    real_build = infilling.build_samples
    calls = []

    def crash_on_third(*args, **kwargs):
        calls.append(kwargs["first_index"])
        if len(calls) == 3:
            raise RuntimeError("killed mid-stage")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(infilling, "build_samples", crash_on_third)
    with pytest.raises(RuntimeError, match="killed"):
        build_infilling_dataset(tokens_dir, tmp_path, cfg, progress=False)
    assert not (tmp_path / "manifest.json").exists() and not list(tmp_path.rglob("*.tmp"))
    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.arrow")}
    assert len(written) == 2

    calls.clear()
    monkeypatch.setattr(infilling, "build_samples", real_build)
    first = build_infilling_dataset(tokens_dir, tmp_path, cfg, progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in written.items())  # finished shards were kept
    assert shards.verify_manifest(tmp_path) == []
    before = first.stat().st_mtime_ns
    assert build_infilling_dataset(tokens_dir, tmp_path, cfg, progress=False).stat().st_mtime_ns == before

    # one more epoch reuses epoch 0 as is; a new seq_len rebuilds everything and drops stale shards
    epoch0 = {p: p.stat().st_mtime_ns for p in (tmp_path / "epoch-000").iterdir()}
    build_infilling_dataset(tokens_dir, tmp_path, cfg.model_copy(update={"epochs": 2}), progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "epoch-000").iterdir()} == epoch0
    build_infilling_dataset(tokens_dir, tmp_path, cfg.model_copy(update={"seq_len": 48}), progress=False)
    assert not list((tmp_path / "epoch-001").glob("*.arrow"))
    manifest = shards.read_manifest(tmp_path)
    assert manifest["stats"]["seq_len"] == 48 and shards.verify_manifest(tmp_path) == []
    assert sorted(f["path"] for f in manifest["files"]) == sorted(
        p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.arrow")
    )


def test_shard_jobs_are_independent_units_of_work(corpus, tmp_path):
    tokens_dir, _ = corpus
    jobs = infill_shards.shard_jobs(tokens_dir, tmp_path, CFG)
    assert {(j.plan.split, j.plan.epoch) for j in jobs} == {("train", 0), ("train", 1), ("valid", 0)}
    results = [infill_shards.build_shard(j) for j in reversed(jobs)]  # any order, e.g. a Prefect map
    assert not any(r["skipped"] for r in results)
    assert all(r["skipped"] for r in map(infill_shards.build_shard, jobs))
    manifest = infill_shards.write_infilling_manifest(tokens_dir, tmp_path, CFG, results)
    sequential = build_infilling_dataset(tokens_dir, tmp_path / "seq", CFG, progress=False)
    by_path = lambda m: {f["path"]: f["sha256"] for f in json.loads(m.read_text())["files"]}  # noqa: E731
    assert by_path(manifest) == by_path(sequential)


def test_a_vocabulary_beyond_uint16_is_stored_as_uint32(tmp_path):
    rng = np.random.default_rng(3)
    docs = [rng.integers(60_000, 70_000, 50).astype(np.uint32) for _ in range(8)]
    tokens_dir = write_token_shards(tmp_path / "tokens", {"train": [docs]}, id_type=pa.uint32())
    build_infilling_dataset(tokens_dir, tmp_path / "infill", CFG.model_copy(update={"epochs": 1}), progress=False)
    table = shards.read_arrow(tmp_path / "infill" / "epoch-000" / infill_shards.part_name(0))
    assert table.schema.field("input_ids").type == pa.list_(pa.uint32(), CFG.seq_len)
    ids = table.column("input_ids").combine_chunks().flatten().to_numpy()
    assert ids.max() >= 65_536 and not (tmp_path / "infill" / "valid").exists()


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(shards.ManifestError, match="run it first"):
        build_infilling_dataset(tmp_path / "nowhere", tmp_path / "out", CFG, progress=False)
    empty = write_token_shards(tmp_path / "empty", {"train": [[np.zeros(0, np.uint16)]]})
    with pytest.raises(ValueError, match="no training tokens"):
        build_infilling_dataset(empty, tmp_path / "out", CFG, progress=False)
    wrong = tmp_path / "wrong"
    path = shards.write_arrow(wrong / "train" / "part-00000.arrow", pa.table({"ids": pa.array([[9, 10]])}))
    shards.write_manifest(wrong, "tokens", [shards.file_entry(path, wrong)])
    with pytest.raises(ValueError, match="no `tokens` column"):
        build_infilling_dataset(wrong, tmp_path / "out", CFG, progress=False)


# --------------------------------------------------------------------------- corrupt token shards


def test_a_token_id_beyond_the_vocabulary_fails_the_build_naming_file_and_row(tmp_path):
    rng = np.random.default_rng(4)
    docs = [rng.integers(NUM_SPECIAL, 3000, 40).astype(np.uint16) for _ in range(30)]
    marker = np.array([2999, 2998, 2997, 2996, 2995], np.uint16)  # a byte pattern found once in the file
    docs[17][10:15] = marker
    tokens_dir = write_token_shards(tmp_path / "tokens", {"train": [docs]}, vocab_size=3000)
    shard = tokens_dir / "train" / "part-00000.arrow"
    flip_in_place(shard, marker.tobytes(), np.array([2999, 65535, 2997, 2996, 2995], np.uint16).tobytes())
    assert not shards.verify_manifest(tokens_dir)  # same size and mtime: the manifest check cannot see it
    with pytest.raises(
        shards.CorruptShardError,
        match=rf"{shard} is corrupt: token id 65535 >= vocab size 3000 in row 17; "
        r"delete it and re-run, or run `glm-pipeline verify RUN_DIR`",
    ):
        build_infilling_dataset(tokens_dir, tmp_path / "infill", CFG.model_copy(update={"epochs": 1}), progress=False)


def test_corrupt_document_offsets_fail_at_open(tmp_path):
    docs = [np.arange(NUM_SPECIAL + 10 * i, NUM_SPECIAL + 10 * (i + 1), dtype=np.uint16) for i in range(3)]
    offsets = np.array([0, 10, 20, 30], np.int32).tobytes()
    for bad, problem in (([0, 10, 5, 30], "row 1 has a negative length"), ([0, 10, 20, 31], "its Arrow buffers do not match")):
        root = write_token_shards(tmp_path / str(bad[2] + bad[3]), {"train": [docs]}, vocab_size=1000)
        path = root / "train" / "part-00000.arrow"
        flip_in_place(path, offsets, np.array(bad, np.int32).tobytes())
        with pytest.raises(shards.CorruptShardError, match=f"{path} is corrupt: {problem}"):
            packing_plan(root, "train", 31, seed=0, epoch=0, shuffle=False)


def test_corrupt_shard_errors_are_manifest_errors_and_pickle_whole():
    err = shards.CorruptShardError("/r/tokens/train/part-00000.arrow", "token id 9 >= vocab size 8 in row 2")
    assert isinstance(err, shards.ManifestError)  # callers that catch ManifestError still do
    again = pickle.loads(pickle.dumps(err))  # crosses process pools and task runners unchanged
    assert str(again) == str(err) and again.path == err.path and again.problem == err.problem
    assert str(err).count("\n") == 0 and "part-00000.arrow is corrupt: token id 9" in str(err)
