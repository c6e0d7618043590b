"""The GLM transformer (docs/method.md section 4) with its prefix-LM attention and KV cache.

One sample is Part A (corrupted text, bidirectional) ++ Part B (spans, causal). The
whole attention pattern is one integer per row, `sep`: key j is visible to query i iff
`(j < sep or j <= i) and j >= key_start`, with i, j ABSOLUTE positions in the full
sequence (cached past + current), so one rule serves training, prompt pass and
cached decoding. The mask is built here from `sep`, never carried by the data.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from glm.core.config import ModelConfig, OptimConfig

try:  # FlexAttention: a block-sparse prefix-LM kernel on CUDA (torch >= 2.5)
    from torch.nn.attention.flex_attention import (
        BlockMask,
        create_block_mask,
        flex_attention,
    )
except ImportError:  # pragma: no cover - older torch
    BlockMask = create_block_mask = flex_attention = None

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k, v), each (B, H, P, D)

USE_FLEX_ATTENTION = True  # set False to force SDPA on CUDA too (debugging, comparisons)
_compiled_flex: Any = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any) -> torch.Tensor:
    # flex_attention only runs its fused kernel when compiled; compile it once, lazily
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def prefix_lm_mask(
    sep: torch.Tensor,
    q_len: int,
    past_len: int | torch.Tensor,
    key_start: torch.Tensor | None = None,
    n_keys: int | None = None,
) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask, True = may attend, S = n_keys or P+T. Built with tensor ops only
    (compile/export safe). `past_len` may be a (B,) tensor and `n_keys` a cache buffer's capacity (an
    in-place cache): the slots after a query's own position are hidden by the causal rule."""
    steps = torch.arange(q_len, device=sep.device)[None]  # (1, T)
    per_row = isinstance(past_len, torch.Tensor)
    q_pos = (past_len[:, None] if per_row else past_len) + steps  # (B or 1, T)
    if n_keys is None:
        if per_row:
            raise ValueError("a per-row past_len needs n_keys (the cache buffer's capacity)")
        n_keys = past_len + q_len
    k_pos_ = torch.arange(n_keys, device=sep.device)[None, None, :]  # (1, 1, S)
    q_pos_ = q_pos[..., None]  # (B or 1, T, 1)
    visible = (k_pos_ < sep[:, None, None]) | (k_pos_ <= q_pos_)  # (B, T, S)
    if key_start is not None:
        visible = visible & (k_pos_ >= key_start[:, None, None])  # (B, T, S)
        # a left-pad query would otherwise see no key at all (softmax of nothing = NaN, which
        # leaks through 0 * NaN into real rows); letting it see itself keeps it finite and harmless
        visible = visible | (k_pos_ == q_pos_)  # (B, T, S)
    return visible[:, None]  # (B, 1, T, S)


def _flex_block_mask(sep: torch.Tensor, seq_len: int, key_start: torch.Tensor | None) -> Any:
    """The same rule as `prefix_lm_mask` (no past) as a FlexAttention BlockMask."""
    starts = torch.zeros_like(sep) if key_start is None else key_start  # (B,)

    def mask_mod(b, h, q_idx, kv_idx):
        rule = ((kv_idx < sep[b]) | (kv_idx <= q_idx)) & (kv_idx >= starts[b])
        return rule | (kv_idx == q_idx)

    return create_block_mask(mask_mod, sep.shape[0], None, seq_len, seq_len, device=sep.device)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of x (B, H, T, d) by angles given as cos/sin (B, 1, T, d/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, T, d/2) each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)  # (B, H, T, d)


