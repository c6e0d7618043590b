"""Parity with the reference GLM code (THUDM/GLM), from fixtures recorded by scripts/glm_reference_parity.py.

The fixtures hold, per tokenizer family, a synthetic vocabulary in the family's file format, the
reference tokenizer's ids for fixed texts and its command-token ids, a tiny random reference
GLMModel saved in a released layout, and its fp32 logits on fixed blank-infilling rows. Nothing
here needs the reference checkout.
"""

import json
from pathlib import Path

import pytest
import torch

from glm.core.released_tokenizer import ReleasedTokenizer, detect_kind
from glm.released import import_released

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "released"
FAMILIES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def test_every_family_has_fixtures():
    assert FAMILIES == ["glm-2b", "glm-large", "glm-large-chinese", "glm-roberta-large"]


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_match_the_reference(family):
    ref = torch.load(FIXTURES / family / "logits.pt", weights_only=True)
    # the DeepSpeed fixture is a bare mp_rank_00 file: the head count is the one thing its shapes cannot tell
    model, cfg = import_released(FIXTURES / family / "model", n_head=4)
    assert cfg.max_seq_len == 64 and cfg.vocab_size == ref["logits"].shape[-1]
    with torch.no_grad():
        logits = model(ref["input_ids"], ref["position_ids"], ref["block_position_ids"], ref["sep"])  # (B, T, V)
    assert logits.shape == ref["logits"].shape
    diff = (logits - ref["logits"]).abs().max().item()
    assert diff < 1e-5, f"{family}: max |logit difference| {diff:.2e}"
    # a wrong head split, position table or mask would be far off: the fixture logits are not trivially equal
    assert ref["logits"].std() > 1.0
    if family == "glm-large-chinese":  # and a wrong head count is caught
        wrong, _ = import_released(FIXTURES / family / "model", n_head=2)
        with torch.no_grad():
            off = wrong(ref["input_ids"], ref["position_ids"], ref["block_position_ids"], ref["sep"])
        assert (off - ref["logits"]).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_ids_match_the_reference(family):
    rec = json.loads((FIXTURES / family / "tokens.json").read_text(encoding="utf-8"))
    assert detect_kind(FIXTURES / family / "tokenizer") == rec["kind"]
    tok = ReleasedTokenizer(FIXTURES / family / "tokenizer")
    assert tok.vocab_size == rec["num_tokens"]
    c = rec["commands"]
    s = tok.special
    assert (s.pad, s.eos, s.unk, s.cls, s.mask, s.smask, s.gmask, s.sop, s.eop, tok.sep_id) == (
        c["pad"], c["eos"], c["unk"], c["ENC"], c["MASK"], c["sMASK"], c["gMASK"], c["sop"], c["eop"], c["sep"],
    )  # fmt: skip
    for text, want in zip(rec["texts"], rec["ids"]):
        assert tok.encode(text) == want, f"{family}: {text!r}"
    assert tok.encode(rec["texts"]) == rec["ids"]  # the batch path too


@pytest.mark.parametrize("family", FAMILIES)
def test_corpus_text_never_turns_into_blanks(family):
    tok = ReleasedTokenizer(FIXTURES / family / "tokenizer")
    ids = tok.encode("It was [MASK] and [gMASK] <|endofpiece|>.", specials=False)
    assert not set(ids) & {tok.mask_id, tok.gmask_id, tok.smask_id, tok.sop_id, tok.eop_id}
    flat, lengths = tok.encode_flat(["It was [MASK].", "ok"], specials=False)
    assert lengths.sum() == len(flat) and tok.mask_id not in flat.tolist()
    assert all(tok.mask_id not in spelled for spelled in tok.literal_ids().values())
