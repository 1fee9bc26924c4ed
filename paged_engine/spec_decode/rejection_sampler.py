"""Verification of draft tokens: the rejection sampler of Leviathan et al. (arXiv 2211.17192).

A sequence with k drafts d_1..d_k has k + 1 target rows: row j holds the target's logits after
the sequence's tokens and d_1..d_j. Each row goes through the sampler's own pipeline
(`Sampler.process_logits`, `Sampler.sampling_probs`) as if d_1..d_j had been generated already,
so bad words, min_tokens, penalties, temperature, min_p, top-k and top-p see the tokens they
would see without speculation, and p_j is the distribution the plain sampler would draw from.

Then, for j = 1..k in order:
  * greedy rows: accept d_j while it is the argmax of row j-1; at the first mismatch emit that
    argmax instead (the same tokens as without speculation);
  * random rows: accept d_j when u_j < p_{j-1}(d_j) / q_{j-1}(d_j), u_j ~ U[0, 1); at the first
    rejection emit a token drawn from max(p_{j-1} - q_{j-1}, 0) normalised (the "recovered"
    token). q is the draft's distribution: the draft model's, or one-hot at d_j for n-gram
    drafts (then the recovered token is drawn from p with d_j removed).
If all k are accepted, a bonus token is drawn from row k. Each emitted token then has exactly
the distribution the plain sampler would give it, so speculation changes speed, not output law.

Seeded requests draw every random number from generators seeded by (seed, output position, a
stream), so they reproduce alone or in any batch. Logprobs of the emitted tokens are the raw
target logprobs of their rows, as without speculation.
"""

from __future__ import annotations

from typing import Sequence

import torch

from paged_engine.core.batch import SampleLogprobs
from paged_engine.executor.sampler import (SAMPLING_EPS, Sampler, row_uniforms, sample_categorical,
                                           seed_for_position)

# Seed streams of a seeded request besides the sampling noise (salt 0, shared with the plain
# sampler so that a step without drafts draws what it would draw without speculation).
ACCEPT_SEED_SALT = 0x5EC0_0001
DRAFT_SEED_SALT = 0x5EC0_0002


class DraftRow:
    """What the sampler reads of one target row: the sequence with the first j drafts appended."""

    __slots__ = ("params", "prompt_token_ids", "output_token_ids")

    def __init__(self, params, prompt_token_ids, output_token_ids):
        self.params = params
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids = output_token_ids


def draft_rows(state, drafts: Sequence[int], num_rows: int | None = None) -> list[DraftRow]:
    """Rows 0..k of a sequence (state: params, prompt_token_ids, output_token_ids)."""
    out = list(state.output_token_ids)
    n = len(drafts) + 1 if num_rows is None else num_rows
    return [DraftRow(state.params, state.prompt_token_ids, out + list(drafts[:j])) for j in range(n)]


def uniform_draws(num_rows: int, rows: Sequence[DraftRow], device, generator) -> torch.Tensor:
    """U[0, 1) per row; seeded random rows from (seed ^ ACCEPT_SEED_SALT, output position)."""
    row_seeds = [(i, seed_for_position(r.params.seed ^ ACCEPT_SEED_SALT, len(r.output_token_ids)))
                 for i, r in enumerate(rows)
                 if r.params.seed is not None and r.params.temperature >= SAMPLING_EPS]
    return row_uniforms(num_rows, device, generator, row_seeds)


