"""Record parity fixtures from the reference GLM code (a checkout of THUDM/GLM), for tests/glm/test_released_parity.py.

    python scripts/glm_reference_parity.py /path/to/THUDM-GLM [--out tests/fixtures/released]

For each tokenizer family of the released models it

1. makes a small synthetic vocabulary in the family's file format (WordPiece vocab.txt, GPT-2 /
   RoBERTa byte-level BPE vocab.json + merges.txt, a sentencepiece .model), trained here on a
   fixed paragraph with HF `tokenizers` / `sentencepiece`;
2. builds the reference tokenizer class on it (data_utils/tokenization.py, with --block-lm
   --task-mask, and --fix-command-token for the Chinese one) and records its ids for fixed texts
   and its command-token ids;
3. builds the reference GLMModel (model/modeling_glm.py over mpu/) at tiny width with random
   weights (LayerNorms and biases randomised too), saves it in a released layout (config.json +
   pytorch_model.bin; a sharded index; a DeepSpeed mp_rank_00 file with "module"; glm-2b's stray
   head keys) and records its fp32 logits on fixed blank-infilling inputs.

The reference runs here on CPU without apex, deepspeed, nltk, boto3 or CUDA through shims defined
IN THIS SCRIPT ONLY (nothing of them is part of the pipeline):
  - apex FusedLayerNorm   -> torch.nn.LayerNorm (same function, eps passed through)
  - deepspeed             -> a module whose checkpointing.is_configured() is False
  - torch._six.inf        -> math.inf (removed from torch)
  - nltk, utils (tensorboardX, fp16), data_utils.file_utils (boto3) -> stubs; none is used on these paths
  - the CUDA RNG tracker  -> a no-op context (dropout is 0 and the model is in eval mode)
  - the package __init__s of data_utils/ and model/ are skipped (they import the data pipeline)
  - *.from_pretrained of the tokenizers -> the synthetic files (they would download otherwise)
torch.distributed is initialised as one gloo process through a file store (no network), and the
model-parallel world size is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

CORPUS = """The quick brown fox jumps over the lazy dog. It was a great movie, and the cast was superb!
Blank infilling fills the blanks one span at a time; each span ends with an end-of-piece token.
Naïve café owners said: "we'll reopen at 10:30 on Monday." Prices rose 3.5% in 2021 (see table 2).
General language model pretraining with autoregressive blank infilling. 今天天气很好，我们去公园散步。
这部电影非常好看！演员的表演也很出色。模型在中文和英文上都训练过。Hello world, hello again.
"""

TEXTS = [
    "The movie was great.",
    "It was [MASK].",
    "The film was [MASK] and the cast superb.",
    "[gMASK] Hello world",
    "a  [MASK]  b [sMASK] c<|endoftext|>d",
    "Naïve CAFÉ, 10:30 - prices rose 3.5%!",
    "<|startofpiece|> span <|endofpiece|>",
    "今天天气很好[MASK]我们去公园。",
    "   ",
    "unknownwordzzz qqq [UNK] [CLS] [SEP]",
]

# family -> (tokenizer kind, weight layout); each is a released model's tokenizer and one of the layouts
FAMILIES = {
    "glm-large": ("wordpiece", "bin"),
    "glm-roberta-large": ("roberta", "bin"),
    "glm-2b": ("gpt2", "sharded"),
    "glm-large-chinese": ("sp", "deepspeed"),
}

N_LAYER, HIDDEN, HEADS, MAX_SEQ = 2, 32, 4, 64


# --------------------------------------------------------------------------- shims (this script only)


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def install_shims(ref: Path) -> None:
    sys.path.insert(0, str(ref))
    _module("apex")
    _module("apex.normalization")
    _module("apex.normalization.fused_layer_norm", FusedLayerNorm=torch.nn.LayerNorm)
    _module("deepspeed", checkpointing=types.SimpleNamespace(is_configured=lambda: False))
    _module("torch._six", inf=math.inf)
    _module("nltk", tokenize=types.SimpleNamespace())
    _module("nltk.tokenize")
    _module("utils", print_rank_0=lambda *a, **k: None)
    for pkg in ("data_utils", "model"):  # skip the package __init__ (the data pipeline, DDP wrappers)
        m = _module(pkg)
        m.__path__ = [str(ref / pkg)]
    _module("data_utils.file_utils", cached_path=lambda path, cache_dir=None: path)


class _NoRngTracker:
    @contextlib.contextmanager
    def fork(self, name: str = ""):
        yield


def init_reference_parallel(tmp: Path):
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp / 'dist-store'}", rank=0, world_size=1)
    mpu = importlib.import_module("mpu")
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(1)
    transformer = importlib.import_module("mpu.transformer")
    transformer.get_cuda_rng_tracker = lambda: _NoRngTracker()
    return mpu


# --------------------------------------------------------------------------- synthetic vocabularies


def make_vocab(kind: str, out: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    out.mkdir(parents=True, exist_ok=True)
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=220, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
        tok.train_from_iterator(lines, trainer)
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        (out / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
        return
    if kind in ("roberta", "gpt2"):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        specials = ["<s>", "<pad>", "</s>", "<unk>"] if kind == "roberta" else []
        trainer = trainers.BpeTrainer(
            vocab_size=330, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(lines, trainer)
        model = json.loads(tok.to_str())["model"]
        vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
        vocab["<mask>" if kind == "roberta" else "<|endoftext|>"] = len(vocab)  # last, as in the real files
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
        return
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as t:
        corpus = Path(t) / "corpus.txt"
        corpus.write_text(CORPUS * 4, encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(out / "cog-pretrain"),
            vocab_size=130,
            model_type="unigram",
            character_coverage=1.0,
            normalization_rule_name="identity",  # no normalisation tables: a 2 KB model instead of 240 KB
            minloglevel=2,
        )
    (out / "cog-pretrain.vocab").unlink(missing_ok=True)


def reference_tokenizer(kind: str, vocab_dir: Path):
    tokenization = importlib.import_module("data_utils.tokenization")
    if kind == "wordpiece":
        wordpiece = importlib.import_module("data_utils.wordpiece")
        wordpiece.BertTokenizer.from_pretrained = classmethod(
            lambda cls, name, do_lower_case=True, cache_dir=None, **kw: cls(
                str(vocab_dir / "vocab.txt"), do_lower_case=do_lower_case
            )
        )
        return tokenization.BertWordPieceTokenizer("bert-large-uncased", add_block_symbols=True, add_task_mask=True)
    if kind in ("roberta", "gpt2"):
        gpt2 = importlib.import_module("data_utils.tokenization_gpt2")
        gpt2.GPT2Tokenizer.from_pretrained = classmethod(
            lambda cls, name, cache_dir=None, **kw: cls(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"))
        )
        return tokenization.GPT2BPETokenizer(kind, add_block_symbols=True, add_task_mask=True)
    sp_tokenizer = importlib.import_module("data_utils.sp_tokenizer")
    sp_tokenizer.from_pretrained = lambda: sp_tokenizer.Encoder_SP(str(vocab_dir / "cog-pretrain.model"))
    return tokenization.ChineseSPTokenizer(add_block_symbols=True, add_task_mask=True, fix_command_token=True)


# --------------------------------------------------------------------------- the model


def blank_inputs(tok, vocab_rows: int, seed: int):
    """Two blank-infilling rows built from the reference tokenizer's ids: Part A with [MASK], then <sop> + span."""
    g = torch.Generator().manual_seed(seed)
    name = tok.command_name_map
    a1 = tok.EncodeAsIds("The film was [MASK] and the cast superb.").tokenization
    a2 = tok.EncodeAsIds("[gMASK] Hello world").tokenization
    rows, pos, blk, seps = [], [], [], []
    T = 20
    for a in (a1, a2):
        a = a[:12]
        mask_at = next(i for i, t in enumerate(a) if t in (name["MASK"].Id, name["gMASK"].Id))
        span = torch.randint(0, vocab_rows, (T - len(a) - 1,), generator=g).tolist()
        ids = a + [name["sop"].Id] + span
        rows.append(ids)
        pos.append(list(range(len(a))) + [mask_at] * (len(span) + 1))
        blk.append([0] * len(a) + list(range(1, len(span) + 2)))
        seps.append(len(a))
    return torch.tensor(rows), torch.tensor(pos), torch.tensor(blk), torch.tensor(seps)


