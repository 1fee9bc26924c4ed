"""Speculative decoding is lossless: greedy outputs and logprobs equal the engine without it.

References are independent of the code under test: the same engine without speculation (and
transformers greedy generate), a brute-force n-gram search, and exact distributions computed with
plain torch / transformers for the statistical tests. Proposers: n-gram, a draft model identical
to the target, a different draft model, and an "oracle" that proposes the true continuation with
planted wrong tokens (EOS, bad words, random ids), so that long runs get accepted and every stop
can land inside an accepted run. The engine runs with a tiny KV cache and token budget, so
prompts are prefilled in chunks and sequences are preempted while speculating.
"""

from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest
import torch

from paged_engine import EngineConfig, LLMEngine, SamplingParams
from paged_engine.spec_decode.ngram_proposer import NgramProposer, ngram_propose

from engine_core_helpers import run_to_completion

K = 4
STRESS = dict(device="cpu", block_size=4, num_kv_blocks=40, max_num_batched_tokens=24,
              max_model_len=256)


def _ngram(k=K, lo=1, hi=3, **extra):
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": lo,
            "prompt_lookup_max": hi, "adaptive": False, **extra}


def _draft(model_dir, k=3, **extra):
    return {"method": "draft_model", "model": model_dir, "num_speculative_tokens": k,
            "adaptive": False, **extra}


@pytest.fixture(scope="module")
def draft_dir(make_model):
    """Same architecture and tokenizer as the target, other random weights."""
    return make_model("llama", "byte_level", seed=1)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("spec, message", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "method must be one of"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be in [1, 16], got 0"),
    ({"method": "ngram", "num_speculative_tokens": 17}, "num_speculative_tokens must be in [1, 16], got 17"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown speculative_config key(s): lookahead"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_max (2) must be >= prompt_lookup_min (4)"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, "prompt_lookup_min must be >= 1"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model"),
    ({"method": "draft_model", "model": "/nonexistent", "num_speculative_tokens": 2}, "no config.json"),
    ({"method": "ngram", "num_speculative_tokens": "x"}, "num_speculative_tokens must be an integer"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}, "disable_by_batch_size"),
    ("{not json", "speculative_config is not valid JSON"),
    ([1, 2], "speculative_config must be a dict"),
])
def test_bad_config_is_a_load_error_naming_it(tiny_model_dir, spec, message):
    with pytest.raises(ValueError) as e:
        EngineConfig(model=tiny_model_dir, device="cpu", speculative_config=spec)
    assert message in str(e.value)


