"""`glm-pipeline run` as a real process, on a data stage made once and copied into each test's run directory."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tests.flows.conftest import SMALL
from tests.integration.server import ROOT


def data_stage(root: Path) -> Path:
    """A run directory whose data stage is done (glm.stages directly: only the later stages are under test)."""
    from glm import stages
    from glm.core.config import load_config

    stages.run_pipeline(load_config("configs/tiny.yaml", [*SMALL, "quality.enabled=false", f"run_dir={root}"]), "data")
    return root


def copy_run(data_run: Path, run_dir: Path) -> Path:
    shutil.copytree(data_run, run_dir, symlinks=True)
    return run_dir


def cli_run(run_dir: Path, name: str, *overrides: str, stage: str = "pretrain") -> list[str]:
    """`python -m glm_pipeline.flows.cli run configs/tiny.yaml --stage STAGE` with the small test config (run it with cwd=ROOT)."""
    cmd = [sys.executable, "-m", "glm_pipeline.flows.cli", "run", "configs/tiny.yaml", "--stage", stage]
    for o in [*SMALL, "quality.enabled=false", f"name={name}", f"run_dir={run_dir}", *overrides]:
        cmd += ["--set", o]
    return cmd


__all__ = ["ROOT", "cli_run", "copy_run", "data_stage"]
