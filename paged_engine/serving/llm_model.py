"""The `paged_llm` Triton Python model: one LLMEngine per instance, decoupled.

model_repository/paged_llm/1/model.py only forwards to this class, so the logic lives in the
package (vllm_backend keeps it in `utils/`). Engine arguments come from `1/model.json` beside
model.py (`{"model": "/path/to/hf/model", "block_size": 16, ...}`); an unknown key fails the load
with a message naming it.
"""

from __future__ import annotations

import gc
import json
import os

from paged_engine.serving.engine_loop import EngineLoop
from paged_engine.serving.intake import RequestTooLarge, parse_max_prompt_bytes
from paged_engine.serving.metrics import ServingMetrics
from paged_engine.serving.request import RequestError, RequestLimits, parse_request
from paged_engine.serving.sender import ResponseSenderThread


def load_engine_args(model_dir: str) -> dict:
    """Read `model.json` of a model version directory; relative `model` paths are taken from it."""
    path = os.path.join(model_dir, "model.json")
    try:
        with open(path) as f:
            args = json.load(f)
    except FileNotFoundError:
        raise RuntimeError(
            f"{path} is missing: it holds the engine arguments, at least {{\"model\": <dir>}}; "
            "paged_engine.deploy.repository.prepare_model_repository writes it") from None
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(args, dict) or "model" not in args:
        raise RuntimeError(f"{path} must be a JSON object with a 'model' key")
    model = args["model"]
    if isinstance(model, str) and not os.path.isabs(model) and os.path.exists(
            os.path.join(model_dir, model)):
        args["model"] = os.path.normpath(os.path.join(model_dir, model))
    spec = args.get("speculative_config")
    if isinstance(spec, str) and spec.strip().startswith("{"):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError:
            pass  # EngineConfig reports it, naming the key
    if isinstance(spec, dict) and isinstance(spec.get("model"), str):
        draft = spec["model"]  # a draft model directory, relative like `model`
        if not os.path.isabs(draft) and os.path.exists(os.path.join(model_dir, draft)):
            args["speculative_config"] = {**spec, "model": os.path.normpath(os.path.join(model_dir, draft))}
    return args


_FALSE = ("false", "0", "no", "off")


def metrics_enabled(params: dict) -> bool:
    """Metrics are on unless `enable_metrics` or vllm_backend's `REPORT_CUSTOM_METRICS` model
    parameter says false (vllm_backend has them off unless REPORT_CUSTOM_METRICS is true; ours
    are on by default)."""
    for key in ("enable_metrics", "REPORT_CUSTOM_METRICS"):
        value = params.get(key, {}).get("string_value", "true").strip().lower()
        if value in _FALSE:
            return False
    return True


def default_engine_factory(engine_args: dict):
    from paged_engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig.from_dict(engine_args))


