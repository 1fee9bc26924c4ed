"""Structured outputs (issue 18): grammar-constrained decoding with xgrammar.

Checked against independent references: JSON-schema outputs with `jsonschema`, regex outputs
with Python's `re.fullmatch`, EBNF outputs with an equivalent regular expression, the bitmask
op against xgrammar's own `apply_token_bitmask_inplace`, per-position draft bitmasks against a
fresh matcher fed the same tokens; unconstrained requests in a constrained batch against the
same request run alone, and speculative decoding (greedy, n-gram drafts) against the same
constrained request without it.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from paged_engine import SamplingParams
from paged_engine.sampling_params import StructuredOutputsParams as SO

jsonschema = pytest.importorskip("jsonschema")
xgr = pytest.importorskip("xgrammar")

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
GREETING_EBNF = '''
root ::= greeting " " name "!"
greeting ::= "Hello" | "Hi"
name ::= [A-Z] [a-z] [a-z]? [a-z]? [a-z]? [a-z]? [a-z]? [a-z]?
'''
# The same language, written independently as a regular expression.
GREETING_RE = r"(?:Hello|Hi) [A-Z][a-z]{1,7}!"


def chat_ids(llm, question: str) -> list[int]:
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                            tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


# ------------------------------------------------------------------ parameters (no model)


def test_structured_outputs_params_need_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one of json, regex, choice, grammar"):
        SO()
    with pytest.raises(ValueError, match=r"got \['json', 'regex'\]"):
        SO(json={"type": "object"}, regex="a+")
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        SO(choice=[])
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        SO(choice=["a", 3])
    with pytest.raises(ValueError, match="regex must be a non-empty string"):
        SO(regex="")
    with pytest.raises(ValueError, match="json must be a JSON schema"):
        SO(json="not json at all")
    with pytest.raises(ValueError, match="unknown structured_outputs key"):
        SamplingParams(structured_outputs={"jsn": {}})


def test_sampling_parameters_json_keys_map_onto_structured_outputs():
    """paged_llm's sampling_parameters: the structured_outputs object (values may be JSON
    text) and vLLM's older guided_* keys give the same StructuredOutputsParams."""
    schema_text = json.dumps(PERSON)
    a = SamplingParams.from_dict(json.dumps({"structured_outputs": {"json": PERSON}}))
    b = SamplingParams.from_dict({"structured_outputs": json.dumps({"json": schema_text})})
    c = SamplingParams.from_dict({"guided_json": schema_text})
    assert a.structured_outputs == b.structured_outputs == c.structured_outputs
    assert a.structured_outputs.json == PERSON and a.structured_outputs.kind == "json"
    assert SamplingParams.from_dict({"guided_choice": '["yes", "no"]'}).structured_outputs.choice == ("yes", "no")
    assert SamplingParams.from_dict({"guided_regex": "a+"}).structured_outputs.regex == "a+"
    assert SamplingParams.from_dict({"guided_grammar": "root ::= \"x\""}).structured_outputs.kind == "grammar"
    assert SamplingParams.from_dict({"guided_json_object": "true"}).structured_outputs.kind == "json_object"
    with pytest.raises(ValueError, match="not both"):
        SamplingParams.from_dict({"guided_regex": "a", "structured_outputs": {"regex": "b"}})
    # Absent / null guided keys are no constraint (clients send them as null).
    assert SamplingParams.from_dict({"guided_json": None}).structured_outputs is None
    assert SamplingParams.from_dict({"guided_json_object": "false"}).structured_outputs is None


