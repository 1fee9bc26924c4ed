"""The supervisor's recovery policy without a server: which probe outcome leads to a restart,
which to a reload, and what the health endpoints answer meanwhile."""

import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from paged_engine.deploy import supervisor as sup


class FakeProc:
    pid = 999_999_999  # no such process: no stubs found under /proc

    def __init__(self):
        self.returncode = None

    def poll(self):
        return self.returncode


class FakeServer:
    grpc_url = "127.0.0.1:1"

    def __init__(self):
        self._proc = FakeProc()
        self.restarts = self.reloads = 0
        self.reload_fails = False

    def restart(self, timeout_s):
        self.restarts += 1
        self._proc = FakeProc()

    def reload_model(self, model):
        self.reloads += 1
        if self.reload_fails:
            raise RuntimeError("load failed")


class FakeProber:
    """Answers each probe with outcomes[model] (default OK)."""

    def __init__(self):
        self.outcomes = {}

    def probe(self, model, timeout_s):
        return self.outcomes.get(model, sup.OK)

    def close(self):
        pass


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def watched():
    server, prober = FakeServer(), FakeProber()
    port = _free_port()
    s = sup.Supervisor(server, ["paged_llm", "preprocessing", "postprocessing",
                                "tensorrt_llm_bls", "ensemble"], health_port=port,
                       interval_s=0.05, probe_timeout_s=0.1, unreachable_rounds=3,
                       log=lambda m: None, prober=prober)
    s.start()
    yield s, server, prober, port
    s.stop()


def _get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_ready_only_while_every_probe_passes(watched):
    s, server, prober, port = watched
    _wait(lambda: s.ready)
    assert _get(port, "/health/ready")[0] == 200 and _get(port, "/health/live")[0] == 200
    assert "ensemble" not in s.models  # no stub of its own to probe
    prober.outcomes["postprocessing"] = sup.FAILED
    _wait(lambda: not s.ready)
    code, body = _get(port, "/health/ready")
    assert code == 503 and "postprocessing" in body["problem"]
    assert _get(port, "/health/live")[0] == 200  # recovering is not dead


def test_a_dead_decoupled_stub_restarts_the_server(watched):
    s, server, prober, port = watched
    _wait(lambda: s.ready)
    prober.outcomes["tensorrt_llm_bls"] = sup.STUB_DOWN
    _wait(lambda: server.restarts >= 1)
    prober.outcomes.clear()
    _wait(lambda: s.ready)
    assert server.reloads == 0 and s.status.restarts >= 1


def test_a_dead_engine_reloads_paged_llm_and_restarts_if_that_fails(watched):
    s, server, prober, port = watched
    _wait(lambda: s.ready)
    prober.outcomes["paged_llm"] = sup.ENGINE_DOWN

    def reload_fixes():
        server.reloads += 1
        prober.outcomes.clear()

    server.reload_model = lambda model: reload_fixes()
    _wait(lambda: server.reloads == 1 and s.ready)
    assert server.restarts == 0
    # a reload that does not help ends in a restart
    server.reload_model = FakeServer.reload_model.__get__(server)
    server.reload_fails = True
    prober.outcomes["paged_llm"] = sup.ENGINE_DOWN
    _wait(lambda: server.restarts >= 1)


def test_an_exited_or_unresponsive_server_is_restarted(watched):
    s, server, prober, port = watched
    _wait(lambda: s.ready)
    server._proc.returncode = -9
    _wait(lambda: server.restarts == 1)
    for model in s.models:
        prober.outcomes[model] = sup.UNREACHABLE
    _wait(lambda: server.restarts == 2)  # after unreachable_rounds rounds, not at once


def test_a_failed_restart_makes_the_launcher_not_live(watched):
    s, server, prober, port = watched
    _wait(lambda: s.ready)

    def broken(timeout_s):
        raise RuntimeError("no GPU")

    server.restart = broken
    prober.outcomes["paged_llm"] = sup.STUB_DOWN
    _wait(lambda: s.status.state == "failed")
    code, body = _get(port, "/health/live")
    assert code == 503 and body["state"] == "failed"


def test_classify():
    assert sup.classify(None) == sup.OK
    assert sup.classify("Stub process 'paged_llm_0_0' is not healthy.") == sup.STUB_DOWN
    assert sup.classify("paged_llm engine is unhealthy after an error: RuntimeError: x") \
        == sup.ENGINE_DOWN
    assert sup.classify("[StatusCode.UNAVAILABLE] failed to connect to all addresses") \
        == sup.UNREACHABLE
    assert sup.classify("tensorrt_llm_bls: missing input 'text_input'", "text_input") == sup.OK
    assert sup.classify("something else") == sup.FAILED