def test_draft_with_another_vocabulary_is_rejected(tiny_model_dir, make_model, tmp_path):
    other = make_model("llama", "sentencepiece")  # another tokenizer (and vocabulary size)
    with pytest.raises(ValueError, match="draft's vocabulary differs"):
        EngineConfig(model=tiny_model_dir, device="cpu", speculative_config=_draft(other))
    # Same vocab_size, other token -> id table: caught from the tokenizer files.
    target_vocab = json.loads(open(f"{tiny_model_dir}/config.json").read())["vocab_size"]
    same_size = tmp_path / "same-size"
    shutil.copytree(other, same_size)
    cfg = json.loads((same_size / "config.json").read_text())
    cfg["vocab_size"] = target_vocab
    (same_size / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tokenizer maps tokens to other ids"):
        EngineConfig(model=tiny_model_dir, device="cpu", speculative_config=_draft(str(same_size)))


def test_config_from_json_string_and_dict(tiny_model_dir, draft_dir):
    cfg = EngineConfig.from_dict({"model": tiny_model_dir, "device": "cpu",
                                  "speculative_config": '{"method": "ngram", "num_speculative_tokens": "3"}'})
    spec = cfg.speculative_config
    assert (spec.method, spec.num_speculative_tokens) == ("ngram", 3)
    assert (spec.prompt_lookup_min, spec.prompt_lookup_max) == (5, 5)  # vLLM's default
    assert cfg.to_dict()["speculative_config"]["num_speculative_tokens"] == 3
    spec = EngineConfig(model=tiny_model_dir, device="cpu", speculative_config={
        "model": draft_dir, "num_speculative_tokens": 2}).speculative_config
    assert spec.method == "draft_model"  # inferred from the model key, as vLLM
    only_max = EngineConfig(model=tiny_model_dir, device="cpu", speculative_config={
        "method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}).speculative_config
    assert (only_max.prompt_lookup_min, only_max.prompt_lookup_max) == (3, 3)


# --------------------------------------------------------------------------- n-gram


def _ngram_reference(tokens, lo, hi, k):
    """Brute force: longest n in [lo, hi] whose suffix occurs earlier, most recent occurrence."""
    length = len(tokens)
    for n in range(hi, lo - 1, -1):
        if n >= length:
            continue
        suffix = tokens[length - n:]
        for end in range(length - 2, n - 2, -1):  # an occurrence ending at `end` < length - 1
            if tokens[end - n + 1:end + 1] == suffix:
                return tokens[end + 1:end + 1 + k]
    return []


def test_ngram_matches_brute_force():
    rng = random.Random(0)
    for trial in range(3000):
        vocab = rng.choice([2, 3, 5, 20])
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        lo = rng.randrange(1, 4)
        hi = lo + rng.randrange(0, 4)
        k = rng.randrange(1, 6)
        got = ngram_propose(np.array(tokens, dtype=np.int64), lo, hi, k)
        assert got == _ngram_reference(tokens, lo, hi, k), (tokens, lo, hi, k)
    assert ngram_propose(np.array([1, 2, 3, 9, 1, 2, 3]), 2, 3, 2) == [9, 1]


def test_ngram_proposer_follows_a_growing_sequence():
    class Seq:
        def __init__(self, seq_id, tokens):
            self.seq_id, self.tokens = seq_id, tokens

        num_tokens = property(lambda self: len(self.tokens))

        def token_slice(self, a, b):
            return self.tokens[a:b]

    from paged_engine.core.batch import ScheduledSequence, SchedulerOutput
    from paged_engine.spec_decode.config import SpeculativeConfig

    proposer = NgramProposer(SpeculativeConfig(method="ngram", num_speculative_tokens=3,
                                               prompt_lookup_min=1, prompt_lookup_max=2))
    seq = Seq(7, [5, 6, 7, 8, 5, 6])
    batch = SchedulerOutput([ScheduledSequence(7, 5, 1, True, num_lookahead_tokens=3)], 4, [])
    proposer.propose(batch, {7: seq})
    assert batch.seqs[0].draft_token_ids == [7, 8, 5]
    seq.tokens += [7, 1]
    batch = SchedulerOutput([ScheduledSequence(7, 7, 1, True, num_lookahead_tokens=2)], 3, [])
    proposer.propose(batch, {7: seq})
    assert batch.seqs[0].draft_token_ids == []  # "7 1" / "1" never occurred before
    seq.tokens += [5, 6]
    batch = SchedulerOutput([ScheduledSequence(7, 9, 1, True, num_lookahead_tokens=2)], 3, [])
    proposer.propose(batch, {7: seq})
    assert batch.seqs[0].draft_token_ids == [7, 1]  # the most recent "5 6"


# --------------------------------------------------------------------------- oracle proposer


class OracleProposer:
    """Proposes the reference continuation (the non-speculative engine's output for the same
    prompt and params) with wrong tokens planted at random positions."""

    def __init__(self, references: dict, wrong_tokens: list[int], vocab_size: int, seed=0):
        self.references = references  # request id -> reference output ids
        self.wrong_tokens = wrong_tokens
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)
        self.num_proposed = 0

    def propose(self, batch, seqs_by_id):
        for s in batch.seqs:
            seq = seqs_by_id.get(s.seq_id)
            if not s.num_lookahead_tokens or seq is None:
                continue
            ref = self.references.get(seq.request.request_id)
            out = seq.output_token_ids
            if ref is None or list(ref[:len(out)]) != list(out):
                continue
            drafts = list(ref[len(out):len(out) + s.num_lookahead_tokens])
            while len(drafts) < s.num_lookahead_tokens:  # past the reference's end
                drafts.append(self.rng.randrange(self.vocab_size))
            if self.rng.random() < 0.5:
                j = self.rng.randrange(len(drafts))
                drafts[j] = self.rng.choice(self.wrong_tokens + [self.rng.randrange(self.vocab_size)])
            s.draft_token_ids = drafts
            self.num_proposed += len(drafts)
        return None


# --------------------------------------------------------------------------- greedy parity


def _requests(tokenizer, vocab_size, base_outputs=None):
    """(request id, prompt ids, params): the mix every proposer runs."""
    rng = random.Random(1)
    rep = tokenizer.encode("Hello world! Hello world! Hello world! Hello world!")
    prompts = [rep, [rng.randrange(3, vocab_size) for _ in range(37)],
               [rng.randrange(3, vocab_size) for _ in range(9)], rep[:11] + rep[:11],
               [rng.randrange(3, vocab_size) for _ in range(3)]]
    reqs = []
    for i, prompt in enumerate(prompts):
        reqs.append((f"g{i}", prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)))
        reqs.append((f"lp{i}", prompt, SamplingParams(max_tokens=17, temperature=0, ignore_eos=True,
                                                      logprobs=3)))
    # The same prompt again (prefix-cache hits), n > 1, penalties and bad words through drafts.
    reqs.append(("again", prompts[1], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)))
    reqs.append(("n2", prompts[0], SamplingParams(max_tokens=21, temperature=0, ignore_eos=True, n=2)))
    reqs.append(("pen", prompts[2], SamplingParams(max_tokens=25, temperature=0, ignore_eos=True,
                                                   repetition_penalty=1.3, frequency_penalty=0.2)))
    if base_outputs is not None:
        # Stops that really occur, at positions inside later steps' runs.
        for i in range(len(prompts)):
            out = base_outputs[f"g{i}"].outputs[0]
            ids = out.token_ids
            reqs.append((f"st{i}", prompts[i], SamplingParams(
                max_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=[ids[9]])))
            text = out.text
            if len(text.strip()) > 12:
                stop = text[8:11]
                if stop.strip():
                    reqs.append((f"ss{i}", prompts[i], SamplingParams(
                        max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])))
            reqs.append((f"mt{i}", prompts[i], SamplingParams(max_tokens=7 + i, temperature=0,
                                                              ignore_eos=True)))
            words = [tokenizer.decode([t]) for t in ids[4:8]]
            words = [w for w in words if w.strip()]
            if words:
                reqs.append((f"bw{i}", prompts[i], SamplingParams(
                    max_tokens=20, temperature=0, ignore_eos=True, bad_words=words[:2])))
        reqs.append(("mintok", prompts[1], SamplingParams(max_tokens=20, temperature=0, min_tokens=12,
                                                          stop_token_ids=[base_outputs["g1"].outputs[0].token_ids[3]])))
    return reqs