class PagedLLMModel:
    """initialize / execute / finalize of `paged_llm`.

    Args:
        pb_utils: the `triton_python_backend_utils` module.
        engine_factory: engine_args dict -> engine (tests swap it).
        sampling_params_from_dict: dict -> SamplingParams (default `SamplingParams.from_dict`).
    """

    def __init__(self, pb_utils, engine_factory=default_engine_factory,
                 sampling_params_from_dict=None, decode_window=None):
        self.pb = pb_utils
        self._engine_factory = engine_factory
        self._sampling_params_from_dict = sampling_params_from_dict
        self._decode_window = decode_window
        self.loop: EngineLoop | None = None
        self.sender: ResponseSenderThread | None = None
        self.metrics: ServingMetrics | None = None

    def initialize(self, args: dict) -> None:
        pb = self.pb
        self.logger = pb.Logger
        model_config = json.loads(args["model_config"])
        if not pb.using_decoupled_model_transaction_policy(model_config):
            raise pb.TritonModelException(
                "paged_llm must be decoupled: set model_transaction_policy { decoupled: true }")
        self.model_name = args["model_name"]
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        engine_args = load_engine_args(version_dir)
        tp = engine_args.get("tensor_parallel_size", 1)
        if args.get("model_instance_kind") == "GPU" and str(tp).strip() not in ("1", ""):
            # vllm_backend's rule: an instance pinned to one GPU cannot place ranks on others.
            raise pb.TritonModelException(
                f"tensor_parallel_size={tp} needs instance_group {{ kind: KIND_MODEL }} in "
                "config.pbtxt (KIND_GPU pins the instance to one GPU; the engine places rank r "
                "on cuda:r itself)")
        if args.get("model_instance_kind") == "GPU" and "device" not in engine_args:
            engine_args["device"] = f"cuda:{args['model_instance_device_id']}"
        if self._sampling_params_from_dict is None:
            from paged_engine import SamplingParams

            self._sampling_params_from_dict = SamplingParams.from_dict
        if self._decode_window is None:
            from paged_engine.output.detokenizer import decode_window

            self._decode_window = decode_window
        try:
            engine = self._engine_factory(engine_args)
        except ValueError as e:  # unknown or bad engine argument: fail the load, say which
            raise pb.TritonModelException(f"bad engine arguments in model.json: {e}") from e

        params = model_config.get("parameters", {})
        metrics_on = metrics_enabled(params)
        tokenizer = getattr(engine, "tokenizer", None)
        max_model_len = getattr(engine, "max_model_len", None)
        try:
            max_prompt_bytes = parse_max_prompt_bytes(
                params.get("max_prompt_bytes", {}).get("string_value"), tokenizer, max_model_len)
        except ValueError as e:
            raise pb.TritonModelException(f"config.pbtxt: {e}") from e
        self.limits = RequestLimits(max_prompt_bytes=max_prompt_bytes, max_model_len=max_model_len)
        self.sender = ResponseSenderThread(pb, self.logger)
        self.metrics = None
        if metrics_on:
            self.metrics = ServingMetrics(pb, {"model": self.model_name,
                                               "version": str(args["model_version"])},
                                          max_model_len=max_model_len or 8192)
        self.loop = EngineLoop(engine, self.sender, self.metrics, self.logger,
                               decode_window=self._decode_window, tokenizer=tokenizer,
                               max_model_len=max_model_len)
        # Full garbage collections walk every object left from importing torch and transformers
        # (~10^5; ~0.1 s each on a slow core, a latency spike every few dozen steps): park them
        # in the permanent generation, as vLLM does after start-up. finalize() unfreezes them.
        gc.collect()
        gc.freeze()
        self.sender.start()
        self.loop.start()
        if self.metrics is not None:
            self.sender.call(self.metrics.update_from_stats, dict(engine.stats()))
        self.logger.log_info(f"paged_llm: engine ready ({engine_args.get('model')}; "
                             f"max_model_len {max_model_len}, max_prompt_bytes "
                             f"{max_prompt_bytes})")

    def execute(self, requests):
        """Validate, hand to the engine thread, return None (responses leave via the sender)."""
        pb = self.pb
        for request in requests:
            response_sender = request.get_response_sender()
            abort = pb.get_input_tensor_by_name(request, "abort_request_id")
            if abort is not None:  # a control request from postprocessing (see EngineLoop.abort)
                for value in abort.as_numpy().reshape(-1):
                    self.loop.abort(value.decode() if isinstance(value, bytes) else str(value))
                response_sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            if pb.get_input_tensor_by_name(request, "health_check") is not None:
                # A probe (paged-triton's supervisor, a Kubernetes probe): an empty final while
                # the engine thread runs, UNAVAILABLE once it died. Reaching here at all shows
                # the backend stub is alive.
                if self.loop.healthy:
                    response_sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                else:
                    self.sender.send(response_sender, final=True, error=(
                        "UNAVAILABLE", self.loop.unavailable_message()))
                continue

            def get_input(name, _request=request):
                tensor = pb.get_input_tensor_by_name(_request, name)
                return None if tensor is None else tensor.as_numpy()

            try:
                parsed = parse_request(get_input, request.parameters(),
                                       self._sampling_params_from_dict, self.limits)
            except (RequestError, RequestTooLarge) as e:
                self.sender.send(response_sender, final=True, error=("INVALID_ARG", str(e)))
                continue
            except Exception as e:  # never let one request take the batch down
                self.sender.send(response_sender, final=True,
                                 error=("INVALID_ARG", f"could not parse the request: {e!r}"))
                continue
            self.loop.submit(response_sender, parsed, request.request_id())
        return None

    def finalize(self) -> None:
        """Stop and join the threads, then release the engine and its GPU memory."""
        engine = None
        if self.loop is not None:
            self.loop.stop()
            engine = self.loop.engine
            self.loop.engine = None
            self.loop = None
        if self.sender is not None:
            self.sender.stop()
            self.sender = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if engine is not None:
            shutdown = getattr(engine, "shutdown", None)
            if callable(shutdown):
                shutdown()
            del engine
        gc.unfreeze()  # the engine was frozen with the start-up heap: let a collection free it
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass
