"""Training data: memory-mapped blank-infilling shards, split across ranks and workers, resumable.

The built epochs form one endless stream of samples: epoch k uses shard set
`epoch-{k mod E}` (E = built epochs, so a longer run cycles over them) in the order
permutation(seed, k), so even a cycled set is seen in a new order. Global batch j covers
stream positions [p0 + j*G, p0 + (j+1)*G), G = batch_size x world_size, and rank r takes
its r-th slice of B. A batch may straddle two epochs; nothing is dropped or repeated.
The whole position is one integer (samples consumed globally), so `state_dict()` resumes
exactly, even with another world size or batch size.

Batches are gathered with numpy fancy indexing from memory-mapped Arrow shards (zero copy
until the gather, widened to int64 per batch). That is fast enough to run in the main
process (the default, and the simplest to reason about); `num_workers > 0` runs the
same batches through a torch DataLoader whose workers take batches j = w mod num_workers,
which the DataLoader returns in the same order, for when the trainer's step is so short
that the gather shows up in profiles.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from glm.core.config import ConfigError
from glm.core.shards import (
    MANIFEST,
    CorruptShardError,
    ManifestError,
    read_arrow,
    read_manifest,
    verify_manifest,
)
from glm.core.special_tokens import SPECIAL, SpecialTokens
from glm.data.infill_shards import (
    DERIVED,
    LAYOUT_VERSION,
    STAGE,
    STORED,
    VALID,
    check_samples,
    epoch_dir,
    expand_samples,
)

# `task` (B,): the objective each sample was drawn as, which the trainer weighs by the mix (glm/training/train.py)
BATCH_KEYS = ("input_ids", "position_ids", "block_position_ids", "targets", "loss_mask", "sep", "task")
_ROWS = ("input_ids", "position_ids")  # (N, L) columns
_SCALARS = ("sep", "length", "task")  # (N,) columns


class ShardSet:
    """One built shard set (an epoch or the validation set): its samples, memory-mapped on first use.

    Opening checks every shard's content (`glm.infill_shards.check_samples`), so a corrupt file
    fails with its name before a training step sees any of its samples.
    """

    def __init__(
        self,
        root: Path,
        files: list[dict[str, Any]],
        seq_len: int,
        vocab_size: int | None = None,
        special: SpecialTokens = SPECIAL,
    ):
        self.root, self.special = root, special
        self.files = sorted(files, key=lambda f: f["shard"])
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        sizes = np.array([f["samples"] for f in self.files], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # (F+1,)
        self._views: list[dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers re-open the memory maps instead of pickling them
        return {**self.__dict__, "_views": None}

    def _open(self) -> list[dict[str, np.ndarray]]:
        views = []
        for f in self.files:
            path = self.root / f["path"]
            try:
                table = read_arrow(path)  # memory-mapped, zero copy
            except ManifestError as e:  # not Arrow at all (truncated, overwritten): as permanent as bad ids
                raise CorruptShardError(path, "it does not read as an Arrow IPC file") from e
            if table.num_rows != f["samples"]:
                raise CorruptShardError(path, f"it holds {table.num_rows} samples, its manifest says {f['samples']}")
            missing = set(STORED) - set(table.column_names)
            if missing:
                raise ManifestError(f"{path} lacks columns {sorted(missing)} (another layout); rebuild the dataset")
            try:
                table.validate()  # buffer sizes against lengths: O(columns); memory maps are not validated on read
            except pa.ArrowInvalid as e:
                raise CorruptShardError(path, f"its Arrow buffers do not match its lengths ({e})") from None
            table = table.combine_chunks() if table.column("sep").num_chunks > 1 else table  # a copy, never written so
            view = {}
            for name in table.column_names:
                array = table.column(name).chunk(0)
                if name in (*_ROWS, *DERIVED):
                    width = array.type.list_size
                    if width != self.seq_len:
                        raise CorruptShardError(path, f"its {name} rows hold {width} tokens, not seq_len={self.seq_len}")
                    flat = array.values.to_numpy(zero_copy_only=True)  # (N*L,) memory-mapped
                    view[name] = flat[array.offset * width : (array.offset + len(array)) * width].reshape(-1, width)
                else:
                    view[name] = array.to_numpy(zero_copy_only=True)  # (N,)
            check_samples(path, view, self.seq_len, self.vocab_size)
            views.append(view)
        return views

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Samples `indices` (B,) as int64 / bool numpy arrays, derived columns filled in."""
        if self._views is None:
            self._views = self._open()
        B, L = len(indices), self.seq_len
        shard = np.searchsorted(self.starts, indices, side="right") - 1  # (B,)
        local = indices - self.starts[shard]  # (B,)
        out = {name: np.empty((B, L), np.int64) for name in _ROWS}  # (B, L)
        out.update({name: np.empty(B, np.int64) for name in _SCALARS})  # (B,)
        groups = [(s, np.flatnonzero(shard == s)) for s in np.unique(shard)]
        for s, where in groups:
            for name in (*_ROWS, *_SCALARS):
                out[name][where] = self._views[s][name][local[where]]
        out.update(expand_samples(out["input_ids"], out["sep"], out["length"], self.special))
        for s, where in groups:  # shards that stored a column the layout could not derive
            for name in DERIVED:
                if name in self._views[s]:
                    out[name][where] = self._views[s][name][local[where]]
        return out


