"""The benchmark workloads (issue 7): which model, which requests, which sampling.

    wl = get_workload("W1", tiny=False)
    requests = wl.make_requests()          # list[BenchRequest], deterministic
    spec = wl.model                        # benchmarks.model_dir.ModelSpec

Every workload uses prompts of random token ids and `ignore_eos`, so the number of generated
tokens is exactly the sum of the requests' `max_tokens`. `--tiny` variants keep the request
pattern but scale lengths and the model down for CPU smoke runs; their numbers say nothing
about speed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from benchmarks.model_dir import LLAMA3_8B, QWEN3_0_6B, TINY_LLAMA, TINY_QWEN3, ModelSpec, num_word_tokens


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    """Args:
        name: "W1".."W4".
        model: the architecture.
        num_requests: default number of requests.
        prompt_len: (lo, hi) inclusive, drawn per request with `random.randint` when lo != hi.
        output_len: (lo, hi) inclusive, likewise.
        token_id_high: prompt ids are `randint(0, token_id_high)` (nano-vllm draws from [0, 10000]).
        temperature: sampling temperature (top_p 1, top_k off).
        max_model_len: engine max_model_len (None: the model's).
        seed: `random.seed` of the request draw.
        draw: "nano_vllm" draws per request ids, then lengths in nano-vllm's order; "fixed" uses
            fixed lengths.
    """

    name: str
    model: ModelSpec
    num_requests: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    token_id_high: int
    temperature: float
    max_model_len: int | None
    seed: int = 0
    draw: str = "fixed"

    def make_requests(self, num_requests: int | None = None) -> list[BenchRequest]:
        """The workload's requests, the same on every call (seeded)."""
        n = self.num_requests if num_requests is None else num_requests
        if n < 1:
            raise ValueError(f"num_requests must be >= 1, got {n}")
        # ids must be words of the synthetic tokenizer so that W4 can send the prompt as text
        high = min(self.token_id_high, num_word_tokens(self.model.vocab_size) - 1)
        if self.draw == "nano_vllm":
            # nano-vllm bench.py: seed(0); prompt_token_ids = [[randint(0, 10000) for _ in
            # range(randint(100, max_input_len))] ...]; max_tokens=randint(100, max_output_len)
            rng = random.Random(self.seed)
            prompts = [[rng.randint(0, high) for _ in range(rng.randint(*self.prompt_len))]
                       for _ in range(n)]
            max_tokens = [rng.randint(*self.output_len) for _ in range(n)]
            return [BenchRequest(p, m) for p, m in zip(prompts, max_tokens)]
        rng = random.Random(self.seed)
        out = []
        for _ in range(n):
            plen = rng.randint(*self.prompt_len)
            olen = rng.randint(*self.output_len)
            out.append(BenchRequest([rng.randint(0, high) for _ in range(plen)], olen))
        return out


WORKLOADS = {
    # nano-vllm's benchmark: Qwen3-0.6B, 256 requests, lengths randint(100, 1024), temperature 0.6
    "W1": Workload("W1", QWEN3_0_6B, 256, (100, 1024), (100, 1024), 10000, 0.6, 4096,
                   draw="nano_vllm"),
    # vLLM's H100 throughput run: Llama-3-8B, 1000 x (256 in, 256 out), temperature 1.0
    "W2": Workload("W2", LLAMA3_8B, 1000, (256, 256), (256, 256), 10000, 1.0, None),
    # batch-1 latency: Llama-3-8B, 32 in, 128 out (vLLM benchmark_latency defaults), temperature 1.0
    "W3": Workload("W3", LLAMA3_8B, 1, (32, 32), (128, 128), 10000, 1.0, None),
}
# W4 serves W1's requests through tritonserver.
WORKLOADS["W4"] = WORKLOADS["W1"]

TINY_WORKLOADS = {
    "W1": Workload("W1-tiny", TINY_QWEN3, 8, (4, 24), (4, 24), 10000, 0.6, 512, draw="nano_vllm"),
    "W2": Workload("W2-tiny", TINY_LLAMA, 8, (16, 16), (16, 16), 10000, 1.0, 512),
    "W3": Workload("W3-tiny", TINY_LLAMA, 1, (8, 8), (16, 16), 10000, 1.0, 512),
}
TINY_WORKLOADS["W4"] = TINY_WORKLOADS["W1"]


def get_workload(name: str, tiny: bool = False) -> Workload:
    table = TINY_WORKLOADS if tiny else WORKLOADS
    key = name.upper()
    if key not in table:
        raise ValueError(f"unknown workload {name!r}; expected one of {sorted(table)}")
    return table[key]