def _run(engine, reqs):
    for rid, prompt, params in reqs:
        engine.add_request(rid, prompt_token_ids=prompt, params=params)
    finals = run_to_completion(engine)
    assert engine.scheduler.block_manager.num_used_blocks == 0
    return finals


def _assert_same(base, spec, rids):
    for rid in rids:
        for a, b in zip(base[rid].outputs, spec[rid].outputs):
            assert b.token_ids == a.token_ids, (rid, a.token_ids, b.token_ids)
            assert b.text == a.text, rid
            assert (b.finish_reason, b.stop_reason) == (a.finish_reason, a.stop_reason), rid
            assert b.cumulative_logprob == pytest.approx(a.cumulative_logprob, abs=1e-3), rid
            if a.logprobs is not None:
                for la, lb in zip(a.logprobs, b.logprobs):
                    assert list(la) == list(lb), rid  # same tokens, same top-N order
                    for t in la:
                        assert lb[t].logprob == pytest.approx(la[t].logprob, abs=1e-4)
                        assert lb[t].rank == la[t].rank


@pytest.fixture(scope="module")
def baseline(tiny_model_dir):
    engine = LLMEngine(tiny_model_dir, **STRESS)
    first = _run(engine, _requests(engine.tokenizer, engine.vocab_size))
    reqs = _requests(engine.tokenizer, engine.vocab_size, first)
    finals = _run(engine, reqs)
    yield engine, reqs, finals
    engine.shutdown()


def test_baseline_is_transformers_greedy(tiny_model_dir, baseline):
    from test_engine_parity import hf_greedy

    _, reqs, finals = baseline
    for rid, prompt, params in reqs[:4]:
        assert finals[rid].outputs[0].token_ids == hf_greedy(tiny_model_dir, prompt, params.max_tokens)