def _to_torch(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(arrays[name])) for name in BATCH_KEYS}


class InfillingData:
    """A built blank-infilling dataset: its manifest, training epochs and validation set."""

    def __init__(self, data_dir: str | Path, *, seq_len: int | None = None, max_seq_len: int | None = None):
        self.root = Path(data_dir)
        if not (self.root / MANIFEST).is_file():
            raise ManifestError(
                f"no blank-infilling dataset at {self.root} ({MANIFEST} missing): run the dataset stage "
                "(glm.infill_shards.build_infilling_dataset) first"
            )
        problems = verify_manifest(self.root)
        if problems:
            raise ManifestError(
                f"blank-infilling dataset {self.root} is incomplete ({'; '.join(problems[:3])}); re-run the dataset stage"
            )
        self.manifest = read_manifest(self.root)
        if self.manifest.get("stage") != STAGE:
            raise ManifestError(f"{self.root} holds a {self.manifest.get('stage')!r} stage, not {STAGE!r} shards")
        stats = self.manifest["stats"]
        if stats.get("layout_version") != LAYOUT_VERSION:
            raise ManifestError(
                f"{self.root} was written with shard layout {stats.get('layout_version')}, this code reads "
                f"layout {LAYOUT_VERSION}; re-run the dataset stage"
            )
        self.seq_len = int(stats["seq_len"])
        self.vocab_size = int(stats["vocab_size"]) if stats.get("vocab_size") else None  # absent in older builds
        self.key = stats["build_key"]
        # a released GLM tokenizer's ids, if the shards were built with them (targets are derived with them)
        special = SpecialTokens(**stats["special_tokens"]) if stats.get("special_tokens") else SPECIAL
        # the mix the samples were drawn with: the trainer weighs each objective's loss by it
        self.objective_mix = {k: float(v) for k, v in self.manifest["config"]["objective_mix"].items()}
        self.check_lengths(seq_len, max_seq_len)
        files = self.manifest["files"]
        self.epochs = [
            ShardSet(
                self.root, [f for f in files if f["path"].startswith(epoch_dir(e) + "/")], self.seq_len, self.vocab_size, special
            )
            for e in range(len(stats["epochs"]))
        ]
        valid = [f for f in files if f["path"].startswith(VALID + "/")]
        self.valid = ShardSet(self.root, valid, self.seq_len, self.vocab_size, special) if valid else None
        if not self.epochs or min(map(len, self.epochs)) == 0:
            raise ManifestError(f"blank-infilling dataset {self.root} has an empty training epoch; rebuild it")

    def check_lengths(self, seq_len: int | None = None, max_seq_len: int | None = None) -> None:
        """The samples must have the config's seq_len and fit the model's position tables."""
        if seq_len is not None and seq_len != self.seq_len:
            raise ConfigError(
                f"shards in {self.root} hold samples of seq_len={self.seq_len} but the config asks for "
                f"infilling.seq_len={seq_len}; rebuild the dataset or match the config"
            )
        if max_seq_len is not None and self.seq_len > max_seq_len:
            raise ConfigError(
                f"shards in {self.root} hold samples of seq_len={self.seq_len}, longer than model.max_seq_len="
                f"{max_seq_len}; raise model.max_seq_len or rebuild with a smaller infilling.seq_len"
            )


