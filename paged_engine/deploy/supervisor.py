"""Keeps a served model repository healthy: probes every model, recovers, and says honestly
whether it is ready.

Triton 2.51 cannot tell by itself: when a Python backend stub dies, `/v2/health/ready` and the
model's ready endpoint stay 200, every new request gets "Stub process ... is not healthy", and the
requests a dead decoupled stub was serving never get an answer (the Python backend does not
restart decoupled stubs: "TODO: Implement restart on decoupled"). So `Supervisor`, run by
`paged-triton serve`:

- probes each model every `interval_s` over one long-lived gRPC stream: paged_llm with its
  `health_check` input (an empty final while the engine runs, UNAVAILABLE once it died), the
  others with a cheap request that reaches their stub;
- watches the tritonserver process;
- recovers: a dead stub or an unresponsive / exited server -> restart tritonserver on the same
  ports (the clients of requests in flight get a connection error instead of waiting forever;
  the dead stubs' shared-memory regions are removed); a dead engine with a live stub (its
  requests already got UNAVAILABLE) -> reload paged_llm in place, and restart if that fails;
- serves `/health/live`, `/health/ready` and `/health` (JSON) on `health_port`, for load
  balancers and Kubernetes probes: ready only while every probe passes.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

OK, ENGINE_DOWN, STUB_DOWN, UNREACHABLE, FAILED = "ok", "engine_down", "stub_down", \
    "unreachable", "failed"


def _probe_inputs(model: str) -> tuple[dict[str, np.ndarray], str | None]:
    """(inputs, an error text that still proves the stub answered) of each model's probe."""
    if model == "paged_llm":
        return {"health_check": np.array([True])}, None
    if model == "preprocessing":
        return {"text_input": np.array([[b"a"]], dtype=np.object_)}, None
    if model == "postprocessing":
        return {"output_ids": np.zeros((1, 1), np.int32),
                "output_read_offset": np.zeros((1, 1), np.int32)}, None
    if model == "tensorrt_llm_bls":  # a request without a prompt: refused by its own stub
        return {"max_tokens": np.ones((1, 1), np.int32)}, "text_input"
    raise ValueError(f"no probe for model {model!r}")


DECOUPLED = ("paged_llm", "tensorrt_llm_bls")  # a dead stub of these leaves requests hanging


def classify(error: str | None, alive_error: str | None = None) -> str:
    """A probe's outcome from its error message (None: success)."""
    if error is None:
        return OK
    text = error.lower()
    if alive_error is not None and alive_error in error:
        return OK
    if "not healthy" in text or "stub process" in text:
        return STUB_DOWN
    if "engine is unhealthy" in text or "engine thread died" in text:
        return ENGINE_DOWN
    if ("unavailable" in text and "connect" in text) or "connection refused" in text \
            or "deadline" in text or "timed out" in text:
        return UNREACHABLE
    return FAILED


