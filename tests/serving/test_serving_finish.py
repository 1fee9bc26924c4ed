"""finish_reason and token counts for max_tokens, a stop string, a stop token and EOS, streamed
and not, through paged_llm and the ensemble; equal to the offline engine's."""

import numpy as np
import pytest

from paged_engine import SamplingParams
from serving_client import EOS_PROMPT, inputs, trt_inputs, run_one, sampling

pytestmark = pytest.mark.server

PROMPT = "Hello world! 日本語"
GREEDY = dict(temperature=0.0, max_tokens=16)


def _serve(triton, settings: dict, stream: bool, prompt: str = PROMPT):
    s = run_one(triton.grpc_url, "paged_llm", inputs(
        text_input=prompt, stream=stream, sampling_parameters=sampling(**settings),
        exclude_input_in_output=True, return_finish_reason=True,
        return_num_output_tokens=True, return_num_input_tokens=True))
    assert s.error is None, s.error
    assert s.finals == 1
    return (s.text(), s.values("finish_reason")[-1][0].decode(),
            sum(int(v[0]) for v in s.values("num_output_tokens")),
            int(s.values("num_input_tokens")[-1][0]))


def _check(triton, offline_llm, settings, prompt=PROMPT):
    expected = offline_llm.generate([prompt], SamplingParams(**settings))[0]
    for stream in (True, False):
        text, reason, num_out, num_in = _serve(triton, settings, stream, prompt)
        assert (text, reason, num_out, num_in) == (
            expected.text, expected.finish_reason, len(expected.token_ids),
            len(expected.prompt_token_ids)), (settings, stream)
    return expected


@pytest.fixture(scope="module")
def base(offline_llm):
    return offline_llm.generate([PROMPT], SamplingParams(**GREEDY, ignore_eos=True))[0]


def test_length(triton, offline_llm):
    out = _check(triton, offline_llm, dict(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_stop_string(triton, offline_llm, base):
    # A stop string that really occurs a few characters in, cut across token boundaries.
    start = next(i for i in range(2, len(base.text) - 2)
                 if base.text[i:i + 2].strip() and "\ufffd" not in base.text[i:i + 2])
    stop = base.text[start:start + 2]
    out = _check(triton, offline_llm, dict(**GREEDY, ignore_eos=True, stop=[stop]))
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[:base.text.index(stop)]
    assert stop not in out.text


def test_stop_token(triton, offline_llm, base):
    token = base.token_ids[3]
    out = _check(triton, offline_llm, dict(**GREEDY, ignore_eos=True, stop_token_ids=[token]))
    assert out.finish_reason == "stop" and out.stop_reason == token
    assert len(out.token_ids) == base.token_ids.index(token) + 1


def test_eos(triton, offline_llm):
    # conftest made a token that greedy decoding of EOS_PROMPT reaches early an EOS id.
    out = _check(triton, offline_llm, dict(**GREEDY), prompt=EOS_PROMPT)
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert len(out.token_ids) < GREEDY["max_tokens"]


def _bad_words_from(tokenizer, token_ids: list[int]) -> list[str]:
    """A one-token and a two-token word of a greedy output (clean text, past its first token)."""

    def clean(ids):
        text = tokenizer.decode(ids)
        return text if text.strip() and text == text.strip() and "\ufffd" not in text else None

    one = next(w for pos in range(2, len(token_ids)) if (w := clean(token_ids[pos:pos + 1])))
    two = next(w for pos in range(2, len(token_ids) - 1)
               if (w := clean(token_ids[pos:pos + 2])) and w != one)
    return [one, two]


def test_bad_words(triton, offline_llm, base):
    """paged_llm's sampling_parameters take bad_words; the output is the offline engine's."""
    words = _bad_words_from(offline_llm.tokenizer, base.token_ids)
    out = _check(triton, offline_llm, dict(**GREEDY, ignore_eos=True, bad_words=words))
    assert out.token_ids != base.token_ids, "the bad words did not change the output"


def test_ensemble_bad_words(triton, offline_llm, base):
    """The ensemble's bad_words tensor changes the output exactly as offline bad_words do."""
    words = _bad_words_from(offline_llm.tokenizer, base.token_ids)
    # No ignore_eos through the ensemble: the offline reference stops on the same EOS ids.
    expected = offline_llm.generate([PROMPT], SamplingParams(**GREEDY, bad_words=words))[0]
    assert expected.token_ids != base.token_ids[:len(expected.token_ids)], "no effect"
    for stream in (True, False):
        s = run_one(triton.grpc_url, "ensemble", trt_inputs(
            text_input=PROMPT, stream=stream, max_tokens=np.array([16], np.int32),
            temperature=np.array([0.0], np.float32), bad_words=words + [""],
            exclude_input_in_output=True, return_log_probs=True))
        assert s.error is None, s.error
        assert s.text() == expected.text, stream
        log_probs = np.concatenate([v.reshape(-1) for v in s.values("output_log_probs")])
        assert len(log_probs) == len(expected.token_ids)


def test_ensemble_stop_words_and_end_id(triton, offline_llm, base):
    stop = base.text[3:5] if base.text[3:5].strip() else base.text[5:7]
    expected = offline_llm.generate([PROMPT], SamplingParams(**GREEDY, ignore_eos=True,
                                                             stop=[stop]))[0]
    s = run_one(triton.grpc_url, "ensemble", trt_inputs(
        text_input=PROMPT, stream=True, max_tokens=np.array([16], np.int32),
        temperature=np.array([0.0], np.float32), stop_words=[stop]))
    assert s.error is None, s.error
    # (EOS would only shorten it further; the prompt has none in 16 greedy tokens.)
    assert s.text() == expected.text

    token = base.token_ids[4]
    expected = offline_llm.generate([PROMPT], SamplingParams(**GREEDY, stop_token_ids=[token]))[0]
    s = run_one(triton.grpc_url, "ensemble", trt_inputs(
        text_input=PROMPT, stream=True, max_tokens=np.array([16], np.int32),
        temperature=np.array([0.0], np.float32), end_id=np.array([token], np.int32),
        return_log_probs=True))
    assert s.error is None, s.error
    assert s.text() == expected.text
    # return_log_probs: one logprob per generated token, all <= 0.
    log_probs = np.concatenate([v.reshape(-1) for v in s.values("output_log_probs")])
    assert len(log_probs) == len(expected.token_ids) and (log_probs <= 0).all()
