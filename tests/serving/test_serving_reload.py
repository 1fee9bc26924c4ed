"""Unload and reload of paged_llm in explicit model-control mode: finalize stops the engine
thread (the unload completes), and the reloaded model serves the same greedy text. This server
also runs with vllm_backend's REPORT_CUSTOM_METRICS set to false: no vllm:* metric at all."""

import json
import time
import urllib.request
from pathlib import Path

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
    from paged_engine.deploy.repository import prepare_model_repository

    repo = prepare_model_repository(tmp_path_factory.mktemp("reload-repo"), serving_model_dir,
                                    **engine_args)
    config = Path(repo) / "paged_llm" / "config.pbtxt"
    config.write_text(config.read_text() + 'parameters { key: "REPORT_CUSTOM_METRICS" '
                                           'value: { string_value: "false" } }\n')
    # TensorRT-LLM's decoupled_mode: false, for Triton's unary endpoints.
    bls = Path(repo) / "tensorrt_llm_bls" / "config.pbtxt"
    bls.write_text(bls.read_text().replace("model_transaction_policy { decoupled: true }",
                                           "model_transaction_policy { decoupled: false }"))
    server = triton_server_factory(
        repo, extra_args=["--model-control-mode=explicit", "--load-model=paged_llm",
                          "--load-model=tensorrt_llm_bls"])
    try:
        expected = offline_llm.generate(
            [PROMPT], SamplingParams(max_tokens=8, temperature=0.0))[0].text
        assert _generate(server) == expected
        with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
            text = r.read().decode()
        assert "nv_inference_count" in text  # Triton's own metrics are there
        assert not [line for line in text.splitlines() if "vllm:" in line]
        _unary_bls(server, expected)

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


def _unary_bls(server, expected: str) -> None:
    """tensorrt_llm_bls with decoupled: false answers HTTP /infer (TensorRT-LLM's
    end_to_end_test.py sends that) and refuses what needs several responses."""
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    def tensor(name, array):
        dtype = "BYTES" if array.dtype == np.object_ else {np.int32: "INT32",
                                                           np.bool_: "BOOL"}[array.dtype.type]
        t = httpclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    client = httpclient.InferenceServerClient(server.http_url)
    base = [tensor("text_input", np.array([[PROMPT.encode()]], dtype=np.object_)),
            tensor("max_tokens", np.array([[8]], np.int32)),
            tensor("bad_words", np.array([[b""]], dtype=np.object_)),
            tensor("stop_words", np.array([[b""]], dtype=np.object_))]
    result = client.infer("tensorrt_llm_bls", base)
    assert result.as_numpy("text_output")[0].decode() == PROMPT + expected
    with pytest.raises(InferenceServerException, match="'stream' needs the decoupled model"):
        client.infer("tensorrt_llm_bls", base + [tensor("stream", np.array([[True]]))])
    client.close()
