"""The tokenizers of the released GLM models, with the reference's special-token ids.

Three families (the reference's data_utils/tokenization.py), each behind the interface of
glm.tokenizer.Tokenizer (encode / encode_flat / decode / special ids / sentence ends ...):

    wordpiece  vocab.txt, BERT uncased          glm-large, glm-515m              (HF `tokenizers`)
    roberta    vocab.json + merges.txt with <s>  glm-roberta-large                (HF `tokenizers`, byte-level BPE)
    gpt2       vocab.json + merges.txt           glm-2b, glm-10b                  (HF `tokenizers`, byte-level BPE)
    sp         cog-pretrain.model                glm-large-chinese, glm-10b-chinese (`sentencepiece`)

Special ids follow the reference with block symbols and task masks (--block-lm --task-mask), and, for
the Chinese model, --fix-command-token, the ids the released checkpoints use (glm-10b-chinese was
converted with row 50007 copied to 50009 so that it too uses them). With n the text vocabulary size:

    wordpiece  [PAD]=pad=eos, [CLS], [MASK], [UNK], [SEP] from vocab.txt; sop n, eop n+1, [gMASK] n+2, [sMASK] n+3
    roberta    </s>=pad=eos=sep, <s>=[CLS], <mask>=[MASK], <unk>; sop n, eop n+1, [gMASK] n+2, [sMASK] n+3
    gpt2       <|endoftext|>=pad=eos; sop n, eop n+1, [CLS] n+2, [MASK] n+3, [SEP] n+4, [UNK] n+5, [gMASK] n+6, [sMASK] n+7
    sp         pad=eos n, [SEP] n+1, [CLS] n+2, [MASK] n+3, [UNK] n+4, sop n+6, eop n+7, [sMASK] n+8, [gMASK] n+9

pad and eos are one id in every family (the reference's choice): this pipeline never needs to tell
them apart by id (padding is marked by lengths and loss masks, not by the pad id).

As in the reference, `encode` first cuts the text at the command-token strings ("[MASK]",
"<|startofpiece|>", ...; whitespace before [MASK]/[gMASK]/[sMASK] is dropped for the BPE and
sentencepiece families) and encodes each piece of text on its own. `specials=False` (corpus text)
encodes the whole text as text, so a literal "[MASK]" never becomes a blank.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from glm.core.special_tokens import SpecialTokens
from glm.runtime import CommandTokenizer

INFO_FILE = "released_tokenizer.json"  # written by save_released_tokenizer: kind + file names
KINDS = ("wordpiece", "roberta", "gpt2", "sp")

# the released model names and their tokenizer kind (what the THUDM repos ship)
FAMILIES: dict[str, str] = {
    "glm-large": "wordpiece",
    "glm-515m": "wordpiece",
    "glm-roberta-large": "roberta",
    "glm-2b": "gpt2",
    "glm-10b": "gpt2",
    "glm-large-chinese": "sp",
    "glm-10b-chinese": "sp",
}

_SENTENCE_END = ".!?。！？…．｡;:；：\n"
_CLOSERS = "\"'”’」』）)]》〉"


@dataclass(frozen=True)
class Command:
    """One command token of the reference: its name there, its text, its id, whether it eats whitespace on its left."""

    name: str
    text: str
    id: int
    lstrip: bool = False


class ReleasedTokenizerError(ValueError):
    """Tokenizer files that cannot be loaded; the message names the file and the fix."""


def detect_kind(directory: str | Path) -> str:
    """The tokenizer kind of a released model directory, from the files it holds."""
    d = Path(directory)
    if (d / "vocab.txt").is_file():
        return "wordpiece"
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
        return "roberta" if "<mask>" in vocab and "<s>" in vocab else "gpt2"
    if list(d.glob("*.model")):
        return "sp"
    raise ReleasedTokenizerError(
        f"{d} holds no released GLM tokenizer: expected vocab.txt (WordPiece), vocab.json + merges.txt (GPT-2 BPE) "
        "or a sentencepiece *.model (cog-pretrain.model); copy the model's tokenizer files next to config.json"
    )


class ReleasedTokenizer:
    """A released GLM tokenizer with the glm.tokenizer.Tokenizer interface and the reference's ids."""

    released = True

    def __init__(self, directory: str | Path, kind: str | None = None):
        self.directory = Path(directory)
        self.kind = kind or detect_kind(self.directory)
        if self.kind not in KINDS:
            raise ReleasedTokenizerError(f"tokenizer kind {self.kind!r} is not one of {KINDS}")
        self.origin = str(self.directory)
        self._files = self._file_names()
        self._load()
        by = {c.name: c.id for c in self.commands}
        self.special = SpecialTokens(
            pad=by["pad"],
            unk=by["unk"],
            cls=by["ENC"],
            eos=by["eos"],
            mask=by["MASK"],
            smask=by["sMASK"],
            gmask=by["gMASK"],
            sop=by["sop"],
            eop=by["eop"],
        )
        s = self.special
        self.pad_id, self.unk_id, self.cls_id, self.eos_id = s.pad, s.unk, s.cls, s.eos
        self.mask_id, self.smask_id, self.gmask_id, self.sop_id, self.eop_id = s.mask, s.smask, s.gmask, s.sop, s.eop
        self.sep_id = by["sep"]
        self._command_ids = {c.id: c for c in self.commands}
        self._by_text = {c.text: c for c in self.commands}  # pad and eos share a text and an id
        backend = self._sp if self.kind == "sp" else self._hf
        # the cutting at command strings, encoding and decoding live in glm.runtime, which bundles use too
        self._core = CommandTokenizer(self.kind, backend, [(c.text, c.id, c.lstrip) for c in self.commands], self._size)
        digest = hashlib.sha256(self.kind.encode())
        for name in self._files:
            digest.update((self.directory / name).read_bytes())
        self.sha256 = digest.hexdigest()

    # ------------------------------------------------------------------ loading

    def _file_names(self) -> list[str]:
        d = self.directory
        if self.kind == "wordpiece":
            names = ["vocab.txt"]
        elif self.kind in ("roberta", "gpt2"):
            names = ["vocab.json", "merges.txt"]
        else:
            models = sorted(p.name for p in d.glob("*.model"))
            names = ["cog-pretrain.model"] if "cog-pretrain.model" in models else models[:1]
        missing = [n for n in names if not (d / n).is_file()]
        if missing or not names:
            raise ReleasedTokenizerError(
                f"{d} lacks the {self.kind} tokenizer file(s) {missing or ['*.model']}; copy them from the released model"
            )
        return names

    def _load(self) -> None:
        d = self.directory
        if self.kind == "sp":
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor()
            try:
                self._sp.Load(str(d / self._files[0]))
            except (RuntimeError, OSError) as e:
                raise ReleasedTokenizerError(f"{d / self._files[0]} is not a sentencepiece model ({e})") from None
            n = self._sp.get_piece_size()
            self.n_text = n
            self.commands = [
                Command("pad", "<|endoftext|>", n),
                Command("eos", "<|endoftext|>", n),
                Command("sep", "[SEP]", n + 1),
                Command("ENC", "[CLS]", n + 2),
                Command("MASK", "[MASK]", n + 3, lstrip=True),
                Command("unk", "[UNK]", n + 4),
                Command("sop", "<|startofpiece|>", n + 6),
                Command("eop", "<|endofpiece|>", n + 7),
                Command("sMASK", "[sMASK]", n + 8, lstrip=True),
                Command("gMASK", "[gMASK]", n + 9, lstrip=True),
            ]
            self._size = n + 10
            return
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, normalizers, pre_tokenizers

        if self.kind == "wordpiece":
            vocab = models.WordPiece.read_file(str(d / "vocab.txt"))
            tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
            # BERT uncased: clean control characters, space out CJK characters, strip accents, lowercase
            tok.normalizer = normalizers.BertNormalizer(
                clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
            )
            tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            tok.decoder = decoders.WordPiece(prefix="##")
            need = ["[PAD]", "[CLS]", "[MASK]", "[UNK]", "[SEP]"]
            missing = [t for t in need if t not in vocab]
            if missing:
                raise ReleasedTokenizerError(f"{d / 'vocab.txt'} lacks {missing}: not a BERT vocabulary")
            n = len(vocab)
            self.commands = [
                Command("pad", "[PAD]", vocab["[PAD]"]),
                Command("ENC", "[CLS]", vocab["[CLS]"]),
                Command("MASK", "[MASK]", vocab["[MASK]"]),
                Command("unk", "[UNK]", vocab["[UNK]"]),
                Command("sep", "[SEP]", vocab["[SEP]"]),
                Command("eos", "[PAD]", vocab["[PAD]"]),
                Command("sop", "<|startofpiece|>", n),
                Command("eop", "<|endofpiece|>", n + 1),
                Command("gMASK", "[gMASK]", n + 2),
                Command("sMASK", "[sMASK]", n + 3),
            ]
            self._size = n + 4
        else:
            vocab, merges = models.BPE.read_file(str(d / "vocab.json"), str(d / "merges.txt"))
            tok = HFTokenizer(models.BPE(vocab, merges))
            # GPT-2's byte-level pre-tokenizer: its regex, no prefix space (the reference's GPT2Tokenizer)
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            tok.decoder = decoders.ByteLevel()
            n = len(vocab)
            if self.kind == "roberta":
                missing = [t for t in ("<s>", "</s>", "<mask>", "<unk>") if t not in vocab]
                if missing:
                    raise ReleasedTokenizerError(f"{d / 'vocab.json'} lacks {missing}: not a RoBERTa vocabulary")
                self.commands = [
                    Command("pad", "<|endoftext|>", vocab["</s>"]),
                    Command("eos", "<|endoftext|>", vocab["</s>"]),
                    Command("sep", "[SEP]", vocab["</s>"]),
                    Command("ENC", "[CLS]", vocab["<s>"]),
                    Command("MASK", "[MASK]", vocab["<mask>"], lstrip=True),
                    Command("unk", "[UNK]", vocab["<unk>"]),
                    Command("sop", "<|startofpiece|>", n),
                    Command("eop", "<|endofpiece|>", n + 1),
                    Command("gMASK", "[gMASK]", n + 2, lstrip=True),
                    Command("sMASK", "[sMASK]", n + 3, lstrip=True),
                ]
                self._size = n + 4
            else:
                if "<|endoftext|>" not in vocab:
                    raise ReleasedTokenizerError(f"{d / 'vocab.json'} lacks <|endoftext|>: not a GPT-2 vocabulary")
                self.commands = [
                    Command("pad", "<|endoftext|>", vocab["<|endoftext|>"]),
                    Command("eos", "<|endoftext|>", vocab["<|endoftext|>"]),
                    Command("sop", "<|startofpiece|>", n),
                    Command("eop", "<|endofpiece|>", n + 1),
                    Command("ENC", "[CLS]", n + 2),
                    Command("MASK", "[MASK]", n + 3, lstrip=True),
                    Command("sep", "[SEP]", n + 4),
                    Command("unk", "[UNK]", n + 5),
                    Command("gMASK", "[gMASK]", n + 6, lstrip=True),
                    Command("sMASK", "[sMASK]", n + 7, lstrip=True),
                ]
                self._size = n + 8
        self.n_text = n
        self._hf = tok
        self._id_to_token = {i: t for t, i in vocab.items()}

    @classmethod
    def load(cls, path: str | Path) -> "ReleasedTokenizer":
        """Load from a released model directory or a directory written by save_released_tokenizer."""
        path = Path(path)
        if path.is_file():
            path = path.parent
        info = path / INFO_FILE
        kind = json.loads(info.read_text())["kind"] if info.is_file() else None
        return cls(path, kind)

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "kind": self.kind}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["kind"])

    # ------------------------------------------------------------------ sizes and pieces

    @property
    def vocab_size(self) -> int:
        """Text tokens + command tokens: every id this tokenizer produces is below it (the model may have more rows)."""
        return self._size

    def __len__(self) -> int:
        return self._size

    @property
    def byte_fallback(self) -> bool:
        return self.kind in ("roberta", "gpt2")  # byte-level BPE spells any text; WordPiece and sp can give [UNK]

    @property
    def space_prefix(self) -> bool:
        """Whether a word after a space has its own token with the space in it (byte-level BPE: "Ġword")."""
        return self.kind in ("roberta", "gpt2")

    @property
    def num_special(self) -> int:
        """Ids below this that are not text (the pipeline's NUM_SPECIAL): none in a released vocabulary's front."""
        return 0

    def is_special(self, i: int) -> bool:
        return int(i) in self._command_ids or int(i) >= self._size

    def id_to_piece(self, i: int) -> str:
        i = int(i)
        if i in self._command_ids:
            return self._command_ids[i].text
        if self.kind == "sp":
            return self._sp.id_to_piece(i) if i < self.n_text else ""
        return self._id_to_token.get(i, "")

    def piece_to_id(self, piece: str) -> int:
        if piece in self._by_text:
            return self._by_text[piece].id
        if self.kind == "sp":
            return self._sp.piece_to_id(piece)
        i = self._hf.token_to_id(piece)
        return self.unk_id if i is None else i

    def normalize(self, text: str) -> str:
        if self.kind == "wordpiece":
            return self._hf.normalizer.normalize_str(text)
        return text

    # ------------------------------------------------------------------ encode / decode

    def _encode_text(self, texts: list[str]) -> list[list[int]]:
        return self._core.encode_text(texts)

    def _encode_one(self, text: str) -> list[int]:
        return self._core.encode(text)

    def encode(self, text: str | list[str], specials: bool = True) -> list[int] | list[list[int]]:
        """Ids of one text or of a list of texts. `specials=False` treats "[MASK]" etc. as plain text."""
        if isinstance(text, str):
            return self._encode_one(text) if specials else self._encode_text([text])[0]
        if not isinstance(text, list):
            raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")
        return [self._encode_one(t) for t in text] if specials else self._encode_text(text)

    def encode_flat(self, texts: Sequence[str], specials: bool = False, num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated (int32) and each text's length (int64)."""
        rows = self.encode(list(texts), specials=specials)
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))  # (N,)
        flat = np.fromiter((i for r in rows for i in r), dtype=np.int32, count=int(lengths.sum()))  # (sum,)
        return flat, lengths

    def decode(self, ids: Sequence[int] | np.ndarray | Sequence[Sequence[int]]) -> str | list[str]:
        """Text of one id sequence (or each row of a batch). Command tokens other than the masks decode to nothing."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        ids = list(ids)
        if ids and isinstance(ids[0], (list, tuple, np.ndarray)):
            return [self.decode(r) for r in ids]  # type: ignore[misc]
        return self._core.decode(ids, keep=self.special.mask_ids)

    # ------------------------------------------------------------------ what the pipeline asks

    def literal_ids(self) -> dict[int, list[int]]:
        """How `encode(..., specials=False)` spells each mask/span command text as plain text."""
        s = self.special
        return {i: self._encode_text([self._command_ids[i].text])[0] for i in (s.mask, s.smask, s.gmask, s.sop, s.eop)}

    def sentence_end_ids(self) -> np.ndarray:
        return self._sentence_ends

    @functools.cached_property
    def _sentence_ends(self) -> np.ndarray:
        ids = [i for i in range(self.n_text) if i not in self._command_ids and _ends_sentence(self._text_of(i))]
        out = np.asarray(ids, dtype=np.int64)
        out.flags.writeable = False
        return out

    def _text_of(self, i: int) -> str:
        if self.kind == "sp":
            return "" if self._sp.is_control(i) or self._sp.is_unknown(i) else self._sp.id_to_piece(i).replace("▁", "")
        if self.kind == "wordpiece":
            tok = self._id_to_token.get(i, "")
            return "" if tok.startswith("[") and tok.endswith("]") else tok.removeprefix("##")
        return self._hf.decode([i])

    def bundle_file(self) -> tuple[str, bytes]:
        """(name, bytes) of the one file an ONNX bundle carries: the sentencepiece model, or the whole
        HF tokenizer (normaliser, pre-tokenizer, vocabulary, decoder) as tokenizer.json."""
        if self.kind == "sp":
            return "tokenizer.model", (self.directory / self._files[0]).read_bytes()
        return "tokenizer.json", self._hf.to_str().encode("utf-8")

    def commands_json(self) -> list[list[Any]]:
        """[text, id, lstrip] of every command token, for a bundle's config.json."""
        return [[c.text, c.id, c.lstrip] for c in self.commands]

    def files(self) -> dict[str, bytes]:
        """The tokenizer's files by name (to copy into a run or an export)."""
        return {name: (self.directory / name).read_bytes() for name in self._files}


