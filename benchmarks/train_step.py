"""Training-step tokens/s (forward + backward + AdamW) of GLM vs a same-size Hugging Face GPT-2.

Both sides run in the same process, alternating in rounds (so background load hits both alike),
with the same dimensions, dropout, micro-batch and sequence length. They do not compute the
same loss, by design: ours is the GLM blank-infilling loss on a realistic 15% span mask (loss and
vocabulary projection on the Part B positions only, prefix-LM mask built from `sep`); the
reference is a plain causal LM (loss and vocabulary projection at every position). tokens/s
counts every position of the micro-batch on both sides. On CUDA, MFU is reported as well.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import numpy as np
import torch

from glm.core.config import OptimConfig, model_config
from glm.core.model import GLM, configure_optimizer, infilling_loss
from glm.core.special_tokens import NUM_SPECIAL, SPECIAL
from glm.training.train import peak_flops

VOCAB = 16000
CASES = {  # preset: (seq_len, micro_batch)
    "tiny": (128, 16),
    "small": (256, 8),
}


def infilling_batch(B: int, T: int, vocab: int, seed: int = 0, mask_ratio: float = 0.15) -> dict[str, torch.Tensor]:
    """Rows shaped like the builder's: Part A with one mask per span, Part B = [sop] + span per span.

    Spans of length 3 (the Poisson mean) cover mask_ratio of the original tokens, so Part B is
    ~19% of each row (the loss positions).
    """
    rng = np.random.default_rng(seed)
    n_spans = int(round(mask_ratio * T / (3 + 2 * mask_ratio)))  # 3k = ratio * (T - 2k)
    sep = T - 4 * n_spans  # Part A: T - 2k original tokens - 3k masked + k masks
    cols = {k: np.zeros((B, T), dtype=np.int64) for k in ("input_ids", "position_ids", "block_position_ids", "targets")}
    cols["input_ids"][:] = rng.integers(NUM_SPECIAL, vocab, size=(B, T))
    cols["targets"][:] = rng.integers(NUM_SPECIAL, vocab, size=(B, T))
    loss_mask = np.zeros((B, T), dtype=bool)
    for r in range(B):
        where = np.sort(rng.choice(np.arange(1, sep, 2), size=n_spans, replace=False))  # non-adjacent masks
        cols["input_ids"][r, where] = SPECIAL.mask
        cols["position_ids"][r, :sep] = np.arange(sep)
        order = rng.permutation(n_spans)  # span shuffling
        for i, s in enumerate(order):
            at = sep + 4 * i
            cols["input_ids"][r, at] = SPECIAL.sop
            cols["position_ids"][r, at : at + 4] = where[s]
            cols["block_position_ids"][r, at : at + 4] = np.arange(1, 5)
        loss_mask[r, sep:] = True
    batch = {k: torch.from_numpy(v) for k, v in cols.items()}
    batch["sep"] = torch.full((B,), sep, dtype=torch.long)
    batch["loss_mask"] = torch.from_numpy(loss_mask)
    return batch


def _gpt2(cfg, seq_len: int):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    gcfg = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=seq_len,
        n_embd=cfg.hidden_size,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.mlp_ratio * cfg.hidden_size,
        activation_function="gelu_new",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.attention_dropout,
        layer_norm_epsilon=cfg.layernorm_eps,
        bos_token_id=SPECIAL.cls,
        eos_token_id=SPECIAL.eos,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(gcfg)


def _bench_case(preset: str, steps: int, rounds: int, device: torch.device) -> dict:
    seq_len, micro_batch = CASES[preset]
    cfg = model_config(preset, vocab_size=VOCAB, max_seq_len=max(seq_len, model_config(preset).max_seq_len))
    torch.manual_seed(0)
    ours = GLM(cfg).to(device).train()
    ref = _gpt2(cfg, seq_len).to(device).train()
    optim = OptimConfig()
    opt_ours = configure_optimizer(ours, optim, device.type)
    opt_ref = torch.optim.AdamW(
        ref.parameters(),
        lr=optim.lr,
        betas=optim.betas,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=device.type == "cuda" or None,
    )
    batch = {k: v.to(device) for k, v in infilling_batch(micro_batch, seq_len, VOCAB).items()}
    ids = batch["input_ids"]
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step_ours() -> None:
        with amp:
            loss, _ = infilling_loss(ours, batch)
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def step_ref() -> None:
        with amp:
            loss = ref(input_ids=ids, labels=ids).loss
        opt_ref.zero_grad(set_to_none=True)
        loss.backward()
        opt_ref.step()

    def timed(step) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return steps * micro_batch * seq_len / (time.perf_counter() - t0)

    step_ours(), step_ref()  # warm-up: allocator, kernels, lazy init
    ours_tps, ref_tps = [], []
    for _ in range(rounds):  # alternate, so load from other processes hits both sides alike
        ours_tps.append(timed(step_ours))
        ref_tps.append(timed(step_ref))
    value, reference = statistics.median(ours_tps), statistics.median(ref_tps)
    loss_fraction = float(batch["loss_mask"].float().mean())
    result = {
        "name": f"train_step/{preset}",
        "metric": "train_tokens_per_s",
        "value": round(value, 1),
        "unit": "tokens/s",
        "reference": round(reference, 1),
        "ratio": round(value / reference, 3),
        "better": "higher",
        "device": device.type,
        "threads": torch.get_num_threads(),
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "vocab": VOCAB,
        "dims": f"{cfg.n_layer} layers x {cfg.hidden_size} wide x {cfg.n_head} heads, dropout {cfg.dropout}",
        "params_ours": ours.num_params(),
        "params_reference": sum(p.numel() for p in ref.parameters()),
        "steps_per_round": steps,
        "rounds": rounds,
        "ours_computes": (
            f"GLM blank-infilling loss: prefix-LM attention from sep, vocab projection + CE on the "
            f"{loss_fraction:.0%} Part B loss positions only (15% span mask, spans of 3)"
        ),
        "reference_computes": "HF transformers GPT2LMHeadModel (SDPA), causal-LM loss: vocab projection + CE at every position",
    }
    if device.type == "cuda":
        peak = peak_flops(device)
        flops = ours.flops_per_token(seq_len, loss_fraction=loss_fraction)
        result["achieved_tflops"] = round(value * flops / 1e12, 2)
        result["mfu"] = round(value * flops / peak, 4) if peak else None
        print(f"{preset}: {value:,.0f} tokens/s, MFU {result['mfu']} (peak bf16 {peak} FLOP/s)")
    return result


def run(quick: bool = False) -> Iterator[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if quick:
        yield _bench_case("tiny", steps=3, rounds=1, device=device)
        return
    for preset in CASES:
        yield _bench_case(preset, steps=2 if preset == "small" else 10, rounds=4, device=device)
