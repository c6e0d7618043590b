"""The glm-runtime distribution: a wheel built from glm/runtime.py itself, installed in a fresh virtual
environment without torch or the pipeline, loads a real bundle exported here, classifies, runs the batch
command, and refuses a bundle newer than itself in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from glm import runtime
from glm.export import write_sha256sums
from tests.glm.test_export import build_bundles

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_bundles(tmp_path_factory)


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, ROOT / "runtime"])
    (whl,) = dist.glob("glm_runtime-*.whl")
    return whl


def test_the_wheel_holds_glm_runtime_py_itself_and_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as z:
        assert z.read("glm_runtime/__init__.py") == (ROOT / "glm" / "runtime.py").read_bytes()  # the same source, no copy
        meta = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
        scripts = z.read(next(n for n in z.namelist() if n.endswith("entry_points.txt"))).decode()
    assert f"Version: {runtime.__version__}" in meta
    requires = sorted(
        line.split(":", 1)[1].split(";")[0].split(">")[0].strip()
        for line in meta.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    )
    assert requires == ["numpy", "onnxruntime", "sentencepiece"]
    assert "glm-runtime = glm_runtime:main" in scripts


@pytest.mark.slow
def test_installed_in_a_fresh_venv_without_torch_it_classifies_predicts_and_refuses_newer_bundles(built, wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    # the dependencies come from the machine's package index / pip cache (numpy, onnxruntime, sentencepiece)
    _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel])
    script = (
        "import importlib.util, sys, glm_runtime as r\n"
        f"b = r.Bundle.load({str(built.clf_bundle)!r})\n"
        "c = b.classify('the movie was good')\n"
        "print(c.label in ('0', '1'), abs(sum(c.probabilities.values()) - 1) < 1e-6, b.select_session is not None)\n"
        "print([m for m in ('torch', 'glm', 'glm_pipeline', 'pyarrow') if importlib.util.find_spec(m)])\n"
    )
    out = _run([py, "-c", script], cwd=tmp_path)
    assert out.stdout.splitlines() == ["True True True", "[]"]

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a good film"}\n{"text": "bad"}\n')
    _run([venv / "bin" / "glm-runtime", "predict", built.clf_bundle, src, tmp_path / "out.jsonl", "--quiet"], cwd=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["a good film", "bad"] and all(r["label"] in ("0", "1") for r in rows)

    newer = tmp_path / "newer"
    shutil.copytree(built.clf_bundle, newer)
    config = json.loads((newer / "config.json").read_text())
    config["format_version"] = runtime.FORMAT_VERSION + 1
    (newer / "config.json").write_text(json.dumps(config))
    write_sha256sums(newer)
    refused = subprocess.run(
        [venv / "bin" / "glm-runtime", "predict", newer, src, tmp_path / "o.jsonl"], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2 and refused.stdout == ""
    (line,) = refused.stderr.strip().splitlines()
    assert f"format version {runtime.FORMAT_VERSION + 1}, newer than this runtime understands" in line
    assert "pip install -U glm-runtime" in line
