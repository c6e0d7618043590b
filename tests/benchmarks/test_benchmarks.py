"""Every benchmark runs in quick mode and follows the output convention (no timing is asserted)."""

import math

import pytest

from benchmarks.__main__ import REQUIRED, available, run

BENCHMARKS = sorted(available())


def test_benchmarks_are_listed():
    assert BENCHMARKS, "no benchmark found in benchmarks/"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_quick_run_follows_the_convention(name):
    results = list(run(name, quick=True))
    assert results, f"{name} produced no result"
    for r in results:
        assert all(k in r for k in REQUIRED)
        assert isinstance(r["value"], (int, float)) and math.isfinite(r["value"])
        if "reference" in r:
            # the convention: ratio = value / reference; `better` says which direction wins
            assert r["ratio"] == pytest.approx(
                r["value"] / r["reference"], rel=2e-2, abs=2e-3
            )  # values and ratios may be rounded
            assert r.get("better") in ("higher", "lower")


def test_quality_tasks_are_listed_and_write_configs_that_load(tmp_path):
    from benchmarks.quality import TASKS, task_config
    from glm.core.config import load_config

    assert "quality" in BENCHMARKS and list(TASKS) == ["demo", "bbc-news", "chinese-sentiment"]
    for name in TASKS:
        made = task_config(name, tmp_path / name, quick=True, overrides=["finetune.seed=3"])
        if isinstance(made, str):  # its data package is not installed: the reason names it
            assert "pip install" in made
            continue
        path, info = made
        cfg = load_config(path)
        assert cfg.finetune.seed == 3 and cfg.run_dir == str(tmp_path / name) and info["data"]
        assert len(cfg.finetune.task.verbalizers) >= 2
