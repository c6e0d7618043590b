"""Blank filling with a KV cache: greedy, sampling (temperature / top-k / top-p) and beam search.

A prompt is Part A: token ids holding one or more blanks ([MASK], [sMASK], [gMASK]). It is run
once; then Part B is decoded from <sop> (docs/method.md section 6): every token of a span keeps its
blank's position id and counts its block position up 1, 2, 3...; a span ends at <eop> (never
fed back: the next blank's <sop> follows the span's last token, as in training) or after
max_new_tokens. Blanks are filled in order of appearance, each seeing the spans before it.

Batches of different-length prompts are left-padded: every row then has the same `sep` (the
padded prompt length) and `key_start` hides its pads. Rows run in lockstep, each through its
own blanks; a row's Part B never holds padding, so a batched row decodes exactly as it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from glm.core.model import GLM, KVCache
from glm.core.special_tokens import SPECIAL, SpecialTokens, special_of


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32  # per blank, <eop> excluded
    min_new_tokens: int = 0  # per blank: <eop> is suppressed until the blank holds this many tokens
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size occurs twice within one blank's span
    strategy: Literal["greedy", "sample", "beam"] = "greedy"
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    num_beams: int = 4
    length_penalty: float = 1.0  # beam score = sum log p / length ** length_penalty
    seed: int | None = None  # sampling: fixed seed -> reproducible draws
    output_scores: bool = False  # greedy/sample: keep each step's raw logits in FillResult.step_logits

    def __post_init__(self) -> None:
        if self.strategy not in ("greedy", "sample", "beam"):
            raise ValueError(f"GenerationConfig.strategy={self.strategy!r}; choose 'greedy', 'sample' or 'beam'")
        if self.max_new_tokens < 1:
            raise ValueError(f"GenerationConfig.max_new_tokens={self.max_new_tokens} must be >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"GenerationConfig.min_new_tokens={self.min_new_tokens} must be in [0, max_new_tokens={self.max_new_tokens}]"
            )
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"GenerationConfig.no_repeat_ngram_size={self.no_repeat_ngram_size} must be >= 0 (0 disables it)")
        if self.temperature <= 0:
            raise ValueError(f"GenerationConfig.temperature={self.temperature} must be > 0 (use strategy='greedy' for argmax)")
        if self.top_k < 0:
            raise ValueError(f"GenerationConfig.top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"GenerationConfig.top_p={self.top_p} must be in (0, 1] (1 disables it)")
        if self.num_beams < 1:
            raise ValueError(f"GenerationConfig.num_beams={self.num_beams} must be >= 1")


@dataclass
class FillResult:
    spans: list[list[int]]  # generated ids per blank, in order of appearance, <eop> excluded
    tokens: list[int]  # the prompt with each blank replaced by its span
    score: float | None = None  # beam: length-normalised log-probability of the chosen hypothesis
    step_logits: torch.Tensor | None = field(default=None, repr=False)  # (steps, V) raw logits, if output_scores


# --------------------------------------------------------------------------- inputs


def blank_positions(prompt: list[int], special: SpecialTokens = SPECIAL) -> list[int]:
    """Positions of the blank tokens ([MASK], [sMASK], [gMASK]) in a prompt."""
    return [i for i, t in enumerate(prompt) if t in special.mask_ids]


def infill_inputs(prompt: list[int], spans: list[list[int]], special: SpecialTokens = SPECIAL) -> dict[str, torch.Tensor]:
    """Model inputs of Part A = prompt ++ Part B = [sop] + span for the first len(spans) blanks.

    The teacher-forced equivalent of decoding: input i of Part B predicts the span's next token.
    Returns input_ids, position_ids, block_position_ids (1-D) and sep (0-D).
    """
    blanks = blank_positions(prompt, special)
    if len(spans) > len(blanks):
        raise ValueError(f"{len(spans)} spans given for a prompt with {len(blanks)} blanks")
    ids, pos, blk = list(prompt), list(range(len(prompt))), [0] * len(prompt)
    for where, span in zip(blanks, spans):
        part = [special.sop, *span]
        ids += part
        pos += [where] * len(part)
        blk += list(range(1, len(part) + 1))
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return dict(input_ids=as_long(ids), position_ids=as_long(pos), block_position_ids=as_long(blk), sep=as_long(len(prompt)))


def splice(prompt: list[int], spans: list[list[int]], special: SpecialTokens = SPECIAL) -> list[int]:
    """The prompt with its i-th blank replaced by spans[i] (blanks beyond len(spans) stay)."""
    out: list[int] = []
    filled = 0
    for t in prompt:
        if t in special.mask_ids and filled < len(spans):
            out += spans[filled]
            filled += 1
        else:
            out.append(t)
    return out


def _validate(model: GLM, prompts: list[list[int]], cfg: GenerationConfig) -> None:
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, (list, tuple)) for p in prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists, e.g. [[12, 40, 4, 9]]")
    limit, vocab, sp = model.cfg.max_seq_len, model.cfg.vocab_size, special_of(model)
    for i, p in enumerate(prompts):
        if not blank_positions(list(p), sp):
            raise ValueError(
                f"prompt {i} has no blank; put [MASK]/[sMASK] where text is wanted, "
                f"or append [gMASK] (id {sp.gmask}) for free generation"
            )
        if len(p) > limit:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than model.max_seq_len={limit}; shorten it")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} holds ids outside [0, vocab_size={vocab}); check the tokenizer/model pairing")
    if cfg.max_new_tokens + 1 > limit:
        raise ValueError(
            f"max_new_tokens={cfg.max_new_tokens} needs block positions up to {cfg.max_new_tokens + 1}, "
            f"beyond model.max_seq_len={limit}; lower it"
        )


@dataclass
class _Prompts:
    """Left-padded prompts after their single prompt pass."""

    cache: KVCache  # per layer (k, v), each (N, H, L, D)
    sep: torch.Tensor  # (N,) all equal to L
    key_start: torch.Tensor  # (N,) first real token of each row
    blanks: torch.Tensor  # (N, NB) blank positions (relative to the prompt), 0-padded
    n_blanks: torch.Tensor  # (N,)
    special: SpecialTokens  # the model's special ids


def _prompt_pass(model: GLM, prompts: list[list[int]], device: torch.device, repeat: int = 1) -> _Prompts:
    B, L = len(prompts), max(len(p) for p in prompts)
    sp = special_of(model)
    ids = torch.full((B, L), sp.pad, dtype=torch.long)  # (B, L)
    pos = torch.zeros((B, L), dtype=torch.long)  # (B, L)
    blanks = [blank_positions(p, sp) for p in prompts]
    blank_t = torch.zeros((B, max(map(len, blanks))), dtype=torch.long)  # (B, NB)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.tensor(p, dtype=torch.long)
        pos[i, L - len(p) :] = torch.arange(len(p))
        blank_t[i, : len(blanks[i])] = torch.tensor(blanks[i])
    key_start = torch.tensor([L - len(p) for p in prompts], dtype=torch.long)  # (B,)
    sep = torch.full((B,), L, dtype=torch.long)  # (B,)
    ids, pos, key_start, sep = (t.to(device) for t in (ids, pos, key_start, sep))
    _, cache = model.hidden_states(ids, pos, torch.zeros_like(pos), sep, key_start=key_start, use_cache=True)
    rep = lambda t: t.repeat_interleave(repeat, dim=0)  # noqa: E731  (row b -> rows b*repeat .. b*repeat+repeat-1)
    return _Prompts(
        cache=[(rep(k), rep(v)) for k, v in cache],
        sep=rep(sep),
        key_start=rep(key_start),
        blanks=rep(blank_t.to(device)),
        n_blanks=rep(torch.tensor([len(b) for b in blanks], device=device)),
        special=sp,
    )


@dataclass
class _Cursor:
    """Where each hypothesis is in its Part B, and its next input."""

    blank: torch.Tensor  # (N,) index of the blank being filled
    n_gen: torch.Tensor  # (N,) tokens generated in this blank
    token: torch.Tensor  # (N,) next input token
    pos: torch.Tensor  # (N,) its position id (= the blank's position)
    bpos: torch.Tensor  # (N,) its block position id

    @classmethod
    def start(cls, pr: _Prompts) -> "_Cursor":
        zeros = torch.zeros_like(pr.sep)  # (N,)
        return cls(blank=zeros, n_gen=zeros, token=torch.full_like(zeros, pr.special.sop), pos=pr.blanks[:, 0], bpos=zeros + 1)

    def select(self, idx: torch.Tensor) -> "_Cursor":
        return _Cursor(*(t[idx] for t in (self.blank, self.n_gen, self.token, self.pos, self.bpos)))

    def advance(self, chosen: torch.Tensor, active: torch.Tensor, pr: _Prompts) -> None:
        """Feed back `chosen` (N,): <eop> moves to the next blank's <sop>; inactive rows idle on [PAD]."""
        sp = pr.special
        is_eop = chosen == sp.eop  # (N,)
        blank = self.blank + is_eop.long()  # (N,)
        next_pos = pr.blanks.gather(1, blank.clamp(max=pr.blanks.shape[1] - 1)[:, None])[:, 0]  # (N,)
        token = torch.where(is_eop, torch.full_like(chosen, sp.sop), chosen)  # (N,)
        bpos = torch.where(is_eop, torch.ones_like(self.bpos), self.bpos + 1)  # (N,)
        n_gen = torch.where(is_eop, torch.zeros_like(self.n_gen), self.n_gen + 1)  # (N,)
        self.blank = torch.where(active, blank, self.blank)
        self.token = torch.where(active, token, torch.full_like(token, sp.pad))
        self.pos = torch.where(active, next_pos, self.pos)
        self.bpos = torch.where(active, bpos, self.bpos)
        self.n_gen = torch.where(active, n_gen, self.n_gen)


