"""LLMEngine: requests in, RequestOutputs out, one `step()` at a time.

    engine = LLMEngine(EngineConfig(model="dir"))      # or LLMEngine("dir", device="cpu", ...)
    engine.add_request("r1", prompt="Hello", params=SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for out in engine.step():
            print(out.request_id, out.new_text, out.finished)

A step is: `batch = scheduler.schedule(); out = runner.run(batch); self._postprocess(batch, out)`.
Post-processing appends the sampled tokens, detokenizes incrementally and decides stops, in the
order vLLM does: (only once more than min_tokens were generated) EOS unless ignore_eos, then
stop_token_ids, then stop strings on the text; then max_tokens / max_model_len ("length").
Text that could be the start of a stop string is held back until decided, so text after a stop
string never reaches any delta. The engine is thread-safe: add_request / abort / step / stats
take one lock, so a serving thread may abort while another thread steps.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from typing import Any

from paged_engine.config import EngineConfig
from paged_engine.outputs import CompletionOutput, LivePrefix, Logprob, RequestOutput
from paged_engine.sampling_params import SamplingParams
from paged_engine.scheduler import Scheduler
from paged_engine.sequence import Request, Sequence, SequenceStatus

logger = logging.getLogger(__name__)


def _find_stop_string(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """The stop string occurrence in text[start:] that ends first: (index, stop) or None."""
    best = None
    for s in stops:
        idx = text.find(s, max(0, start))
        if idx >= 0:
            key = (idx + len(s), idx)
            if best is None or key < best[0]:
                best = (key, idx, s)
    return None if best is None else (best[1], best[2])


def _partial_stop_suffix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def _model_eos_token_ids(config: EngineConfig, tokenizer) -> frozenset[int]:
    """EOS ids: the tokenizer's, generation_config.json's and config.json's (Llama 3 has several)."""
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                add(v)

    add(getattr(tokenizer, "eos_token_id", None))
    add(getattr(config.hf_config, "eos_token_id", None))
    path = os.path.join(config.model, "generation_config.json")
    if os.path.isfile(path):
        import json

        try:
            with open(path) as f:
                add(json.load(f).get("eos_token_id"))
        except (OSError, ValueError):
            pass
    return frozenset(ids)


