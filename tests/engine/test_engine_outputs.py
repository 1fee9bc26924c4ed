"""Stops, finish reasons, text deltas and logprobs, with a runner that emits scripted tokens."""

from __future__ import annotations

import pytest

from engine_core_helpers import OutputTracker, ScriptedRunner, make_engine
from paged_engine import SamplingParams

PROMPT = [40, 41, 42]


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def model_dir(request, make_model):
    return make_model("llama", request.param)


def scripted(model_dir, text, extra_tokens=(), **kw):
    engine = make_engine(model_dir, runner_cls=ScriptedRunner, num_kv_blocks=64, block_size=4, **kw)
    tok = engine.tokenizer
    script = tok.encode(text, add_special_tokens=False) + list(extra_tokens)
    engine.executor.scripts[tuple(PROMPT)] = script
    return engine, script


def run(engine, params):
    engine.add_request("r", prompt_token_ids=PROMPT, params=params)
    tracker = OutputTracker(engine)
    tracker.run()
    deltas = [o.new_text for o in tracker.all_outputs]
    return tracker.finals["r"], deltas


TEXT = "Hello world, stop here please. 東京は日本の首都です。🚀 done"


def test_plain_text_equals_decode(model_dir):
    engine, script = scripted(model_dir, TEXT)
    out, deltas = run(engine, SamplingParams(max_tokens=len(script), ignore_eos=True))
    assert out.text == TEXT == "".join(deltas)
    assert out.finish_reason == "length" and out.stop_reason is None
    assert out.token_ids == script


@pytest.mark.parametrize("stop,include,want", [
    ("stop here", False, "Hello world, "),
    ("stop here", True, "Hello world, stop here"),
    ("首都", False, "Hello world, stop here please. 東京は日本の"),
    ("🚀", True, "Hello world, stop here please. 東京は日本の首都です。🚀"),
    ("world, s", False, "Hello "),
])
def test_stop_string_split_across_deltas(model_dir, stop, include, want):
    engine, script = scripted(model_dir, TEXT)
    out, deltas = run(engine, SamplingParams(max_tokens=100, stop=stop, include_stop_str_in_output=include))
    assert out.text == want and "".join(deltas) == want
    assert out.finish_reason == "stop" and out.stop_reason == stop
    # no delta ever carried text past the cut
    emitted = ""
    for d in deltas:
        emitted += d
        assert want.startswith(emitted)
    # the request stopped at the token that completed the stop string
    assert len(out.token_ids) < len(script)
    assert stop in engine.tokenizer.decode(out.token_ids)


def test_partial_stop_is_released(model_dir):
    engine, script = scripted(model_dir, TEXT)
    out, deltas = run(engine, SamplingParams(max_tokens=len(script), stop=["stop now", "首相"], ignore_eos=True))
    assert out.text == TEXT == "".join(deltas)
    assert out.finish_reason == "length"


def test_earliest_stop_wins(model_dir):
    engine, _ = scripted(model_dir, TEXT)
    out, _ = run(engine, SamplingParams(max_tokens=100, stop=["please", "Hello world, stop here please", "here"]))
    assert out.text == "Hello world, stop " and out.stop_reason == "here"