@pytest.mark.parametrize("proposer", ["ngram", "draft_same", "draft_other", "oracle"])
def test_greedy_equals_non_speculative(tiny_model_dir, draft_dir, baseline, proposer):
    base_engine, reqs, base = baseline
    kwargs = {}
    if proposer == "ngram":
        spec = _ngram()
    elif proposer == "draft_same":
        spec = _draft(tiny_model_dir)
    elif proposer == "draft_other":
        spec = _draft(draft_dir)
    else:
        spec = _ngram()  # the scheduler's draft slots; the oracle fills them
        refs = {rid: base[rid].outputs[0].token_ids for rid, _, _ in reqs}
        wrong = sorted(base_engine.eos_token_ids) + [int(t) for ws in
                       (base_engine._bad_words_token_ids(p.bad_words) for _, _, p in reqs if p.bad_words)
                       for w in ws for t in w]
        kwargs["proposer"] = OracleProposer(refs, wrong, base_engine.vocab_size)
    engine = LLMEngine(EngineConfig(model=tiny_model_dir, speculative_config=spec, **STRESS), **kwargs)
    try:
        spec_out = _run(engine, reqs)
        _assert_same(base, spec_out, [r for r, _, _ in reqs])
        stats = engine.stats()
        assert stats["spec_num_draft_tokens"] > 0
        assert stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0
        if proposer in ("draft_same", "oracle"):
            # Stops inside accepted runs really happened: several tokens per step.
            assert stats["spec_num_accepted_tokens"] > stats["spec_num_drafts"]
        if proposer == "draft_same":
            # An identical draft is always right (greedy; rare fp near-ties aside).
            assert stats["spec_num_accepted_tokens"] >= 0.97 * stats["spec_num_draft_tokens"]
            assert stats["spec_accepted_per_pos"][0] >= 0.97 * stats["spec_num_drafts"]
    finally:
        engine.shutdown()


