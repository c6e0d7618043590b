"""Versioned bundles: the atomic `current` under a loading app in another process, the gate, pruning,
the runtime's reload, the `glm-pipeline bundles` command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from glm_pipeline.flows.cli import main as cli_main

from glm import bundles, runtime
from tests.glm.test_export import build_bundles

# an app in another process: loads the run's current bundle (glm.runtime) over and over, and reads
# export/bundle/config.json directly as an old app would; any failure ends it with a traceback (exit 1)
LOADER = """
import json, sys
from pathlib import Path
from glm.runtime import Bundle

export, n = Path(sys.argv[1]), int(sys.argv[2])
seen = {}
print("ready", flush=True)
for i in range(n):
    b = Bundle.load(export, providers=["CPUExecutionProvider"], threads=1)
    on_disk = json.loads((b.path / "config.json").read_text())
    assert on_disk == b.config, "config.json of another version than the model"
    assert (b.classifier is not None) == (b.version == "v0002"), (b.version, b.classifier)
    assert b.session.get_inputs(), b.version
    json.loads((export / "bundle" / "config.json").read_bytes())  # the old path, read through both symlinks
    seen[b.version] = seen.get(b.version, 0) + 1
print(json.dumps(seen), flush=True)
"""


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """An export directory with two real bundles as versions: v0001 a language model, v0002 a classifier."""
    built = build_bundles(tmp_path_factory)
    export = tmp_path_factory.mktemp("run") / "export"
    for name, src, blessed in (("v0001", built.lm_bundle, True), ("v0002", built.clf_bundle, True)):
        target = bundles.versions_dir(export) / name
        shutil.copytree(src, target)
        lineage = {"version": name, "time": bundles.now(), "blessed": blessed, "reason": "test", "verified": True}
        lineage["metric"] = {"name": "accuracy", "value": 0.5 + int(name[1:]) / 10, "higher_is_better": True}
        (target / bundles.LINEAGE).write_text(json.dumps(lineage))
    bundles.set_current(export, "v0001", "test")
    return export


def test_an_app_loading_in_a_loop_never_sees_a_missing_or_mixed_bundle_across_swaps(two_versions):
    export = two_versions
    app = subprocess.Popen(
        [sys.executable, "-c", LOADER, str(export), "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert app.stdout.readline().strip() == "ready"
    swaps = 0
    while app.poll() is None:  # swap as fast as we can while the app loads
        bundles.promote(export, "v0002" if swaps % 2 == 0 else "v0001", "swap test")
        swaps += 1
    out, err = app.communicate()
    assert app.returncode == 0, err[-3000:]
    seen = json.loads(out.strip().splitlines()[-1])
    assert sum(seen.values()) == 60
    assert swaps >= 60, swaps  # the app's loads overlapped many swaps
    assert set(seen) == {"v0001", "v0002"}, seen  # it saw both: the swaps really happened under it
    promotions = (export / bundles.PROMOTIONS).read_text().splitlines()
    assert len(promotions) >= swaps and json.loads(promotions[-1])["why"] == "swap test"
    bundles.promote(export, "v0001")


def test_the_runtime_loads_current_and_tells_when_it_moved(two_versions):
    export = two_versions
    bundles.promote(export, "v0001")
    app = runtime.Bundle.load(export / "current", providers=["CPUExecutionProvider"], threads=1)
    assert app.version == "v0001" and app.classifier is None and not app.changed()
    assert runtime.Bundle.load(export, providers=["CPUExecutionProvider"]).version == "v0001"  # export/: its current
    bundles.promote(export, "v0002")
    assert app.changed()
    fresh = app.reload_if_changed()
    assert fresh.version == "v0002" and fresh.classifier is not None and not fresh.changed()
    assert fresh.reload_if_changed() is fresh
    assert fresh.load_options["threads"] == 1  # reloaded as it was first loaded
    bundles.promote(export, "v0001")


def test_promote_refuses_a_damaged_or_unknown_version_and_leaves_current(two_versions, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(two_versions, export, symlinks=True)
    with pytest.raises(bundles.BundleVersionError, match="no bundle version 'v0009'.*v0001, v0002"):
        bundles.promote(export, "v0009")
    with (bundles.versions_dir(export) / "v0002" / "model.onnx").open("r+b") as f:
        f.write(b"\0" * 8)
    with pytest.raises(bundles.BundleVersionError, match="v0002 cannot become current.*checksum"):
        bundles.promote(export, "v0002")
    assert bundles.current_version(export) == "v0001"


def test_rollback_goes_to_the_newest_blessed_version_before_current(tmp_path):
    export = tmp_path / "export"
    for n, blessed in ((1, True), (2, False), (3, True), (4, False)):
        _fake_version(export, n, blessed)
    bundles.set_current(export, "v0003", "test")
    assert bundles.rollback_target(export) == "v0001"  # v0002 was refused
    bundles.set_current(export, "v0001", "test")
    with pytest.raises(bundles.BundleVersionError, match="no blessed version older than the current v0001"):
        bundles.rollback_target(export)


def test_pruning_keeps_the_last_n_every_blessed_one_and_current(tmp_path):
    export = tmp_path / "export"
    for n, blessed in ((1, True), (2, False), (3, False), (4, False), (5, False), (6, False)):
        _fake_version(export, n, blessed)
    bundles.set_current(export, "v0002", "test")  # a refused version promoted by hand
    assert bundles.prune(export, keep_last=2) == ["v0003", "v0004"]
    assert bundles.version_names(export) == ["v0001", "v0002", "v0005", "v0006"]
    assert bundles.prune(export, keep_last=1, keep_blessed=False) == ["v0001", "v0005"]
    assert bundles.version_names(export) == ["v0002", "v0006"] and bundles.current_version(export) == "v0002"


def test_a_pre_versions_bundle_directory_is_adopted_as_the_first_version(two_versions, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(bundles.versions_dir(two_versions) / "v0001", export / "bundle")
    (export / "bundle" / bundles.LINEAGE).unlink()
    assert bundles.adopt_legacy(export) == "v0001"
    assert (export / "bundle").is_symlink() and bundles.current_version(export) == "v0001"
    assert runtime.Bundle.load(export / "bundle", providers=["CPUExecutionProvider"]).version == "v0001"
    assert bundles.read_lineage(export, "v0001")["blessed"]
    # a run directory copied with symlinks followed (shutil.copytree's default): the links come back
    copy = tmp_path / "copy"
    shutil.copytree(export, copy)
    assert not (copy / "current").is_symlink()
    bundles.adopt_legacy(copy)
    assert (copy / "current").is_symlink() and (copy / "bundle").is_symlink() and bundles.current_version(copy) == "v0001"


def test_the_gate_blesses_within_the_margin_and_says_why_it_refuses():
    base = dict(verified=True, collapsed=False, metric="accuracy", higher_is_better=True, baselines={"majority": 0.5})
    current = {"version": "v0003"}
    first = bundles.decide(**base, value=0.6, current=None, compared=None, max_drop=0.01, floor="majority")
    assert first["blessed"] and "first version" in first["reason"]
    same = {"examples": 100, "how": "same split"}
    ok = bundles.decide(
        **base, value=0.7, current=current, compared={"new": 0.695, "current": 0.70, **same}, max_drop=0.01, floor="none"
    )
    assert ok["blessed"]
    worse = bundles.decide(
        **base, value=0.6, current=current, compared={"new": 0.60, "current": 0.70, **same}, max_drop=0.01, floor="none"
    )
    assert not worse["blessed"] and "accuracy 0.6000 vs current v0003 0.7000 on the same 100 test examples" in worse["reason"]
    below = bundles.decide(**base, value=0.45, current=None, compared=None, max_drop=0.01, floor="majority")
    assert not below["blessed"] and "majority baseline 0.5000" in below["reason"]
    collapsed = bundles.decide(**(base | {"collapsed": True}), value=0.7, current=None, compared=None, max_drop=1, floor="none")
    assert not collapsed["blessed"] and "collapsed" in collapsed["reason"]
    unverified = bundles.decide(**(base | {"verified": None}), value=0.7, current=None, compared=None, max_drop=1, floor="none")
    assert not unverified["blessed"] and "export.verify is false" in unverified["reason"]
    loss = bundles.decide(
        **(base | {"metric": "loss", "higher_is_better": False}),
        value=2.0,
        current=current,
        compared={"new": 2.5, "current": 2.0, **same},
        max_drop=0.1,
        floor="none",
    )
    assert not loss["blessed"]  # a seq2seq loss that rose by more than the margin
    broken = bundles.decide(
        **base, value=0.9, current=current, compared={"error": "the new bundle could not be scored"}, max_drop=1, floor="none"
    )
    assert not broken["blessed"] and "could not be scored" in broken["reason"]


def test_the_bundles_command_lists_promotes_and_rolls_back(tmp_path, capsys):
    run = tmp_path / "run"
    export = run / "export"
    for n, blessed in ((1, True), (2, True), (3, False)):
        _fake_version(export, n, blessed)
    bundles.set_current(export, "v0002", "test")
    assert cli_main(["bundles", str(run)]) == 0
    table = capsys.readouterr().out
    assert "| v0002 |" in table and "<- current" in table.split("| v0002 |")[1].splitlines()[0]
    assert "| NO |" in table.split("| v0003 |")[1].splitlines()[0]
    assert cli_main(["bundles", str(run), "--rollback"]) == 0
    assert "current: v0002 -> v0001" in capsys.readouterr().out and bundles.current_version(export) == "v0001"
    assert cli_main(["bundles", str(run), "--promote", "v0003", "--why", "operator override"]) == 0
    assert bundles.current_version(export) == "v0003"
    assert json.loads((export / bundles.PROMOTIONS).read_text().splitlines()[-1])["why"] == "operator override"
    assert cli_main(["bundles", str(run), "--promote", "v7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no bundle version 'v7'" in err[0]
    assert cli_main(["bundles", str(tmp_path / "nothing")]) == 2


def _fake_version(export: Path, n: int, blessed: bool) -> None:
    """A minimal complete bundle directory (a file and its SHA256SUMS) with a lineage: enough for the links."""
    where = bundles.versions_dir(export) / f"v{n:04d}"
    where.mkdir(parents=True)
    (where / "config.json").write_text("{}")
    (where / "SHA256SUMS").write_text(f"{runtime.sha256_file(where / 'config.json')}  config.json\n")
    lineage = {"version": where.name, "time": f"2026-01-0{n}T00:00:00+00:00", "blessed": blessed, "reason": "test"}
    lineage["metric"] = {"name": "accuracy", "value": n / 10, "higher_is_better": True}
    (where / bundles.LINEAGE).write_text(json.dumps(lineage))
