"""16 concurrent streams with different sampling settings all complete correctly, and the engine
batches them continuously (later requests start before earlier ones finish)."""

import numpy as np
import pytest

from paged_engine import SamplingParams
from serving_client import StreamClient, inputs, sampling

pytestmark = pytest.mark.server

PROMPTS = ["Hello world!", "The quick brown fox", "日本語のテキスト", "Paged attention",
           "Emoji: 😀 🚀", "Numbers: 0 1 2", "café naïve", "Continuous batching"]


def _settings(i: int) -> dict:
    """Sixteen different settings; seeded sampling is batch-independent, so offline matches."""
    base = {"max_tokens": 48 if i == 0 else 4 + i % 7}  # the first outlives the sends
    kinds = [
        {"temperature": 0.0},
        {"temperature": 0.8, "seed": 100 + i},
        {"temperature": 1.0, "top_k": 20, "seed": 200 + i},
        {"temperature": 0.7, "top_p": 0.9, "seed": 300 + i},
        {"temperature": 0.9, "min_p": 0.05, "seed": 400 + i},
        {"temperature": 0.0, "repetition_penalty": 1.3},
        {"temperature": 1.0, "presence_penalty": 0.5, "frequency_penalty": 0.5, "seed": 500 + i},
        {"temperature": 0.0, "min_tokens": 3},
    ]
    return {**base, **kinds[i % len(kinds)]}


def test_sixteen_concurrent_streams(triton, offline_llm):
    n = 16
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    settings = [_settings(i) for i in range(n)]
    expected = offline_llm.generate(prompts, [SamplingParams(**s) for s in settings])

    client = StreamClient(triton.grpc_url)
    try:
        ids = [client.send("paged_llm", inputs(
            text_input=prompts[i], stream=True, sampling_parameters=sampling(**settings[i]),
            return_num_output_tokens=True)) for i in range(n)]
        streams = client.wait_all(timeout_s=240)
    finally:
        client.close()

    for i, rid in enumerate(ids):
        s = streams[rid]
        assert s.error is None, (settings[i], s.error)
        assert s.finals == 1
        assert s.text() == expected[i].text, (settings[i], s.text(), expected[i].text)
        assert sum(int(v[0]) for v in s.values("num_output_tokens")) == len(expected[i].token_ids)
    # Continuous batching: the last request's first token came before the first one's last.
    first, last = streams[ids[0]], streams[ids[-1]]
    assert last.times_s[0] < first.times_s[-1]
    starts = np.array([streams[r].times_s[0] for r in ids])
    ends = np.array([streams[r].times_s[-1] for r in ids])
    assert (starts[1:] < ends[0]).sum() >= n // 2
