"""The GLM special tokens and their ids: defined here and nowhere else.

The reference implementation defined these in several places and they drifted
(eos == pad, skipped ids, flags to swap ids). Every module and every artefact
(tokenizer, shards, ONNX bundle) takes its ids from `SPECIAL`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SpecialTokens:
    pad: int = 0  # [PAD]
    unk: int = 1  # [UNK]
    cls: int = 2  # [CLS]
    eos: int = 3  # <eos>  ends a document when rows are packed
    mask: int = 4  # [MASK]  token-level blank
    smask: int = 5  # [sMASK] sentence-level blank
    gmask: int = 6  # [gMASK] document-level blank / free generation
    sop: int = 7  # <sop>  starts a Part B span
    eop: int = 8  # <eop>  ends a Part B span

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def mask_ids(self) -> tuple[int, int, int]:
        return (self.mask, self.smask, self.gmask)


SPECIAL = SpecialTokens()


def special_of(source: Any) -> SpecialTokens:
    """The special ids of a model, a ModelConfig or a tokenizer: an imported released GLM carries its
    own (ModelConfig.special_tokens, ReleasedTokenizer.special); everything else uses SPECIAL."""
    if source is None:
        return SPECIAL
    if isinstance(source, SpecialTokens):
        return source
    if isinstance(getattr(source, "special", None), SpecialTokens):  # a tokenizer
        return source.special
    for wrapper in ("module", "_orig_mod"):  # DDP/FSDP, torch.compile
        source = getattr(source, wrapper, source)
    cfg = getattr(source, "cfg", source)  # a GLM model, or its config
    ids = getattr(cfg, "special_tokens", None)
    return SpecialTokens(**ids) if ids else SPECIAL


# The piece (surface string) of each special token, in id order.
PIECES: dict[str, str] = {
    "pad": "[PAD]",
    "unk": "[UNK]",
    "cls": "[CLS]",
    "eos": "<eos>",
    "mask": "[MASK]",
    "smask": "[sMASK]",
    "gmask": "[gMASK]",
    "sop": "<sop>",
    "eop": "<eop>",
}

NUM_SPECIAL = len(PIECES)  # the first regular token id
