"""Blank-infilling shards and the training loader: shard writing tokens/s, batches/s, peak RSS, disk cost.

On synthetic token shards (random ids, Zipf-ish document lengths; no tokenizer needed) at
seq_len 512, this process:
- builds the dataset end to end (packing, the vectorised builder, Arrow writes, hashes,
  manifest) and reports packed tokens/s and the stage's peak RSS;
- reports the shards' disk cost per token against the raw token shards (lower is better);
- reads batches of 32 with `TrainLoader` (memory-mapped, one fancy-index gather per shard
  and column) against the conventional map-style Dataset + DataLoader over the same shards
  (one __getitem__ per sample, then default_collate), both in the main process;
- reports what the content check of a shard open costs (`glm.infill_shards.check_samples`: id,
  sep/length and position ranges, once per shard per process), per full shard and in batches.
Peak RSS is the VmHWM of this process, reset before each phase where Linux allows it (so it
includes the ~300 MB of imported libraries, reported as rss_before_mb, and the touched pages
of the memory-mapped shards).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from glm.core import shards
from glm.core.config import InfillingConfig
from glm.core.special_tokens import NUM_SPECIAL
from glm.data.infill_shards import build_infilling_dataset, check_samples
from glm.data.loader import TrainLoader, _to_torch

SEQ_LEN = 512
BATCH = 32
VOCAB = 32000


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak


def synthetic_token_shards(root: Path, tokens: int, docs_per_shard: int = 20_000, seed: int = 0) -> Path:
    """Token shards of about `tokens` train tokens (+5% valid): random ids, Zipf-ish document lengths."""
    rng = np.random.default_rng(seed)
    files = []
    for split, budget in (("train", tokens), ("valid", max(tokens // 20, 2000))):
        shard = 0
        while budget > 0:
            lengths = np.minimum(rng.zipf(1.3, docs_per_shard), 100) * 40  # (D,) 40..4000 tokens
            lengths = lengths[: max(1, int(np.searchsorted(np.cumsum(lengths), budget)) + 1)]
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)  # (D+1,)
            values = pa.array(rng.integers(NUM_SPECIAL, VOCAB, int(offsets[-1])).astype(np.uint16))
            table = pa.table({"tokens": pa.ListArray.from_arrays(pa.array(offsets), values)})
            path = shards.write_arrow(root / split / f"part-{shard:05d}.arrow", table)
            files.append(shards.file_entry(path, root, docs=len(lengths), tokens=int(offsets[-1])))
            budget -= int(offsets[-1])
            shard += 1
    shards.write_manifest(root, "tokens", files, stats={"vocab_size": VOCAB})  # as the token stage records it
    return root


class PerSample(torch.utils.data.Dataset):
    """The conventional reference: one sample per __getitem__, batched by default_collate."""

    def __init__(self, loader: TrainLoader):
        self.shard_set = loader.data.epochs[0]

    def __len__(self) -> int:
        return len(self.shard_set)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in _to_torch(self.shard_set.gather(np.array([i]))).items()}


def _rate(batches: Iterator, n: int) -> float:
    next(batches)  # warm the memory maps and caches
    start = time.perf_counter()
    for _ in range(n):
        next(batches)
    return n / (time.perf_counter() - start)


def run(quick: bool = False) -> Iterator[dict]:
    tokens = 300_000 if quick else 12_000_000
    n_batches = 40 if quick else 1000
    cfg = InfillingConfig(seq_len=SEQ_LEN, epochs=1, samples_per_shard=512 if quick else 4096)
    work = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        tokens_dir = synthetic_token_shards(work / "tokens", tokens)
        reset, baseline = _reset_peak_rss(), _status_mb("VmRSS")
        start = time.perf_counter()
        manifest = shards.read_manifest(build_infilling_dataset(tokens_dir, work / "infill", cfg, progress=False))
        seconds = time.perf_counter() - start
        stats = manifest["stats"]
        packed = sum(e["tokens"] for e in stats["epochs"]) + stats["valid"]["tokens"]
        common = {"seq_len": SEQ_LEN, "tokens": packed, "quick": quick}
        yield {
            "name": "infill_shards",
            "metric": "throughput",
            "value": packed / seconds,
            "unit": "tokens/s",
            "seconds": seconds,
            "samples": stats["builder"]["train"]["samples"] + stats["valid"]["samples"],
            **common,
        }
        yield {
            "name": "infill_shards",
            "metric": "peak_rss",
            "value": _peak_rss_mb(),
            "unit": "MB",
            "peak_reset": reset,
            "rss_before_mb": baseline,
            **common,
        }
        yield {
            "name": "infill_shards",
            "metric": "disk_bytes_per_token",
            "value": stats["bytes_per_token"],
            "unit": "bytes/token",
            "reference": stats["raw_bytes_per_token"],
            "ratio": stats["bytes_per_token"] / stats["raw_bytes_per_token"],
            "better": "lower",
            "reference_is": "the raw token shards (uint16 ids + offsets)",
            **common,
        }

        loader = TrainLoader(work / "infill", BATCH, seed=0)
        reset, baseline = _reset_peak_rss(), _status_mb("VmRSS")
        ours = _rate(iter(loader), n_batches)
        peak = _peak_rss_mb()
        generator = torch.Generator().manual_seed(0)
        reference = _rate(
            iter(
                torch.utils.data.DataLoader(
                    PerSample(loader),
                    batch_size=BATCH,
                    shuffle=True,
                    generator=generator,
                    num_workers=0,
                )
            ),
            min(n_batches, len(loader.data.epochs[0]) // BATCH - 1),
        )
        common = {"seq_len": SEQ_LEN, "batch_size": BATCH, "batches": n_batches, "quick": quick}
        yield {
            "name": "train_loader",
            "metric": "throughput",
            "value": ours,
            "unit": "batches/s",
            "reference": reference,
            "ratio": ours / reference,
            "better": "higher",
            "reference_is": "map-style Dataset + DataLoader(default_collate), main process",
            **common,
        }
        yield {
            "name": "train_loader",
            "metric": "peak_rss",
            "value": peak,
            "unit": "MB",
            "peak_reset": reset,
            "rss_before_mb": baseline,
            **common,
        }

        shard_set = loader.data.epochs[0]
        views = shard_set._open()  # memory-mapped and checked; the pages are warm from the batches above
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for f, view in zip(shard_set.files, views):
                check_samples(f["path"], view, shard_set.seq_len, shard_set.vocab_size)
            best = min(best, time.perf_counter() - start)
        per_shard = best / len(shard_set) * cfg.samples_per_shard
        yield {
            "name": "shard_check",
            "metric": "seconds_per_shard",
            "value": per_shard,
            "unit": "s",
            "better": "lower",
            "samples_per_shard": cfg.samples_per_shard,
            "in_batches": per_shard * ours,
            "note": "once per shard per process, when its shard set is first opened; warm page cache",
            **common,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
