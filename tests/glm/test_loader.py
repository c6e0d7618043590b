"""The memory-mapped training loader: rank/worker split, shuffling, epochs, exact resumption."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from glm.core import shards
from glm.core.config import InfillingConfig, ModelConfig
from glm.core.model import GLM, infilling_loss
from glm.core.special_tokens import NUM_SPECIAL, SPECIAL
from glm.data import infilling
from glm.data.infill_shards import build_infilling_dataset, packing_plan, read_rows
from glm.data.loader import BATCH_KEYS, InfillingData, TrainLoader, ValidLoader
from tests.glm.test_infill_shards import flip_in_place, write_token_shards

CFG = InfillingConfig(seq_len=64, epochs=2, samples_per_shard=24)
ROW = infilling.input_length(CFG)
N_TRAIN = 160  # documents of exactly one row each, so every epoch holds N_TRAIN samples


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    one_row = lambda n: [rng.integers(NUM_SPECIAL, 2000, ROW - 1).astype(np.uint16) for _ in range(n)]  # noqa: E731
    docs = {"train": [one_row(70), one_row(90)], "valid": [one_row(37)]}
    root = tmp_path_factory.mktemp("run")
    build_infilling_dataset(write_token_shards(root / "tokens", docs, vocab_size=2000), root / "infill", CFG, progress=False)
    return root / "infill"


def copy_of(data_dir: Path, where: Path) -> Path:
    """A copy with the files' mtimes, so the manifests still describe it."""
    return Path(shutil.copytree(data_dir, where))


def epoch_rows(data_dir: Path, epoch: int) -> dict[bytes, int]:
    """Sample index of every input row of a built epoch (rows are unique: random documents)."""
    shard_set = InfillingData(data_dir).epochs[epoch]
    ids = shard_set.gather(np.arange(len(shard_set)))["input_ids"]
    rows = {row.tobytes(): i for i, row in enumerate(ids)}
    assert len(rows) == len(shard_set)
    return rows


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(iter(loader), n))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in BATCH_KEYS:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


def test_batches_are_what_infilling_loss_expects(data_dir):
    batch = next(iter(TrainLoader(data_dir, 8, seed=0, seq_len=64, max_seq_len=128)))
    assert set(batch) == set(BATCH_KEYS)
    for key in BATCH_KEYS:
        assert batch[key].dtype == (torch.bool if key == "loss_mask" else torch.int64)
        assert batch[key].shape == ((8,) if key in ("sep", "task") else (8, 64))
    assert (batch["task"] == infilling.TOKEN).all() and InfillingData(data_dir).objective_mix == {"token": 1.0}
    model = GLM(ModelConfig(vocab_size=2048, max_seq_len=64))
    loss, n_tokens = infilling_loss(model, batch)
    assert torch.isfinite(loss) and n_tokens == batch["loss_mask"].sum() > 0


def test_validation_batches_equal_the_builder_output_in_file_order(data_dir):
    plan = packing_plan(data_dir.parent / "tokens", "valid", ROW, seed=CFG.seed, epoch=0, shuffle=False)
    rows, lengths = read_rows(plan, 0, plan.n_rows)
    expected, _ = infilling.build_samples(rows, lengths, CFG, seed=CFG.seed, epoch=0, first_index=0)
    valid = ValidLoader(data_dir, 10)
    batches = list(valid)
    assert len(valid) == len(batches) == 4 and [len(b["sep"]) for b in batches] == [10, 10, 10, 7]
    for key in BATCH_KEYS:
        got = torch.cat([b[key] for b in batches]).numpy()
        np.testing.assert_array_equal(got, getattr(expected, key))
    assert_same_batches(batches, list(valid))  # re-iterable, same order

    ranks = [list(ValidLoader(data_dir, 10, rank=r, world_size=3)) for r in range(3)]
    assert [len(r) for r in ranks] == [2, 1, 1]
    assert_same_batches([ranks[0][0], ranks[1][0], ranks[2][0], ranks[0][1]], batches)
    assert len(ValidLoader(data_dir, 10, max_batches=2)) == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_and_workers_see_every_sample_of_an_epoch_exactly_once(data_dir, num_workers):
    rows = epoch_rows(data_dir, 0)
    world, batch_size = 2, 8
    steps = N_TRAIN // (world * batch_size)
    seen = []
    for rank in range(world):
        loader = TrainLoader(data_dir, batch_size, rank=rank, world_size=world, seed=7, num_workers=num_workers)
        for batch in take(loader, steps):
            seen += [rows[r.tobytes()] for r in batch["input_ids"].numpy()]
        assert loader.position == N_TRAIN and loader.epoch == 1
    assert sorted(seen) == list(range(N_TRAIN))