def _step(model: GLM, pr: _Prompts, cur: _Cursor) -> torch.Tensor:
    """One decoding step for every row: logits (N, V) of the next token; grows pr.cache by one."""
    h, pr.cache = model.hidden_states(
        cur.token[:, None],
        cur.pos[:, None],
        cur.bpos[:, None],
        pr.sep,
        past_key_values=pr.cache,
        key_start=pr.key_start,
        use_cache=True,
    )  # (N, 1, C)
    return model.logits(h[:, -1])  # (N, V)


def _force_eop(scores: torch.Tensor, force: torch.Tensor, eop_value: float, eop: int) -> torch.Tensor:
    """Rows in `force` (N,) may only choose <eop> (the blank hit max_new_tokens)."""
    only_eop = torch.full_like(scores, float("-inf"))  # (N, V)
    only_eop[:, eop] = eop_value
    return torch.where(force[:, None], only_eop, scores)  # (N, V)


def banned_ngram_tokens(span: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `span` (the blank's tokens so far)."""
    if n <= 0 or len(span) < n - 1:
        return []
    if n == 1:
        return sorted(set(span))
    prefix = tuple(span[len(span) - n + 1 :])
    return sorted({span[i + n - 1] for i in range(len(span) - n + 1) if tuple(span[i : i + n - 1]) == prefix})


def _constrain(
    scores: torch.Tensor, history: torch.Tensor | list[torch.Tensor], cur: "_Cursor", cfg: GenerationConfig, eop: int
) -> torch.Tensor:
    """Apply min_new_tokens, no_repeat_ngram_size and max_new_tokens to next-token scores (N, V).

    `history` (N, steps), or its columns, holds each row's chosen tokens; the current blank's span
    is its last cur.n_gen entries (a span never holds <eop>, which is what resets n_gen).
    """
    if cfg.min_new_tokens:
        scores = scores.masked_fill((cur.n_gen < cfg.min_new_tokens)[:, None] & _eop_column(scores, eop), float("-inf"))
    if cfg.no_repeat_ngram_size:
        if isinstance(history, list):
            history = torch.stack(history, dim=1) if history else torch.empty((scores.shape[0], 0), dtype=torch.long)
        rows, n = history.tolist(), cfg.no_repeat_ngram_size
        ban = [(r, t) for r, k in enumerate(cur.n_gen.tolist()) if k for t in banned_ngram_tokens(rows[r][len(rows[r]) - k :], n)]
        if ban:
            where = torch.tensor(ban, device=scores.device)  # (nb, 2) (row, token)
            scores = scores.index_put((where[:, 0], where[:, 1]), torch.tensor(float("-inf"), device=scores.device))
    # a row with every token banned (tiny vocabularies) may still end its blank
    stuck = torch.isneginf(scores).all(dim=-1)  # (N,)
    scores = _force_eop(scores, stuck, 0.0, eop)
    return _force_eop(scores, cur.n_gen >= cfg.max_new_tokens, 0.0, eop)


def _eop_column(scores: torch.Tensor, eop: int) -> torch.Tensor:
    col = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)  # (V,)
    col[eop] = True
    return col[None, :]  # (1, V)


# --------------------------------------------------------------------------- choosing tokens


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest nucleus of mass >= top_p."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (N, V)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
        probs = sorted_logits.softmax(dim=-1)  # (N, V)
        mass_before = probs.cumsum(dim=-1) - probs  # (N, V) mass of strictly better tokens
        drop_sorted = mass_before >= top_p  # (N, V) the best token always survives
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # (N, V) back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))  # (N, V)
    return logits


def _choose(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    if cfg.strategy == "greedy":
        return logits.argmax(dim=-1)  # (N,)
    probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(dim=-1)  # (N, V)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (N,)


def _split_spans(chosen: list[int], n_blanks: int, eop: int) -> list[list[int]]:
    """s1 .. sk <eop> t1 .. <eop> ... -> [[s1 .. sk], [t1 ..], ...]."""
    spans: list[list[int]] = [[]]
    for t in chosen:
        if t == eop:
            if len(spans) == n_blanks:
                break
            spans.append([])
        else:
            spans[-1].append(t)
    return spans + [[] for _ in range(n_blanks - len(spans))]


# --------------------------------------------------------------------------- decoding loops


def _max_steps(prompts: list[list[int]], cfg: GenerationConfig, special: SpecialTokens) -> int:
    return max(len(blank_positions(p, special)) for p in prompts) * (cfg.max_new_tokens + 1)


def _sample_or_greedy(model: GLM, prompts: list[list[int]], cfg: GenerationConfig, device: torch.device):
    pr = _prompt_pass(model, prompts, device)
    sp = pr.special
    cur = _Cursor.start(pr)
    generator = None
    if cfg.strategy == "sample":
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed) if cfg.seed is not None else generator.seed()
    active = torch.ones_like(pr.sep, dtype=torch.bool)  # (B,)
    history, raw = [], []
    for _ in range(_max_steps(prompts, cfg, sp)):
        logits = _step(model, pr, cur)  # (B, V)
        if cfg.output_scores:
            raw.append(logits)
        chosen = _choose(_constrain(logits, history, cur, cfg, sp.eop), cfg, generator)  # (B,)
        chosen = torch.where(active, chosen, torch.full_like(chosen, -1))  # (B,) -1: row already done
        history.append(chosen)
        active = active & ~((chosen == sp.eop) & (cur.blank == pr.n_blanks - 1))  # (B,)
        if not bool(active.any()):
            break
        cur.advance(chosen, active, pr)
    chosen_all = torch.stack(history, dim=1).tolist()  # (B, steps)
    step_logits = torch.stack(raw, dim=1) if raw else None  # (B, steps, V)
    out = []
    for i, p in enumerate(prompts):
        row = [t for t in chosen_all[i] if t >= 0]
        spans = _split_spans(row, len(blank_positions(p, sp)), sp.eop)
        logits_i = None if step_logits is None else step_logits[i, : len(row)].cpu()  # (steps_i, V)
        out.append(FillResult(spans=spans, tokens=splice(p, spans, sp), step_logits=logits_i))
    return out


def _beam_search(model: GLM, prompts: list[list[int]], cfg: GenerationConfig, device: torch.device):
    """Beam search over each row's whole Part B (all blanks jointly); a hypothesis finishes at the
    <eop> of its last blank. Stops a row once num_beams hypotheses finished (early stopping), and
    only candidates ranked within the top num_beams may finish, so num_beams=1 is greedy decoding."""
    B, K = len(prompts), cfg.num_beams
    pr = _prompt_pass(model, prompts, device, repeat=K)  # rows b*K .. b*K+K-1 are row b's beams
    sp = pr.special
    cur = _Cursor.start(pr)
    beam_scores = torch.full((B, K), float("-inf"), device=device)  # (B, K)
    beam_scores[:, 0] = 0.0  # the K beams start identical: expand from one
    history = torch.empty((B * K, 0), dtype=torch.long, device=device)  # (B*K, steps)
    pools: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    row_done = [False] * B
    norm = lambda score, length: score / (length**cfg.length_penalty)  # noqa: E731
    for _ in range(_max_steps(prompts, cfg, sp)):
        logp = _step(model, pr, cur).log_softmax(dim=-1)  # (B*K, V)
        logp = _constrain(logp, history, cur, cfg, sp.eop)  # (B*K, V)
        V = logp.shape[-1]
        cand = (beam_scores.reshape(-1, 1) + logp).reshape(B, K * V)  # (B, K*V)
        top_scores, top_idx = cand.topk(2 * K, dim=1)  # (B, 2K)
        top_scores, top_beam, top_tok = top_scores.tolist(), (top_idx // V).tolist(), (top_idx % V).tolist()
        last_blank = (cur.blank == pr.n_blanks - 1).tolist()  # (B*K,)
        next_beam = list(range(B * K))
        next_tok = [sp.pad] * (B * K)
        next_scores = [[float("-inf")] * K for _ in range(B)]
        hist_rows = history.tolist()
        for b in range(B):
            if row_done[b]:
                continue
            slot = 0
            for rank in range(2 * K):
                score, src, tok = top_scores[b][rank], b * K + top_beam[b][rank], top_tok[b][rank]
                if score == float("-inf"):
                    break
                if tok == sp.eop and last_blank[src]:
                    if rank < K:
                        pools[b].append((norm(score, len(hist_rows[src]) + 1), hist_rows[src] + [tok]))
                    continue
                next_beam[b * K + slot], next_tok[b * K + slot], next_scores[b][slot] = src, tok, score
                slot += 1
                if slot == K:
                    break
            row_done[b] = len(pools[b]) >= K
        if all(row_done):
            break
        idx = torch.tensor(next_beam, device=device)  # (B*K,)
        chosen = torch.tensor(next_tok, device=device)  # (B*K,)
        pr.cache = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in pr.cache]
        history = torch.cat([history[idx], chosen[:, None]], dim=1)  # (B*K, steps+1)
        beam_scores = torch.tensor(next_scores, device=device)  # (B, K)
        # finished rows and dead slots (fewer than K live candidates) idle instead of advancing
        active = (beam_scores.reshape(-1) > float("-inf")) & torch.tensor(
            [not row_done[i // K] for i in range(B * K)], device=device
        )  # (B*K,)
        cur = cur.select(idx)
        cur.advance(chosen, active, pr)
    out = []
    hist_rows = history.tolist()
    for b, p in enumerate(prompts):
        pool = pools[b]
        if len(pool) < K:  # out of steps: running hypotheses compete as they are
            scores = beam_scores[b].tolist()
            pool = pool + [
                (norm(s, max(len(hist_rows[b * K + j]), 1)), hist_rows[b * K + j])
                for j, s in enumerate(scores)
                if s != float("-inf")
            ]
        score, chosen_ids = max(pool, key=lambda item: item[0])
        spans = _split_spans(chosen_ids, len(blank_positions(p, sp)), sp.eop)
        out.append(FillResult(spans=spans, tokens=splice(p, spans, sp), score=score))
    return out


def fill_blanks(model: GLM, prompts: list[list[int]], gen_cfg: GenerationConfig | None = None) -> list[FillResult]:
    """Fill every blank of every prompt (token-id lists); one FillResult per prompt, in order."""
    cfg = gen_cfg or GenerationConfig()
    _validate(model, prompts, cfg)
    prompts = [list(p) for p in prompts]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if cfg.strategy == "beam":
                return _beam_search(model, prompts, cfg, device)
            return _sample_or_greedy(model, prompts, cfg, device)
    finally:
        model.train(was_training)