def test_eos_inside_accepted_drafts(tiny_model_dir, tmp_path):
    """An EOS the target emits in the middle of an accepted run ends the output there."""
    plain = LLMEngine(tiny_model_dir, device="cpu")
    prompt = plain.tokenizer.encode("Hello world! Hello world!")
    plain.add_request("r", prompt_token_ids=prompt, params=SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    ids = run_to_completion(plain)["r"].outputs[0].token_ids
    plain.shutdown()
    stop_at = next(i for i in range(6, len(ids)) if ids[i] not in ids[:i])
    eos = ids[stop_at]
    model = tmp_path / "eos-model"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (model / "config.json").write_text(json.dumps(cfg))
    for spec in (None, _draft(str(model), k=4)):
        engine = LLMEngine(str(model), device="cpu", speculative_config=spec)
        engine.add_request("r", prompt_token_ids=prompt, params=SamplingParams(max_tokens=20, temperature=0))
        out = run_to_completion(engine)["r"].outputs[0]
        assert out.token_ids == ids[:stop_at + 1] and out.finish_reason == "stop", (spec, out.token_ids)
        if spec is not None:
            assert engine.stats()["spec_num_accepted_tokens"] >= stop_at - 2
        engine.shutdown()


# --------------------------------------------------------------------------- sampling


def _chi2_critical(df: int, z: float = 3.719) -> float:
    """Chi-square critical value at p = 1e-4 (z = its normal quantile), Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts: dict, probs: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom; outcomes expected fewer than 5 times
    are pooled into one cell (so the chi-square approximation holds)."""
    keys = [k for k, p in probs.items() if p > 0]
    assert set(counts) <= set(keys), set(counts) - set(keys)  # nothing impossible was drawn
    big = [k for k in keys if n * probs[k] >= 5]
    small = [k for k in keys if n * probs[k] < 5]
    cells = [(counts.get(k, 0), n * probs[k]) for k in big]
    if small:
        cells.append((sum(counts.get(k, 0) for k in small), n * sum(probs[k] for k in small)))
    stat = sum((c - e) ** 2 / e for c, e in cells)
    return stat, len(cells) - 1


class _Row:
    def __init__(self, params, out):
        self.params, self.prompt_token_ids, self.output_token_ids = params, [1, 2], list(out)


def _reference_probs(logits, temperature, top_k):
    """Plain torch: softmax(logits / T) over the top-k."""
    kth = logits.topk(top_k).values[-1]
    masked = torch.where(logits >= kth, logits / temperature, torch.tensor(float("-inf")))
    return torch.softmax(masked, -1)


def _sample_rejection(rs_cls, use_q: bool, n: int = 12000, seed: int = 0):
    """Run the rejection sampler on n copies of one 3-row sequence with 2 drafts.

    Returns (emitted token lists, drafts, [p0, p1, p2], q): the target rows' distributions
    after temperature 0.8 and top-k 4, computed independently with plain torch, and the
    draft distribution (None for one-hot drafts).
    """
    from paged_engine.executor.sampler import Sampler

    vocab = 6
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(3, vocab, generator=gen) * 1.5
    params = SamplingParams(temperature=0.8, top_k=4, max_tokens=10)
    p = [_reference_probs(target[j], 0.8, 4) for j in range(3)]
    sampler = Sampler(vocab, "cpu", seed=seed)
    rs = rs_cls(sampler)
    if use_q:  # a draft model: drafts sampled from q per sequence
        q = torch.softmax(torch.randn(2, vocab, generator=gen), -1)
        d1 = torch.multinomial(q[0], n, replacement=True, generator=gen).tolist()
        d2 = torch.multinomial(q[1], n, replacement=True, generator=gen).tolist()
        drafts = [[a, b] for a, b in zip(d1, d2)]
        qs = [q] * n
    else:  # n-gram: the same deterministic drafts, one-hot q
        drafts = [[int(p[0].argsort()[-2]), int(p[1].argmax())]] * n  # a likely, not the likeliest
        qs = [None] * n
        q = None
    rows = [_Row(params, [3]) for _ in range(n)]
    logits = target.repeat(n, 1)
    tokens, logprobs = rs(logits, rows, drafts, qs)
    assert all(1 <= len(t) <= 3 for t in tokens)
    return tokens, drafts, p, q


def _worst_statistic(tokens, drafts, p) -> float:
    """Largest chi2 / critical ratio over: the first token, the second given the first was the
    first draft, the third given both drafts were emitted (each must follow its row's p)."""
    worst = 0.0
    for pos in range(3):
        counts: dict = {}
        n = 0
        for t, d in zip(tokens, drafts):
            if len(t) > pos and t[:pos] == d[:pos]:
                counts[t[pos]] = counts.get(t[pos], 0) + 1
                n += 1
        if n < 500:
            continue
        probs = {k: float(p[pos][k]) for k in range(len(p[pos]))}
        for k in counts:
            if probs.get(k, 0) == 0:
                return float("inf")
        stat, df = _chi2(counts, probs, n)
        worst = max(worst, stat / _chi2_critical(df))
    return worst


@pytest.mark.parametrize("use_q", [False, True], ids=["ngram_one_hot", "draft_model_q"])
def test_rejection_sampler_preserves_the_distribution(use_q):
    from paged_engine.spec_decode.rejection_sampler import RejectionSampler

    tokens, drafts, p, q = _sample_rejection(RejectionSampler, use_q)
    assert _worst_statistic(tokens, drafts, p) < 1.0
    # Drafts are accepted with the right probability: sum(min(p, q)) for the first.
    accepted = sum(1 for t, d in zip(tokens, drafts) if len(t) > 1) / len(tokens)
    if use_q:  # Leviathan: P(accept) = sum min(p, q)
        expected = float(torch.minimum(p[0], q[0]).sum())
    else:
        expected = float(p[0][drafts[0][0]])
    assert accepted == pytest.approx(expected, abs=0.02)


def _wrong_verifiers():
    """Verifiers with a deliberate mistake, which the statistic must catch. (Treating sampled
    drafts as one-hot is not one: accepting d with p(d) and resampling from p without d
    preserves p whatever drew d; it only accepts less.)"""
    from paged_engine.executor.sampler import Sampler
    from paged_engine.spec_decode.rejection_sampler import RejectionSampler

    class AcceptsAll(RejectionSampler):  # q = 0: u * 0 < p accepts every possible draft
        def _draft_distribution(self, probs, token, has_draft, draft_probs, drafts):
            return torch.zeros_like(probs)

    class RawTargetProbs(RejectionSampler):  # p before temperature and top-k
        def __init__(self, sampler):
            class RawSampler(Sampler):
                def sampling_probs(self, logits, requests, greedy, seed_salt=0):
                    return torch.softmax(logits, -1), []

            raw = RawSampler(sampler.vocab_size, sampler.device)
            raw.generator = sampler.generator
            super().__init__(raw)

    return {"accepts_all": AcceptsAll, "raw_target_probs": RawTargetProbs}


@pytest.mark.parametrize("wrong", ["accepts_all", "raw_target_probs"])
@pytest.mark.parametrize("use_q", [False, True], ids=["ngram_one_hot", "draft_model_q"])
def test_the_statistic_catches_a_wrong_verifier(wrong, use_q):
    tokens, drafts, p, _ = _sample_rejection(_wrong_verifiers()[wrong], use_q)
    assert _worst_statistic(tokens, drafts, p) > 1.0


def _prompt_holding_its_top_k(model_dir, top_k):
    """A short prompt that contains the top_k tokens the model puts after it, so that n-gram
    (prompt_lookup_min 1) finds the first generated token earlier and drafts its follower."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = [5, 17, 29, 41, 53]
    for _ in range(20):
        with torch.no_grad():
            top = model(torch.tensor([prompt])).logits[0, -1].topk(top_k).indices.tolist()
        missing = [t for t in top if t not in prompt]
        if not missing:
            return prompt
        prompt = missing + prompt
    raise AssertionError("no prompt found")


def _exact_joint(model_dir, prompt, temperature, top_k, length=3):
    """Exact P(first `length` tokens) under the model with temperature and top-k (transformers)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    joint = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for prefix, pr in joint.items():
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(prefix)])).logits[0, -1]
            probs = _reference_probs(logits, temperature, top_k)
            for t in torch.nonzero(probs).flatten().tolist():
                nxt[prefix + (t,)] = pr * float(probs[t])
        joint = nxt
    return joint