def test_workers_yield_the_main_process_batches_in_order(data_dir):
    single = take(TrainLoader(data_dir, 8, rank=1, world_size=2, seed=3), 7)
    assert_same_batches(take(TrainLoader(data_dir, 8, rank=1, world_size=2, seed=3, num_workers=2), 7), single)


def test_a_batch_may_straddle_epochs_and_nothing_is_dropped_or_repeated(data_dir):
    # 3 ranks x 7 = 21 samples per step does not divide the 160 of an epoch
    loaders = [TrainLoader(data_dir, 7, rank=r, world_size=3, seed=0) for r in range(3)]
    seen = np.concatenate([ld.batch_indices(p) for p in range(0, 21 * 31, 21) for ld in loaders])  # (651, 2)
    for epoch in range(4):  # 640 stream positions: epochs 0, 1 and their cycled repeats 2, 3
        assert sorted(seen[seen[:, 0] == epoch, 1]) == list(range(N_TRAIN))
    assert len(set(seen[seen[:, 0] == 4, 1])) == 11  # the rest: the start of epoch 4
    order = [seen[seen[:, 0] == e, 1] for e in (0, 2)]
    assert not np.array_equal(*order)  # a cycled set comes back in a new order
    batch = loaders[1].batch_at(21 * 7)  # positions 154..160: the last 6 of epoch 0, the first of epoch 1
    assert loaders[1].batch_indices(21 * 7)[:, 0].tolist() == [0] * 6 + [1]
    assert batch["input_ids"].shape == (7, 64)


def test_shuffle_is_deterministic_per_seed_and_differs_across_epochs(data_dir):
    rows0, rows1 = epoch_rows(data_dir, 0), epoch_rows(data_dir, 1)
    a = take(TrainLoader(data_dir, 16, seed=1), 20)  # 2 epochs
    assert_same_batches(a, take(TrainLoader(data_dir, 16, seed=1), 20))
    order0 = [rows0[r.tobytes()] for b in a[:10] for r in b["input_ids"].numpy()]
    order1 = [rows1[r.tobytes()] for b in a[10:] for r in b["input_ids"].numpy()]
    assert sorted(order0) == sorted(order1) == list(range(N_TRAIN))  # epoch 1 uses the epoch-1 shards
    assert order0 != list(range(N_TRAIN)) and order0 != order1
    b = take(TrainLoader(data_dir, 16, seed=2), 1)
    assert not torch.equal(a[0]["input_ids"], b[0]["input_ids"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_gives_the_uninterrupted_batches(data_dir, num_workers):
    whole = take(TrainLoader(data_dir, 12, seed=4), 30)  # crosses into the cycled epochs
    first = TrainLoader(data_dir, 12, seed=4, num_workers=num_workers)
    assert_same_batches(take(first, 9), whole[:9])
    state = first.state_dict()
    resumed = TrainLoader(data_dir, 12, seed=999, num_workers=num_workers)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 21), whole[9:])
    # the position is global, so the stream continues even with another world size
    halves = [TrainLoader(data_dir, 6, rank=r, world_size=2) for r in range(2)]
    for loader in halves:
        loader.load_state_dict(state)
    nxt = [next(iter(loader)) for loader in halves]
    assert torch.equal(torch.cat([b["input_ids"] for b in nxt]), whole[9]["input_ids"])