def _ends_sentence(text: str) -> bool:
    text = text.strip().rstrip(_CLOSERS)
    return bool(text) and text[-1] in _SENTENCE_END


def save_released_tokenizer(tok: ReleasedTokenizer, out_dir: str | Path) -> list[Path]:
    """Copy the tokenizer's files and a small info file into `out_dir` (atomically, info last)."""
    from glm.core.shards import atomic_write_bytes, atomic_write_json

    out = Path(out_dir)
    paths = [atomic_write_bytes(out / name, data) for name, data in tok.files().items()]
    paths.append(
        atomic_write_json(
            out / INFO_FILE,
            {"kind": tok.kind, "files": list(tok.files()), "special_tokens": tok.special.as_dict(), "vocab_size": tok.vocab_size},
        )
    )
    return paths


def install_released_tokenizer(source: str | Path, out_dir: str | Path) -> Path:
    """A run's tokenizer stage for model.init.from: the released tokenizer's files copied into `out_dir`
    with the stage manifest (what glm.tokenizer.train_tokenizer writes for a trained one); returns it.
    Nothing is trained; an unchanged copy is kept."""
    from glm.core.shards import MANIFEST, file_entry, read_manifest, verify_manifest, write_manifest

    tok = ReleasedTokenizer(source)
    out = Path(out_dir)
    stats = {"vocab_size": tok.vocab_size, "model_sha256": tok.sha256, "byte_fallback": tok.byte_fallback, "kind": tok.kind}
    config = {"released": str(Path(source).resolve()), "kind": tok.kind}
    if (out / MANIFEST).is_file() and not verify_manifest(out, deep=True):
        m = read_manifest(out)
        if m.get("stats", {}).get("model_sha256") == tok.sha256 and m.get("config") == config:
            return out / MANIFEST
    paths = save_released_tokenizer(tok, out)
    return write_manifest(out, "tokenizer", [file_entry(p, out) for p in paths], config=config, inputs=[], stats=stats)