@pytest.mark.parametrize("proposer", ["ngram", "draft_model"])
def test_engine_sampling_distribution_is_the_models(tiny_model_dir, draft_dir, proposer):
    """Many sampled requests: the joint law of the first 3 tokens (top-k 3, 27 outcomes) is the
    model's exact one (chi-square, p = 1e-4), with speculation verifying tokens 2 and 3."""
    n = 1500
    prompt = _prompt_holding_its_top_k(tiny_model_dir, 3)
    spec = _ngram(k=2, lo=1, hi=1) if proposer == "ngram" else _draft(draft_dir, k=2)
    engine = LLMEngine(tiny_model_dir, device="cpu", max_num_seqs=512, speculative_config=spec,
                       seed=123)
    params = SamplingParams(max_tokens=3, temperature=1.3, top_k=3, ignore_eos=True)
    for i in range(n):
        engine.add_request(f"s{i}", prompt_token_ids=prompt, params=params)
    finals = run_to_completion(engine)
    counts: dict = {}
    for out in finals.values():
        key = tuple(out.outputs[0].token_ids)
        counts[key] = counts.get(key, 0) + 1
    stats = engine.stats()
    engine.shutdown()
    assert stats["spec_num_draft_tokens"] >= n  # speculation verified every request's token 2
    exact = _exact_joint(tiny_model_dir, prompt, 1.3, 3)
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-5)
    stat, df = _chi2(counts, exact, n)
    assert stat < _chi2_critical(df), (stat, df)


def test_seeded_requests_reproduce_alone_and_in_a_batch(tiny_model_dir, draft_dir):
    params = SamplingParams(max_tokens=24, temperature=0.9, seed=42, ignore_eos=True)
    for spec in (_ngram(), _draft(draft_dir)):
        engine = LLMEngine(tiny_model_dir, device="cpu", speculative_config=spec)
        prompt = engine.tokenizer.encode("Hello world! Hello world! Hello")
        engine.add_request("alone", prompt_token_ids=prompt, params=params)
        alone = run_to_completion(engine)["alone"].outputs[0].token_ids
        for i in range(6):
            engine.add_request(f"other{i}", prompt_token_ids=prompt[i:],
                               params=SamplingParams(max_tokens=10 + i, temperature=1.0, seed=None))
        engine.add_request("busy", prompt_token_ids=prompt, params=params)
        busy = run_to_completion(engine)["busy"].outputs[0].token_ids
        assert busy == alone
        engine.shutdown()


# --------------------------------------------------------------------------- blocks


