"""Unload and reload of paged_llm in explicit model-control mode: finalize stops the engine
thread (the unload completes), and the reloaded model serves the same greedy text."""

import json
import time
import urllib.request

import pytest

from paged_engine import SamplingParams
from serving_client import inputs, run_one, sampling

pytestmark = pytest.mark.server

PROMPT = "Hello world! 你好"


def _post(server, path: str) -> int:
    req = urllib.request.Request(f"http://{server.http_url}{path}", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status


def _state(server, model: str) -> str | None:
    req = urllib.request.Request(f"http://{server.http_url}/v2/repository/index", data=b"{}",
                                 method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        index = json.loads(r.read())
    return next((m.get("state") for m in index if m["name"] == model), None)


def _generate(server) -> str:
    stream = run_one(server.grpc_url, "paged_llm", inputs(
        text_input=PROMPT, stream=True, sampling_parameters=sampling(max_tokens=8, temperature=0)))
    assert stream.error is None and stream.finals == 1
    return stream.text()


def test_unload_then_load_serves_again(tmp_path_factory, serving_model_dir, engine_args,
                                       offline_llm, triton_server_factory):
    from paged_engine.serving.repository import prepare_model_repository

    repo = prepare_model_repository(tmp_path_factory.mktemp("reload-repo"), serving_model_dir,
                                    **engine_args)
    server = triton_server_factory(
        repo, extra_args=["--model-control-mode=explicit", "--load-model=paged_llm"])
    try:
        expected = offline_llm.generate(
            [PROMPT], SamplingParams(max_tokens=8, temperature=0.0))[0].text
        assert _generate(server) == expected

        assert _post(server, "/v2/repository/models/paged_llm/unload") == 200
        deadline = time.monotonic() + 60  # a finalize that never joins its threads stays UNLOADING
        while _state(server, "paged_llm") in ("READY", "UNLOADING") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _state(server, "paged_llm") == "UNAVAILABLE"

        assert _post(server, "/v2/repository/models/paged_llm/load") == 200
        assert _state(server, "paged_llm") == "READY"
        assert _generate(server) == expected
    finally:
        server.stop()
