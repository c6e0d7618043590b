"""Two nightly cycles on a growing corpus and labelled set, the second deliberately worse, under a real
Prefect server: only new files are ingested and tokenized, the tokenizer is kept, pretraining continues
from the archived checkpoint, the worse model is kept as a refused version, and the app keeps serving the
previous one. The 4-cycle run with its wall times is `python -m benchmarks nightly_cycles`."""

from __future__ import annotations

import json
import subprocess
import sys

from glm_pipeline.flows.cli import main as cli_main

from benchmarks.nightly_cycles import run_cycle
from glm import bundles
from glm.runtime import Bundle
from tests.flows.api import artifacts, events


def test_two_cycles_continue_pretraining_and_the_worse_model_is_not_promoted(prefect_api, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    first = run_cycle(tmp_path, 1, worse=False, size="quick")
    assert first["flow_state"] == "Completed", first["flow_message"]
    assert first["blessed"] and first["current"] == first["app_loaded"] == first["version"] == "v0001", first
    export = tmp_path / "run" / "export"
    app = Bundle.load(export, providers=["CPUExecutionProvider"], threads=1)  # a long-running app, loaded once
    assert app.version == "v0001"

    second = run_cycle(tmp_path, 2, worse=True, size="quick")
    # only the new corpus file was ingested and tokenized; the tokenizer was kept
    assert second["doc_shards_kept"] == first["doc_shards_written"] > 0 and second["doc_shards_written"] > 0
    assert second["token_shards_kept"] == first["token_shards_written"] and second["token_shards_written"] > 0
    assert second["tokenizer_kept"]
    # pretraining continued from the archived weights and trained its steps on the grown corpus
    assert second["pretrain"]["start_step"] == first["pretrain"]["step"] == 6 and second["pretrain"]["step"] == 12
    assert "/pretrain/history/" in second["pretrain"]["continued_from"]
    assert second["labelled_sizes"]["test"] > first["labelled_sizes"]["test"]  # the labelled set grew too
    # the worse model: a version, refused, with the reason; current and the app stay on v0001
    assert second["version"] == "v0002" and not second["blessed"], second
    assert second["compared"]["examples"] == second["labelled_sizes"]["test"]  # re-scored on the same examples
    assert second["current"] == second["app_loaded"] == "v0001"
    assert second["flow_state"] == "Not promoted" and "v0001 stays current" in second["flow_message"]
    assert not app.changed() and app.classify("good").label in app.labels
    # an app in another process loading the run's bundle gets v0001
    loaded = subprocess.run(
        [sys.executable, "-c", f"from glm.runtime import Bundle; print(Bundle.load({str(export)!r}).version)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.stdout.strip() == "v0001", loaded.stderr[-2000:]

    # what an operator sees: the gate's artifact, the events an automation can match, the versions
    gate = artifacts(second["flow_run_id"])["cycles-bundle-gate"]
    assert "v0002 NOT promoted" in gate.data and "data:image/png;base64," in gate.data
    assert gate.description.startswith("bundle v0002 of cycles NOT promoted")
    refused = events("glm.bundle.refused", "glm.bundle.cycles.")  # (other tests of the session emit theirs too)
    blessed = events("glm.bundle.blessed", "glm.bundle.cycles.")
    assert [e.payload["version"] for e in refused] == ["v0002"] and refused[0].payload["current"] == "v0001"
    assert "v0001" in [e.payload["version"] for e in blessed]
    assert str(refused[0].resource.id) == "glm.bundle.cycles.v0002"
    assert cli_main(["bundles", str(tmp_path / "run")]) == 0
    table = capsys.readouterr().out
    assert "| v0002 |" in table and "| NO |" in table and "<- current" in table.split("| v0001 |")[1].splitlines()[0]
    assert (export / "versions.png").stat().st_size > 0
    lineage = bundles.read_lineage(export, "v0002")
    assert lineage["pretrained"]["step"] == 12 and len(lineage["pretrained"]["lineage"]) == 2
    assert lineage["data"]["documents_manifest"] != bundles.read_lineage(export, "v0001")["data"]["documents_manifest"]
    assert json.loads((export / "manifest.json").read_text())["stats"]["current"] == "v0001"