def test_abort_mid_verification_frees_both_caches(tiny_model_dir):
    engine = LLMEngine(tiny_model_dir, device="cpu", block_size=4, num_kv_blocks=64,
                       speculative_config=_draft(tiny_model_dir, k=4))
    draft_runner = engine.proposer.runner
    target = engine.executor.runner
    # Same device and dtype; a paged cache of as many blocks as the target's.
    assert (draft_runner.device, draft_runner.dtype) == (target.device, target.dtype)
    assert draft_runner.k_caches[0].shape[0] == target.k_caches[0].shape[0] == 64
    prompt = engine.tokenizer.encode("Hello world! Hello world!")
    for i in range(3):
        engine.add_request(f"a{i}", prompt_token_ids=prompt + [i + 5],
                           params=SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.stats()["spec_num_accepted_tokens"] > 0
    assert len(draft_runner.states) == 3
    for i in range(3):
        engine.abort(f"a{i}")
    assert engine.scheduler.block_manager.num_used_blocks == 0
    engine.scheduler.block_manager.check_invariants([])
    engine.add_request("next", prompt_token_ids=prompt, params=SamplingParams(max_tokens=3, temperature=0))
    run_to_completion(engine)
    # The next batch told both runners to drop the aborted sequences' copies.
    assert len(draft_runner.states) == 1 and len(engine.executor.runner.states) == 1
    assert engine.scheduler.block_manager.num_used_blocks == 0
    engine.shutdown()


class SpecTokenCacheRunner:
    """Fake target: a paged cache of token ids; 'verifies' drafts against a deterministic next
    token (a function of the context), like a model would, and checks that every block in the
    prefix cache holds exactly the tokens it was registered with."""

    def __init__(self, num_kv_blocks, block_size, vocab_size):
        self.num_kv_blocks, self.block_size, self.vocab_size = num_kv_blocks, block_size, vocab_size
        self.cache = [None] * (num_kv_blocks * block_size)
        from paged_engine.executor.sequence_state import SequenceStates

        self.states = SequenceStates()
        self.engine = None

    def _next(self, context):
        # A function of the last 3 tokens over 4 ids: repetitive, so n-gram drafts often match.
        return 3 + random.Random(hash(tuple(context[-3:]))).randrange(4)

    def execute_model(self, batch):
        from paged_engine.core.batch import ModelRunnerOutput, SampleLogprobs

        bs = self.block_size
        states = self.states.update(batch)
        out_tokens, out_lp = [], []
        for s, state in zip(batch.seqs, states):
            full = list(state.prompt_token_ids) + list(state.output_token_ids)
            query = full[s.start_pos:s.start_pos + s.num_tokens] + list(s.draft_token_ids)
            for j, t in enumerate(query):
                pos = s.start_pos + j
                self.cache[state.block_table[pos // bs] * bs + pos % bs] = t
            if not s.do_sample:
                out_tokens.append([]); out_lp.append([])
                continue
            context, emitted = full[:s.start_pos + s.num_tokens], []
            for d in s.draft_token_ids:
                want = self._next(context)
                if d != want:
                    break
                emitted.append(d)
                context.append(d)
            emitted.append(self._next(context))
            out_tokens.append(emitted)
            out_lp.append([SampleLogprobs(0.0, 1, [])] * len(emitted))
        return ModelRunnerOutput(out_tokens, out_lp)

    def check_registered_blocks(self, engine):
        bm = engine.scheduler.block_manager
        bs = self.block_size
        for h, b in bm.hash_to_block.items():
            block = bm.blocks[b]
            assert tuple(self.cache[b * bs:(b + 1) * bs]) == block.token_ids, (
                f"block {b} is registered for {block.token_ids} but holds {self.cache[b * bs:(b + 1) * bs]}")

    def shutdown(self):
        pass


def test_only_verified_tokens_enter_the_prefix_cache(tiny_model_dir):
    """Drafts write into blocks (rejected ones too); no registered block may hold them."""
    config = EngineConfig(model=tiny_model_dir, device="cpu", block_size=4, num_kv_blocks=24,
                          max_num_batched_tokens=20, speculative_config=_ngram(k=5, lo=1, hi=2))
    runner = SpecTokenCacheRunner(24, 4, config.hf_config.vocab_size)
    engine = LLMEngine(config, executor=runner)
    rng = random.Random(3)
    for i in range(12):
        prompt = [rng.randrange(4) + 3 for _ in range(rng.randrange(3, 30))]
        engine.add_request(f"r{i}", prompt_token_ids=prompt,
                           params=SamplingParams(max_tokens=rng.randrange(5, 40), ignore_eos=True,
                                                 n=rng.choice([1, 1, 2])))

    def check(e):
        runner.check_registered_blocks(e)
        bm = e.scheduler.block_manager
        bm.check_invariants([s for r in e.requests.values() for s in r.seqs if not s.is_finished])
        for seq in e.scheduler.running:
            # Blocks for the verified tokens plus at most k reserved draft slots.
            assert len(seq.block_table) <= -(-(seq.num_computed_tokens + 1 + 5) // 4), seq

    finals = run_to_completion(engine, check=check)
    stats = engine.stats()
    assert stats["spec_num_draft_tokens"] > stats["spec_num_accepted_tokens"] > 0
    assert stats["preemptions"] > 0 and len(engine.scheduler.block_manager.hash_to_block) > 0
    for rid, out in finals.items():
        for c in out.outputs:  # each output is the fake model's deterministic continuation
            context = list(out.prompt_token_ids)
            for t in c.token_ids:
                assert t == runner._next(context), rid
                context.append(t)
    assert engine.scheduler.block_manager.num_used_blocks == 0


def test_disable_by_batch_size_and_back_off(tiny_model_dir):
    config = EngineConfig(model=tiny_model_dir, device="cpu", block_size=4, num_kv_blocks=256,
                          speculative_config=_ngram(k=3, lo=1, hi=2, disable_by_batch_size=2))
    runner = SpecTokenCacheRunner(256, 4, config.hf_config.vocab_size)
    engine = LLMEngine(config, executor=runner)
    for i in range(3):
        engine.add_request(f"r{i}", prompt_token_ids=[3, 4, 3, 4, 3],
                           params=SamplingParams(max_tokens=8, ignore_eos=True))
    run_to_completion(engine)
    assert engine.stats()["spec_num_drafts"] == 0  # three running > 2: never speculated
    engine.add_request("solo", prompt_token_ids=[3, 4, 3, 4, 3], params=SamplingParams(max_tokens=8, ignore_eos=True))
    run_to_completion(engine)
    assert engine.stats()["spec_num_drafts"] > 0

    # adaptive: a sequence whose drafts all fail skips 1, 2, 4, ... steps before trying again
    config = EngineConfig(model=tiny_model_dir, device="cpu", block_size=4, num_kv_blocks=256,
                          speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                              "prompt_lookup_min": 1, "prompt_lookup_max": 1})

    class AlwaysWrong:
        def __init__(self):
            self.steps_with_drafts = []

        def propose(self, batch, seqs_by_id):
            for s in batch.seqs:
                if s.num_lookahead_tokens:
                    state = seqs_by_id[s.seq_id]
                    s.draft_token_ids = [runner._next(state.token_ids) + 10]
                    self.steps_with_drafts.append(state.num_output_tokens)

    runner = SpecTokenCacheRunner(256, 4, config.hf_config.vocab_size)
    proposer = AlwaysWrong()
    engine = LLMEngine(config, executor=runner, proposer=proposer)
    engine.add_request("w", prompt_token_ids=[3, 4, 5], params=SamplingParams(max_tokens=40, ignore_eos=True))
    run_to_completion(engine)
    # Output positions where drafts were tried: after each failure the gap doubles (max 16).
    gaps = np.diff(proposer.steps_with_drafts).tolist()
    assert gaps[:5] == [2, 3, 5, 9, 17], proposer.steps_with_drafts
    assert engine.stats()["spec_num_accepted_tokens"] == 0


def test_engine_arg_on_the_command_line(tiny_model_dir, tmp_path):
    """`--engine-arg speculative_config='{...}'` reaches model.json and loads."""
    from paged_engine.deploy.launcher import parse_engine_args
    from paged_engine.deploy.repository import prepare_model_repository
    from paged_engine.serving.llm_model import load_engine_args

    args = parse_engine_args(['speculative_config={"method": "ngram", "num_speculative_tokens": 3}'])
    repo = prepare_model_repository(tmp_path / "repo", tiny_model_dir, **args)
    loaded = load_engine_args(f"{repo}/paged_llm/1")
    spec = EngineConfig.from_dict({**loaded, "device": "cpu"}).speculative_config
    assert (spec.method, spec.num_speculative_tokens) == ("ngram", 3)
