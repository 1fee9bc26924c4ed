"""benchmarks.openai_door's measuring loop on the shared tiny server (a smoke run: it measures
both paths and reports every number; the numbers themselves go to benchmarks/RESULTS.md)."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.server


def test_openai_door_bench_measures_both_paths(llm_server):
    from benchmarks.openai_door import measure
    from paged_triton.client.openai_server import ServerThread

    with ServerThread(triton_url=llm_server.grpc_url) as door:
        doc = asyncio.run(measure(llm_server.grpc_url, f"http://{door.host}:{door.port}",
                                  num_pairs=2, stream_tokens=4))
    assert set(doc) == {"per_request_max_tokens_1", "stream_time_to_first_token",
                        "stream_per_token"}
    for summary in doc.values():
        assert summary["direct_median_ms"] > 0 and summary["door_median_ms"] > 0
        assert summary["ratio_door_over_direct"] > 0
