"""bad_words: vLLM's tokenization, the sampler's mask against a plain loop, and greedy generation
equal to transformers `generate(..., bad_words_ids=...)` token for token (fp32, CPU).

The bad words are taken from the model's own unconstrained greedy output, so the constraint
changes the output (each test asserts that it does).
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from paged_engine import LLM, SamplingParams
from paged_engine.executor.sampler import Sampler

PROMPT = "Hello world"
MAX_NEW = 16


# ------------------------------------------------------------------ plain references


def vllm_bad_words_ids(tokenizer, words):
    """vLLM's SamplingParams.update_from_tokenizer, written out: each word as is, and after a
    space when that gives a new first token and as many tokens."""
    out = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        out.append(plain)
        if spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    unique = []
    for ids in out:
        if ids not in unique:
            unique.append(ids)
    return unique


def plain_apply_bad_words(row: list[float], bad_words_ids, past: list[int]) -> list[float]:
    """vLLM v1 `_apply_bad_words_single_batch`, element by element on a Python list."""
    row = list(row)
    for ids in bad_words_ids:
        if len(ids) > len(past) + 1:
            continue
        prefix_len = len(ids) - 1
        actual = past[-prefix_len:] if prefix_len > 0 else []
        if actual == list(ids[:prefix_len]):
            row[ids[-1]] = float("-inf")
    return row


def contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


# ------------------------------------------------------------------ transformers reference

_hf_cache: dict = {}


def hf_greedy_bad_words(model_dir, prompt_ids, bad_words_ids, max_new_tokens=MAX_NEW):
    """transformers greedy generate with bad_words_ids: (generated ids, raw logprobs per step)."""
    from transformers import AutoModelForCausalLM

    if model_dir not in _hf_cache:
        _hf_cache[model_dir] = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32).eval()
    model = _hf_cache[model_dir]
    kwargs = {"bad_words_ids": [list(ids) for ids in bad_words_ids]} if bad_words_ids else {}
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0, return_dict_in_generate=True, output_logits=True,
            **kwargs,
        )
    ids = out.sequences[0, len(prompt_ids):].tolist()
    # `logits` are the model's, before any logits processor (the bad-words mask included).
    return ids, [torch.log_softmax(l[0].float(), -1) for l in out.logits]


def assert_prompt_plays_no_part(prompt_ids, output_ids, bad_words_ids):
    """transformers matches a bad word's prefix on prompt + output, vLLM on the output only:
    they agree unless a prefix straddles the end of the prompt. Check the test avoids that."""
    for ids in bad_words_ids:
        prefix = list(ids[:-1])
        for t in range(min(len(prefix), len(output_ids) + 1)):
            context = prompt_ids + output_ids[:t]
            assert not (prefix and context[-len(prefix):] == prefix), (ids, t)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", dtype="float32", block_size=4, num_kv_blocks=128)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def prompt_ids(llm):
    return llm.tokenizer(PROMPT).input_ids


@pytest.fixture(scope="module")
def base(llm, prompt_ids):
    """Unconstrained greedy output ids."""
    out = llm.generate([prompt_ids], SamplingParams(max_tokens=MAX_NEW, temperature=0.0,
                                                    ignore_eos=True))[0]
    return out.token_ids


def _clean_text(tokenizer, ids) -> str | None:
    text = tokenizer.decode(ids)
    return text if text.strip() and "\ufffd" not in text and text == text.strip() else None


@pytest.fixture(scope="module")
def one_token_word(llm, base):
    """(word, position): a word that is one token of the base output, past its first token."""
    tok = llm.tokenizer
    for pos in range(2, len(base)):
        word = _clean_text(tok, [base[pos]])
        if word and [base[pos]] in vllm_bad_words_ids(tok, [word]):
            return word, pos
    pytest.fail(f"no single-token word in the base output {base}")


@pytest.fixture(scope="module")
def two_token_word(llm, base):
    """(word, position of its last token): two consecutive base-output tokens that a word
    tokenizes to, the first not at output position 0."""
    tok = llm.tokenizer
    for pos in range(2, len(base)):
        pair = base[pos - 1:pos + 1]
        word = _clean_text(tok, pair)
        if word and pair in vllm_bad_words_ids(tok, [word]):
            return word, pos
    pytest.fail(f"no two-token word in the base output {base}")


def _generate(llm, prompt_ids, bad_words, **kw):
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True,
                            bad_words=bad_words, **kw)
    return llm.generate([prompt_ids], params)[0]


# ------------------------------------------------------------------ tokenization


def test_engine_tokenizes_like_vllm(llm):
    tok = llm.tokenizer
    words = ["world", " world", "fox", "quick brown", "日本語", "world"]
    llm.engine.add_request("tok", prompt="Hi", params=SamplingParams(max_tokens=1, bad_words=words))
    seq = llm.engine.requests["tok"].seqs[0]
    got = [list(ids) for ids in seq.params.bad_words_token_ids]
    assert got == vllm_bad_words_ids(tok, words)
    assert len(got) == len({tuple(ids) for ids in got})  # deduplicated
    # Both spellings reach the mask where the spaced one has a new first token and as many
    # tokens ("fox": [f, o, x] and [ f, o, x]); otherwise only the word as written ("world":
    # [wor, ld], while " world" is one token).
    fox, spaced_fox = (tok.encode(w, add_special_tokens=False) for w in ("fox", " fox"))
    assert fox in got and spaced_fox in got and fox[0] != spaced_fox[0]
    world, spaced_world = (tok.encode(w, add_special_tokens=False) for w in ("world", " world"))
    assert world in got and len(spaced_world) != len(world) and spaced_world not in got
    llm.engine.abort("tok")
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


# ------------------------------------------------------------------ generation vs transformers


@pytest.mark.parametrize("which", ["one_token", "two_token", "both"])
def test_greedy_matches_transformers_bad_words_ids(llm, tiny_model_dir, prompt_ids, base,
                                                   one_token_word, two_token_word, which):
    words = {"one_token": [one_token_word[0]], "two_token": [two_token_word[0]],
             "both": [one_token_word[0], two_token_word[0]]}[which]
    bad_ids = vllm_bad_words_ids(llm.tokenizer, words)
    out = _generate(llm, prompt_ids, words, logprobs=1)
    expected, raw_logprobs = hf_greedy_bad_words(tiny_model_dir, prompt_ids, bad_ids)
    assert_prompt_plays_no_part(prompt_ids, expected, bad_ids)

    assert out.token_ids == expected
    assert out.token_ids != base, "the bad word did not change the output"
    for ids in bad_ids:
        assert not contains(out.token_ids, list(ids))
    # Logprobs stay the raw model's: at the step where the base output had the bad word's last
    # token, that token is still the top-1 alternative, with its unmasked logprob.
    pos = one_token_word[1] if which == "one_token" else two_token_word[1]
    first_diff = next(i for i, (a, b) in enumerate(zip(out.token_ids, base)) if a != b)
    assert first_diff <= pos
    masked_id, step = base[first_diff], out.logprobs[first_diff]
    assert step[masked_id].rank == 1
    assert step[masked_id].logprob == pytest.approx(raw_logprobs[first_diff][masked_id].item(),
                                                    abs=1e-4)
    assert step[out.token_ids[first_diff]].rank > 1
    for i, step in enumerate(out.logprobs):
        chosen = out.token_ids[i]
        assert step[chosen].logprob == pytest.approx(raw_logprobs[i][chosen].item(), abs=1e-4)


def test_batch_mixes_bad_words_per_request(llm, tiny_model_dir, prompt_ids, base,
                                           one_token_word, two_token_word):
    """Rows with different (and no) bad words in one batch each follow their own; n=2 children
    of a request carry its bad words too."""
    other = llm.tokenizer("The quick brown fox").input_ids
    cases = [
        (prompt_ids, [two_token_word[0]], 1),
        (other, [], 1),
        (prompt_ids, [one_token_word[0]], 2),
        (other, [one_token_word[0], two_token_word[0]], 1),
    ]
    outs = llm.generate(
        [p for p, _, _ in cases],
        [SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, bad_words=w, n=n)
         for _, w, n in cases],
    )
    for (prompt, words, n), out in zip(cases, outs):
        bad_ids = vllm_bad_words_ids(llm.tokenizer, words) if words else []
        expected, _ = hf_greedy_bad_words(tiny_model_dir, prompt, bad_ids)
        assert_prompt_plays_no_part(prompt, expected, bad_ids)
        assert len(out.outputs) == n
        for completion in out.outputs:
            assert completion.token_ids == expected, words
    assert outs[0].outputs[0].token_ids != base


def test_sampled_outputs_never_contain_a_bad_word(llm, prompt_ids, one_token_word, two_token_word):
    words = [one_token_word[0], two_token_word[0]]
    bad_ids = vllm_bad_words_ids(llm.tokenizer, words)
    out = llm.generate([prompt_ids], SamplingParams(
        max_tokens=24, temperature=1.5, seed=7, n=4, ignore_eos=True, bad_words=words))[0]
    for completion in out.outputs:
        for ids in bad_ids:
            assert not contains(completion.token_ids, list(ids)), (ids, completion.token_ids)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("value", [5, [1, 2], ["ok", None], {"a": 1}, ["ok", "  "], "", '["a", 3]'])
def test_bad_values_name_the_field(value):
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=value)
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams.from_dict({"bad_words": value})


def test_accepted_forms():
    assert SamplingParams().bad_words == []
    assert SamplingParams(bad_words="foo").bad_words == ["foo"]
    assert SamplingParams(bad_words=("a", "b c")).bad_words == ["a", "b c"]
    assert SamplingParams.from_dict({"bad_words": '["a", " b"]'}).bad_words == ["a", " b"]
    assert SamplingParams.from_dict('{"bad_words": "x"}').bad_words == ["x"]
    assert SamplingParams(bad_words=["a"]).to_dict()["bad_words"] == ["a"]


def test_engine_rejects_words_outside_the_vocabulary(llm):
    engine = llm.engine
    vocab_size = engine.vocab_size
    engine.vocab_size = 4  # every real token id is now outside the vocabulary
    try:
        with pytest.raises(ValueError, match="bad_words"):
            engine.add_request("oov", prompt="Hi", params=SamplingParams(bad_words=["world"]))
    finally:
        engine.vocab_size = vocab_size
    assert not engine.has_unfinished_requests()


# ------------------------------------------------------------------ the sampler's mask


def _req(params, output, prompt=(5, 6)):
    return SimpleNamespace(params=params, prompt_token_ids=list(prompt),
                           output_token_ids=list(output))


def _params(bad_ids, **kw):
    """The engine's private copy (EOS = 1 among the stop ids), as the runner gets it."""
    return SamplingParams(temperature=0.0, **kw)._for_engine(frozenset({1}), 0, bad_ids)