def test_stop_token_ids_and_min_tokens(model_dir):
    engine, script = scripted(model_dir, "Hello world, stop here")
    stop_id = script[2]
    out, _ = run(engine, SamplingParams(max_tokens=100, stop_token_ids=[stop_id]))
    assert out.token_ids == script[:3] and out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.text == engine.tokenizer.decode(script[:2])
    # include_stop_str_in_output keeps the stop token's text
    out, _ = run(engine, SamplingParams(max_tokens=100, stop_token_ids=[stop_id], include_stop_str_in_output=True))
    assert out.text == engine.tokenizer.decode(script[:3])
    # min_tokens: neither stop token nor stop string may end it before min_tokens tokens
    out, _ = run(engine, SamplingParams(max_tokens=len(script), stop_token_ids=[script[0]], stop="Hello", min_tokens=3, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.token_ids) == len(script)


def test_eos_and_ignore_eos(model_dir):
    engine, script = scripted(model_dir, "Hello world")
    eos = engine.tokenizer.eos_token_id
    engine.executor.scripts[tuple(PROMPT)] = script + [eos] + script
    out, deltas = run(engine, SamplingParams(max_tokens=100))
    assert out.token_ids == script + [eos]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.text == "Hello world" == "".join(deltas)
    out, _ = run(engine, SamplingParams(max_tokens=len(script) * 2 + 1, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.token_ids) == len(script) * 2 + 1
    # EOS is special: skipped in the text unless skip_special_tokens=False
    tok = engine.tokenizer
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
    assert tok.eos_token not in out.text
    out, _ = run(engine, SamplingParams(max_tokens=len(script) * 2 + 1, ignore_eos=True, skip_special_tokens=False))
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=False)
    assert tok.eos_token in out.text
    # min_tokens: the first EOS does not count (the real sampler would not even sample it)
    engine.executor.scripts[tuple(PROMPT)] = script + [eos] + script + [eos] + script
    out, _ = run(engine, SamplingParams(max_tokens=100, min_tokens=len(script) + 1))
    assert out.finish_reason == "stop" and out.token_ids == script + [eos] + script + [eos]


def test_max_tokens_length(model_dir):
    engine, script = scripted(model_dir, TEXT)
    out, _ = run(engine, SamplingParams(max_tokens=3))
    assert out.token_ids == script[:3] and out.finish_reason == "length"
    assert out.text == engine.tokenizer.decode(script[:3])


def test_step_outputs_are_snapshots(model_dir):
    """A step's token_ids are that step's, whether read at once or only after later steps."""
    engine, script = scripted(model_dir, TEXT)
    engine.add_request("r", prompt_token_ids=PROMPT,
                       params=SamplingParams(max_tokens=len(script), ignore_eos=True))
    outputs, read_during_run = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs.append(out)
            if len(outputs) % 2:
                read_during_run.append((len(outputs), out.outputs[0].token_ids))
    want = [script[:k] for k in range(1, len(script) + 1)]
    assert [o.outputs[0].token_ids for o in outputs] == want
    assert read_during_run and all(ids == script[:k] for k, ids in read_during_run)


def test_logprobs_shape(model_dir):
    engine, script = scripted(model_dir, "Hello world")
    out, _ = run(engine, SamplingParams(max_tokens=3, logprobs=2))
    assert len(out.logprobs) == 3
    for tok, entry in zip(out.token_ids, out.logprobs):
        first = next(iter(entry))
        assert first == tok  # the sampled token comes first
        assert entry[tok].rank == 1
        assert len(entry) == 2
    # The sampled tokens' decoded_token is the text each added (vLLM): they concatenate to it.
    assert "".join(e[t].decoded_token for t, e in zip(out.token_ids, out.logprobs)) == \
        engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.cumulative_logprob == pytest.approx(-1.5)
    out, _ = run(engine, SamplingParams(max_tokens=3))
    assert out.logprobs is None


def test_logprobs_decoded_tokens_follow_the_text(model_dir):
    """Multi-byte characters split over tokens, and a special token the text skips: the sampled
    tokens' decoded_token values concatenate to the text, and the special token adds no text of
    its own (it is written out with skip_special_tokens=False). (A token's decoded_token may also
    carry text the detokenizer held back until it came.)"""
    engine, _ = scripted(model_dir, "x")
    special = engine.tokenizer.convert_tokens_to_ids(engine.tokenizer.eos_token)
    head = engine.tokenizer.encode("東京 🚀", add_special_tokens=False)
    tail = engine.tokenizer.encode(" done", add_special_tokens=False)
    engine.executor.scripts[tuple(PROMPT)] = head + [special] + tail
    for skip, special_text in ((True, ""), (False, engine.tokenizer.eos_token)):
        engine.requests.clear()
        out, _ = run(engine, SamplingParams(max_tokens=len(head) + 1 + len(tail), logprobs=1,
                                            ignore_eos=True, skip_special_tokens=skip))
        decoded = [e[t].decoded_token for t, e in zip(out.token_ids, out.logprobs)]
        assert "".join(decoded) == out.text
        assert decoded[len(head)].endswith(special_text)
        assert (engine.tokenizer.eos_token in out.text) == (not skip)
        assert out.text.startswith("東京 🚀") and out.text.endswith(" done")


def test_n_outputs_streamed_together(model_dir):
    engine, script = scripted(model_dir, TEXT)
    engine.add_request("r", prompt_token_ids=PROMPT, params=SamplingParams(n=2, max_tokens=4))
    tracker = OutputTracker(engine)
    tracker.run()
    out = tracker.finals["r"]
    assert len(out.outputs) == 2
    assert out.outputs[0].token_ids == out.outputs[1].token_ids == script[:4]
    assert all(len(o.outputs) == 2 for o in tracker.all_outputs)


def test_detok_window_reproduces_deltas(model_dir):
    from paged_engine.output.detokenizer import decode_window

    engine, script = scripted(model_dir, TEXT)
    engine.add_request("r", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=len(script), ignore_eos=True))
    tracker = OutputTracker(engine)
    text = ""
    while engine.has_unfinished_requests():
        for o in tracker.step():
            c = o.outputs[0]
            ids, offset = c.detok_window
            text += decode_window(engine.tokenizer, ids, offset, final=o.finished)
    assert text == TEXT
