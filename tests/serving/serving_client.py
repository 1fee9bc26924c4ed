"""Small tritonclient helpers for the serving tests (gRPC streams, HTTP generate, metrics)."""

from __future__ import annotations

import json
import queue
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np

# conftest gives the served model a second EOS id: a token greedy decoding of this prompt
# reaches within a few tokens.
EOS_PROMPT = "The quick brown fox"


def _array(value) -> np.ndarray:
    if isinstance(value, str):
        return np.array([value.encode("utf-8")], dtype=np.object_)
    if isinstance(value, bool):
        return np.array([value], dtype=np.bool_)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        return np.array([v.encode("utf-8") for v in value], dtype=np.object_)
    return np.asarray(value)


def _infer_input(name: str, array: np.ndarray):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    datatype = "BYTES" if array.dtype == np.object_ else np_to_triton_dtype(array.dtype)
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def inputs(**named) -> list:
    """inputs(text_input="hi", stream=True, sampling_parameters=..., ...) for paged_llm."""
    return [_infer_input(k, _array(v)) for k, v in named.items() if v is not None]


def trt_inputs(**named) -> list:
    """The same with TensorRT-LLM's batch dimension ([1, ...]) for the ensemble and
    tensorrt_llm_bls: trt_inputs(text_input="hi", max_tokens=np.array([4], np.int32))."""
    return [_infer_input(k, _array(v).reshape(1, -1)) for k, v in named.items() if v is not None]


def sampling(**params) -> str:
    return json.dumps(params)


@dataclass
class Stream:
    """All responses of one request, in arrival order."""

    responses: list[dict] = field(default_factory=list)  # output name -> numpy array
    times_s: list[float] = field(default_factory=list)
    error: str | None = None
    finals: int = 0

    def text(self, name: str = "text_output") -> str:
        return b"".join(r[name][0] for r in self.responses if name in r).decode("utf-8")

    def values(self, name: str) -> list:
        return [r[name] for r in self.responses if name in r]


class StreamClient:
    """One gRPC stream carrying any number of requests."""

    def __init__(self, url: str):
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url)
        self.events: queue.Queue = queue.Queue()
        self.streams: dict[str, Stream] = {}
        self.client.start_stream(callback=lambda result, error: self.events.put(
            (time.monotonic(), result, error)))
        self._n = 0

    def send(self, model: str, tensors: list, request_id: str | None = None) -> str:
        if request_id is None:
            self._n += 1
            request_id = f"req-{self._n}"
        self.streams[request_id] = Stream()
        self.client.async_stream_infer(model, tensors, request_id=request_id,
                                       enable_empty_final_response=True)
        return request_id

    def poll(self, timeout_s: float) -> str | None:
        """Take one event; returns the request id it belonged to."""
        t, result, error = self.events.get(timeout=timeout_s)
        if error is not None:
            # Errors carry no request id through the stream callback unless Triton sets it.
            message = str(error)
            rid = getattr(error, "request_id", None) or self._only_open()
            stream = self.streams[rid]
            stream.error = message
            stream.finals += 1
            stream.times_s.append(t)
            return rid
        response = result.get_response()
        rid = response.id
        stream = self.streams[rid]
        outputs = {o.name: result.as_numpy(o.name) for o in response.outputs}
        if outputs:
            stream.responses.append(outputs)
            stream.times_s.append(t)
        if response.parameters.get("triton_final_response").bool_param:
            stream.finals += 1
        return rid

    def _only_open(self) -> str:
        open_ids = [rid for rid, s in self.streams.items() if s.finals == 0]
        assert len(open_ids) == 1, f"cannot tell which request failed among {open_ids}"
        return open_ids[0]

    def wait_all(self, timeout_s: float = 120.0) -> dict[str, Stream]:
        deadline = time.monotonic() + timeout_s
        while any(s.finals == 0 for s in self.streams.values()):
            self.poll(max(0.1, deadline - time.monotonic()))
        return self.streams

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def run_one(url: str, model: str, tensors: list, timeout_s: float = 120.0) -> Stream:
    """Send one request on its own stream and wait for its final response."""
    client = StreamClient(url)
    try:
        rid = client.send(model, tensors)
        client.wait_all(timeout_s)
        return client.streams[rid]
    finally:
        client.close()


def http_post(http_url: str, path: str, body: dict, timeout_s: float = 120.0) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{http_url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            return r.status, r.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8")


def sse_events(body: str) -> list[dict]:
    return [json.loads(line[len("data:"):]) for line in body.splitlines()
            if line.startswith("data:")]


def metrics(metrics_url: str, model: str = "paged_llm") -> dict[str, float]:
    """name -> value of the metrics labelled with model (histograms: _count/_sum/_bucket{le})."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or f'model="{model}"' not in line:
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        if name.endswith("_bucket"):
            le = name_labels.split('le="', 1)[1].split('"', 1)[0]
            name = f"{name}{{le={le}}}"
        values[name] = float(value)
    return values


def wait_for_metric(metrics_url: str, name: str, predicate, timeout_s: float = 15.0) -> float:
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = metrics(metrics_url).get(name)
        if value is not None and predicate(value):
            return value
        time.sleep(0.1)
    raise AssertionError(f"metric {name} stayed at {value} for {timeout_s} s")
