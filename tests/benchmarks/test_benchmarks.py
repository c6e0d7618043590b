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