def _attention_for_export(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v written out, for exported graphs (eval: no dropout).

    SDPA's ONNX form transposes the key through Reshape/Transpose/Reshape and a chain of Shape/Slice/
    Concat nodes, so every decoding step copies each layer's whole key cache; written out, onnxruntime
    fuses the transpose and the scale into the MatMul (FusedMatMul, transB and alpha)."""
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (B, H, T, S)
    return torch.softmax(scores + mask.to(scores.dtype), dim=-1) @ v  # (B, H, T, D)


class Rotary2D(nn.Module):
    """ChatGLM 2D rotary positions: one half of each head by position_ids, the other by block_position_ids."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        quarter = head_dim // 4  # each half of the head has head_dim/2 dims = head_dim/4 frequencies
        inv_freq = 1.0 / base ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (D/4,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, block_position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inv_freq = self.inv_freq.float()  # (D/4,)
        pos = position_ids[:, None, :, None].float() * inv_freq  # (B, 1, T, D/4)
        blk = block_position_ids[:, None, :, None].float() * inv_freq  # (B, 1, T, D/4)
        return pos.cos(), pos.sin(), blk.cos(), blk.sin()

    @staticmethod
    def rotate(x: torch.Tensor, angles: tuple[torch.Tensor, ...]) -> torch.Tensor:
        cos_a, sin_a, cos_b, sin_b = angles
        half_a, half_b = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
        return torch.cat([_rope(half_a, cos_a, sin_a), _rope(half_b, cos_b, sin_b)], dim=-1)  # (B, H, T, D)


class InPlaceCache:
    """A layer's key/value cache held in preallocated buffers (B, H, capacity, D) that `attend` writes at
    `past_length` (B,) and attends over, instead of the (k, v) pair each step concatenates onto. The
    exported generation graph uses one (glm.export.KVBuffer): onnxruntime then updates the cache in place."""

    k: torch.Tensor  # (B, H, capacity, D)
    past_length: torch.Tensor  # (B,) positions already written

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """q, k, v (B, T, C) and the additive mask (B, 1, T, capacity) -> (B, T, C) and the updated buffers."""
        raise NotImplementedError


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.proj.residual_out = True  # scaled init, see GLM._init_weights
        self.attn_dropout = cfg.attention_dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: Any,
        rope: tuple[torch.Tensor, ...] | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attention of every position, or (`rows` (B, N)) of those queries only: keys and values still
        come from every position. Returns (B, T or N, C) and this layer's (k, v)."""
        B, T, C = x.shape
        if isinstance(past, InPlaceCache):
            return self._attend_in_place(x, mask, rope, past)
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim)  # (B, T, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D) each
        if rope is not None:
            q, k = Rotary2D.rotate(q, rope), Rotary2D.rotate(k, rope)  # (B, H, T, D)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H, P+T, D)
            v = torch.cat([past[1], v], dim=2)  # (B, H, P+T, D)
        if rows is not None:
            q = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))  # (B, H, N, D)
            mask = mask.gather(2, rows[:, None, :, None].expand(-1, 1, -1, mask.shape[3]))  # (B, 1, N, S)
        if BlockMask is not None and isinstance(mask, BlockMask):
            y = _flex(q, k, v, mask)  # (B, H, T, D)
        elif torch.compiler.is_exporting():
            y = _attention_for_export(q, k, v, mask)  # (B, H, T or N, D)
        else:
            p = self.attn_dropout if self.training else 0.0
            mask = mask.to(q.dtype)  # the additive mask in the queries' dtype (bf16 under autocast; else a no-op)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, T or N, D)
        y = y.transpose(1, 2).reshape(B, q.shape[2], C)  # (B, T or N, C)
        return self.resid_drop(self.proj(y)), (k, v)

    def _attend_in_place(
        self, x: torch.Tensor, mask: torch.Tensor, rope: tuple[torch.Tensor, ...] | None, cache: "InPlaceCache"
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attention through a cache that writes these keys/values into its buffers and attends itself,
        with q, k, v as (B, T, C): the layout a fused kernel takes without transposes."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)  # (B, T, C) each
        if rope is not None:
            heads = (B, T, self.n_head, self.head_dim)
            q, k = (Rotary2D.rotate(t.view(heads).transpose(1, 2), rope).transpose(1, 2).reshape(B, T, C) for t in (q, k))
        y, present = cache.attend(q, k, v, mask)  # (B, T, C)
        return self.resid_drop(self.proj(y)), present


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.hidden_size, cfg.mlp_ratio * cfg.hidden_size)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.hidden_size, cfg.hidden_size)
        self.proj.residual_out = True
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))  # (B, T, C)


