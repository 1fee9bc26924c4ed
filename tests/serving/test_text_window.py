"""The ensemble's token windows reproduce the engine's text deltas exactly (no server needed).

Runs the real engine step by step, turns every step into the token-level outputs `paged_llm`
sends (output_ids, read offset, text offset/length, final), decodes them the way the stateless
postprocessing model does, and checks each piece equals the engine's new_text, so the stream
concatenates to the offline text byte for byte: byte-level BPE and SentencePiece tokenizers, stop
strings (held back and cut), stop tokens, max_tokens.
"""

import numpy as np
import pytest

from paged_engine import LLMEngine, SamplingParams
from paged_engine.output.detokenizer import decode_window
from paged_engine.serving.request import ParsedRequest
from paged_engine.serving.response import TextWindow, build_outputs

PROMPTS = ["Hello world! 日本語", "The quick brown", "😀 emoji and 中文", " leading  spaces",
           "こんにちは世界", "中文文本也需要测试。"]


def _postprocess(tokenizer, arrays) -> str:
    """What model_repository/postprocessing does with one response."""
    text = decode_window(tokenizer, arrays["output_ids"].tolist(),
                         int(arrays["output_read_offset"][0]),
                         final=bool(arrays["output_final"][0]))
    text = text[int(arrays["output_text_offset"][0]):]
    length = int(arrays["output_text_length"][0])
    return text if length < 0 else text[:length]


def _run(engine, requests, stream=True):
    """requests: [(prompt, SamplingParams)]; returns request id -> final RequestOutput."""
    parsed = {}
    windows = {}
    pieces = {}
    finals = {}
    for i, (prompt, params) in enumerate(requests):
        rid = str(i)
        engine.add_request(rid, prompt=prompt, params=params)
        parsed[rid] = ParsedRequest(prompt=None, prompt_token_ids=[0], params=params,
                                    stream=stream, exclude_input_in_output=True,
                                    token_outputs=True)
        windows[rid] = TextWindow(engine.tokenizer, decode_window)
        pieces[rid] = []
    mismatches = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            rid = out.request_id
            if not stream and not out.finished:
                continue
            arrays = build_outputs(parsed[rid], out, prompt_text=None, text_window=windows[rid],
                                   on_window_mismatch=mismatches.append)
            piece = _postprocess(engine.tokenizer, arrays)
            expected = out.outputs[0].text if not stream else out.outputs[0].new_text
            assert piece == expected, (rid, piece, expected, {k: v.tolist() for k, v in
                                                             arrays.items()},
                                       out.outputs[0], requests[int(rid)])
            pieces[rid].append(piece)
            if out.finished:
                finals[rid] = out
    assert not mismatches, mismatches
    for rid, out in finals.items():
        assert "".join(pieces[rid]) == out.outputs[0].text
    return finals


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def engine(request, make_model):
    model = make_model("llama", request.param)
    eng = LLMEngine(model, num_kv_blocks=64, max_model_len=256)
    yield eng
    eng.shutdown()


def test_windows_reproduce_deltas(engine):
    # A first greedy pass picks stop strings and stop tokens that really occur.
    base = _run(engine, [(p, SamplingParams(max_tokens=12, temperature=0.0)) for p in PROMPTS])
    requests = []
    for i, prompt in enumerate(PROMPTS):
        out = base[str(i)].outputs[0]
        requests.append((prompt, SamplingParams(max_tokens=12, temperature=0.0)))
        for stop in (out.text[3:5], out.text[6:7]):
            if stop.strip():
                requests.append((prompt, SamplingParams(max_tokens=12, temperature=0.0,
                                                        stop=[stop])))
        if len(out.token_ids) > 4:
            requests.append((prompt, SamplingParams(max_tokens=12, temperature=0.0,
                                                    stop_token_ids=[out.token_ids[3]])))
        requests.append((prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=i)))
    finals = _run(engine, requests)
    assert len(finals) == len(requests)
    finals_whole = _run(engine, requests, stream=False)
    assert len(finals_whole) == len(requests)
    assert np.any([f.outputs[0].finish_reason == "stop" for f in finals.values()])


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def spec_engine(request, make_model):
    """The same model drafting for itself: nearly every step emits k + 1 tokens at once."""
    model = make_model("llama", request.param)
    eng = LLMEngine(model, num_kv_blocks=64, max_model_len=256, speculative_config={
        "method": "draft_model", "model": model, "num_speculative_tokens": 4})
    yield eng
    eng.shutdown()


def test_windows_cover_multi_token_steps(spec_engine):
    """With speculative decoding a step emits several tokens; its window reproduces all of
    their text (no fallback to a reaching-back window: `_run` fails on any mismatch)."""
    base = _run(spec_engine, [(p, SamplingParams(max_tokens=12, temperature=0.0)) for p in PROMPTS])
    requests = []
    for i, prompt in enumerate(PROMPTS):
        out = base[str(i)].outputs[0]
        requests.append((prompt, SamplingParams(max_tokens=15, temperature=0.0)))
        for stop in (out.text[3:5], out.text[6:7]):
            if stop.strip():
                requests.append((prompt, SamplingParams(max_tokens=15, temperature=0.0, stop=[stop])))
        if len(out.token_ids) > 4:
            requests.append((prompt, SamplingParams(max_tokens=15, temperature=0.0,
                                                    stop_token_ids=[out.token_ids[3]])))
        requests.append((prompt, SamplingParams(max_tokens=11, temperature=0.8, seed=i)))
    before = spec_engine.stats()["spec_num_accepted_tokens"]
    finals = _run(spec_engine, requests)
    assert len(finals) == len(requests)
    assert spec_engine.stats()["spec_num_accepted_tokens"] - before > 2 * len(requests)
    _run(spec_engine, requests, stream=False)

    # The engine's own window of each step (what the ensemble gets when no stop string holds
    # text back) decodes to that step's whole text, however many tokens it emitted.
    plain = [(p, sp) for p, sp in requests if not sp.stop]
    for i, (prompt, params) in enumerate(plain):
        spec_engine.add_request(f"w{i}", prompt=prompt, params=params)
    multi = 0
    while spec_engine.has_unfinished_requests():
        for out in spec_engine.step():
            c = out.outputs[0]
            ids, offset = c.detok_window
            text = decode_window(spec_engine.tokenizer, ids, offset, final=out.finished)
            assert text == c.new_text, (c.new_token_ids, ids, offset, text, c.new_text)
            multi += len(c.new_token_ids) > 1
    assert multi > len(plain)
