"""Batched token sampling on the device.

One call samples one token for each row of a logits batch, each row with its own SamplingParams:

  raw logprobs (log_softmax of the model's logits, vLLM's default): the sampled token's
      logprob and rank for every row, the top-N where params.logprobs = N
  -> banned tokens, one masked write for the batch: EOS and stop_token_ids while fewer than
     min_tokens tokens were generated; bad words (vLLM v1 `apply_bad_words`: a one-token bad
     word always, the last token of a longer one when the generated tokens end with the rest)
  -> logit_bias: one indexed add for the batch
  -> penalties: repetition over prompt+output, presence/frequency over output (vLLM semantics)
  -> greedy rows: argmax;  random rows: / temperature -> min_p -> top_k -> top_p -> sample

Sampling draws one uniform per row against the row's cumulative probabilities (inverse CDF, a
few device ops for the batch). A request with a seed gets its uniform from a generator seeded
by (seed, number of tokens generated so far) only, so it samples the same tokens alone or in any
batch. Branches are chosen from the host-side parameters, and nothing is copied back to the host
but the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from paged_engine.core.batch import SampleLogprobs

SAMPLING_EPS = 1e-5  # temperature below this is greedy (vLLM)
_MASK64 = (1 << 64) - 1


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[SampleLogprobs]  # every row; `top` is empty unless params.logprobs >= 1


def seed_for_position(seed: int, position: int) -> int:
    """A 63-bit generator seed from (request seed, output position): splitmix64 of both."""

    def mix(x: int) -> int:
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        return x ^ (x >> 31)

    return mix(mix(seed & _MASK64) ^ position) & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------
# The ops, each on a [num_rows, vocab] float32 logits tensor (also used by the tests one by one).


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
    repetition_penalties: torch.Tensor,
    presence_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
) -> torch.Tensor:
    """vLLM penalties, in place.

    Args:
        prompt_mask: bool [rows, vocab], token occurs in the prompt.
        output_counts: int [rows, vocab], occurrences in the generated tokens.
        repetition_penalties, presence_penalties, frequency_penalties: float [rows].
    A token seen in prompt or output has its logit divided by the repetition penalty when positive,
    multiplied when not; then logit -= frequency * count + presence * (count > 0).
    """
    output_mask = output_counts > 0
    seen = prompt_mask | output_mask
    rep = repetition_penalties.unsqueeze(1).expand_as(logits)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits.copy_(torch.where(seen, penalized, logits))
    logits -= frequency_penalties.unsqueeze(1) * output_counts.to(logits.dtype)
    logits -= presence_penalties.unsqueeze(1) * output_mask.to(logits.dtype)
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p [rows] times the row's top probability."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill_(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Keep each row's top_k largest logits (ties at the k-th kept), then the smallest set of the
    best tokens whose probability (renormalised after top-k) reaches top_p. Returns new logits.

    Args:
        top_k: int64 [rows], vocab size for "no limit"; or None.
        top_p: float [rows], 1.0 for "no limit"; or None.
    """
    if top_k is None and top_p is None:
        return logits
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k.clamp(1, vocab)).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # ascending order: drop a token if all tokens up to it sum to at most 1 - p; keep the best
        drop = cum <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def row_uniforms(
    num_rows: int,
    device,
    generator: torch.Generator | None,
    row_seeds: Sequence[tuple[int, int]] = (),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """U[0, 1) [num_rows] from ``generator``; rows in row_seeds (row, generator seed) draw theirs
    from a generator of that seed instead, so they do not depend on the batch."""
    u = torch.rand(num_rows, dtype=dtype, device=device, generator=generator)
    for row, row_seed in row_seeds:
        row_gen = torch.Generator(device=device).manual_seed(row_seed)
        u[row] = torch.rand(1, dtype=dtype, device=device, generator=row_gen)[0]
    return u


def sample_categorical(
    weights: torch.Tensor,
    generator: torch.Generator | None,
    row_seeds: Sequence[tuple[int, int]] = (),
) -> torch.Tensor:
    """One index per row of ``weights`` [rows, vocab] (non-negative, need not sum to 1), drawn
    with probability proportional to the weights; rows in row_seeds (row, generator seed) take
    their uniform from their own seed.

    Inverse CDF: one uniform per row against the running sum of the row. The exponential race
    (argmax of weights / Exp(1)) needs a [rows, vocab] draw per step: on CPU that draw was 11% of
    a 32-sequence decode step; for 32 x 49152 here it took 33 ms against 2.5 ms for this. The
    sum is in float64 so that rounding moves at most ~vocab * 2^-53 (5e-12 for 49152 tokens) of
    mass between neighbouring tokens.
    """
    rows, width = weights.shape
    cdf = weights.cumsum(dim=-1, dtype=torch.float64)
    u = row_uniforms(rows, weights.device, generator, row_seeds, torch.float64).unsqueeze(1)
    total = cdf[:, -1:]
    # x < total strictly, so the first cdf entry above x is a token of positive weight.
    x = torch.minimum(u * total, total * (1.0 - 2.0**-52))
    return torch.searchsorted(cdf, x, right=True).squeeze(1).clamp_(max=width - 1)


def bad_words_banned_ids(
    bad_words_token_ids: Sequence[Sequence[int]], output_token_ids: Sequence[int]
) -> list[int]:
    """Token ids that would complete a bad word if sampled next (vLLM v1 `apply_bad_words`).

    Args:
        bad_words_token_ids: the tokenized bad words (params.bad_words_token_ids).
        output_token_ids: the tokens generated so far (the prompt does not count, as in vLLM).
    Returns:
        The last token of every bad word whose other tokens end output_token_ids (all of them
        for one-token words), in bad-word order, possibly repeated.
    """
    banned = []
    num_output = len(output_token_ids)
    for word in bad_words_token_ids:
        prefix_len = len(word) - 1
        if prefix_len == 0:
            banned.append(word[0])
        elif (
            prefix_len <= num_output
            and output_token_ids[-1] == word[-2]  # cheap reject before slicing
            and tuple(output_token_ids[num_output - prefix_len:]) == tuple(word[:-1])
        ):
            banned.append(word[-1])
    return banned


# ---------------------------------------------------------------------------------------------


class Sampler:
    """Samples one token per row; see the module docstring for the order of operations.

    Args:
        vocab_size: logits width.
        device: device of the logits.
        seed: seed of the generator used by requests without their own seed.
    The stop tokens masked during min_tokens come with each row's params
    (`all_stop_token_ids`: stop_token_ids plus the model's EOS ids unless ignore_eos).
    """

    def __init__(self, vocab_size: int, device, seed: int = 0):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._pin = self.device.type == "cuda"

    def _tensor(self, data, dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype, pin_memory=self._pin)
        return t.to(self.device, non_blocking=True)

    def _padded(self, rows: list[list[int]], pad: int) -> torch.Tensor:
        width = max(1, max(len(r) for r in rows))
        return self._tensor([r + [pad] * (width - len(r)) for r in rows], torch.int64)

    def _token_counts(self, rows: list[list[int]]) -> torch.Tensor:
        """int [len(rows), vocab]: occurrences of each token id in each row (ids >= vocab ignored)."""
        ids = self._padded(rows, self.vocab_size)
        ids = ids.clamp_(max=self.vocab_size)
        counts = torch.zeros(len(rows), self.vocab_size + 1, dtype=torch.int32, device=self.device)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))
        return counts[:, : self.vocab_size]

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: Sequence) -> SamplerOutput:
        """Sample one token per row.

        Args:
            logits: [len(requests), vocab] raw model logits (any float dtype).
            requests: per row, an object with `params` (SamplingParams), `prompt_token_ids`
                and `output_token_ids` (the runner's SequenceState).
        """
        num_rows = len(requests)
        if num_rows == 0:
            return SamplerOutput([], [])
        logits, raw_logprobs = self.process_logits(logits, requests)
        params = [r.params for r in requests]
        greedy = [p.temperature < SAMPLING_EPS for p in params]
        token_ids = logits.argmax(dim=-1)
        if not all(greedy):
            sampled = self._sample_random(logits, requests, greedy)
            if any(greedy):
                token_ids = torch.where(self._tensor(greedy, torch.bool), token_ids, sampled)
            else:
                token_ids = sampled
        return self.logprobs_of(raw_logprobs, token_ids, params)

    def process_logits(self, logits: torch.Tensor, requests: Sequence
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stages every row goes through before greedy or random selection.

        Returns (logits, raw_logprobs): a float32 copy of the logits with banned tokens masked
        and penalties applied (greedy rows take its argmax), and the raw logprobs (log_softmax
        before any processing: what the engine reports, vLLM's default). Speculative
        verification goes through the same stages (spec_decode/rejection_sampler.py).
        """
        logits = logits.to(torch.float32, copy=True)  # the ops below work in place
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        self.mask_banned_tokens(logits, requests)
        self.add_logit_bias(logits, requests)
        self._apply_penalties(logits, requests)
        return logits, raw_logprobs

    def logprobs_of(self, raw_logprobs: torch.Tensor, token_ids: torch.Tensor,
                    params: Sequence) -> SamplerOutput:
        """The chosen tokens with their raw logprob and rank, and the top-N where asked.

        Every row gets its token's logprob and rank (the engine sums them into
        cumulative_logprob); the top-N alternatives only where params.logprobs asks for them.
        """
        chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1))
        ranks = (raw_logprobs >= chosen).sum(dim=-1)  # 1-based: the chosen token counts itself (vLLM)
        max_n = min(max((p.logprobs or 0) for p in params), self.vocab_size)
        top_vals = top_ids = None
        if max_n > 0:
            top_vals, top_ids = raw_logprobs.topk(max_n, dim=-1)
        ids_host = token_ids.tolist()  # the one device->host sync of the step; the rest is ready
        chosen_host, ranks_host = chosen.squeeze(1).tolist(), ranks.tolist()
        top_vals_h = top_vals.tolist() if top_vals is not None else None
        top_ids_h = top_ids.tolist() if top_ids is not None else None
        if max_n == 0:  # the common batch: no row asked for alternatives
            logprob_out = [SampleLogprobs(c, r, []) for c, r in zip(chosen_host, ranks_host)]
        else:
            logprob_out = []
            for i, p in enumerate(params):
                n = p.logprobs or 0
                top = list(zip(top_ids_h[i][:n], top_vals_h[i][:n])) if n > 0 else []
                logprob_out.append(SampleLogprobs(chosen_host[i], ranks_host[i], top))
        return SamplerOutput(ids_host, logprob_out)

    @torch.inference_mode()
    def token_logprobs(self, logits: torch.Tensor, token_ids: Sequence[int], num_top: int,
                       max_rows: int = 512) -> list[SampleLogprobs]:
        """Raw logprob and rank of given tokens (prompt logprobs), with the top `num_top`.

        Rows are processed `max_rows` at a time, so a long prompt chunk never materialises
        [tokens, vocab] float32 logprobs at once.
        """
        out: list[SampleLogprobs] = []
        num_top = min(num_top, self.vocab_size)
        for start in range(0, len(token_ids), max_rows):
            rows = torch.log_softmax(logits[start:start + max_rows].to(torch.float32), dim=-1)
            ids = self._tensor(list(token_ids[start:start + max_rows]), torch.int64)
            chosen = rows.gather(1, ids.unsqueeze(1))
            ranks = (rows >= chosen).sum(dim=-1)
            chosen_h, ranks_h = chosen.squeeze(1).tolist(), ranks.tolist()
            if num_top > 0:
                top_vals, top_ids = rows.topk(num_top, dim=-1)
                tops = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), top_vals.tolist())]
            else:
                tops = [[] for _ in chosen_h]
            out.extend(SampleLogprobs(c, r, t) for c, r, t in zip(chosen_h, ranks_h, tops))
        return out

    def mask_banned_tokens(self, logits: torch.Tensor, requests: Sequence) -> None:
        """Set to -inf, in place, the logits of tokens a row may not sample this step.

        That is the stop tokens (EOS unless ignore_eos, stop_token_ids) while fewer than
        min_tokens tokens were generated, and the tokens that would complete a bad word. The
        (row, token) pairs are found on the host, where the token ids already are, and written
        with one indexed store: no device->host sync, one small non-blocking upload.
        """
        rows, cols = [], []
        for i, r in enumerate(requests):
            p = r.params
            in_min_tokens = len(r.output_token_ids) < (p.min_tokens or 0)
            bad_words = getattr(p, "bad_words_token_ids", ())
            if not in_min_tokens and not bad_words:
                continue  # the common decode row: nothing to mask
            banned: set[int] = set()
            if in_min_tokens:
                # all_stop_token_ids: the engine's stop set (stop_token_ids + EOS unless ignore_eos)
                banned.update(p.all_stop_token_ids)
            if bad_words:
                banned.update(bad_words_banned_ids(bad_words, r.output_token_ids))
            for t in banned:
                if 0 <= t < self.vocab_size:
                    rows.append(i)
                    cols.append(t)
        if rows:
            logits[self._tensor(rows, torch.int64), self._tensor(cols, torch.int64)] = float("-inf")

    def add_logit_bias(self, logits: torch.Tensor, requests: Sequence) -> None:
        """Add each row's params.logit_bias to its logits, in place (one indexed add)."""
        rows, cols, values = [], [], []
        for i, r in enumerate(requests):
            bias = getattr(r.params, "logit_bias", None)
            if not bias:
                continue
            for token_id, value in bias.items():
                if 0 <= token_id < self.vocab_size:
                    rows.append(i)
                    cols.append(token_id)
                    values.append(value)
        if rows:
            logits.index_put_((self._tensor(rows, torch.int64), self._tensor(cols, torch.int64)),
                              self._tensor(values, torch.float32), accumulate=True)

    def _apply_penalties(self, logits: torch.Tensor, requests: Sequence) -> None:
        rows = [
            i
            for i, r in enumerate(requests)
            if r.params.repetition_penalty != 1.0
            or r.params.presence_penalty != 0.0
            or r.params.frequency_penalty != 0.0
        ]
        if not rows:
            return
        sub = [requests[i] for i in rows]
        outputs = [list(r.output_token_ids) for r in sub]
        prompt_mask = self._token_counts([list(r.prompt_token_ids) for r in sub]) > 0
        output_counts = self._token_counts(outputs)
        rows_t = self._tensor(rows, torch.int64)
        penalized = apply_penalties(
            logits[rows_t],
            prompt_mask,
            output_counts,
            self._tensor([r.params.repetition_penalty for r in sub], torch.float32),
            self._tensor([r.params.presence_penalty for r in sub], torch.float32),
            self._tensor([r.params.frequency_penalty for r in sub], torch.float32),
        )
        logits[rows_t] = penalized

    def _sample_random(self, logits: torch.Tensor, requests: Sequence, greedy: list[bool]):
        probs, row_seeds = self.sampling_probs(logits, requests, greedy)
        return sample_categorical(probs, self.generator, row_seeds)

    def sampling_probs(self, logits: torch.Tensor, requests: Sequence, greedy: list[bool],
                       seed_salt: int = 0) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The distribution random rows sample from: / temperature -> min_p -> top_k -> top_p ->
        softmax, on the output of `process_logits`.

        Returns (probs [rows, vocab], row_seeds): row_seeds lists (row, generator seed) of the
        seeded random rows, from (params.seed, tokens generated so far) mixed with `seed_salt`
        (0 for sampling; speculative verification draws its other random streams with others).
        """
        params = [r.params for r in requests]
        # One pass over the rows decides every optional stage (most batches need none of them).
        temps = []
        use_min_p = use_top_k = use_top_p = False
        row_seeds = []  # (row, generator seed) of seeded sampling rows
        for i, (p, r, g) in enumerate(zip(params, requests, greedy)):
            temps.append(1.0 if g else p.temperature)  # greedy rows ride along; result discarded
            use_min_p = use_min_p or p.min_p > 0.0
            use_top_k = use_top_k or (p.top_k is not None and 0 < p.top_k < self.vocab_size)
            use_top_p = use_top_p or p.top_p < 1.0
            if p.seed is not None and not g:
                seed = p.seed if not seed_salt else p.seed ^ seed_salt
                row_seeds.append((i, seed_for_position(seed, len(r.output_token_ids))))
        logits = logits / self._tensor(temps, torch.float32).unsqueeze(1)
        if use_min_p:
            apply_min_p(logits, self._tensor([p.min_p for p in params], torch.float32))
        top_k = top_p = None
        if use_top_k:
            top_k = self._tensor(
                [p.top_k if p.top_k is not None and p.top_k > 0 else self.vocab_size for p in params],
                torch.int64,
            )
        if use_top_p:
            top_p = self._tensor([p.top_p for p in params], torch.float32)
        logits = apply_top_k_top_p(logits, top_k, top_p)
        return torch.softmax(logits, dim=-1), row_seeds
