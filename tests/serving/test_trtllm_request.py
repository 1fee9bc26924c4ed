"""TensorRT-LLM's front-door inputs -> engine settings, without a server: TensorRT-LLM's sampling
semantics (0 turns top_k / top_p off; neither set is greedy), batch rows, older names, refusals."""

import numpy as np
import pytest

from paged_engine import SamplingParams
from paged_engine.serving.request import RequestError
from paged_engine.serving.trtllm_request import batch_size, logit_bias, parse_trtllm_row


def _get(**named):
    arrays = {}
    for name, value in named.items():
        if isinstance(value, str):
            value = np.array([[value.encode()]], dtype=np.object_)
        elif isinstance(value, bool):
            value = np.array([[value]])
        elif isinstance(value, list):
            value = np.array([[v.encode() for v in value]], dtype=np.object_)
        arrays[name] = np.asarray(value)
    return arrays.get


def _settings(**named):
    return parse_trtllm_row(_get(text_input="Hi", **named)).settings


@pytest.mark.parametrize("given,want", [
    ({}, {"temperature": 0.0}),  # nothing set: greedy
    ({"temperature": np.array([[0.8]], np.float32)}, {"temperature": 0.0}),  # C++ runtime: greedy
    ({"top_k": np.array([[1]], np.int32), "top_p": np.array([[0.0]], np.float32)},
     {"temperature": 0.0}),  # the docs' request
    ({"top_k": np.array([[0]], np.int32), "top_p": np.array([[0.0]], np.float32)},
     {"temperature": 0.0}),
    ({"top_k": np.array([[5]], np.int32)}, {"temperature": 1.0, "top_k": 5}),
    ({"top_p": np.array([[0.5]], np.float32), "temperature": np.array([[0.7]], np.float32)},
     {"temperature": pytest.approx(0.7), "top_p": 0.5}),
    ({"top_k": np.array([[4]], np.int32), "top_p": np.array([[0.9]], np.float32)},
     {"temperature": 1.0, "top_k": 4, "top_p": pytest.approx(0.9)}),
    ({"top_p": np.array([[1.0]], np.float32), "temperature": np.array([[0.0]], np.float32)},
     {"temperature": 0.0}),
])
def test_sampling_semantics(given, want):
    settings = _settings(**given)
    assert {k: settings[k] for k in ("temperature", "top_k", "top_p") if k in settings} == want
    SamplingParams.from_dict(settings)  # always something the engine takes


def test_mapping_of_the_other_inputs():
    s = parse_trtllm_row(_get(
        text_input="Hi", max_tokens=np.array([[7]], np.int32),
        num_return_sequences=np.array([[3]], np.int32), random_seed=np.array([[9]], np.uint64),
        min_length=np.array([[0]], np.int32), end_id=np.array([[-1]], np.int32),
        pad_id=np.array([[2]], np.int32), stop_words=["ab", ""], bad_words=[""],
        beam_width=np.array([[1]], np.int32), len_penalty=np.array([[1.5]], np.float32),
        streaming=True, exclude_input_in_output=False, return_log_probs=True,
        embedding_bias_words=["x", "y"],
        embedding_bias_weights=np.array([[1.0, -2.0]], np.float32)))
    assert s.settings == {"max_tokens": 7, "n": 3, "seed": 9, "temperature": 0.0,
                          "stop": ["ab"], "logprobs": 0}
    assert s.stream and s.exclude_input_in_output  # a stream never repeats the prompt
    assert s.return_log_probs and s.embedding_bias == [("x", 1.0), ("y", -2.0)]
    s = parse_trtllm_row(_get(text_input="Hi", end_id=np.array([[5]], np.int32)))
    assert s.settings["stop_token_ids"] == [5] and not s.stream and not s.exclude_input_in_output


def test_guided_decoding_inputs_map_onto_structured_outputs():
    from paged_engine import SamplingParams

    schema = '{"type": "object", "properties": {"a": {"type": "integer"}}}'
    for guide_type, guide, want in (
            ("json_schema", schema, {"json": schema}),
            ("json", None, {"json_object": True}),
            ("regex", "[0-9]+", {"regex": "[0-9]+"}),
            ("ebnf_grammar", 'root ::= "x"', {"grammar": 'root ::= "x"'})):
        named = {"text_input": "Hi", "guided_decoding_guide_type": guide_type}
        if guide is not None:
            named["guided_decoding_guide"] = guide
        s = parse_trtllm_row(_get(**named))
        assert s.settings["structured_outputs"] == want
        SamplingParams.from_dict(s.settings)  # what paged_llm then parses


@pytest.mark.parametrize("named,needle", [
    ({"beam_width": np.array([[4]], np.int32)}, "beam_width"),
    ({"return_generation_logits": True}, "return_generation_logits"),
    ({"prompt_embedding_table": np.zeros((1, 2, 2), np.float16)}, "prompt tuning"),
    ({"guided_decoding_guide": "x"}, "needs 'guided_decoding_guide_type'"),
    ({"guided_decoding_guide_type": "structural_tag", "guided_decoding_guide": "x"},
     "must be one of json, json_schema, regex, ebnf_grammar"),
    ({"guided_decoding_guide_type": "regex"}, "needs the input 'guided_decoding_guide'"),
    ({"num_draft_tokens": np.array([[3]], np.int32)}, "num_draft_tokens"),
    ({"num_return_sequences": np.array([[0]], np.int32)}, "num_return_sequences"),
    ({"top_k": np.array([[-1]], np.int32)}, "top_k"),
    ({"end_id": np.array([[-5]], np.int32)}, "end_id"),
    ({"stream": np.array([[1]], np.int32)}, "BOOL"),
    ({"seed": np.array([[1]], np.uint64), "random_seed": np.array([[1]], np.uint64)},
     "older name 'random_seed'"),
    ({"embedding_bias_words": ["x"]}, "embedding_bias_weights"),
])
def test_refusals_name_the_input(named, needle):
    with pytest.raises(RequestError, match=needle):
        _settings(**named)


def test_batch_rows_and_missing_prompt():
    get = _get(text_input=np.array([[b"a"], [b"b"]], dtype=np.object_),
               max_tokens=np.array([[3], [4]], np.int32))
    assert batch_size(get) == 2
    rows = [parse_trtllm_row(get, r, 2) for r in range(2)]
    assert [(r.text, r.settings["max_tokens"]) for r in rows] == [("a", 3), ("b", 4)]
    with pytest.raises(RequestError, match="batch size 1"):
        parse_trtllm_row(_get(text_input=np.array([[b"a"], [b"b"]], dtype=np.object_),
                              max_tokens=np.array([[3]], np.int32)), 0, 2)
    with pytest.raises(RequestError, match="missing input 'text_input'"):
        parse_trtllm_row(_get(max_tokens=np.array([[3]], np.int32)))
    with pytest.raises(Exception, match="too large"):
        parse_trtllm_row(_get(text_input="x" * 100), max_prompt_bytes=10)


def test_logit_bias_adds_each_words_weight_to_its_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.encode("Hello world", add_special_tokens=False)
    bias = logit_bias(tok, [("Hello world", 2.0), ("Hello world", 0.5)])
    assert bias == {t: 2.5 * ids.count(t) for t in ids}
