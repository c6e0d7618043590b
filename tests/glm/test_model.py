"""The GLM transformer: prefix-LM attention, shapes, init, presets, training, numerics, KV cache."""

from __future__ import annotations

import math

import pytest
import torch

from glm.core.config import OptimConfig, model_config
from glm.core.model import (
    GLM,
    _flex_block_mask,
    configure_optimizer,
    infilling_loss,
    prefix_lm_mask,
)
from tests.glm.factories import tiny_model

VOCAB = 64


def synthetic_batch(B: int = 3, T: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hand-made blank-infilling rows: Part A (bidirectional) then a Part B of two spans, each [sop] + tokens.

    Row r: Part A has sep = T - 8 - r tokens with two mask tokens; Part B = [sop] a a' [sop] b b b', then padding.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(9, VOCAB, (B, T), generator=g)  # (B, T)
    pos = torch.zeros(B, T, dtype=torch.long)
    blk = torch.zeros(B, T, dtype=torch.long)
    targets = torch.zeros(B, T, dtype=torch.long)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    seps = []
    for r in range(B):
        sep = T - 8 - r
        seps.append(sep)
        m1, m2 = 2, sep - 3  # where the two blanks sit in Part A
        ids[r, m1], ids[r, m2] = 4, 4  # [MASK]
        pos[r, :sep] = torch.arange(sep)
        span_lens = (2, 3)
        at = sep
        for where, k in zip((m1, m2), span_lens):
            ids[r, at] = 7  # [sop]
            pos[r, at : at + k + 1] = where
            blk[r, at : at + k + 1] = torch.arange(1, k + 2)
            targets[r, at : at + k] = ids[r, at + 1 : at + k + 1]
            targets[r, at + k] = 8  # [eop]
            loss_mask[r, at : at + k + 1] = True
            at += k + 1
        ids[r, at:] = 0  # [PAD] tail
        # padding keeps pos/blk 0 and no loss
        if at < T:
            targets[r, at:] = 0
        targets[r, :sep] = 0
        # Part B inputs other than [sop] are the previous targets (teacher forcing) by construction
    return dict(
        input_ids=ids,
        position_ids=pos,
        block_position_ids=blk,
        sep=torch.tensor(seps),
        targets=targets,
        loss_mask=loss_mask,
    )


def run(model: GLM, b: dict[str, torch.Tensor], **kw) -> torch.Tensor:
    return model(b["input_ids"], b["position_ids"], b["block_position_ids"], b["sep"], **kw)


# --------------------------------------------------------------------------- attention semantics


def test_prefix_lm_mask_matches_the_rule_elementwise():
    sep, key_start = torch.tensor([3, 5]), torch.tensor([0, 2])
    past, T = 4, 3
    got = prefix_lm_mask(sep, T, past, key_start)  # (B, 1, T, P+T)
    assert got.shape == (2, 1, T, past + T)
    for b in range(2):
        for t in range(T):
            i = past + t
            for j in range(past + T):
                want = ((j < sep[b] or j <= i) and j >= key_start[b]) or j == i
                assert bool(got[b, 0, t, j]) == want, (b, i, j)
    assert torch.equal(prefix_lm_mask(sep, T, past), prefix_lm_mask(sep, T, past, torch.zeros(2, dtype=torch.long)))


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
@pytest.mark.parametrize("with_key_start", [False, True])
def test_flex_block_mask_applies_the_same_rule(with_key_start):
    # the CUDA path: FlexAttention's block mask; eager flex_attention on CPU checks its mask_mod
    from torch.nn.attention.flex_attention import flex_attention

    B, H, T, D = 3, 2, 40, 16
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    sep, key_start = torch.tensor([10, 25, 39]), (torch.tensor([0, 3, 7]) if with_key_start else None)
    got = flex_attention(q, k, v, block_mask=_flex_block_mask(sep, T, key_start))  # (B, H, T, D)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=prefix_lm_mask(sep, T, 0, key_start))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rotary", [False, True])
def test_part_a_never_sees_part_b(rotary):
    model, b = tiny_model(VOCAB, rotary_2d=rotary), synthetic_batch()
    base = run(model, b)
    for r, sep in enumerate(b["sep"].tolist()):
        for j in (sep, sep + 3, sep + 6):  # a [sop], a span token, the last span's token
            changed = {k: v.clone() for k, v in b.items()}
            changed["input_ids"][r, j] = (changed["input_ids"][r, j] + 1 - 9) % (VOCAB - 9) + 9
            out = run(model, changed)
            torch.testing.assert_close(out[r, :sep], base[r, :sep], atol=1e-6, rtol=0)
            assert (out[r, j] - base[r, j]).abs().max() > 1e-4  # the change itself is visible


@pytest.mark.parametrize("rotary", [False, True])
def test_part_b_is_causal(rotary):
    model, b = tiny_model(VOCAB, rotary_2d=rotary), synthetic_batch()
    base = run(model, b)
    r, sep = 0, int(b["sep"][0])
    j = sep + 4  # a token of the second span
    changed = {k: v.clone() for k, v in b.items()}
    changed["input_ids"][r, j] = 9 if int(changed["input_ids"][r, j]) != 9 else 10
    out = run(model, changed)
    torch.testing.assert_close(out[r, :j], base[r, :j], atol=1e-6, rtol=0)
    assert (out[r, j : sep + 7] - base[r, j : sep + 7]).abs().amax(dim=-1).min() > 1e-5  # later Part B tokens see it


@pytest.mark.parametrize("rotary", [False, True])
def test_part_b_sees_all_of_part_a(rotary):
    model, b = tiny_model(VOCAB, rotary_2d=rotary), synthetic_batch()
    base = run(model, b)
    r, sep = 1, int(b["sep"][1])
    changed = {k: v.clone() for k, v in b.items()}
    changed["input_ids"][r, sep - 1] = 9 if int(changed["input_ids"][r, sep - 1]) != 9 else 10  # last Part A token
    out = run(model, changed)
    # every Part B position, including the first [sop], sees the change (bidirectional Part A, full prefix)
    assert (out[r, sep : sep + 7] - base[r, sep : sep + 7]).abs().amax(dim=-1).min() > 1e-5
    # and so does an earlier Part A position (Part A is bidirectional)
    assert (out[r, 0] - base[r, 0]).abs().max() > 1e-5
    torch.testing.assert_close(out[0], base[0], atol=1e-6, rtol=0)  # other rows untouched


def test_left_padding_with_key_start_matches_unpadded():
    model, b = tiny_model(VOCAB), synthetic_batch(B=1)
    ids, pos, blk, sep = b["input_ids"], b["position_ids"], b["block_position_ids"], b["sep"]
    pad = 5
    padded = lambda t: torch.cat([torch.zeros(1, pad, dtype=t.dtype), t], dim=1)  # noqa: E731
    out = model(padded(ids), padded(pos), padded(blk), sep + pad, key_start=torch.tensor([pad]))
    torch.testing.assert_close(out[:, pad:], model(ids, pos, blk, sep), atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()  # pad queries see themselves: no NaN leaks


# --------------------------------------------------------------------------- shapes, weights, presets


def test_shapes_dtype_and_tied_output():
    model, b = tiny_model(VOCAB), synthetic_batch()
    logits = run(model, b)
    assert logits.shape == (3, 24, VOCAB) and logits.dtype == torch.float32
    h, presents = model.hidden_states(b["input_ids"], b["position_ids"], b["block_position_ids"], b["sep"], use_cache=True)
    assert h.shape == (3, 24, 32)
    assert len(presents) == 2 and presents[0][0].shape == (3, 2, 24, 16)
    torch.testing.assert_close(logits, h @ model.wte.weight.T)
    assert not any("lm_head" in n for n, _ in model.named_parameters())  # no separate output matrix
    with torch.no_grad():
        model.wte.weight[5] += 1.0  # the output projection moves with the token table
    assert not torch.allclose(run(model, b)[..., 5], logits[..., 5])
    selected = run(model, b, select=b["loss_mask"])
    assert selected.shape == (int(b["loss_mask"].sum()), VOCAB)


def test_tiny_param_count_and_flops_by_hand():
    model = tiny_model(VOCAB)
    # per layer: 2 LN (2*64) + qkv (32*96+96) + proj (32*32+32) + fc (32*128+128) + proj (128*32+32) = 12704
    body = 2 * 12704 + 64  # + final LN
    assert model.num_params(exclude_embeddings=True) == body
    assert model.num_params() == body + VOCAB * 32 + 2 * 129 * 32  # tied token table + two position tables
    assert model.flops_per_token(16) == 6 * body + 6 * VOCAB * 32 + 12 * 2 * 32 * 16
    assert model.flops_per_token(16, loss_fraction=0.25) == 6 * body + 6 * VOCAB * 32 * 0.25 + 12 * 2 * 32 * 16
    rotary = tiny_model(VOCAB, rotary_2d=True)
    assert rotary.num_params() == body + VOCAB * 32  # no learned position tables


def test_init_std():
    cfg = model_config("tiny", vocab_size=512, n_layer=8, hidden_size=256, n_head=4)
    model = GLM(cfg)
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 1e-3
    assert abs(model.wte.weight.std().item() - 0.02) < 1e-3
    residual = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        assert abs(block.attn.proj.weight.std().item() - residual) < 3e-4
        assert abs(block.mlp.proj.weight.std().item() - residual) < 3e-4
        assert block.attn.qkv.bias.abs().max() == 0


@pytest.mark.parametrize(
    "preset, vocab, low, high",
    [
        ("tiny", 1000, 0.05e6, 0.07e6),
        ("small", 16000, 8.5e6, 9.5e6),
        ("base", 30592, 105e6, 115e6),
        ("large", 30592, 325e6, 345e6),
    ],
)
def test_preset_param_counts(preset, vocab, low, high):
    with torch.device("meta"):  # count without allocating 1.3 GB for large
        model = GLM(model_config(preset, vocab_size=vocab))
    assert low < model.num_params() < high


def test_clear_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        GLM(model_config("tiny"))
    model, b = tiny_model(VOCAB), synthetic_batch()
    with pytest.raises(ValueError, match="position_ids"):
        model(b["input_ids"], b["position_ids"][:, :-1], b["block_position_ids"], b["sep"])
    with pytest.raises(ValueError, match="sep"):
        model(b["input_ids"], b["position_ids"], b["block_position_ids"], b["sep"][:1])
    with pytest.raises(ValueError, match="vocab_size"):
        model(b["input_ids"] + VOCAB, b["position_ids"], b["block_position_ids"], b["sep"])
    with pytest.raises(ValueError, match="max_seq_len"):
        model(b["input_ids"], b["position_ids"] + 1000, b["block_position_ids"], b["sep"])
    with pytest.raises(ValueError, match="loss_mask"):
        infilling_loss(model, {k: v for k, v in b.items() if k != "loss_mask"})


def test_optimizer_decays_linear_weights_only():
    model = tiny_model(VOCAB)
    opt = configure_optimizer(model, OptimConfig(weight_decay=0.1), "cpu")
    decay, no_decay = opt.param_groups
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear_weights and decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    assert id(model.wte.weight) in {id(p) for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6


# --------------------------------------------------------------------------- training


def test_infilling_loss_counts_and_matches_full_projection():
    model, b = tiny_model(VOCAB), synthetic_batch()
    loss, n = infilling_loss(model, b)
    assert int(n) == 3 * 7
    logits = run(model, b)  # (B, T, V): the slow way, every position projected
    m = b["loss_mask"]
    full = torch.nn.functional.cross_entropy(logits[m], b["targets"][m])
    torch.testing.assert_close(loss, full)
    smoothed, _ = infilling_loss(model, b, label_smoothing=0.1)
    assert not torch.isclose(smoothed, loss)
    empty, n = infilling_loss(model, {**b, "loss_mask": torch.zeros_like(b["loss_mask"])})
    assert int(n) == 0 and empty.item() == 0.0  # not NaN


def test_tiny_model_memorises_one_batch():
    model = tiny_model(VOCAB).train()
    b = synthetic_batch(B=4, T=24, seed=1)
    opt = configure_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.0), "cpu")
    for _ in range(150):
        loss, _ = infilling_loss(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


# Golden trace: tiny config, seed 0, synthetic_batch(seed=3), AdamW (lr 1e-3, decay 0.1), dropout 0.1, 5 steps.
# It pins the model's numerics (init, embeddings, attention, loss). If you change them ON PURPOSE,
# regenerate with: .venv/bin/python -c "from tests.glm.test_model import golden_trace; print(golden_trace())"
GOLDEN_LOSSES = [4.2010684013, 4.0612845421, 3.9592487812, 3.8903176785, 3.8303580284]


def golden_trace() -> list[float]:
    torch.manual_seed(0)
    model = GLM(model_config("tiny", vocab_size=VOCAB)).train()
    opt = configure_optimizer(model, OptimConfig(lr=1e-3), "cpu")
    b = synthetic_batch(B=4, T=24, seed=3)
    losses = []
    for _ in range(5):
        loss, _ = infilling_loss(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 10))
    return losses


def test_golden_loss_trace():
    torch.testing.assert_close(golden_trace(), GOLDEN_LOSSES, rtol=1e-4, atol=0)


# --------------------------------------------------------------------------- numerics, cache, compile


@pytest.mark.parametrize("rotary", [False, True])
def test_bf16_autocast_close_to_fp32(rotary):
    model, b = tiny_model(VOCAB, rotary_2d=rotary), synthetic_batch()
    ref = run(model, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, b)
        loss, _ = infilling_loss(model.train(), b)
    assert out.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=0)
    assert (out - ref).abs().max() > 0  # bf16 really ran