class TrainLoader:
    """Endless, shuffled, rank/worker-split, exactly resumable training batches (dicts of tensors)."""

    def __init__(
        self,
        data: str | Path | InfillingData,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        seq_len: int | None = None,
        max_seq_len: int | None = None,
    ):
        self.data = data if isinstance(data, InfillingData) else InfillingData(data)
        self.data.check_lengths(seq_len, max_seq_len)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        smallest = min(map(len, self.data.epochs))
        if batch_size < 1 or batch_size * world_size > smallest:
            raise ValueError(
                f"batch_size={batch_size} x world_size={world_size} = {batch_size * world_size} samples per step, but an "
                f"epoch of {self.data.root} holds only {smallest}; lower the batch size or build more data"
            )
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.num_workers = seed, num_workers
        self.position = 0  # samples consumed by all ranks together
        self._sizes = np.array([len(s) for s in self.data.epochs], np.int64)  # (E,)
        self._cum = np.concatenate([[0], np.cumsum(self._sizes)])  # (E+1,)
        self._orders: dict[int, np.ndarray] = {}

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.world_size

    @property
    def epoch(self) -> int:
        """The epoch (counting cycles over the built sets) the next sample comes from."""
        return self._locate(self.position)[0]

    def _locate(self, position: int) -> tuple[int, int]:
        cycles, rest = divmod(position, int(self._cum[-1]))
        e = int(np.searchsorted(self._cum, rest, side="right")) - 1
        return cycles * len(self._sizes) + e, rest - int(self._cum[e])

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a batch spans at most two epochs
                self._orders.pop(min(self._orders))
            n = int(self._sizes[epoch % len(self._sizes)])
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
        return self._orders[epoch]

    def batch_indices(self, position: int) -> np.ndarray:
        """(B, 2) (epoch, sample) pairs of this rank's batch in the global step starting at `position`."""
        lo = position + self.rank * self.batch_size
        hi = lo + self.batch_size
        pieces = []
        while lo < hi:
            epoch, offset = self._locate(lo)
            take = min(hi - lo, int(self._sizes[epoch % len(self._sizes)]) - offset)
            samples = self._order(epoch)[offset : offset + take]  # (take,)
            pieces.append(np.stack([np.full(take, epoch), samples], axis=1))  # (take, 2)
            lo += take
        return np.concatenate(pieces)  # (B, 2)

    def batch_at(self, position: int) -> dict[str, torch.Tensor]:
        """This rank's batch of the global step starting at `position`."""
        ids = self.batch_indices(position)  # (B, 2)
        parts = []
        for epoch in np.unique(ids[:, 0]):
            shard_set = self.data.epochs[int(epoch) % len(self.data.epochs)]
            parts.append(shard_set.gather(ids[ids[:, 0] == epoch, 1]))
        arrays = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return _to_torch(arrays)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from the current position on, forever (one live iterator at a time)."""
        if self.num_workers == 0:
            source = map(self.batch_at, itertools.count(self.position, self.samples_per_step))
        else:
            stream = _WorkerStream(self, self.position)
            source = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.num_workers))
        for batch in source:  # workers run ahead; only batches handed out count as consumed
            self.position += self.samples_per_step
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "data": self.data.key}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Resume at a saved position (with the saved shuffle seed)."""
        if strict and state.get("data") != self.data.key:
            raise ValueError(
                f"the loader state was saved on another blank-infilling dataset than {self.data.root}; "
                "resume with the same data, or pass strict=False to continue at the same position anyway"
            )
        self.position, self.seed = int(state["position"]), int(state["seed"])
        self._orders.clear()


class _WorkerStream(torch.utils.data.IterableDataset):
    """The loader's batches from `start` on; worker w of W makes batches w, w+W, ..."""

    def __init__(self, loader: TrainLoader, start: int):
        self.loader, self.start = loader, start

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.loader.samples_per_step
        j = worker
        while True:
            yield self.loader.batch_at(self.start + j * step)
            j += workers


class ValidLoader:
    """The validation set in file order, no shuffle; rank r takes batches r, r+W, ...; re-iterable.

    The last batch may be smaller; ranks may get one batch fewer than rank 0 unless
    `max_batches` <= len(loader) of the last rank.
    """

    def __init__(
        self,
        data: str | Path | InfillingData,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        max_batches: int | None = None,
        seq_len: int | None = None,
        max_seq_len: int | None = None,
    ):
        self.data = data if isinstance(data, InfillingData) else InfillingData(data)
        self.data.check_lengths(seq_len, max_seq_len)
        if self.data.valid is None:
            raise ValueError(f"{self.data.root} has no validation shards: the token shards' valid split was empty")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        self.batch_size, self.rank, self.world_size, self.max_batches = batch_size, rank, world_size, max_batches
        n = len(self.data.valid)
        self._batches = list(range(rank, -(-n // batch_size), world_size))[:max_batches]

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.data.valid)
        for j in self._batches:
            indices = np.arange(j * self.batch_size, min((j + 1) * self.batch_size, n))  # (B,)
            yield _to_torch(self.data.valid.gather(indices))