def test_columns_stored_explicitly_override_the_derived_ones(tmp_path):
    # documents full of literal <sop> ids: the shard stores targets and block positions
    rng = np.random.default_rng(2)
    text = np.where(rng.random((20, 40)) < 0.5, SPECIAL.sop, rng.integers(NUM_SPECIAL, 99, (20, 40)))  # (docs, len)
    docs = list(text.astype(np.uint16))
    tokens = write_token_shards(tmp_path / "tokens", {"train": [docs], "valid": [docs]})
    cfg = CFG.model_copy(update={"epochs": 1})
    manifest = shards.read_manifest(build_infilling_dataset(tokens, tmp_path / "infill", cfg, progress=False))
    assert manifest["stats"]["shards_with_explicit_columns"] > 0
    plan = packing_plan(tokens, "valid", ROW, seed=cfg.seed, epoch=0, shuffle=False)
    rows, lengths = read_rows(plan, 0, plan.n_rows)
    expected, _ = infilling.build_samples(rows, lengths, cfg, seed=cfg.seed, epoch=0, first_index=0)
    batch = next(iter(ValidLoader(tmp_path / "infill", plan.n_rows)))
    for key in BATCH_KEYS:
        np.testing.assert_array_equal(batch[key].numpy(), getattr(expected, key))


def test_clear_errors(data_dir, tmp_path):
    with pytest.raises(shards.ManifestError, match="run the dataset stage"):
        TrainLoader(tmp_path, 4)
    with pytest.raises(ValueError, match="seq_len=64.*infilling.seq_len=128"):
        TrainLoader(data_dir, 4, seq_len=128)
    with pytest.raises(ValueError, match="max_seq_len=32"):
        ValidLoader(data_dir, 4, max_seq_len=32)
    with pytest.raises(ValueError, match="holds only 160"):
        TrainLoader(data_dir, 81, world_size=2)
    other = TrainLoader(data_dir, 4)
    with pytest.raises(ValueError, match="another blank-infilling dataset"):
        other.load_state_dict({"position": 8, "seed": 0, "data": "elsewhere"})
    other.load_state_dict({"position": 8, "seed": 0, "data": "elsewhere"}, strict=False)
    assert other.position == 8

    broken = copy_of(data_dir, tmp_path / "broken")
    (broken / "epoch-001" / "part-00002.arrow").unlink()
    with pytest.raises(shards.ManifestError, match="incomplete.*missing"):
        TrainLoader(broken, 4)


def damage(path: Path, column: str, row: int, change) -> None:
    """Rewrite `row` of `column` in place with change(values): the bytes of that row's values
    (with the next row's, so the pattern is unique in the file) found and overwritten."""
    table = shards.read_arrow(path)
    values = table.column(column).combine_chunks()
    if isinstance(values, pa.FixedSizeListArray):
        rows = values.flatten().to_numpy().reshape(len(values), -1)
        old = rows[row : row + 2].copy()
    else:
        rows = values.to_numpy()
        old = rows[row : row + 8].copy()  # scalars: a longer run of rows to be unique
    new = old.copy()
    new[0] = change(old[0])
    flip_in_place(path, old.tobytes(), new.tobytes())


@pytest.mark.parametrize(
    "column,change,problem",
    [
        ("input_ids", lambda ids: np.where(np.arange(len(ids)) == 3, 65535, ids), r"token id 65535 >= vocab size 2000 in row 5"),
        ("sep", lambda sep: sep + 200, r"sep \d+ and length \d+ in row 5 break 1 <= sep <= length <= seq_len=64"),
        (
            "position_ids",
            lambda pos: np.where(np.arange(len(pos)) == 0, 7, pos),
            r"position ids of row 5 do not fit its sep \d+ and length \d+",
        ),
    ],
)
def test_a_corrupt_shard_fails_at_open_naming_the_file_before_a_batch_uses_it(data_dir, tmp_path, column, change, problem):
    broken = copy_of(data_dir, tmp_path / "broken")
    shard = broken / "epoch-000" / "part-00001.arrow"
    damage(shard, column, 5, change)
    assert not shards.verify_manifest(broken)  # same size and mtime: only the content check sees it
    loader = TrainLoader(broken, 4)
    with pytest.raises(shards.CorruptShardError, match=rf"{shard} is corrupt: {problem}; delete it and re-run"):
        next(iter(loader))  # the first batch opens epoch 0, whichever samples it needs
    assert loader.position == 0


def test_a_corrupt_validation_shard_fails_the_same_way(data_dir, tmp_path):
    broken = copy_of(data_dir, tmp_path / "broken")
    shard = broken / "valid" / "part-00000.arrow"
    damage(shard, "input_ids", 2, lambda ids: np.where(np.arange(len(ids)) == 0, 4000, ids))
    with pytest.raises(shards.CorruptShardError, match=rf"{shard} is corrupt: token id 4000 >= vocab size 2000 in row 2"):
        next(iter(ValidLoader(broken, 4)))
