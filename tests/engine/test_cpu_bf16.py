"""SmolLM2-135M in bf16 on CPU (the path dtype="auto" takes on CPUs with native bf16) against
transformers from the same weights. "The usual bf16 tolerance" is measured, not assumed: the
engine's bf16 logprobs of the first generated token may differ from transformers' fp32 ones by
about as much as transformers' own bf16 run does (twice its error, plus 0.05); the first greedy
token agrees, and how many greedy tokens agree with transformers bf16 is reported (bf16 sums in
another order may break a near tie differently, after which the continuations part)."""

import pytest
import torch

from paged_engine import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
NEW_TOKENS = 16
TOP = 5


@pytest.fixture(scope="module")
def hf_bf16(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()
    fp32 = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, fp32, AutoTokenizer.from_pretrained(smollm2_dir)


def test_bf16_logits_close_and_greedy_agreement(smollm2_dir, hf_bf16):
    model, fp32, tokenizer = hf_bf16
    llm = LLM(smollm2_dir, device="cpu", dtype="bfloat16", num_kv_blocks=64, max_model_len=512)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True,
                                                logprobs=TOP))
    agreement, errors = [], []
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                                output_logits=True)
        hf_ids = hf.sequences[0, len(prompt):].tolist()
        first = torch.log_softmax(hf.logits[0][0].float(), -1)
        with torch.no_grad():
            exact = torch.log_softmax(fp32(torch.tensor([prompt])).logits[0, -1].float(), -1)
        assert out.token_ids[0] == hf_ids[0]
        ids = list(out.logprobs[0])
        engine_err = max(abs(out.logprobs[0][t].logprob - float(exact[t])) for t in ids)
        hf_err = max(abs(float(first[t]) - float(exact[t])) for t in ids)
        assert engine_err <= 2 * hf_err + 0.05, (engine_err, hf_err)
        errors.append((round(engine_err, 3), round(hf_err, 3)))
        same = 0
        while same < NEW_TOKENS and out.token_ids[same] == hf_ids[same]:
            same += 1
        agreement.append(same)
    print(f"bf16 greedy agreement with transformers bf16 (tokens before the first difference, of "
          f"{NEW_TOKENS}): {agreement}; max |logprob - fp32| of the top {TOP}, engine vs transformers "
          f"bf16: {errors}")
    llm.shutdown()
