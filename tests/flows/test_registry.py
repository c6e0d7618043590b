"""One declaration makes a stage: a toy stage added to a copy of the registry runs, is stamped and is
verified by the plain runner, and becomes a Prefect task of the data flow that ends "Cached" when re-run."""

from __future__ import annotations

import json

import pytest
from glm_pipeline.flows.pipeline import data_flow

from glm import stages
from glm.core.shards import file_entry, read_manifest, write_manifest
from glm.pipeline import engine
from tests.flows.api import states, task_runs


@pytest.fixture
def toy_registry(swap_registry, monkeypatch):
    """ingest, then a toy stage that counts the documents per split: declared once, nowhere else."""
    built = []

    def count_docs(cfg, paths):
        built.append(cfg.name)
        counts = read_manifest(paths.docs / "manifest.json")["stats"]["docs"]
        out = paths.root / "counts"
        out.mkdir(parents=True, exist_ok=True)
        (out / "counts.json").write_text(json.dumps(counts), encoding="utf-8")
        write_manifest(out, "counts", [file_entry(out / "counts.json", out)], inputs=[paths.docs / "manifest.json"], stats=counts)

    # as docs/architecture.md "Adding a stage" says: its directory in the run layout, declared after ingest
    monkeypatch.setitem(engine.LAYOUT, "counts", "counts")
    toy = stages.Stage(
        "count-docs", "data", f"{engine.LAYOUT['counts']}/manifest.json", sections=("data",), inputs=("ingest",), build=count_docs
    )
    swap_registry(*stages.declare(stages.REGISTRY["ingest"], toy).values())
    return built


def test_the_plain_runner_runs_a_declared_stage_once_and_verify_checks_it(make_config, toy_registry):
    cfg = make_config(name="toy")
    paths = stages.RunPaths(cfg.run_dir)
    out = stages.run_pipeline(cfg, "data")
    assert list(out) == ["ingest", "count-docs"] and out["count-docs"] == paths.root / "counts" / "manifest.json"
    counts = json.loads((paths.root / "counts" / "counts.json").read_text(encoding="utf-8"))
    assert counts == read_manifest(paths.docs / "manifest.json")["stats"]["docs"] and sum(counts.values()) > 0
    assert stages.current_output("count-docs", cfg, paths) == out["count-docs"]

    assert stages.run_pipeline(cfg, "data") == out
    assert toy_registry == ["toy"]  # stamped: not rebuilt

    assert stages.verify_run(cfg.run_dir)["counts/manifest.json"] == []  # verify's list comes from the registry
    (paths.root / "counts" / "counts.json").write_text("{}", encoding="utf-8")
    assert stages.verify_run(cfg.run_dir)["counts/manifest.json"]  # damaged: its stamp goes, so it is rebuilt
    stages.run_pipeline(cfg, "data")
    assert toy_registry == ["toy", "toy"]


def test_the_flow_makes_a_task_of_a_declared_stage_and_a_rerun_is_cached(prefect_api, make_config, toy_registry):
    cfg = make_config(name="toy-flow")
    first = data_flow(cfg, return_state=True)
    assert first.is_completed(), first.message
    assert first.result() == {
        "ingest": str(stages.RunPaths(cfg.run_dir).docs / "manifest.json"),
        "count-docs": str(stages.RunPaths(cfg.run_dir).root / "counts" / "manifest.json"),
    }
    assert states(task_runs(first.state_details.flow_run_id)) == {
        "ingest-toy-flow": "Completed",
        "count-docs-toy-flow": "Completed",
    }
    second = data_flow(cfg, return_state=True)
    assert second.is_completed(), second.message
    assert states(task_runs(second.state_details.flow_run_id)) == {"ingest-toy-flow": "Cached", "count-docs-toy-flow": "Cached"}
    assert toy_registry == ["toy-flow"]


def test_the_task_tables_name_only_declared_stages(monkeypatch):
    """tasks/stages.py's per-stage tables are checked against the registry when it is imported."""
    from glm_pipeline.tasks import stages as task_stages

    task_stages.check_tables()  # the shipped tables hold
    monkeypatch.setitem(task_stages.ARTIFACTS, "validate-corpra", lambda cfg, paths: None)
    with pytest.raises(ValueError, match=r"ARTIFACTS names \['validate-corpra'\], which are not stages"):
        task_stages.check_tables()
    monkeypatch.delitem(task_stages.ARTIFACTS, "validate-corpra")
    monkeypatch.setitem(task_stages.RUN_NAMES, "export", "export-{cfg.name}")  # built in steps: no task named export
    with pytest.raises(ValueError, match=r"RUN_NAMES names \['export'\], which are not task names"):
        task_stages.check_tables()
