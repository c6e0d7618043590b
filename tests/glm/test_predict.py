"""Batch inference without code (`glm-runtime predict` / `glm-pipeline predict`): JSON Lines, CSV and
Parquet in and out on the real tiny bundles, results equal to the Python API, one-line errors that leave
nothing written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from glm.checkpoint import load_model
from glm.tokenizer import Tokenizer
from glm_pipeline.flows.cli import main as cli_main

from glm import finetune as ft
from glm import runtime
from tests.glm.test_export import SINGLE, build_bundles


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_bundles(tmp_path_factory)


@pytest.fixture(scope="module")
def texts(built) -> list[str]:
    # more rows than one batch: the command streams in batches of --batch-size
    return [e["text"] for e in built.clf_test[:30]] + ['good, "quoted"\nand on two lines', "a bad film", "good " * 80]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_classify_a_jsonl_file_as_the_python_api_and_pytorch_do(built, texts, tmp_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts)])
    out = tmp_path / "out.jsonl"
    assert cli_main(["predict", str(built.clf_bundle), str(src), str(out), "--batch-size", "8"]) == 0
    rows = _read_jsonl(out)
    assert [r["id"] for r in rows] == list(range(len(texts))) and [r["text"] for r in rows] == texts
    api = runtime.Bundle.load(built.clf_bundle, threads=1).classify_batch(texts)
    assert [r["label"] for r in rows] == [c.label for c in api]
    got = np.array([[r["prob_0"], r["prob_1"]] for r in rows])  # (N, 2)
    np.testing.assert_allclose(got, [[c.probabilities["0"], c.probabilities["1"]] for c in api], atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)
    assert all(r["probability"] == max(r["prob_0"], r["prob_1"]) for r in rows)
    model, _ = load_model(built.clf_checkpoint)
    with torch.no_grad():
        ref = ft.score_cloze(model, Tokenizer.load(built.tokenizer), texts, SINGLE)  # (N, 2)
    probs = np.exp(ref - ref.max(1, keepdims=True))
    np.testing.assert_allclose(got, probs / probs.sum(1, keepdims=True), atol=1e-4)
    err = capsys.readouterr().err
    assert f"wrote {len(texts)} rows to {out}" in err  # and the progress bar before it


def test_csv_and_parquet_in_and_out_with_another_text_column(built, texts, tmp_path):
    src = tmp_path / "in.csv"
    with open(src, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["review", "stars"])
        w.writerows([[t, i % 5] for i, t in enumerate(texts)])
    out = tmp_path / "out.parquet"
    args = ["predict", str(built.clf_bundle), str(src), str(out), "--text-field", "review", "--quiet", "--int8"]
    assert cli_main(args) == 0
    table = pq.read_table(out).to_pylist()
    assert [r["review"] for r in table] == texts and {r["label"] for r in table} <= {"0", "1"}
    back = tmp_path / "back.csv"
    assert runtime.main(["predict", str(built.clf_bundle), str(out), str(back), "--text-field", "review", "--quiet"]) == 0
    with open(back, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["review"] for r in rows] == texts and abs(float(rows[0]["prob_0"]) + float(rows[0]["prob_1"]) - 1) < 1e-6


def test_fill_and_generate_with_the_generation_bundle(built, tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", [{"text": "the movie was [MASK]."}, {"text": "[MASK] plot and [MASK] music"}])
    out = tmp_path / "filled.jsonl"
    assert runtime.main(["predict", str(built.lm_bundle), str(src), str(out), "--max-new-tokens", "3", "--quiet"]) == 0
    rows = _read_jsonl(out)
    assert [len(r["spans"]) for r in rows] == [1, 2] and all("[MASK]" not in r["filled"] for r in rows)
    gen = tmp_path / "gen.csv"
    args = ["predict", str(built.lm_bundle), str(src), str(gen), "--task", "generate", "--max-new-tokens", "4", "--quiet"]
    assert runtime.main(args) == 0
    with open(gen, newline="", encoding="utf-8") as f:
        assert [isinstance(r["generated"], str) for r in csv.DictReader(f)] == [True, True]


def _bad_rows(tmp_path: Path) -> Path:
    rows = [{"text": "good"}] * 40 + [{"body": "no text column"}]  # the bad row comes after a first batch
    return _jsonl(tmp_path / "in.jsonl", rows)


@pytest.mark.parametrize(
    "make_input, extra, message",
    [
        (_bad_rows, [], r"in.jsonl row 41 has no column 'text' \(columns: body\); pass --text-field NAME"),
        (lambda p: (p / "in.jsonl").write_text('{"text": "ok"}\n{"text": \n') and p / "in.jsonl", [], "line 2 is not valid JSON"),
        (lambda p: _jsonl(p / "in.jsonl", [{"text": 5}]), [], r"row 1 column 'text' is 5, not a non-empty text"),
        (lambda p: _jsonl(p / "in.txt", [{"text": "x"}]), [], r"extension '.txt'; use .jsonl \(JSON Lines\), .csv or .parquet"),
        (lambda p: p / "missing.jsonl", [], "missing.jsonl does not exist"),
        (lambda p: _jsonl(p / "in.jsonl", [{"text": "no blank"}]), ["--task", "fill", "--allow-classifier"], "has no \\[MASK\\]"),
    ],
    ids=["missing-column", "bad-json", "not-text", "unknown-format", "missing-file", "fill-without-blank"],
)
def test_bad_input_is_one_line_and_leaves_the_old_output_untouched(built, tmp_path, capsys, make_input, extra, message):
    src = make_input(tmp_path)
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    assert runtime.main(["predict", str(built.clf_bundle), str(src), str(out), "--batch-size", "16", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and len([line for line in err if line.startswith("error")]) == 1
    import re

    assert re.search(message, err[-1]), err[-1]
    assert out.read_text() == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_a_generation_bundle_cannot_classify(built, tmp_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", [{"text": "good"}])
    assert runtime.main(["predict", str(built.lm_bundle), str(src), str(tmp_path / "o.jsonl"), "--task", "classify"]) == 2
    assert "is not a classifier; use --task fill or --task generate" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_an_empty_input_gives_an_empty_output_of_the_same_kind(built, tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    for out in (tmp_path / "o.jsonl", tmp_path / "o.parquet"):
        assert runtime.main(["predict", str(built.clf_bundle), str(src), str(out), "--quiet"]) == 0
    assert (tmp_path / "o.jsonl").read_text() == "" and pq.read_table(tmp_path / "o.parquet").num_rows == 0
