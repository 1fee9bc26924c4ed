"""The OpenAI door as vLLM users drive it: the official `openai` client, a real tritonserver, the
real SmolLM2-135M-Instruct chat model (CPU).

References are independent of the door: logprobs against transformers' log_softmax on the same
weights, token ids against the Hugging Face tokenizer, sampling extras against the offline
engine given the same SamplingParams.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

pytestmark = pytest.mark.server

openai = pytest.importorskip("openai")

MODEL = "paged_llm"
EXACT = {"ignore_eos": True}


@pytest.fixture(scope="module")
def door(smollm2_server):
    from paged_triton.client.openai_server import ServerThread

    with ServerThread(triton_url=smollm2_server.grpc_url,
                      metrics_url=smollm2_server.metrics_url) as d:
        yield d


@pytest.fixture(scope="module")
def oai(door):
    return openai.OpenAI(base_url=door.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    """transformers' model and tokenizer on the same (dequantized, float32) weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


def hf_logprobs(hf, ids: list[int]):
    """log_softmax of the logits at every position of ids: row p predicts token p + 1."""
    import torch

    model, _ = hf
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _post(door, path, body, headers=None):
    request = urllib.request.Request(f"http://{door.host}:{door.port}{path}",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request) as r:
        return json.loads(r.read())


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def chat_ids(tok, messages) -> list[int]:
    """The chat prompt's token ids as the engine tokenizes the rendered text."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tok(text).input_ids)


def test_chat_logprobs_match_transformers(oai, hf):
    r = oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0,
                                    logprobs=True, top_logprobs=3, extra_body=EXACT)
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == choice.message.content
    _, tok = hf
    prompt_ids = chat_ids(tok, QUESTION)
    assert r.usage.prompt_tokens == len(prompt_ids)
    # Greedy: transformers picks the same tokens, with the same logprobs.
    ids = list(prompt_ids)
    for t in content:
        assert t.bytes == list(t.token.encode("utf-8"))
        assert len(t.top_logprobs) == 3
        assert [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True)
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy: the top token
        row = hf_logprobs(hf, ids)[-1]
        best = int(row.argmax())
        assert t.logprob == pytest.approx(float(row[best]), abs=2e-3)
        top3 = row.topk(3).values.tolist()
        assert [a.logprob for a in t.top_logprobs] == pytest.approx(top3, abs=2e-3)
        ids.append(best)
    assert tok.decode(ids[len(prompt_ids):]) == choice.message.content


def test_completion_echo_has_prompt_logprobs(oai, hf):
    prompt = "The capital of France is"
    r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                               echo=True, logprobs=2, extra_body=EXACT)
    choice = r.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    n_prompt, n_out = r.usage.prompt_tokens, r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n_prompt + n_out
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts it
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    _, tok = hf
    prompt_ids = tok(prompt).input_ids
    assert n_prompt == len(prompt_ids)
    assert "".join(lp.tokens[:n_prompt]) == tok.decode(prompt_ids)
    ref = hf_logprobs(hf, prompt_ids)
    for p in range(1, n_prompt):
        assert lp.token_logprobs[p] == pytest.approx(float(ref[p - 1, prompt_ids[p]]), abs=2e-3)
        assert len(lp.top_logprobs[p]) >= 2  # the top 2, and the actual token
    generated = lp.tokens[n_prompt:]
    assert "".join(generated) == choice.text[len(prompt):]
    for p in range(n_prompt, n_prompt + n_out):
        assert lp.token_logprobs[p] == pytest.approx(max(lp.top_logprobs[p].values()), abs=1e-6)


def test_completion_prompts_as_lists_and_token_ids(oai, door, hf):
    _, tok = hf
    texts = ["Once upon a time", "The quick brown fox"]
    one = [oai.completions.create(model=MODEL, prompt=t, max_tokens=4, temperature=0,
                                  extra_body=EXACT).choices[0].text for t in texts]
    batch = oai.completions.create(model=MODEL, prompt=texts, max_tokens=4, temperature=0,
                                   extra_body=EXACT)
    assert [c.text for c in batch.choices] == one and [c.index for c in batch.choices] == [0, 1]
    ids = tok(texts[0]).input_ids
    assert _post(door, "/tokenize", {"prompt": texts[0]})["tokens"] == ids
    assert _post(door, "/detokenize", {"tokens": ids})["prompt"] == tok.decode(ids)
    by_ids = oai.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0,
                                    echo=True, extra_body=EXACT)
    assert by_ids.choices[0].text == tok.decode(ids) + one[0]
    assert by_ids.usage.prompt_tokens == len(ids)
    lists = oai.completions.create(model=MODEL, prompt=[ids, tok(texts[1]).input_ids],
                                   max_tokens=4, temperature=0, extra_body=EXACT)
    assert [c.text for c in lists.choices] == one


def test_n_seed_and_sampling_extras_match_the_engine(oai, smollm2_llm):
    from paged_engine import SamplingParams

    prompt = "Write a word:"
    a = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=8, n=2, seed=11,
                               temperature=1.0, extra_body=EXACT)
    b = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=8, n=2, seed=11,
                               temperature=1.0, extra_body=EXACT)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == 16
    extras = dict(top_k=20, min_p=0.05, repetition_penalty=1.3, min_tokens=4)
    r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=8, seed=5, temperature=0.8,
                               presence_penalty=0.5, frequency_penalty=0.3, extra_body=extras)
    expected = smollm2_llm.generate([prompt], SamplingParams(
        max_tokens=8, seed=5, temperature=0.8, presence_penalty=0.5, frequency_penalty=0.3,
        **extras))[0]
    assert r.choices[0].text == expected.outputs[0].text
    assert r.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert r.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_chat_stream_with_usage_logprobs_and_finish_reasons(oai):
    kwargs = dict(model=MODEL, messages=QUESTION, temperature=0)
    whole = oai.chat.completions.create(max_tokens=8, extra_body=EXACT, **kwargs)
    chunks = list(oai.chat.completions.create(
        max_completion_tokens=8, stream=True, stream_options={"include_usage": True},
        logprobs=True, top_logprobs=2, extra_body=EXACT, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content
    streamed_lp = [t for c in body if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(streamed_lp) == 8
    assert body[-1].choices[0].finish_reason == "length"
    # A stop string ends it with "stop", and the text is cut before it.
    words = whole.choices[0].message.content.split()
    stopped = oai.chat.completions.create(max_tokens=8, stop=[words[1]], **kwargs)
    assert stopped.choices[0].finish_reason == "stop"
    assert words[1] not in stopped.choices[0].message.content
    # EOS ends a chat answer with "stop" (no max_tokens: it runs to the end).
    free = oai.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": "Say just the word yes."}], temperature=0)
    assert free.choices[0].finish_reason == "stop" and free.usage.completion_tokens < 200


def test_errors_name_the_parameter(oai):
    cases = [
        (dict(messages=QUESTION, logprobs=True, top_logprobs=21), "top_logprobs"),
        (dict(messages=QUESTION, top_logprobs=2), "top_logprobs"),
        (dict(messages=QUESTION, temperature=-1), "temperature"),
        (dict(messages=QUESTION, response_format={"type": "xml"}), "response_format"),
        (dict(messages=QUESTION, tools=[{"type": "function", "function": {"name": "f"}}],
              tool_choice={"type": "function", "function": {"name": "g"}}), "tool_choice"),
        (dict(messages=QUESTION, tools=[{"type": "function"}]), "tools"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model=MODEL, max_tokens=2, **kwargs)
        assert e.value.status_code == 400 and e.value.body["param"] == param, (kwargs, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="x", suffix="y", max_tokens=2)
    assert e.value.body["param"] == "suffix" and e.value.body["code"] == "unsupported_parameter"


def test_models_health_metrics_and_cors(oai, door):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    base = f"http://{door.host}:{door.port}"
    with urllib.request.urlopen(base + "/health") as r:
        assert r.status == 200
    with urllib.request.urlopen(base + "/metrics") as r:
        text = r.read().decode()
    assert "vllm:prompt_tokens_total" in text and "nv_inference_count" in text
    preflight = urllib.request.Request(base + "/v1/chat/completions", method="OPTIONS", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    with urllib.request.urlopen(preflight) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
    request = urllib.request.Request(base + "/v1/models", headers={"Origin": "http://app.example"})
    with urllib.request.urlopen(request) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "*"


def test_api_key(smollm2_server):
    from paged_triton.client.openai_server import ServerThread

    with ServerThread(triton_url=smollm2_server.grpc_url, api_key="s3cret") as d:
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=d.base_url, api_key="wrong", max_retries=0).models.list()
        assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
        good = openai.OpenAI(base_url=d.base_url, api_key="s3cret", max_retries=0, timeout=120)
        r = good.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body=EXACT)
        assert r.usage.completion_tokens == 2
        with urllib.request.urlopen(f"http://{d.host}:{d.port}/health") as r:
            assert r.status == 200  # health stays open for probes


def test_tools_auto_renders_them_and_answers_validly(oai, hf):
    """`auto` on a 135M model: the tools reach the prompt; whatever the model says comes back as
    a valid answer (tool calls naming a given tool, with JSON arguments, or plain content)."""
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = oai.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=48,
                                    temperature=0)
    _, tok = hf
    plain = len(chat_ids(tok, messages))
    assert r.usage.prompt_tokens > plain + 50  # the tool's description is in the prompt
    message = r.choices[0].message
    if message.tool_calls:
        assert r.choices[0].finish_reason == "tool_calls"
        for call in message.tool_calls:
            assert call.function.name == "get_weather" and call.id
            json.loads(call.function.arguments)
    else:
        assert message.content and r.choices[0].finish_reason in ("stop", "length")
    none = oai.chat.completions.create(model=MODEL, messages=messages, tools=tools,
                                       tool_choice="none", max_tokens=4, temperature=0)
    assert none.usage.prompt_tokens == plain and not none.choices[0].message.tool_calls


def test_completion_stream_echo_logprobs_and_chat_n(oai):
    prompt = "The capital of France is"
    whole = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                   echo=True, logprobs=1, extra_body=EXACT)
    chunks = [c for c in oai.completions.create(model=MODEL, prompt=prompt, max_tokens=4,
                                                temperature=0, echo=True, logprobs=1,
                                                stream=True, extra_body=EXACT) if c.choices]
    assert chunks[0].choices[0].text == prompt  # the echo comes first, with the prompt's logprobs
    assert chunks[0].choices[0].logprobs.token_logprobs[0] is None
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices[0].logprobs
               for o in c.choices[0].logprobs.text_offset]
    assert tokens == whole.choices[0].logprobs.tokens
    assert offsets == whole.choices[0].logprobs.text_offset
    assert chunks[-1].choices[0].finish_reason == "length"
    r = oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5, n=2, seed=7,
                                    temperature=1.0, extra_body=EXACT)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 10