class RejectionSampler:
    """Turns the target logits of drafted sequences into 1..k+1 tokens each.

    Args:
        sampler: the runner's Sampler (its pipeline, generator and vocabulary).
    """

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    @torch.inference_mode()
    def __call__(
        self,
        logits: torch.Tensor,
        states: Sequence,
        drafts: Sequence[Sequence[int]],
        draft_probs: Sequence[torch.Tensor | None] | None = None,
    ) -> tuple[list[list[int]], list[list[SampleLogprobs]]]:
        """Verify the drafts of each sequence.

        Args:
            logits: [sum(len(d) + 1 for d in drafts), vocab] target logits, each sequence's
                k + 1 rows consecutive, in the order of `states`.
            states: per sequence, an object with params, prompt_token_ids, output_token_ids.
            drafts: per sequence, its draft token ids (may be empty: then it samples one token).
            draft_probs: per sequence, None (one-hot q: n-gram drafts, or greedy drafting) or
                the draft's probabilities [len(drafts), vocab] that each draft was sampled from.
        Returns:
            (token ids, their SampleLogprobs) per sequence.
        """
        sampler = self.sampler
        device = logits.device
        rows: list[DraftRow] = []
        draft_token = []  # per row: its draft token (the next row's prefix), -1 on the last row
        for state, d in zip(states, drafts):
            rows.extend(draft_rows(state, d))
            draft_token.extend(list(d) + [-1])
        num_rows = len(rows)
        assert logits.shape[0] == num_rows, (logits.shape, num_rows)
        processed, raw_logprobs = sampler.process_logits(logits, rows)
        greedy = [r.params.temperature < SAMPLING_EPS for r in rows]
        has_draft = [t >= 0 for t in draft_token]
        token = sampler._tensor([max(t, 0) for t in draft_token], torch.int64)
        candidate = processed.argmax(dim=-1)  # greedy rows: the argmax, drafted or not
        accept = candidate == token
        if not all(greedy):
            probs, row_seeds = sampler.sampling_probs(processed, rows, greedy)
            q = self._draft_distribution(probs, token, has_draft, draft_probs, drafts)
            p_tok = probs.gather(1, token.unsqueeze(1)).squeeze(1)
            if q is None:  # one-hot q everywhere: q(d) = 1, residual = p without d
                q_tok = torch.ones_like(p_tok)
                residual = probs.scatter(1, token.unsqueeze(1), 0.0)
            else:
                q_tok = q.gather(1, token.unsqueeze(1)).squeeze(1)
                residual = (probs - q).clamp_(min=0.0)
            u = uniform_draws(num_rows, rows, device, sampler.generator)
            accept_random = u * q_tok < p_tok  # u < p/q without dividing by q
            # A residual with no mass only follows a draft that is always accepted (p <= q
            # everywhere means p == q); fall back to p so that the argmax stays meaningful.
            empty = residual.sum(dim=-1, keepdim=True) <= 0
            residual = torch.where(empty, probs, residual)
            has_draft_t = sampler._tensor(has_draft, torch.bool)
            target = torch.where(has_draft_t.unsqueeze(1), residual, probs)
            sampled = sample_categorical(target, sampler.generator, row_seeds)
            greedy_t = sampler._tensor(greedy, torch.bool)
            candidate = torch.where(greedy_t, candidate, sampled)
            accept = torch.where(greedy_t, accept, accept_random)
        accept_h, candidate_h = accept.tolist(), candidate.tolist()

        # Per sequence: accepted drafts, then the first rejected row's recovered token, or the
        # bonus token of the last row.
        tokens: list[list[int]] = []
        emitted_rows: list[int] = []
        emitted_tokens: list[int] = []
        row = 0
        for d in drafts:
            out = []
            j = 0
            while j < len(d) and accept_h[row + j]:
                out.append(d[j])
                j += 1
            out.append(candidate_h[row + j])
            tokens.append(out)
            emitted_rows.extend(range(row, row + j + 1))
            emitted_tokens.extend(out)
            row += len(d) + 1
        index = sampler._tensor(emitted_rows, torch.int64)
        lp = sampler.logprobs_of(raw_logprobs[index], sampler._tensor(emitted_tokens, torch.int64),
                                 [rows[i].params for i in emitted_rows]).logprobs
        logprobs, start = [], 0
        for out in tokens:
            logprobs.append(lp[start:start + len(out)])
            start += len(out)
        return tokens, logprobs

    def _draft_distribution(self, probs, token, has_draft, draft_probs, drafts):
        """q per row ([rows, vocab]), or None when every draft is one-hot."""
        if not draft_probs or all(q is None for q in draft_probs):
            return None
        q = torch.zeros_like(probs)
        q.scatter_(1, token.unsqueeze(1), 1.0)
        row = 0
        for d, dq in zip(drafts, draft_probs):
            if dq is not None and len(d):
                q[row:row + len(d)] = dq[:len(d)].to(device=probs.device, dtype=probs.dtype)
            row += len(d) + 1
        # The last row of each sequence has no draft: q must not remove mass from its p.
        q[~torch.as_tensor(has_draft, device=probs.device)] = 0.0
        return q