def build_reference_model(vocab_rows: int, seed: int):
    modeling = importlib.import_module("model.modeling_glm")
    torch.manual_seed(seed)
    model = modeling.GLMModel(
        num_layers=N_LAYER,
        vocab_size=vocab_rows,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        embedding_dropout_prob=0.0,
        attention_dropout_prob=0.0,
        output_dropout_prob=0.0,
        max_sequence_length=MAX_SEQ,
        max_memory_length=0,
        checkpoint_activations=False,
        parallel_output=True,
        relative_encoding=False,
        block_position_encoding=True,
        output_predict=True,
    )
    with torch.no_grad():
        # the reference init (std 0.02, LayerNorm 1/0, biases 0) makes attention nearly uniform, which would
        # hide a wrong head split or mask: weights large enough for peaked attention, every tensor random
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.1 if name.endswith("bias") else 0.3))
    return model.eval()


def save_layout(state: dict[str, torch.Tensor], config: dict, layout: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if layout == "deepspeed":  # a bare DeepSpeed file: no config.json, weights under "module"
        torch.save({"module": state, "iteration": 1, "dp_world_size": 1, "mp_world_size": 1}, out / "mp_rank_00_model_states.pt")
        return
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if layout == "bin":
        torch.save(state, out / "pytorch_model.bin")
        return
    # sharded, with glm-2b's stray classification head beside the language model
    state["dense.weight"], state["dense.bias"] = torch.zeros(HIDDEN, HIDDEN), torch.zeros(HIDDEN)
    state["out_proj.weight"], state["out_proj.bias"] = torch.zeros(2, HIDDEN), torch.zeros(2)
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    weight_map = {}
    for name, ks in shards.items():
        torch.save({k: state[k] for k in ks}, out / name)
        weight_map.update({k: name for k in ks})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")


def record(ref: Path, out: Path) -> None:
    install_shims(ref)
    with tempfile.TemporaryDirectory() as tmp:
        init_reference_parallel(Path(tmp))
        for seed, (family, (kind, layout)) in enumerate(FAMILIES.items()):
            fam = out / family
            make_vocab(kind, fam / "tokenizer")
            tok = reference_tokenizer(kind, fam / "tokenizer")
            ids = [list(map(int, tok.EncodeAsIds(t).tokenization)) for t in TEXTS]
            commands = {c.name: int(c.Id) for c in tok._command_tokens}
            vocab_rows = 64 * math.ceil(tok.num_tokens / 64)  # padded like the released tables
            model = build_reference_model(vocab_rows, seed)
            inputs = blank_inputs(tok, tok.num_tokens, seed)
            input_ids, pos, blk, sep = inputs
            with torch.no_grad():
                logits, *_ = model(input_ids, torch.stack([pos, blk], dim=1), sep)  # position_ids (B, 2, T)
            config = {
                "architectures": ["GLMModel"],
                "model_type": "glm",
                "num_layers": N_LAYER,
                "vocab_size": vocab_rows,
                "hidden_size": HIDDEN,
                "num_attention_heads": HEADS,
                "max_sequence_length": MAX_SEQ,
                "block_position_encoding": True,
                "relative_encoding": False,
                "attention_scale": 1.0,
                "output_dropout_prob": 0.1,
                "attention_dropout_prob": 0.1,
                "embedding_dropout_prob": 0.1,
                "spell_length": None,
            }
            save_layout(model.state_dict(), config, layout, fam / "model")
            torch.save(
                {"input_ids": input_ids, "position_ids": pos, "block_position_ids": blk, "sep": sep, "logits": logits.float()},
                fam / "logits.pt",
            )
            head = {"kind": kind, "num_tokens": int(tok.num_tokens), "commands": commands, "texts": TEXTS}
            body = ",\n  ".join(json.dumps(r) for r in ids)  # one text's ids per line
            (fam / "tokens.json").write_text(
                json.dumps(head, ensure_ascii=False)[:-1] + f',\n "ids": [\n  {body}\n ]\n}}\n', encoding="utf-8"
            )
            print(f"{family}: {kind}, {layout}, vocab {tok.num_tokens} -> {vocab_rows} rows, logits {tuple(logits.shape)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", type=Path, help="a checkout of THUDM/GLM (its mpu/, model/, data_utils/)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "released")
    args = ap.parse_args()
    if not (args.reference / "model" / "modeling_glm.py").is_file():
        sys.exit(f"{args.reference} is not a THUDM/GLM checkout (no model/modeling_glm.py); pass the checkout's path")
    torch.set_num_threads(1)
    np.random.seed(0)
    record(args.reference.resolve(), args.out)


if __name__ == "__main__":
    main()