@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("extra", [0, 2])
def test_kv_cache_prompt_then_incremental_equals_full(rotary, extra):
    model, b = tiny_model(VOCAB, rotary_2d=rotary), synthetic_batch()
    full = run(model, b)  # (B, T, V)
    ids, pos, blk, sep = b["input_ids"], b["position_ids"], b["block_position_ids"], b["sep"]
    P = int(sep.max()) + extra  # the prompt pass must hold every row's whole Part A
    logits, cache = model(ids[:, :P], pos[:, :P], blk[:, :P], sep, use_cache=True)
    outs = [logits]
    t, T = P, ids.shape[1]
    widths = iter([1, 3, 1, 2] * T)  # one token at a time and in chunks
    while t < T:
        width = min(next(widths), T - t)
        step, cache = model(
            ids[:, t : t + width], pos[:, t : t + width], blk[:, t : t + width], sep, past_key_values=cache, use_cache=True
        )
        outs.append(step)
        t += width
    assert t == T and cache[0][0].shape[2] == T
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rotary", [False, True])
def test_hidden_states_of_selected_rows_equal_the_full_forward_gathered(rotary):
    """`rows` (a classifier's positions): the last block runs there only; the result is the full model's."""
    model, b = tiny_model(VOCAB, rotary_2d=rotary).eval(), synthetic_batch()
    ids, pos, blk, sep = b["input_ids"], b["position_ids"], b["block_position_ids"], b["sep"]
    rows = torch.tensor([[0, 5, 5], [3, 1, 20], [23, 2, 9]])  # (B, N): any positions, repeats and order included
    with torch.no_grad():
        full, full_cache = model.hidden_states(ids, pos, blk, sep, use_cache=True)  # (B, T, C)
        some, cache = model.hidden_states(ids, pos, blk, sep, use_cache=True, rows=rows)  # (B, N, C)
        want = full.gather(1, rows[..., None].expand(-1, -1, full.shape[-1]))  # (B, N, C)
        torch.testing.assert_close(some, want, atol=1e-5, rtol=0)
        for (k, v), (fk, fv) in zip(cache, full_cache):  # the cache still covers every position
            assert torch.equal(k, fk) and torch.equal(v, fv)
        # with a past: one new token per row, the rows select it
        P = ids.shape[1] - 1
        _, past = model.hidden_states(ids[:, :P], pos[:, :P], blk[:, :P], sep, use_cache=True)
        one, _ = model.hidden_states(
            ids[:, P:], pos[:, P:], blk[:, P:], sep, past_key_values=past, rows=torch.zeros(3, 1, dtype=torch.long)
        )
        torch.testing.assert_close(one, full[:, P:], atol=1e-5, rtol=0)


def test_no_graph_breaks_for_torch_compile():
    # a real fullgraph compile takes ~30 s on 2 cores; dynamo's explain runs the same tracing in < 1 s
    model, b = tiny_model(VOCAB), synthetic_batch()
    model.train()
    args = (b["input_ids"], b["position_ids"], b["block_position_ids"], b["sep"])
    assert torch._dynamo.explain(model)(*args).graph_break_count == 0
    assert torch._dynamo.explain(model)(*args, use_cache=True).graph_break_count == 0
    # the loss gathers a data-dependent number of positions: dynamo keeps it in one graph once told to
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        assert torch._dynamo.explain(infilling_loss)(model, b).graph_break_count == 0