class Block(nn.Module):
    """Pre-LN: h = x + Attn(LN(x)); y = h + MLP(LN(h))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        mask: Any,
        rope: tuple[torch.Tensor, ...] | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(B, T, C), or with `rows` (B, N) the outputs of those positions only (B, N, C)."""
        a, present = self.attn(self.ln_1(x), mask, rope, past, rows)  # (B, T or N, C)
        if rows is not None:
            x = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))  # (B, N, C)
        x = x + a  # (B, T or N, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T or N, C)
        return x, present


class GLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError(
                "ModelConfig.vocab_size is None; set it from the tokenizer "
                "(e.g. cfg.model_copy(update={'vocab_size': tokenizer_vocab_size})) before building the model"
            )
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.rotary_2d:
            self.rotary = Rotary2D(cfg.head_dim)
        else:  # learned 2D positions; max_seq_len + 1 rows as in the reference
            self.wpe = nn.Embedding(cfg.max_seq_len + 1, cfg.hidden_size)
            self.wbpe = nn.Embedding(cfg.max_seq_len + 1, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.apply(self._init_weights)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "GLM":
        return cls(cfg)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            # residual output projections shrink with depth so the residual stream's variance stays put
            std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if getattr(module, "residual_out", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ----------------------------------------------------------------- forward

    def _check_inputs(self, input_ids, position_ids, block_position_ids, sep, past_key_values, key_start) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq) token ids, got shape {tuple(input_ids.shape)}")
        for name, t in (("position_ids", position_ids), ("block_position_ids", block_position_ids)):
            if t.shape != input_ids.shape:
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(t.shape)}")
        for name, t in (("sep", sep), ("key_start", key_start)):
            if t is not None and tuple(t.shape) != (input_ids.shape[0],):
                raise ValueError(f"{name} must be one integer per row, shape ({input_ids.shape[0]},), got {tuple(t.shape)}")
        if past_key_values is not None and len(past_key_values) != self.cfg.n_layer:
            raise ValueError(f"past_key_values must hold one (k, v) per layer ({self.cfg.n_layer}), got {len(past_key_values)}")
        # value checks cost a device sync; only do them in eager CPU mode (never while compiling/exporting)
        if torch.compiler.is_compiling() or input_ids.device.type != "cpu" or input_ids.numel() == 0:
            return
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.cfg.vocab_size:
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.cfg.vocab_size}); check the tokenizer/model pairing")
        limit = self.cfg.max_seq_len
        for name, t in (("position_ids", position_ids), ("block_position_ids", block_position_ids)):
            if int(t.min()) < 0 or int(t.max()) > limit:
                raise ValueError(f"{name} must lie in [0, max_seq_len={limit}]; shorten the input or raise model.max_seq_len")

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        block_position_ids: torch.Tensor,
        sep: torch.Tensor,
        *,
        past_key_values: KVCache | None = None,
        key_start: torch.Tensor | None = None,
        use_cache: bool = False,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """Final-LayerNorm output (B, T, C) and, if use_cache, the per-layer (k, v) of past + these tokens.

        `rows` (B, N): return the positions a classifier reads only (B, N, C); the last block then runs
        its queries, output projection and MLP at those positions alone (its keys and values, and every
        earlier block, still need every position)."""
        self._check_inputs(input_ids, position_ids, block_position_ids, sep, past_key_values, key_start)
        B, T = input_ids.shape
        n_keys = None
        if past_key_values is None:
            past_len: int | torch.Tensor = 0
        elif isinstance(past_key_values[0], InPlaceCache):  # buffers: keys are every slot, written or not
            past_len, n_keys = past_key_values[0].past_length, past_key_values[0].k.shape[2]
        else:
            past_len = past_key_values[0][0].shape[2]
        x = self.wte(input_ids)  # (B, T, C)
        rope = None
        if self.cfg.rotary_2d:
            rope = self.rotary(position_ids, block_position_ids)  # 4 x (B, 1, T, D/4)
        else:
            x = x + self.wpe(position_ids) + self.wbpe(block_position_ids)  # (B, T, C)
        x = self.drop(x)  # (B, T, C)
        use_flex = (
            USE_FLEX_ATTENTION
            and flex_attention is not None
            and x.device.type == "cuda"
            and past_key_values is None
            and not (self.training and self.cfg.attention_dropout > 0)  # flex has no attention dropout
        )
        if use_flex:
            mask = _flex_block_mask(sep, T, key_start)
        else:
            visible = prefix_lm_mask(sep, T, past_len, key_start, n_keys)  # (B, 1, T, P+T or capacity)
            # additive, once for every layer: a boolean mask costs each layer's exported graph a Where
            # and a NaN guard (no row is ever fully masked: every query sees itself)
            mask = torch.where(visible, 0.0, float("-inf"))  # (B, 1, T, P+T) float32
        presents: KVCache = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            past = None if past_key_values is None else past_key_values[i]
            x, present = block(x, mask, rope, past, rows if i == last else None)  # (B, T, C); the last (B, N, C) with rows
            presents.append(present)
        h = self.ln_f(x)  # (B, T, C)
        return h, (presents if use_cache else None)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied output projection h @ wte^T, always float32 (..., V)."""
        return F.linear(h, self.wte.weight).float()  # (..., V)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        block_position_ids: torch.Tensor,
        sep: torch.Tensor,
        *,
        past_key_values: KVCache | None = None,
        key_start: torch.Tensor | None = None,
        use_cache: bool = False,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        """Logits (B, T, V) float32, or (logits, presents) if use_cache.

        `select` (B, T) bool: project only those positions and return (N, V) logits in row-major
        order; `infilling_loss` uses it so the vocabulary projection runs on the loss positions
        only, through the module's own __call__ (so DDP/FSDP/compile wrappers see one forward).
        """
        h, presents = self.hidden_states(
            input_ids,
            position_ids,
            block_position_ids,
            sep,
            past_key_values=past_key_values,
            key_start=key_start,
            use_cache=use_cache,
        )
        if select is not None:
            h = h[select]  # (N, C)
        logits = self.logits(h)  # (B, T, V) or (N, V)
        return (logits, presents) if use_cache else logits

    # ----------------------------------------------------------------- accounting

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; exclude_embeddings drops the token and position tables (the tied output
        projection is the token table, so it is dropped too)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return n

    def flops_per_token(self, seq_len: int, loss_fraction: float = 1.0) -> float:
        """Training FLOPs per token (forward + backward), for MFU.

        6 x (non-embedding params) for the matmuls, 6 x V x C x loss_fraction for the tied vocabulary
        projection (infilling_loss projects only the loss positions: pass their fraction, ~0.15-0.2;
        1.0 is the usual LM convention), and 12 x L x C x seq_len for attention scores and
        weighted sums (the prefix-LM mask is dense, so no causal halving).
        """
        c = self.cfg
        body = 6 * self.num_params(exclude_embeddings=True)
        head = 6 * c.vocab_size * c.hidden_size * loss_fraction
        attn = 12 * c.n_layer * c.hidden_size * seq_len
        return float(body + head + attn)


# --------------------------------------------------------------------------- training helpers


def infilling_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the loss positions of a blank-infilling batch, and their count.

    The vocabulary projection is applied only at loss positions (~15-20% of a row), gathered
    before the projection; on small models the projection is most of the compute otherwise.
    """
    missing = {"input_ids", "position_ids", "block_position_ids", "sep", "targets", "loss_mask"} - set(batch)
    if missing:
        raise ValueError(f"batch is missing {sorted(missing)}; expected the blank-infilling builder's fields")
    select = batch["loss_mask"].bool()  # (B, T)
    logits = model(batch["input_ids"], batch["position_ids"], batch["block_position_ids"], batch["sep"], select=select)  # (N, V)
    targets = batch["targets"][select]  # (N,)
    n_tokens = select.sum()
    # sum / max(N, 1) rather than a mean: a batch without loss positions gives 0, not NaN (no branch on N)
    total = F.cross_entropy(logits, targets, reduction="sum", label_smoothing=label_smoothing)
    return total / n_tokens.clamp(min=1), n_tokens


def configure_optimizer(model: nn.Module, optim_cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on the Linear weight matrices only.

    No decay on biases and LayerNorm (GLM's Megatron code and nanoGPT agree), nor on the
    embedding tables: unlike Megatron/nanoGPT we also exempt the (tied) token and position
    embeddings, the BERT/HF convention, as decaying rarely-seen token rows toward zero only hurts.
    """
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if id(p) in decay_ids else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": optim_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, **kwargs)