class Prober:
    """Probe requests over one gRPC stream, reopened when it breaks (a new channel per probe
    would grow tritonserver's memory)."""

    def __init__(self, url: str):
        self.url = url
        self._client = None
        self._responses: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._n = 0

    def _open(self):
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        client.start_stream(callback=self._on_response)
        self._client = client

    def _on_response(self, result, error):
        if error is not None:
            rid = getattr(error, "request_id", None)
            targets = [self._responses.get(rid)] if rid in self._responses else \
                list(self._responses.values())  # a broken stream fails every waiting probe
            for q in targets:
                if q is not None:
                    q.put(str(error))
            return
        response = result.get_response()
        q = self._responses.get(response.id)
        if q is not None and response.parameters.get("triton_final_response").bool_param:
            q.put(None)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.stop_stream(cancel_requests=True)
                client.close()
            except Exception:
                pass

    def probe(self, model: str, timeout_s: float) -> str:
        """One probe; returns OK, ENGINE_DOWN, STUB_DOWN, UNREACHABLE or FAILED."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import np_to_triton_dtype

        arrays, alive_error = _probe_inputs(model)
        with self._lock:
            self._n += 1
            rid = f"paged-triton-probe-{self._n}"
            q: queue.Queue = queue.Queue()
            self._responses[rid] = q
        try:
            if self._client is None:
                self._open()
            tensors = []
            for name, array in arrays.items():
                datatype = "BYTES" if array.dtype == np.object_ else np_to_triton_dtype(array.dtype)
                t = grpcclient.InferInput(name, list(array.shape), datatype)
                t.set_data_from_numpy(array)
                tensors.append(t)
            self._client.async_stream_infer(model, tensors, request_id=rid,
                                            enable_empty_final_response=True)
            try:
                error = q.get(timeout=timeout_s)
            except queue.Empty:
                self.close()  # the stream may be stuck behind the unanswered probe
                return UNREACHABLE
        except Exception as e:
            self.close()
            error = f"unavailable: failed to connect: {e!r}"
        finally:
            with self._lock:
                self._responses.pop(rid, None)
        outcome = classify(error, alive_error)
        if outcome in (UNREACHABLE, FAILED):
            self.close()
        return outcome


@dataclass
class SupervisorStatus:
    state: str = "starting"  # starting | ready | recovering | failed | draining
    probes: dict[str, str] = field(default_factory=dict)
    restarts: int = 0
    reloads: int = 0
    last_recovery_s: float | None = None
    last_problem: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def stub_processes(server_pid: int) -> dict[str, list[tuple[int, str | None]]]:
    """model name -> [(pid, shared-memory region name)] of the Python backend stubs of a
    tritonserver process (read from /proc: the stub's arguments name its model.py and region)."""
    stubs: dict[str, list[tuple[int, str | None]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            if not args or not args[0].endswith(b"triton_python_backend_stub"):
                continue
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent != server_pid or len(args) < 3:
            continue
        model_py = Path(args[1].decode(errors="replace"))
        region = args[2].decode(errors="replace") if len(args) > 2 else None
        stubs.setdefault(model_py.parent.parent.name, []).append((int(entry.name), region))
    return stubs


class Supervisor:
    """Probes, recovers and reports the health of one `TritonServer` (see the module docstring).

    Args:
        server: a started TritonServer, in explicit model-control mode for reloads (the
            launcher starts it so); its `restart()` is used to recover.
        models: the models to probe (those of the repository that have a probe).
        health_port: port of the /health endpoints (None: none).
        interval_s: time between probe rounds.
        probe_timeout_s: a probe unanswered this long counts as unreachable.
        unreachable_rounds: rounds of unreachable probes before the server is restarted.
        startup_timeout_s: how long a restart may take.
        log: called with each message.
        prober: probes the models (default: a `Prober` on the server's gRPC port; tests pass
            a fake).
    """

    def __init__(self, server, models: list[str], health_port: int | None = None,
                 interval_s: float = 1.0, probe_timeout_s: float = 5.0,
                 unreachable_rounds: int = 3, startup_timeout_s: float = 600.0, log=print,
                 prober=None):
        self.server = server
        self.models = [m for m in models if _has_probe(m)]
        self.health_port = health_port
        self.interval_s = interval_s
        self.probe_timeout_s = probe_timeout_s
        self.unreachable_rounds = unreachable_rounds
        self.startup_timeout_s = startup_timeout_s
        self.status = SupervisorStatus()
        self._log = log
        self._stop = threading.Event()
        self._prober = prober if prober is not None else Prober(server.grpc_url)
        self._thread = threading.Thread(target=self._run, name="paged-triton-supervisor",
                                        daemon=True)
        self._http: ThreadingHTTPServer | None = None
        self._unreachable = 0
        self._known_stubs: dict[str, int] = {}
        self._generation = 0  # bumped by every restart and reload
        self._draining = False
        self._outcomes: tuple[int, dict[str, str]] = (-1, {})

    @property
    def ready(self) -> bool:
        return self.status.state == "ready"

    def start(self) -> "Supervisor":
        if self.health_port is not None:
            self._http = _health_server(self, self.health_port)
            threading.Thread(target=self._http.serve_forever, name="paged-triton-health",
                             daemon=True).start()
        self._thread.start()
        return self

    def drain(self) -> None:
        """Shutting down: readiness turns red, and nothing is recovered any more (the launcher
        unloads models on purpose now)."""
        self._draining = True
        self.status.state = "draining"
        self.status.last_problem = "shutting down"

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.probe_timeout_s + 5)
        self._prober.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    # -- the loop ------------------------------------------------------------------------------
    # Process checks run every `_WATCH_S` (a dead stub is found within a fraction of a second);
    # probe rounds run on their own thread every interval_s (a probe may wait probe_timeout_s);
    # recoveries happen on this thread, one at a time.

    _WATCH_S = 0.25

    def _run(self) -> None:
        self._known_stubs = self._stub_counts()
        prober_thread = None
        last_round = 0.0
        while not self._stop.is_set():
            if self._draining:
                self._stop.wait(self._WATCH_S)
                continue
            try:
                if self._watch_processes():
                    prober_thread, last_round = None, time.monotonic()
                elif prober_thread is None and time.monotonic() - last_round >= self.interval_s:
                    prober_thread = threading.Thread(target=self._probe_round,
                                                     args=(self._generation,), daemon=True,
                                                     name="paged-triton-probes")
                    prober_thread.start()
                elif prober_thread is not None and not prober_thread.is_alive():
                    prober_thread, last_round = None, time.monotonic()
                    self._act_on_probes()
            except Exception as e:  # the supervisor must outlive anything it watches
                self.status.last_problem = f"supervisor error: {e!r}"
                self._log(f"paged-triton: supervisor: {e!r}")
            self._stop.wait(self._WATCH_S)

    def _stub_counts(self) -> dict[str, int]:
        proc = getattr(self.server, "_proc", None)
        if proc is None:
            return {}
        return {m: len(v) for m, v in stub_processes(proc.pid).items()}

    def _watch_processes(self) -> bool:
        """Restart a server that exited or lost a decoupled stub; True when it restarted."""
        proc = self.server._proc
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            self._recover_by_restart(f"tritonserver exited (code {code})")
            return True
        stubs = self._stub_counts()
        missing = [m for m in DECOUPLED if self._known_stubs.get(m, 0) > stubs.get(m, 0)]
        if missing:
            self._recover_by_restart(f"the backend stub of {', '.join(missing)} exited")
            return True
        return False

    def _probe_round(self, generation: int) -> None:
        outcomes = {m: self._prober.probe(m, self.probe_timeout_s) for m in self.models}
        self._outcomes = (generation, outcomes)

    def _act_on_probes(self) -> None:
        generation, outcomes = self._outcomes
        if generation != self._generation or self._draining:  # a stale round
            return
        self.status.probes = outcomes
        bad = {m: o for m, o in outcomes.items() if o != OK}
        if not bad:
            self._unreachable = 0
            if self.status.state != "ready":
                self._log("paged-triton: all models healthy")
            self.status.state = "ready"
            return
        self.status.state = "recovering"
        self.status.last_problem = ", ".join(f"{m}: {o}" for m, o in bad.items())
        if any(o == STUB_DOWN and m in DECOUPLED for m, o in bad.items()):
            self._recover_by_restart(f"backend stub down ({self.status.last_problem})")
        elif bad.get("paged_llm") == ENGINE_DOWN:
            self._recover_by_reload("paged_llm")
        elif all(o == UNREACHABLE for o in bad.values()):
            self._unreachable += 1
            if self._unreachable >= self.unreachable_rounds:
                self._recover_by_restart(f"tritonserver unresponsive for {self._unreachable} "
                                         f"probe rounds")
        else:
            # A non-decoupled stub down (the Python backend restarts those on their next
            # request) or an unexpected answer: restart when the next round still sees it.
            self._unreachable += 1
            if self._unreachable >= 2:
                self._recover_by_restart(f"still failing: {self.status.last_problem}")

    def _recover_by_restart(self, why: str) -> None:
        start = time.monotonic()
        self.status.state = "recovering"
        self.status.last_problem = why
        self._log(f"paged-triton: {why}; restarting tritonserver")
        self._generation += 1
        self._prober.close()
        proc = self.server._proc
        regions = []
        if proc is not None:
            regions = [r for v in stub_processes(proc.pid).values() for _, r in v if r]
        try:
            self.server.restart(timeout_s=self.startup_timeout_s)
        except Exception as e:
            self.status.state = "failed"
            self.status.last_problem = f"restart failed: {e}"
            self._log(f"paged-triton: restarting tritonserver failed: {e}")
            return
        finally:
            for region in regions:  # left behind by the killed stubs
                try:
                    os.unlink(os.path.join("/dev/shm", region))
                except OSError:
                    pass
        self._known_stubs = self._stub_counts()
        self._unreachable = 0
        self._generation += 1
        self.status.restarts += 1
        self.status.last_recovery_s = time.monotonic() - start
        self._log(f"paged-triton: tritonserver restarted in {self.status.last_recovery_s:.1f} s")

    def _recover_by_reload(self, model: str) -> None:
        start = time.monotonic()
        self._log(f"paged-triton: {model}'s engine died; reloading {model}")
        try:
            self.server.reload_model(model)
        except Exception as e:
            self._recover_by_restart(f"reloading {model} failed: {e}")
            return
        if self._prober.probe(model, self.probe_timeout_s) != OK:
            self._recover_by_restart(f"{model} still unhealthy after its reload")
            return
        self._known_stubs = self._stub_counts()
        self._generation += 1
        self.status.reloads += 1
        self.status.last_recovery_s = time.monotonic() - start
        self._log(f"paged-triton: {model} reloaded in {self.status.last_recovery_s:.1f} s")


def _has_probe(model: str) -> bool:
    try:
        _probe_inputs(model)
        return True
    except ValueError:
        return False


def _health_server(supervisor: Supervisor, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            status = supervisor.status
            if self.path.rstrip("/") == "/health/live":
                code = 503 if status.state == "failed" else 200
                body = {"live": code == 200, "state": status.state}
            elif self.path.rstrip("/") == "/health/ready":
                code = 200 if supervisor.ready else 503
                body = {"ready": code == 200, "state": status.state,
                        "problem": None if code == 200 else status.last_problem}
            elif self.path.rstrip("/") == "/health":
                code, body = 200, status.as_dict()
            else:
                code, body = 404, {"error": "GET /health, /health/live or /health/ready"}
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # no access log on stderr
            pass

    return ThreadingHTTPServer(("0.0.0.0", port), Handler)


def probe_once(grpc_url: str, models: list[str], timeout_s: float = 5.0) -> dict[str, str]:
    """Probe each model once (`paged-triton probe`, a Kubernetes exec probe without the
    launcher): model -> outcome."""
    prober = Prober(grpc_url)
    try:
        return {m: prober.probe(m, timeout_s) for m in models if _has_probe(m)}
    finally:
        prober.close()


def http_status(url: str, timeout_s: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


