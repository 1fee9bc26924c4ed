"""paged_llm with tensor_parallel_size=2 in a real tritonserver (CPU, gloo): streamed text equals
the offline one-rank engine's, cancellation frees the blocks, shutdown leaves no worker process
behind, and a killed worker turns health red and fails requests with an error instead of
hanging. KIND_GPU with tensor parallelism is refused when the model loads, by name.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from serving_client import StreamClient, inputs, metrics, run_one, sampling, wait_for_metric
from test_serving_cancel import MAX_TOKENS, _cancel_mid_stream, _good_request_works

pytestmark = pytest.mark.server

PROMPTS = ["Hello world", "The quick brown fox", "naïve café 東京 🚀", "a"]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _tp_workers(server) -> list[int]:
    return tp_worker_pids(server._proc.pid)


def tp_worker_pids(root_pid: int) -> list[int]:
    """The tensor-parallel worker processes below `root_pid` (a tritonserver or a launcher)."""
    pids = []
    for pid in _descendants(root_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"paged_engine.executor.tp_worker" in f.read():
                    pids.append(pid)
        except OSError:
            pass
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start(serving_model_dir, engine_args, triton_server_factory, tmp_path_factory):
    from paged_engine.deploy.repository import prepare_model_repository

    repo = prepare_model_repository(tmp_path_factory.mktemp("tp-repo"), serving_model_dir,
                                    tensor_parallel_size=2, distributed_timeout_s=20, **engine_args)
    return triton_server_factory(repo, extra_args=["--exit-timeout-secs=3"])


@pytest.fixture(scope="module")
def tp_triton(serving_model_dir, engine_args, triton_server_factory, tmp_path_factory):
    return _start(serving_model_dir, engine_args, triton_server_factory, tmp_path_factory)


def test_stream_equals_offline(tp_triton, offline_llm):
    from paged_engine import SamplingParams

    assert len(_tp_workers(tp_triton)) == 1
    want = [o.outputs[0].text for o in offline_llm.generate(
        PROMPTS, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))]
    client = StreamClient(tp_triton.grpc_url)
    try:
        ids = [client.send("paged_llm", inputs(text_input=p, stream=True, sampling_parameters=sampling(
            max_tokens=24, temperature=0, ignore_eos=True))) for p in PROMPTS]
        streams = client.wait_all(120)
    finally:
        client.close()
    assert [streams[i].error for i in ids] == [None] * len(ids)
    assert [streams[i].text() for i in ids] == want


def test_cancel_frees_blocks(tp_triton):
    _cancel_mid_stream(tp_triton, "paged_llm", inputs(
        text_input="Hello world", stream=True,
        sampling_parameters=sampling(max_tokens=MAX_TOKENS, ignore_eos=True)))
    _good_request_works(tp_triton)
    assert metrics(tp_triton.metrics_url)["vllm:engine_healthy"] == 1


def test_shutdown_leaves_no_worker(tp_triton):
    workers = _tp_workers(tp_triton)
    assert workers
    tp_triton.stop()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers)


def test_killed_worker_gives_errors_and_health_red(serving_model_dir, engine_args, triton_server_factory,
                                                  tmp_path_factory):
    server = _start(serving_model_dir, engine_args, triton_server_factory, tmp_path_factory)
    try:
        ok = run_one(server.grpc_url, "paged_llm", inputs(text_input="Hello", sampling_parameters=sampling(
            max_tokens=4, ignore_eos=True)))
        assert ok.error is None
        client = StreamClient(server.grpc_url)
        rid = client.send("paged_llm", inputs(text_input="Hello world", stream=True, sampling_parameters=sampling(
            max_tokens=MAX_TOKENS, ignore_eos=True)))
        client.poll(timeout_s=60)  # the stream is running
        (worker,) = _tp_workers(server)
        os.kill(worker, signal.SIGKILL)
        client.wait_all(timeout_s=30)  # ends: an error, not a hang
        client.close()
        assert client.streams[rid].error is not None and "tensor-parallel" in client.streams[rid].error
        wait_for_metric(server.metrics_url, "vllm:engine_healthy", lambda v: v == 0, timeout_s=10)
        t0 = time.monotonic()
        after = run_one(server.grpc_url, "paged_llm", inputs(text_input="Hello"), timeout_s=30)
        assert after.error is not None and "unhealthy" in after.error and time.monotonic() - t0 < 10
    finally:
        server.stop()


def test_kind_gpu_with_tensor_parallelism_is_refused(tmp_path):
    from paged_engine.serving.llm_model import PagedLLMModel

    class Refused(Exception):
        pass

    class FakePb:
        Logger = None
        TritonModelException = Refused

        @staticmethod
        def using_decoupled_model_transaction_policy(config):
            return True

    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.json").write_text(json.dumps({"model": "/m", "tensor_parallel_size": 2}))
    model = PagedLLMModel(FakePb, engine_factory=lambda args: pytest.fail("no engine may start"))
    args = {"model_config": json.dumps({"parameters": {}}), "model_name": "paged_llm",
            "model_repository": str(tmp_path), "model_version": "1", "model_instance_kind": "GPU",
            "model_instance_device_id": "0"}
    with pytest.raises(Refused, match="KIND_MODEL"):
        model.initialize(args)

