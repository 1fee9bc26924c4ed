"""Fault injection against `paged-triton serve`: kill the paged_llm backend stub under load. The
clients of the requests in flight get errors (no hang), readiness turns red at once, and the
service comes back by itself with the same greedy output. Then Ctrl-C with streams open: the
launcher exits within 10 s and every stream got a final response or an error. With
tensor_parallel_size=2, a killed worker rank: the stream in flight gets an error naming it, and
the supervisor reloads paged_llm (new workers) with the same greedy output."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from paged_engine import SamplingParams
from paged_engine.deploy.supervisor import http_status, stub_processes
from paged_engine.deploy.tritonserver import free_port
from serving_client import StreamClient, inputs, run_one, sampling, trt_inputs
from test_serving_tp import tp_worker_pids

pytestmark = pytest.mark.server

PROMPT = "Hello world! 日本語"
# Generous for a loaded 2-core machine: a restart here took 21 s (tests print what they see).
RECOVERY_LIMIT_S = float(os.environ.get("PAGED_TRITON_RECOVERY_LIMIT_S", "120"))


def _children(pid: int) -> list[tuple[int, list[str]]]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append((int(entry.name), args))
    return out


class Launcher:
    def __init__(self, proc, ports, log_path):
        self.proc, self.log_path = proc, log_path
        self.grpc_url = f"127.0.0.1:{ports['grpc']}"
        self.health = f"http://127.0.0.1:{ports['health']}"

    def tritonserver_pid(self) -> int:
        pids = [p for p, args in _children(self.proc.pid) if args[0].endswith("tritonserver")]
        assert len(pids) == 1, pids
        return pids[0]

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def health_json(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"{self.health}/health", timeout=5) as r:
            return json.loads(r.read())


def _serve(model_dir, engine_args, tmp_path_factory):
    """`paged-triton serve` in a subprocess, yielded once its readiness is green."""
    ports = {k: free_port() for k in ("grpc", "http", "metrics", "health")}
    work = tmp_path_factory.mktemp("launcher")
    log_path = work / "launcher.log"
    cmd = [sys.executable, "-m", "paged_engine.deploy.launcher", "serve",
           "--model", model_dir, "--no-demo", "--repository-dir", str(work / "repo"),
           "--grpc-port", str(ports["grpc"]), "--http-port", str(ports["http"]),
           "--metrics-port", str(ports["metrics"]), "--health-port", str(ports["health"]),
           "--log-file", str(work / "tritonserver.log")]
    for key, value in engine_args.items():
        cmd += ["--engine-arg", f"{key}={value}"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    result = Launcher(proc, ports, log_path)
    deadline = time.monotonic() + 600
    while http_status(f"{result.health}/health/ready") != 200:
        assert proc.poll() is None, result.log()
        assert time.monotonic() < deadline, result.log()
        time.sleep(0.5)
    yield result
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def launcher(serving_model_dir, engine_args, tmp_path_factory):
    yield from _serve(serving_model_dir, engine_args, tmp_path_factory)


def _greedy(launcher) -> str:
    s = run_one(launcher.grpc_url, "paged_llm", inputs(
        text_input=PROMPT, stream=True, sampling_parameters=sampling(max_tokens=8, temperature=0)),
        timeout_s=60)
    assert s.error is None, s.error
    return s.text()


def _greedy_once_back(launcher, since: float) -> str:
    """`_greedy` retried until the service answers again (at most RECOVERY_LIMIT_S after `since`)."""
    while True:
        try:
            return _greedy(launcher)
        except Exception:
            assert time.monotonic() - since < RECOVERY_LIMIT_S, launcher.log()
            time.sleep(0.5)


def _long_streams(launcher) -> list[tuple[StreamClient, str, str]]:
    """Requests in flight on every path: paged_llm streamed and not, the ensemble, the BLS."""
    long = dict(max_tokens=np.array([400], np.int32), min_tokens=np.array([400], np.int32))
    streams = []
    for model, tensors in (
            ("paged_llm", inputs(text_input=PROMPT, stream=True,
                                 sampling_parameters=sampling(max_tokens=400, ignore_eos=True))),
            ("paged_llm", inputs(text_input=PROMPT, stream=False,
                                 sampling_parameters=sampling(max_tokens=400, ignore_eos=True))),
            ("ensemble", trt_inputs(text_input=PROMPT, stream=True, **long)),
            ("tensorrt_llm_bls", trt_inputs(text_input=PROMPT, stream=True, **long))):
        client = StreamClient(launcher.grpc_url)
        streams.append((client, client.send(model, tensors), model))
    for client, rid, _ in (streams[0], streams[2], streams[3]):  # the streamed ones are running
        while len(client.streams[rid].responses) < 2:
            client.poll(timeout_s=120)
    return streams


def test_a_killed_engine_stub_is_recovered_and_no_client_hangs(launcher, offline_llm):
    expected = offline_llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert _greedy(launcher) == expected.text
    streams = _long_streams(launcher)
    stubs = stub_processes(launcher.tritonserver_pid())
    (stub_pid, _), = stubs["paged_llm"]
    killed = time.monotonic()
    os.kill(stub_pid, signal.SIGKILL)

    # Readiness turns red at once (Triton's own stays 200 for a dead stub).
    while http_status(f"{launcher.health}/health/ready") == 200:
        assert time.monotonic() - killed < 5, "readiness stayed green"
        time.sleep(0.05)

    # Every request in flight ends with an error; none waits for an answer that cannot come.
    for client, rid, model in streams:
        stream = client.streams[rid]
        while stream.finals == 0:
            assert time.monotonic() - killed < 60, f"{model} request hangs"
            client.poll(timeout_s=60)
        assert stream.error is not None and "UNAVAILABLE" in stream.error, (model, stream.error)
        client.close()
    print(f"\nrequests in flight answered with UNAVAILABLE {time.monotonic() - killed:.1f} s "
          f"after the kill")

    # The service comes back by itself, with the same output.
    text = _greedy_once_back(launcher, killed)
    recovered_s = time.monotonic() - killed
    print(f"\nservice back {recovered_s:.1f} s after the stub was killed")
    assert text == expected.text
    while http_status(f"{launcher.health}/health/ready") != 200:
        assert time.monotonic() - killed < RECOVERY_LIMIT_S + 10
        time.sleep(0.2)
    assert launcher.health_json()["restarts"] == 1
    assert "restarting tritonserver" in launcher.log()
    new_stubs = stub_processes(launcher.tritonserver_pid())
    assert set(new_stubs) == set(stubs) and stub_pid not in [p for p, _ in new_stubs["paged_llm"]]


def test_ctrl_c_with_streams_open_exits_within_10_s(launcher):
    streams = _long_streams(launcher)
    # A cancelled ensemble request: Triton 2.51 keeps counting it in flight, and would wait
    # its whole exit timeout for it.
    cancelled = StreamClient(launcher.grpc_url)
    rid = cancelled.send("ensemble", trt_inputs(
        text_input=PROMPT, stream=True, max_tokens=np.array([400], np.int32),
        min_tokens=np.array([400], np.int32)))
    while len(cancelled.streams[rid].responses) < 2:
        cancelled.poll(timeout_s=60)
    cancelled.close(cancel=True)

    start = time.monotonic()
    launcher.proc.send_signal(signal.SIGINT)
    code = launcher.proc.wait(30)
    exit_s = time.monotonic() - start
    print(f"\nlauncher exited {exit_s:.1f} s after SIGINT")
    assert code == 0, launcher.log()
    assert exit_s < 10, launcher.log()
    for client, rid, model in streams:
        stream = client.streams[rid]
        deadline = time.monotonic() + 10
        while stream.finals == 0 and time.monotonic() < deadline:
            try:
                client.poll(timeout_s=1)
            except Exception:
                pass
        assert stream.finals == 1, f"{model}: no final response and no error"
        # ended by paged_llm's unload with a message, not by a dropped connection
        assert stream.error is None or "being unloaded" in stream.error, (model, stream.error)
        client.close()


def test_a_killed_tensor_parallel_worker_is_recovered(serving_model_dir, engine_args, tmp_path_factory,
                                                      offline_llm):
    expected = offline_llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0))[0]
    args = dict(engine_args, tensor_parallel_size=2, distributed_timeout_s=20)
    serve = _serve(serving_model_dir, args, tmp_path_factory)
    tp = next(serve)
    try:
        assert _greedy(tp) == expected.text
        client = StreamClient(tp.grpc_url)
        rid = client.send("paged_llm", inputs(text_input=PROMPT, stream=True, sampling_parameters=sampling(
            max_tokens=400, ignore_eos=True)))
        while len(client.streams[rid].responses) < 2:
            client.poll(timeout_s=120)
        (worker,) = tp_worker_pids(tp.proc.pid)
        killed = time.monotonic()
        os.kill(worker, signal.SIGKILL)

        stream = client.streams[rid]
        while stream.finals == 0:
            assert time.monotonic() - killed < 60, "the stream in flight hangs"
            client.poll(timeout_s=60)
        client.close()
        assert stream.error is not None and "tensor-parallel" in stream.error, stream.error

        text = _greedy_once_back(tp, killed)  # paged_llm reloaded with new worker processes
        print(f"\nservice back {time.monotonic() - killed:.1f} s after a tensor-parallel worker was killed")
        assert text == expected.text
        while http_status(f"{tp.health}/health/ready") != 200:
            assert time.monotonic() - killed < RECOVERY_LIMIT_S + 10
            time.sleep(0.2)
        health = tp.health_json()
        assert health["reloads"] + health["restarts"] >= 1, health
        new_workers = tp_worker_pids(tp.proc.pid)
        assert len(new_workers) == 1 and worker not in new_workers
    finally:
        next(serve, None)  # the launcher's teardown (SIGINT, wait)