def test_mask_matches_plain_loop():
    vocab, rows = 30, 64
    rng = random.Random(0)
    requests, expected_rows = [], []
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    for i in range(rows):
        bad_ids = [[rng.randrange(vocab) for _ in range(rng.randint(1, 4))]
                   for _ in range(rng.randint(0, 5))]
        output = [rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
        if bad_ids and rng.random() < 0.6:  # end the output with some word's prefix
            word = rng.choice(bad_ids)
            output = output + word[:-1]
        requests.append(_req(_params(bad_ids), output))
        expected_rows.append(plain_apply_bad_words(logits[i].tolist(), bad_ids, output))
    sampler = Sampler(vocab, "cpu")
    masked = logits.clone()
    sampler.mask_banned_tokens(masked, requests)
    expected = torch.tensor(expected_rows)
    assert torch.equal(masked.isinf(), expected.isinf())
    assert torch.equal(masked[~masked.isinf()], expected[~expected.isinf()])
    # The case mix really exercised multi-token prefixes, matched and unmatched.
    num_masked = int(masked.isinf().sum())
    assert 0 < num_masked < rows * vocab

    # End to end: greedy picks the argmax of the masked row; logprobs stay the raw ones.
    out = sampler(logits, requests)
    assert out.token_ids == expected.argmax(dim=-1).tolist()
    raw = torch.log_softmax(logits, dim=-1)
    for i, t in enumerate(out.token_ids):
        assert out.logprobs[i].logprob == pytest.approx(raw[i, t].item(), abs=1e-5)


def test_mask_cases_by_hand():
    vocab = 12
    p = _params([[3], [4, 5], [6, 7, 8], [9, 7, 10]], min_tokens=2, stop_token_ids=[11])
    sampler = Sampler(vocab, "cpu")
    cases = [
        ([], {3, 1, 11}),            # min_tokens: EOS and stop ids too; no prefix can match yet
        ([4], {3, 5, 1, 11}),
        ([6, 7], {3, 8}),            # min_tokens reached
        ([9, 7], {3, 10}),
        ([5, 6, 7], {3, 8}),
        ([7], {3, 1, 11}),           # a prefix must match entirely
        ([6, 7, 2], {3}),
    ]
    logits = torch.zeros(len(cases), vocab)
    sampler.mask_banned_tokens(logits, [_req(p, out) for out, _ in cases])
    for row, (out, banned) in zip(logits, cases):
        assert {int(t) for t in torch.nonzero(row.isinf()).flatten()} == banned, out
    # A prompt that ends with a prefix does not count (vLLM looks at generated tokens only).
    logits = torch.zeros(1, vocab)
    sampler.mask_banned_tokens(logits, [_req(_params([[4, 5]]), [], prompt=[2, 4])])
    assert not logits.isinf().any()