def test_grammar_bitmask_matches_xgrammar_reference():
    from paged_engine.executor.grammar_bitmask import apply_grammar_bitmask

    torch.manual_seed(0)
    for vocab in (32, 33, 100, 1000):
        words = -(-vocab // 32)
        logits = torch.randn(5, vocab)
        bitmask = torch.randint(-2**31, 2**31 - 1, (3, words), dtype=torch.int32)
        rows = [0, 2, 4]
        expected = logits.clone()
        full = torch.zeros(5, words, dtype=torch.int32)  # xgrammar indexes logits and bitmask alike
        full[rows] = bitmask
        xgr.apply_token_bitmask_inplace(expected, full, vocab_size=vocab, indices=rows,
                                        backend="torch_native")
        got = logits.clone()
        apply_grammar_bitmask(got, rows, [bitmask[:1].numpy(), bitmask[1:].numpy()])
        assert torch.equal(got, expected)
        assert torch.equal(got[[1, 3]], logits[[1, 3]])  # unconstrained rows untouched


@pytest.fixture(scope="module")
def smollm2_manager(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    from paged_engine.structured_output import StructuredOutputManager

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    vocab = AutoConfig.from_pretrained(smollm2_dir).vocab_size
    manager = StructuredOutputManager(tokenizer, vocab, [tokenizer.eos_token_id])
    yield manager, tokenizer
    manager.shutdown()


def _bits(row) -> set[int]:
    return {w * 32 + b for w, word in enumerate(row.tolist()) for b in range(32) if (word >> b) & 1}


def test_draft_bitmasks_per_position_and_cut_at_first_rejected(smollm2_manager):
    manager, tok = smollm2_manager
    compiled = manager.compile(SO(json=PERSON, disable_any_whitespace=True)).result()
    good = tok.encode('{"name": "Ann", "age": 3', add_special_tokens=False)
    bad = tok.encode('"thirty"', add_special_tokens=False)
    drafts = good + bad
    grammar = manager.new_grammar(compiled)
    bitmask, kept = grammar.next_token_bitmask(drafts)
    assert kept == good  # the quote after "age": is not an integer
    assert bitmask.shape == (len(good) + 1, -(-manager.vocab_size // 32))
    # Row j equals the bitmask of a fresh matcher fed drafts[:j].
    for j in range(len(good) + 1):
        ref = xgr.GrammarMatcher(compiled)
        for t in good[:j]:
            assert ref.accept_token(t)
        ref_mask = xgr.allocate_token_bitmask(1, manager.vocab_size)
        ref.fill_next_token_bitmask(ref_mask, 0)
        assert _bits(bitmask[j]) == _bits(ref_mask[0].numpy()), j
    assert bad[0] not in _bits(bitmask[len(good)])
    # The matcher is left where it was: the same call gives the same answer.
    again, kept_again = grammar.next_token_bitmask(drafts)
    assert kept_again == kept and (again == bitmask).all()
    # A draft that ends the grammar (EOS) is left to the target.
    grammar = manager.new_grammar(manager.compile(SO(choice=["yes", "no"])).result())
    yes = tok.encode("yes", add_special_tokens=False)
    _, kept = grammar.next_token_bitmask(yes + [tok.eos_token_id])
    assert kept == yes


def test_compile_errors_name_the_problem_and_are_cached(smollm2_manager):
    manager, _ = smollm2_manager
    for spec, message in ((SO(json={"type": "nope"}), 'json does not compile: Unsupported type "nope"'),
                          (SO(regex="([a-z"), "regex does not compile"),
                          (SO(grammar="root ::= "), "grammar does not compile")):
        future = manager.compile(spec)
        with pytest.raises(ValueError, match=re.escape(message)):
            future.result()
        assert manager.compile(spec) is future  # cached: fails at once next time
    one = manager.compile(SO(json=PERSON))
    assert manager.compile(SO(json=json.loads(json.dumps(PERSON)))) is one


# ------------------------------------------------------------------ the real model


def _constrained_batch(llm):
    questions = {
        "json": "Give me a person as JSON with a name and an age.",
        "plain": "What is the capital of France?",
        "regex": "Give me a US phone number.",
        "choice": "Is the sky blue? Answer yes or no.",
        "grammar": "Greet Alice.",
        "random_choice": "Pick a color.",
        "json_object": 'What color is the sky? Answer as a JSON object like {"color": ...}.',
    }
    params = {
        "json": SamplingParams(temperature=0, max_tokens=48,
                               structured_outputs=SO(json=PERSON, disable_any_whitespace=True)),
        "plain": SamplingParams(temperature=0, max_tokens=12),
        "regex": SamplingParams(temperature=0, max_tokens=24, structured_outputs=SO(regex=PHONE)),
        "choice": SamplingParams(temperature=0, max_tokens=8,
                                 structured_outputs=SO(choice=["yes", "no"])),
        "grammar": SamplingParams(temperature=0, max_tokens=16,
                                  structured_outputs=SO(grammar=GREETING_EBNF)),
        # Random sampling goes through the same mask; n=2: each output has its own matcher.
        "random_choice": SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=8,
                                        structured_outputs=SO(choice=["red", "green", "blue"])),
        "json_object": SamplingParams(temperature=0, max_tokens=48, structured_outputs=SO(
            json_object=True, disable_any_whitespace=True)),
    }
    names = list(questions)
    outs = llm.generate([chat_ids(llm, questions[n]) for n in names], [params[n] for n in names])
    return dict(zip(names, outs)), questions, params


@pytest.fixture(scope="module")
def constrained_batch(smollm2_llm):
    return _constrained_batch(smollm2_llm)


def test_constrained_outputs_validate(constrained_batch):
    outs, _, _ = constrained_batch
    for name, out in outs.items():
        assert out.error is None, (name, out.error)
    person = json.loads(outs["json"].text)
    jsonschema.validate(person, PERSON)
    assert outs["json"].finish_reason == "stop"  # the grammar ended it, not max_tokens
    assert re.fullmatch(PHONE, outs["regex"].text), outs["regex"].text
    assert outs["choice"].text in ("yes", "no")
    assert re.fullmatch(GREETING_RE, outs["grammar"].text), outs["grammar"].text
    assert len(outs["random_choice"].outputs) == 2
    for completion in outs["random_choice"].outputs:
        assert completion.text in ("red", "green", "blue") and completion.finish_reason == "stop"
    assert isinstance(json.loads(outs["json_object"].text), dict)
    for name in ("json", "regex", "choice", "grammar", "random_choice", "json_object"):
        assert outs[name].finish_reason == "stop", (name, outs[name].text)


def test_unconstrained_request_in_a_constrained_batch_is_unchanged(smollm2_llm, constrained_batch):
    outs, questions, params = constrained_batch
    alone = smollm2_llm.generate([chat_ids(smollm2_llm, questions["plain"])], params["plain"])[0]
    assert outs["plain"].token_ids == alone.token_ids
    assert "Paris" in alone.text


def test_bad_grammar_fails_only_its_request_and_frees_everything(smollm2_llm):
    engine = smollm2_llm.engine
    plain = SamplingParams(temperature=0, max_tokens=6)
    ids = chat_ids(smollm2_llm, "What is the capital of France?")
    alone = smollm2_llm.generate([ids], plain)[0]
    bad_schema = {"type": "object", "properties": {"x": {"type": "no-such-type"}}}
    outs = smollm2_llm.generate(
        [ids, ids, ids],
        [SamplingParams(max_tokens=6, structured_outputs=SO(json=bad_schema)), plain,
         SamplingParams(max_tokens=6, structured_outputs=SO(regex="(unclosed"))])
    assert outs[0].finish_reason == "error" and outs[0].token_ids == []
    assert "structured_outputs.json does not compile" in outs[0].error
    assert "no-such-type" in outs[0].error
    assert outs[2].finish_reason == "error" and "structured_outputs.regex" in outs[2].error
    assert outs[1].error is None and outs[1].token_ids == alone.token_ids
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert not engine.has_unfinished_requests()
    # The same spec again is refused in add_request (its failure is cached); nothing is queued.
    with pytest.raises(ValueError, match="no-such-type"):
        engine.add_request("again", prompt_token_ids=ids,
                           params=SamplingParams(structured_outputs=SO(json=bad_schema)))
    assert not engine.has_unfinished_requests()


def test_waiting_for_grammar_blocks_only_its_request(smollm2_llm, monkeypatch):
    """A request whose grammar is still compiling waits (no blocks, no tokens) while others run;
    once the grammar is there it runs; aborted while waiting it ends at once."""
    from concurrent.futures import Future

    from paged_engine.core.sequence import SequenceStatus

    engine = smollm2_llm.engine
    manager = engine.structured_output_manager()
    compiled = manager.compile(SO(choice=["yes", "no"])).result()
    pending = {"slow": Future(), "aborted": Future()}
    monkeypatch.setattr(manager, "compile", lambda spec: pending[spec.regex])
    ids = chat_ids(smollm2_llm, "Is the sky blue? Answer yes or no.")
    engine.add_request("slow", prompt_token_ids=ids,
                       params=SamplingParams(temperature=0, structured_outputs=SO(regex="slow")))
    engine.add_request("aborted", prompt_token_ids=ids,
                       params=SamplingParams(temperature=0, structured_outputs=SO(regex="aborted")))
    engine.add_request("plain", prompt_token_ids=ids, params=SamplingParams(temperature=0, max_tokens=4))
    finals = {}
    while "plain" not in finals:
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    slow = engine.requests["slow"].leader
    assert slow.status is SequenceStatus.WAITING_FOR_GRAMMAR and slow.block_table == []
    assert engine.abort("aborted")
    pending["slow"].set_result(compiled)  # the grammar arrives
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert finals["aborted"].finish_reason == "abort" and finals["aborted"].token_ids == []
    assert finals["slow"].text in ("yes", "no") and finals["slow"].finish_reason == "stop"
    assert engine.stats()["kv_blocks_used"] == 0


def test_speculative_ngram_constrained_output_validates_and_equals_plain(
        smollm2_gguf, smollm2_dir, smollm2_llm, smollm2_engine_args):
    """n-gram drafts from a prompt whose record breaks the schema ("age" as a word): drafts
    the grammar rejects are cut, the verified output is the plain greedy one."""
    from paged_engine import LLM

    question = ('Here is a record: {"name": "Ann", "age": "thirty"}. '
                'Write it as JSON with the age as a number.')
    params = SamplingParams(temperature=0, max_tokens=32,
                            structured_outputs=SO(json=PERSON, disable_any_whitespace=True))
    ids = chat_ids(smollm2_llm, question)
    plain = smollm2_llm.generate([ids], params)[0]
    spec_llm = LLM(smollm2_gguf, **smollm2_engine_args, speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
        "prompt_lookup_max": 3, "adaptive": False})
    try:
        out = spec_llm.generate([ids], params)[0]
        stats = spec_llm.stats()
    finally:
        spec_llm.shutdown()
    jsonschema.validate(json.loads(out.text), PERSON)
    assert out.token_ids == plain.token_ids
    assert stats["spec_num_draft_tokens"] > 0  # drafts were verified


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculative_constrained_greedy_equals_plain_on_a_tiny_model(tiny_model_dir, method,
                                                                     monkeypatch):
    """Drafts the grammar rejects are cut before verification, the others verified: the output
    is the plain constrained greedy output, token for token. n-gram drafts come from a prompt
    of a/b text (many pass the grammar); the draft model is the random-weight target itself,
    whose unconstrained greedy drafts the grammar mostly rejects."""
    from paged_engine import LLM
    from paged_engine.structured_output import SequenceGrammar

    spec = ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
             "prompt_lookup_max": 2, "adaptive": False} if method == "ngram" else
            {"method": "draft_model", "model": tiny_model_dir, "num_speculative_tokens": 3})
    args = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=128)
    prompts = ["abba abab baab abba", "ab ba ab ba aabb"]
    params = [SamplingParams(temperature=0, max_tokens=12, structured_outputs=SO(regex="[ab]{2,12}")),
              SamplingParams(temperature=0, max_tokens=12,
                             structured_outputs=SO(choice=["abba", "baab", "aaaa"]))]
    plain_llm = LLM(tiny_model_dir, **args)
    try:
        plain = plain_llm.generate(prompts, params)
    finally:
        plain_llm.shutdown()
    walked = []  # (drafts proposed, drafts kept) per constrained sequence-step
    original = SequenceGrammar.next_token_bitmask

    def recording(self, draft_token_ids=()):
        bitmask, kept = original(self, draft_token_ids)
        walked.append((len(draft_token_ids), len(kept)))
        return bitmask, kept

    monkeypatch.setattr(SequenceGrammar, "next_token_bitmask", recording)
    spec_llm = LLM(tiny_model_dir, **args, speculative_config=spec)
    try:
        out = spec_llm.generate(prompts, params)
        stats = spec_llm.stats()
    finally:
        spec_llm.shutdown()
    assert re.fullmatch("[ab]{2,12}", plain[0].text) and plain[1].text in ("abba", "baab", "aaaa")
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    assert any(kept < proposed for proposed, kept in walked), walked  # some drafts were cut
    if method == "ngram":
        assert stats["spec_num_draft_tokens"] > 0, walked  # and some verified


def test_min_tokens_that_block_the_grammars_end_is_an_error_not_a_crash(tiny_model_dir):
    from paged_engine import LLM

    llm = LLM(tiny_model_dir, device="cpu", dtype="float32", block_size=4, num_kv_blocks=64)
    try:
        out, plain = llm.generate(["hello", "hello"], [
            SamplingParams(temperature=0, max_tokens=8, min_tokens=6,
                           structured_outputs=SO(choice=["ab"])),
            SamplingParams(temperature=0, max_tokens=4)])
        alone = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=4))[0]
        assert llm.stats()["kv_blocks_used"] == 0
    finally:
        llm.shutdown()
    assert out.finish_reason == "error" and "no allowed token" in out.error
    assert out.text == "ab"
    assert plain.token_ids == alone.token_ids
