"""Each sampling op against a plain per-row computation, and the Sampler end to end."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from paged_engine.executor.sampler import (
    Sampler,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    sample_categorical,
    seed_for_position,
)
from paged_engine.sampling_params import SamplingParams

VOCAB = 40
EOS = 1


def _req(params: SamplingParams, prompt=(5, 6, 7), output=()):
    # The engine's private copy, as the runner gets it: all_stop_token_ids holds EOS (unless
    # ignore_eos) beside stop_token_ids.
    return SimpleNamespace(params=params._for_engine(frozenset({EOS})), prompt_token_ids=list(prompt),
                           output_token_ids=list(output))


def _logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2.0


def _sampler(seed: int = 0, vocab: int = VOCAB) -> Sampler:
    return Sampler(vocab, "cpu", seed=seed)


# ------------------------------------------------------------------ the ops, one by one


def _plain_penalties(row, prompt, output, rep, presence, frequency):
    out = list(row)
    for t in range(len(out)):
        if t in prompt or t in output:
            out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
        count = output.count(t)
        out[t] -= frequency * count + presence * (1 if count else 0)
    return out


def test_penalties_match_plain_computation():
    logits = _logits(3)
    prompts = [[2, 3, 3, 9], [], [4]]
    outputs = [[3, 3, 3, 7], [8, 8], []]
    rep, pres, freq = [1.3, 0.7, 2.0], [0.5, -0.4, 1.0], [0.25, 1.5, -0.3]
    prompt_mask = torch.zeros(3, VOCAB, dtype=torch.bool)
    counts = torch.zeros(3, VOCAB, dtype=torch.int32)
    for i in range(3):
        for t in prompts[i]:
            prompt_mask[i, t] = True
        for t in outputs[i]:
            counts[i, t] += 1
    got = apply_penalties(logits.clone(), prompt_mask, counts, torch.tensor(rep), torch.tensor(pres),
                          torch.tensor(freq))
    for i in range(3):
        want = _plain_penalties(logits[i].tolist(), prompts[i], outputs[i], rep[i], pres[i], freq[i])
        assert torch.allclose(got[i], torch.tensor(want), atol=1e-5)


def test_min_p_matches_plain_computation():
    logits = _logits(4)
    min_p = [0.0, 0.05, 0.3, 1.0]
    got = apply_min_p(logits.clone(), torch.tensor(min_p))
    for i in range(4):
        probs = [math.exp(x) for x in logits[i].tolist()]
        top = max(probs)
        for t, p in enumerate(probs):
            assert math.isinf(got[i, t]) == (p < min_p[i] * top), (i, t)


def _plain_top_k_top_p(row: list[float], k: int, p: float) -> set[int]:
    order = sorted(range(len(row)), key=lambda t: -row[t])
    if k > 0:
        kth = row[order[k - 1]]
        order = [t for t in order if row[t] >= kth]
    z = sum(math.exp(row[t]) for t in order)
    kept, cum = [], 0.0
    for t in order:
        if cum < p:
            kept.append(t)
        cum += math.exp(row[t]) / z
    return set(kept)


@pytest.mark.parametrize("k,p", [(5, 1.0), (-1, 0.6), (7, 0.8), (1, 0.3), (VOCAB, 0.95)])
def test_top_k_top_p_match_plain_computation(k, p):
    logits = _logits(6, seed=k * 100 + int(p * 10))
    top_k = torch.tensor([k if k > 0 else VOCAB] * 6) if k > 0 else None
    top_p = torch.tensor([p] * 6) if p < 1.0 else None
    got = apply_top_k_top_p(logits.clone(), top_k, top_p)
    for i in range(6):
        kept = {t for t in range(VOCAB) if math.isfinite(got[i, t])}
        assert kept == _plain_top_k_top_p(logits[i].tolist(), k, p), i
        for t in kept:  # kept logits are unchanged
            assert got[i, t] == logits[i, t]


def test_seed_for_position_depends_on_both():
    seeds = {seed_for_position(s, pos) for s in (0, 1, 2**40) for pos in range(50)}
    assert len(seeds) == 150
    assert seed_for_position(7, 3) == seed_for_position(7, 3)
    assert 0 <= seed_for_position(-5, 0) < 2**63


# ------------------------------------------------------------------ the Sampler end to end


def test_greedy_is_argmax():
    logits = _logits(5)
    out = _sampler()(logits, [_req(SamplingParams(temperature=0.0)) for _ in range(5)])
    assert out.token_ids == logits.argmax(-1).tolist()
    raw = torch.log_softmax(logits, -1)
    for i, lp in enumerate(out.logprobs):  # chosen logprob + rank always, no top-N unless asked
        assert lp.rank == 1 and lp.top == [] and lp.logprob == pytest.approx(raw[i].max().item(), abs=1e-6)


def test_greedy_applies_penalties():
    logits = _logits(2)
    reqs = [
        _req(SamplingParams(temperature=0.0, repetition_penalty=1.8, frequency_penalty=0.7,
                            presence_penalty=0.4), prompt=[int(logits[0].argmax())], output=[3, 3]),
        _req(SamplingParams(temperature=0.0)),
    ]
    out = _sampler()(logits, reqs)
    want0 = _plain_penalties(logits[0].tolist(), reqs[0].prompt_token_ids, [3, 3], 1.8, 0.4, 0.7)
    assert out.token_ids == [max(range(VOCAB), key=lambda t: want0[t]), int(logits[1].argmax())]


def _frequencies(tokens: list[int], vocab: int) -> list[float]:
    return [tokens.count(t) / len(tokens) for t in range(vocab)]


def test_sample_categorical_draws_in_proportion_to_unnormalised_weights():
    # Zero weights first, last and between (the inverse CDF's plateaus), a tiny weight, and rows
    # that do not sum to 1 (the rejection sampler's residuals).
    weights = torch.tensor([[0.0, 3.0, 0.0, 1.0, 1e-3, 6.0, 0.0],
                            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25]])
    rows = 20000
    batch = weights.repeat(rows, 1)
    drawn = sample_categorical(batch, torch.Generator().manual_seed(5))
    assert drawn.shape == (2 * rows,)
    second = drawn[1::2].tolist()
    assert set(second) == {6}
    first = drawn[0::2].tolist()
    want = (weights[0] / weights[0].sum()).tolist()
    assert {t for t in first if want[t] == 0} == set()
    for t, (f, p) in enumerate(zip(_frequencies(first, 7), want)):
        assert abs(f - p) < 4 * math.sqrt(p * (1 - p) / rows) + 1e-3, (t, f, p)


def test_sample_categorical_seeded_rows_ignore_the_shared_generator():
    weights = torch.softmax(_logits(4, vocab=50, seed=2) * 0.2, -1)
    picks = {sample_categorical(weights, torch.Generator().manual_seed(g), [(2, 999)])[2].item()
             for g in range(20)}
    assert len(picks) == 1
    unseeded = {sample_categorical(weights, torch.Generator().manual_seed(g))[2].item() for g in range(20)}
    assert len(unseeded) > 1


def test_temperature_sampling_follows_the_distribution():
    vocab, rows = 6, 6000
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -3.0])
    params = SamplingParams(temperature=0.7)
    out = _sampler(vocab=vocab)(row.expand(rows, vocab).clone(), [_req(params)] * rows)
    want = torch.softmax(row / 0.7, -1).tolist()
    for t, (f, p) in enumerate(zip(_frequencies(out.token_ids, vocab), want)):
        assert abs(f - p) < 4 * math.sqrt(p * (1 - p) / rows) + 1e-3, (t, f, p)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.7),
        SamplingParams(temperature=1.0, min_p=0.2),
        SamplingParams(temperature=0.8, top_k=4, top_p=0.9, min_p=0.05),
    ],
    ids=["top_k", "top_p", "min_p", "all"],
)
def test_filtered_sampling_follows_the_renormalised_distribution(params):
    vocab, rows = 8, 4000
    row = torch.tensor([1.2, 0.9, 0.5, 0.1, -0.2, -0.5, 1.0, -1.0])
    out = _sampler(vocab=vocab)(row.expand(rows, vocab).clone(), [_req(params)] * rows)
    # plain computation: temperature -> min_p -> top_k -> top_p -> renormalise
    scaled = (row / params.temperature).tolist()
    probs = [math.exp(x) for x in scaled]
    allowed = {t for t in range(vocab) if probs[t] >= params.min_p * max(probs)}
    masked = [x if t in allowed else -math.inf for t, x in enumerate(scaled)]
    allowed &= _plain_top_k_top_p(masked, params.top_k, params.top_p)
    z = sum(probs[t] for t in allowed)
    freqs = _frequencies(out.token_ids, vocab)
    assert {t for t in range(vocab) if freqs[t] > 0} <= allowed
    for t in allowed:
        p = probs[t] / z
        assert abs(freqs[t] - p) < 4 * math.sqrt(p * (1 - p) / rows) + 1e-3, (t, freqs[t], p)


def test_seeded_request_is_reproducible_alone_and_in_a_batch():
    logits = _logits(7, seed=3) * 0.3  # flat-ish: many tokens are likely
    seeded = SamplingParams(temperature=1.0, seed=1234, top_p=0.95)
    alone = [
        _sampler(seed=s)(logits[3:4], [_req(seeded, output=[0] * pos)]).token_ids[0]
        for s, pos in [(0, 0), (1, 1), (2, 2), (3, 3)]
    ]
    for sampler_seed in (0, 99):
        others = [_req(SamplingParams(temperature=1.0, top_k=5)) for _ in range(7)]
        for pos in range(4):
            reqs = list(others)
            reqs[3] = _req(seeded, output=[0] * pos)
            reqs[5] = _req(SamplingParams(temperature=0.5, seed=77), output=[0] * pos)
            got = _sampler(seed=sampler_seed)(logits, reqs).token_ids[3]
            assert got == alone[pos], (sampler_seed, pos)
    # the randomness depends on the position: over many positions the tokens vary
    tokens = {_sampler()(logits[3:4], [_req(seeded, output=[0] * pos)]).token_ids[0] for pos in range(30)}
    assert len(tokens) > 3


def test_min_tokens_masks_eos_and_stop_token_ids():
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0
    logits[0, 9] = 9.0
    logits[0, 4] = 8.0
    sampler = _sampler()
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9])
    assert sampler(logits, [_req(p, output=[2, 2])]).token_ids == [4]
    assert sampler(logits, [_req(p, output=[2, 2, 2])]).token_ids == [EOS]
    p_ignore = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9], ignore_eos=True)
    assert sampler(logits, [_req(p_ignore, output=[])]).token_ids == [EOS]
    # random sampling never picks a masked token either
    p_random = SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=[9])
    out = sampler(logits.expand(200, VOCAB).clone(), [_req(p_random, output=[5])] * 200)
    assert EOS not in out.token_ids and 9 not in out.token_ids


def test_logprobs_are_raw_log_softmax_with_rank_and_top_n():
    logits = _logits(3, seed=5)
    raw = torch.log_softmax(logits, -1)
    reqs = [
        _req(SamplingParams(temperature=0.0, logprobs=4, repetition_penalty=2.0, presence_penalty=1.0),
             prompt=[int(logits[0].argmax())], output=[int(logits[0].argmax())]),
        _req(SamplingParams(temperature=0.0)),
        _req(SamplingParams(temperature=0.5, logprobs=0, seed=3)),
    ]
    out = _sampler()(logits, reqs)
    assert out.logprobs[1].top == []
    for i in (0, 1, 2):
        lp = out.logprobs[i]
        token = out.token_ids[i]
        assert lp.logprob == pytest.approx(raw[i, token].item(), abs=1e-5)
        assert lp.rank == 1 + sum(1 for x in raw[i].tolist() if x > raw[i, token].item())
    top = out.logprobs[0].top
    want = sorted(range(VOCAB), key=lambda t: -raw[0, t].item())[:4]
    assert [t for t, _ in top] == want
    assert [v for _, v in top] == pytest.approx([raw[0, t].item() for t in want], abs=1e-5)
    assert out.logprobs[2].top == []
    # the penalty moved the greedy choice off the raw argmax: rank > 1, logprob still raw
    assert out.token_ids[0] != int(logits[0].argmax()) and out.logprobs[0].rank > 1


def test_logit_bias_shifts_the_logits_and_not_the_logprobs():
    logits = _logits(3, seed=11)
    raw = torch.log_softmax(logits, -1)
    low = int(logits[0].argmin())
    reqs = [
        _req(SamplingParams(temperature=0.0, logit_bias={low: 100.0})),
        _req(SamplingParams(temperature=0.0, logit_bias={str(int(logits[1].argmax())): -100})),
        _req(SamplingParams(temperature=0.0)),
    ]
    out = _sampler()(logits, reqs)
    second = sorted(range(VOCAB), key=lambda t: -logits[1, t].item())[1]
    assert out.token_ids == [low, second, int(logits[2].argmax())]
    assert out.logprobs[0].logprob == pytest.approx(raw[0, low].item(), abs=1e-5)
    # sampled rows: a +100 bias makes the token certain
    target = int(logits[2].argmin())
    p = SamplingParams(temperature=1.0, logit_bias={target: 100.0})
    many = _sampler(seed=3)(logits[2:3].expand(50, VOCAB).clone(), [_req(p)] * 50)
    assert many.token_ids == [target] * 50


def test_logit_bias_validation():
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert SamplingParams(logit_bias='{"3": 1.5, "3 ": 0.5}').logit_bias == {3: 2.0}
    for bad in ({"-1": 1.0}, {"x": 1.0}, {"3": float("nan")}, {"3": float("inf")}, [1, 2]):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)