class LLMEngine:
    """The engine: add requests, step, get outputs.

    Args:
        config: an EngineConfig, or a model directory (then **kwargs are EngineConfig fields),
            or None with model=... in kwargs.
        runner: an already built model runner (tests inject fakes); default builds
            `paged_engine.model_runner.ModelRunner(config, config.hf_config)`.
    """

    def __init__(self, config: EngineConfig | str | os.PathLike | None = None, *, runner: Any = None, **kwargs):
        if config is None:
            config = EngineConfig(**kwargs)
        elif isinstance(config, (str, os.PathLike)):
            config = EngineConfig(model=os.fspath(config), **kwargs)
        elif not isinstance(config, EngineConfig):
            raise ValueError(f"config must be an EngineConfig or a model path, got {type(config).__name__}")
        elif kwargs:
            raise ValueError(f"unexpected arguments next to an EngineConfig: {sorted(kwargs)}")
        self.config = config
        self._lock = threading.RLock()

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
        self.eos_token_ids = _model_eos_token_ids(config, self.tokenizer)
        self.vocab_size = int(getattr(config.hf_config, "vocab_size", 0) or len(self.tokenizer))

        if runner is None:
            from paged_engine.model_runner import ModelRunner

            runner = ModelRunner(config, config.hf_config)
        self.runner = runner
        self.num_kv_blocks = int(runner.num_kv_blocks)
        kv_capacity_tokens = self.num_kv_blocks * config.block_size
        # One sequence alone must always fit in the cache, or preemption could not make progress.
        self.max_model_len = min(config.max_model_len, kv_capacity_tokens)
        if self.max_model_len < config.max_model_len:
            logger.info(
                "max_model_len %d exceeds the KV cache (%d blocks x %d tokens); capping it to %d",
                config.max_model_len, self.num_kv_blocks, config.block_size, self.max_model_len,
            )
        self.scheduler = Scheduler(config, self.num_kv_blocks)

        self.requests: dict[str, Request] = {}
        self._aborted: list[Request] = []  # aborted, final output not yet returned
        self._arrival = itertools.count()
        self._decoded_token_cache: dict[int, str] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_steps = 0

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_dict(cls, d: dict, **kwargs) -> "LLMEngine":
        return cls(EngineConfig.from_dict(d), **kwargs)

    def shutdown(self) -> None:
        """Free the runner (GPU memory)."""
        runner, self.runner = self.runner, None
        if runner is not None and hasattr(runner, "shutdown"):
            runner.shutdown()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ requests

    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        params: SamplingParams | dict | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        """Queue a request. Raises ValueError naming the field on bad input; nothing is queued then.

        Args:
            request_id: unique among unfinished requests.
            prompt: text, tokenized with the model's tokenizer (special tokens added, e.g. BOS).
            params: SamplingParams (or a dict for SamplingParams.from_dict); default SamplingParams().
            prompt_token_ids: token ids instead of (or taking precedence over) prompt.
        """
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if params is None:
            params = SamplingParams()
        elif isinstance(params, dict):
            params = SamplingParams.from_dict(params)
        elif not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt_token_ids = self._prompt_token_ids(prompt, prompt_token_ids)
        if params.n > self.scheduler.max_num_seqs:
            raise ValueError(
                f"n={params.n} is larger than the number of sequences the engine runs at once "
                f"({self.scheduler.max_num_seqs}: min(max_num_seqs, max_num_batched_tokens))"
            )
        bad_words_token_ids = self._bad_words_token_ids(params.bad_words)
        child_params = [
            params._for_engine(self.eos_token_ids, i, bad_words_token_ids) for i in range(params.n)
        ]
        with self._lock:
            if request_id in self.requests:
                raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request")
            request = Request(
                request_id, prompt, prompt_token_ids, params, child_params, next(self._arrival)
            )
            for seq in request.seqs:
                self._init_output_state(seq)
            self.requests[request_id] = request
            self.scheduler.add_request(request)

    def _bad_words_token_ids(self, bad_words: list[str]) -> tuple[tuple[int, ...], ...]:
        """Token-id sequences of bad_words, as vLLM's `SamplingParams.update_from_tokenizer`.

        Each word, leading spaces stripped, is tokenized without special tokens as it is, and
        again after a space (the form it takes inside a text with byte-level BPE and
        SentencePiece tokenizers); the spaced form is kept only where it yields a different
        first token and as many tokens (vLLM's rule). Duplicates are dropped.
        """
        sequences: dict[tuple[int, ...], None] = {}  # insertion-ordered set
        for word in bad_words:
            plain = tuple(self.tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = tuple(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            if not plain:
                raise ValueError(f"bad_words: {word!r} tokenizes to no tokens")
            sequences[plain] = None
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                sequences[spaced] = None
        bad = sorted({t for ids in sequences for t in ids if not 0 <= t < self.vocab_size})
        if bad:
            raise ValueError(
                f"bad_words tokenize to ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}"
            )
        return tuple(sequences)

    def _prompt_token_ids(self, prompt: str | None, prompt_token_ids: list[int] | None) -> list[int]:
        if prompt_token_ids is not None:
            if isinstance(prompt_token_ids, (str, bytes)) or not hasattr(prompt_token_ids, "__iter__"):
                raise ValueError("prompt_token_ids must be a list of ints")
            ids = list(prompt_token_ids)
            if not ids:
                raise ValueError("prompt_token_ids must not be empty")
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, int) and not hasattr(t, "__index__"):
                    raise ValueError(f"prompt_token_ids must be ints, got {t!r}")
            ids = [int(t) for t in ids]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt_token_ids contains ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}"
                )
        else:
            if prompt is None:
                raise ValueError("prompt is required (or prompt_token_ids)")
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
            if not prompt:
                raise ValueError("prompt must not be empty")
            ids = list(self.tokenizer(prompt).input_ids)
            if not ids:
                raise ValueError("prompt tokenizes to no tokens")
        bs = self.config.block_size
        if len(ids) > self.num_kv_blocks * bs:
            raise ValueError(
                f"prompt needs {-(-len(ids) // bs)} KV blocks ({len(ids)} tokens) but the KV cache "
                f"has only {self.num_kv_blocks} blocks of {bs} tokens"
            )
        if len(ids) > self.max_model_len:
            raise ValueError(
                f"prompt is too long: {len(ids)} tokens, max_model_len is {self.max_model_len}"
            )
        return ids

    def abort(self, request_id: str) -> bool:
        """Abort now: frees its blocks at once; the next step() returns it with finish_reason "abort".

        Returns False when the request is unknown or already finished.
        """
        with self._lock:
            request = self.requests.get(request_id)
            if request is None or request in self._aborted or request.is_finished:
                return False
            for seq in request.seqs:
                if not seq.is_finished:
                    self.scheduler.finish_seq(seq, "abort")
            self._aborted.append(request)
            return True

    def has_unfinished_requests(self) -> bool:
        """True while some request has not yet returned its final output."""
        with self._lock:
            return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        with self._lock:
            return len(self.requests)

    # ------------------------------------------------------------------ step

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return the requests that advanced or finished in it."""
        with self._lock:
            outputs: list[RequestOutput] = []
            if self._aborted:
                for request in self._aborted:
                    outputs.append(self._make_output(request))
                self._aborted = []
            batch = self.scheduler.schedule()
            if batch.chunks:
                runner_output = self.runner.run(batch)
                outputs.extend(self._postprocess(batch, runner_output))
                self.scheduler.remove_finished()
                self.num_steps += 1
            return outputs

    def _postprocess(self, batch, runner_output) -> list[RequestOutput]:
        sampled = self.scheduler.update_from_output(
            batch, runner_output.sampled_token_ids, getattr(runner_output, "logprobs", None)
        )
        touched: dict[str, Request] = {}
        for seq, token_id, logprob in sampled:
            self._process_token(seq, token_id, logprob)
            touched[seq.request.request_id] = seq.request
        return [self._make_output(r) for r in touched.values()]

    # ------------------------------------------------------------------ per token

    def _init_output_state(self, seq: Sequence) -> None:
        from paged_engine.detokenizer import IncrementalDetokenizer

        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer, seq.prompt_token_ids, skip_special_tokens=seq.params.skip_special_tokens
        )
        seq.detok_window = seq.detokenizer.window()

    def _decoded_token(self, token_id: int) -> str:
        text = self._decoded_token_cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._decoded_token_cache[token_id] = text
        return text

    def _record_logprobs(self, seq: Sequence, token_id: int, sample_logprobs: Any) -> None:
        if isinstance(sample_logprobs, tuple):
            chosen, rank, top = sample_logprobs
        else:
            chosen, rank, top = sample_logprobs.logprob, sample_logprobs.rank, sample_logprobs.top
        seq.cumulative_logprob += float(chosen)
        if seq.logprobs is None:
            return
        entry = {token_id: Logprob(float(chosen), int(rank), self._decoded_token(token_id))}
        for r, (tid, lp) in enumerate(top or (), start=1):
            tid = int(tid)
            if tid not in entry:
                entry[tid] = Logprob(float(lp), r, self._decoded_token(tid))
        seq.logprobs.append(entry)

    def _process_token(self, seq: Sequence, token_id: int, sample_logprobs: Any) -> None:
        """Append bookkeeping for one sampled token: logprobs, text delta, stop checks, finish."""
        params = seq.params
        request = seq.request
        if not request.prompt_counted and seq.index == 0:
            request.prompt_counted = True
            self.prompt_tokens_total += len(request.prompt_token_ids)
        self.generation_tokens_total += 1
        seq.pending_token_ids.append(token_id)
        if sample_logprobs is not None:
            self._record_logprobs(seq, token_id, sample_logprobs)

        num_out = len(seq.output_token_ids)
        stops_active = num_out > params.min_tokens
        finish_reason = None
        stop_reason: Any = None
        detokenize = True
        if stops_active:
            if token_id in self.eos_token_ids and not params.ignore_eos:
                finish_reason = "stop"
                detokenize = params.include_stop_str_in_output
            elif token_id in params.stop_token_ids:
                finish_reason, stop_reason = "stop", token_id
                detokenize = params.include_stop_str_in_output

        det = seq.detokenizer
        if detokenize:
            delta = det.add_tokens([token_id])
            if delta:
                prev_len = len(seq.output_text)
                seq.output_text += delta
                if params.stop and stops_active and finish_reason is None:
                    finish_reason, stop_reason = self._check_stop_strings(seq, prev_len)

        if finish_reason is None:
            if params.max_tokens is not None and num_out >= params.max_tokens:
                finish_reason = "length"
            elif seq.num_prompt_tokens + num_out >= self.max_model_len:
                finish_reason = "length"

        if finish_reason is not None and not isinstance(stop_reason, str):
            # Release what the detokenizer held back (a dangling partial character).
            tail = det.flush()
            if tail:
                prev_len = len(seq.output_text)
                seq.output_text += tail
                if params.stop and stops_active:
                    reason, s = self._check_stop_strings(seq, prev_len)
                    if reason is not None:
                        finish_reason, stop_reason = reason, s
        # Taken once per step, after flush(): decode_window(ids, offset, final=finished) then
        # reproduces this step's detokenizer text (add_tokens delta + flush tail).
        seq.detok_window = det.window()

        # Emit text, holding back a suffix that may still grow into a stop string.
        emit_to = len(seq.output_text)
        if finish_reason is None and params.stop:
            emit_to -= _partial_stop_suffix_len(seq.output_text, params.stop)
        if emit_to > seq.num_emitted_chars:
            seq.pending_text += seq.output_text[seq.num_emitted_chars : emit_to]
            seq.num_emitted_chars = emit_to

        if finish_reason is not None:
            self.scheduler.finish_seq(seq, finish_reason, stop_reason)

    def _check_stop_strings(self, seq: Sequence, prev_len: int) -> tuple[str | None, str | None]:
        params = seq.params
        max_stop_len = max(len(s) for s in params.stop)
        match = _find_stop_string(seq.output_text, params.stop, prev_len - max_stop_len + 1)
        if match is None:
            return None, None
        idx, s = match
        end = idx + len(s) if params.include_stop_str_in_output else idx
        # Never cut into text already returned (the hold-back makes that impossible).
        seq.output_text = seq.output_text[: max(end, seq.num_emitted_chars)]
        return "stop", s

    # ------------------------------------------------------------------ outputs

    def _make_output(self, request: Request) -> RequestOutput:
        outs = []
        finished = True
        for seq in request.seqs:
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    token_ids=LivePrefix(seq.output_token_ids, len(seq.output_token_ids)),
                    text=seq.output_text[: seq.num_emitted_chars],
                    new_token_ids=seq.pending_token_ids,
                    new_text=seq.pending_text,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    cumulative_logprob=seq.cumulative_logprob,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                    # No tokens this step (an n>1 sibling that waited, an abort): an empty
                    # window, so a stateless decoder repeats nothing. Otherwise the window
                    # taken this step, shared as is: window() returns a fresh list that
                    # nothing mutates, and the next token replaces it.
                    detok_window=seq.detok_window if seq.pending_token_ids else ([], 0),
                )
            )
            seq.pending_token_ids = []
            seq.pending_text = ""
            finished = finished and seq.status is SequenceStatus.FINISHED
        if finished:
            self.requests.pop(request.request_id, None)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=outs,
            finished=finished,
            num_cached_tokens=request.num_cached_tokens,
        )

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict:
        """Counters and gauges for metrics (all ints but prefix_cache_hit_rate).

        running / waiting count requests (a request with n>1 counts once). kv_blocks_free
        includes free blocks that still hold a cached prefix (they are reclaimed on demand).
        prefix_cache_queries / prefix_cache_hits count prompt tokens looked up / served from the
        cache at a request's first admission. preemptions counts sequences preempted.
        prompt_tokens_total counts each request's prompt once, when its first token is sampled;
        generation_tokens_total counts every sampled token.
        """
        with self._lock:
            sched = self.scheduler
            running_ids = {s.request.request_id for s in sched.live_seqs() if s.status.value == "running"}
            unfinished = [r for r in self.requests.values() if not r.is_finished]
            bm = sched.block_manager
            queries = sched.prefix_cache_queries
            return {
                "running": len(running_ids),
                "waiting": sum(1 for r in unfinished if r.request_id not in running_ids),
                "kv_blocks_total": bm.num_blocks,
                "kv_blocks_free": bm.num_free_blocks,
                "kv_blocks_used": bm.num_used_blocks,
                "prefix_cache_hits": sched.prefix_cache_hits,
                "prefix_cache_queries": queries,
                "prefix_cache_hit_rate": (sched.prefix_cache_hits / queries) if queries else 0.0,
                "preemptions": sched.num_preemptions,
                "prompt_tokens_total": self.prompt_tokens_total,
                "generation_tokens_total": self.generation_tokens_total,
                "num_steps": self.num_steps,
            }
