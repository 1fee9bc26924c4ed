"""LLMEngine: requests in, RequestOutputs out, one `step()` at a time.

    engine = LLMEngine(EngineConfig(model="dir"))      # or LLMEngine("dir", device="cpu", ...)
    engine.add_request("r1", prompt="Hello", params=SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for out in engine.step():
            print(out.request_id, out.new_text, out.finished)

A step is three calls (nano-vllm `llm_engine.py`)::

    batch = scheduler.schedule()                  # core/: plain-data SchedulerOutput
    output = executor.execute_model(batch)        # executor/: ModelRunnerOutput
    finished = self._postprocess(batch, output)   # scheduler.update_from_output + output/

Post-processing appends the sampled tokens (scheduler), then the output processor detokenizes
them and the stop checker decides stops (output/stop_checker.py has the order). The engine is
thread-safe: add_request / abort / step / stats take one lock, so a serving thread may abort
while another thread steps.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from typing import Any

from paged_engine.config import EngineConfig
from paged_engine.core.batch import ModelRunnerOutput, SchedulerOutput
from paged_engine.core.scheduler import Scheduler
from paged_engine.core.sequence import Request, SequenceStatus
from paged_engine.output.output_processor import OutputProcessor
from paged_engine.output.request_output import RequestOutput
from paged_engine.output.stop_checker import StopChecker, model_eos_token_ids
from paged_engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    """The engine: add requests, step, get outputs.

    Args:
        config: an EngineConfig, or a model directory (then **kwargs are EngineConfig fields),
            or None with model=... in kwargs.
        executor: an already built executor (tests inject fakes); default
            `Executor.from_config(config)` (one model runner in this process).
        proposer: speculative decoding's draft proposer (tests inject fakes); default built from
            `config.speculative_config` (spec_decode/: n-gram or a draft model), None without it.
    """

    def __init__(self, config: EngineConfig | str | os.PathLike | None = None, *, executor: Any = None,
                 proposer: Any = None, **kwargs):
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
        self.eos_token_ids = model_eos_token_ids(config.model, config.hf_config, self.tokenizer)
        self.vocab_size = int(getattr(config.hf_config, "vocab_size", 0) or len(self.tokenizer))

        spec = config.speculative_config
        if proposer is None and spec is not None:
            # A draft model is loaded before the target sizes its KV cache from what is left.
            from paged_engine.spec_decode import make_proposer

            proposer = make_proposer(config)
        self.proposer = proposer
        if executor is None:
            from paged_engine.executor.executor import Executor

            try:
                executor = Executor.from_config(config)
            except BaseException:
                if proposer is not None and hasattr(proposer, "shutdown"):
                    proposer.shutdown()
                raise
        self.executor = executor
        self.num_kv_blocks = int(executor.num_kv_blocks)
        if proposer is not None and hasattr(proposer, "allocate_kv_cache"):
            # The draft's paged cache has the target's blocks: one block table serves both,
            # so freeing a sequence's blocks frees them in both caches.
            proposer.allocate_kv_cache(self.num_kv_blocks)
        kv_capacity_tokens = self.num_kv_blocks * config.block_size
        # One sequence alone must always fit in the cache, or preemption could not make progress.
        self.max_model_len = min(config.max_model_len, kv_capacity_tokens)
        if self.max_model_len < config.max_model_len:
            logger.info(
                "max_model_len %d exceeds the KV cache (%d blocks x %d tokens); capping it to %d",
                config.max_model_len, self.num_kv_blocks, config.block_size, self.max_model_len,
            )
        self.scheduler = Scheduler(config, self.num_kv_blocks)
        self.output_processor = OutputProcessor(
            self.tokenizer, StopChecker(self.eos_token_ids, self.max_model_len), self.scheduler.finish_seq)

        self.requests: dict[str, Request] = {}
        self._aborted: list[Request] = []  # aborted, final output not yet returned
        # Structured outputs: the grammar compiler (made on the first such request) and the
        # requests whose grammar is still compiling, with its Future.
        self._structured_output = None
        self._grammar_waiting: dict[str, tuple[Request, Any]] = {}
        self._arrival = itertools.count()
        self.num_steps = 0

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_dict(cls, d: dict, **kwargs) -> "LLMEngine":
        return cls(EngineConfig.from_dict(d), **kwargs)

    def shutdown(self) -> None:
        """Free the executor (GPU memory, worker processes) and the draft proposer."""
        executor, self.executor = self.executor, None
        if executor is not None and hasattr(executor, "shutdown"):
            executor.shutdown()
        proposer, self.proposer = getattr(self, "proposer", None), None
        if proposer is not None and hasattr(proposer, "shutdown"):
            proposer.shutdown()
        manager, self._structured_output = getattr(self, "_structured_output", None), None
        if manager is not None:
            manager.shutdown()

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
        if params.logit_bias:
            bad = sorted(t for t in params.logit_bias if t >= self.vocab_size)
            if bad:
                raise ValueError(f"logit_bias names token ids outside the vocabulary "
                                 f"[0, {self.vocab_size}): {bad[:5]}")
        child_params = [
            params._for_engine(self.eos_token_ids, i, bad_words_token_ids) for i in range(params.n)
        ]
        grammar_future = None
        if params.structured_outputs is not None:
            grammar_future = self.structured_output_manager().compile(params.structured_outputs)
            if grammar_future.done() and grammar_future.exception() is not None:
                raise grammar_future.exception()  # known to fail (cached): refuse at once
        with self._lock:
            if request_id in self.requests:
                raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request")
            request = Request(
                request_id, prompt, prompt_token_ids, params, child_params, next(self._arrival)
            )
            for seq in request.seqs:
                self.output_processor.init_sequence(seq)
            if grammar_future is not None:
                if grammar_future.done():
                    self._set_grammars(request, grammar_future.result())
                else:
                    request.leader.status = SequenceStatus.WAITING_FOR_GRAMMAR
                    self._grammar_waiting[request_id] = (request, grammar_future)
            self.requests[request_id] = request
            self.scheduler.add_request(request)

    # ------------------------------------------------------------------ structured outputs

    def structured_output_manager(self):
        """The grammar compiler of this engine (structured_output/), made on first use."""
        with self._lock:
            if self._structured_output is None:
                from paged_engine.structured_output import StructuredOutputManager

                self._structured_output = StructuredOutputManager(
                    self.tokenizer, self.vocab_size, self.eos_token_ids)
            return self._structured_output

    def _set_grammars(self, request: Request, compiled) -> None:
        manager = self._structured_output
        for seq in request.seqs:
            seq.grammar = manager.new_grammar(compiled)

    def _update_grammar_waiting(self) -> list[RequestOutput]:
        """Hand finished compilations to their requests; fail those whose grammar did not
        compile (they hold no KV blocks yet). Returns the failed requests' final outputs."""
        failed = []
        for request_id, (request, future) in list(self._grammar_waiting.items()):
            if request.is_finished:  # aborted while compiling
                del self._grammar_waiting[request_id]
                continue
            if not future.done():
                continue
            del self._grammar_waiting[request_id]
            error = future.exception()
            if error is None:
                self._set_grammars(request, future.result())
                continue
            request.error = str(error)
            for seq in request.seqs:
                self.scheduler.finish_seq(seq, "error")
            failed.append(self._make_output(request))
        return failed

    def _wait_for_grammars(self, timeout_s: float = 0.01) -> None:
        """Nothing could run: wait a little for a compilation rather than spin on the lock."""
        import concurrent.futures

        futures = [f for _, f in self._grammar_waiting.values()]
        concurrent.futures.wait(futures, timeout=timeout_s,
                                return_when=concurrent.futures.FIRST_COMPLETED)

    def _fill_grammar_bitmasks(self, batch: SchedulerOutput) -> None:
        """Put each constrained sampling sequence's bitmask into the batch (one row per sampled
        position), cutting its drafts at the first one its grammar rejects."""
        seqs_by_id = self.scheduler.seqs_by_id
        for scheduled in batch.seqs:
            if not scheduled.do_sample:
                continue
            seq = seqs_by_id.get(scheduled.seq_id)
            if seq is None or seq.grammar is None:
                continue
            scheduled.grammar_bitmask, scheduled.draft_token_ids = seq.grammar.next_token_bitmask(
                scheduled.draft_token_ids)

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
            if self._grammar_waiting:
                outputs.extend(self._update_grammar_waiting())
            batch = self.scheduler.schedule()
            if not batch.seqs and self._grammar_waiting:
                self._wait_for_grammars()
            if batch.seqs:
                draft_probs = None
                if self.proposer is not None:
                    draft_probs = self.proposer.propose(batch, self.scheduler.seqs_by_id)
                if self._structured_output is not None:
                    self._fill_grammar_bitmasks(batch)
                if self.proposer is not None:
                    unused = sum(s.num_lookahead_tokens - len(s.draft_token_ids) for s in batch.seqs)
                    batch.num_batched_tokens -= unused
                if draft_probs:
                    output = self.executor.execute_model(batch, draft_probs=draft_probs)
                else:
                    output = self.executor.execute_model(batch)
                outputs.extend(self._postprocess(batch, output))
                self.scheduler.remove_finished()
                self.num_steps += 1
            return outputs

    def _postprocess(self, batch: SchedulerOutput, output: ModelRunnerOutput) -> list[RequestOutput]:
        if output.prompt_logprobs:
            seqs_by_id = self.scheduler.seqs_by_id
            for scheduled, chunk in zip(batch.seqs, output.prompt_logprobs):
                seq = seqs_by_id.get(scheduled.seq_id) if chunk is not None else None
                if seq is not None:
                    self.output_processor.add_prompt_logprobs(seq, chunk)
        new_tokens = self.scheduler.update_from_output(batch, output)
        touched: dict[str, Request] = {}
        process_tokens = self.output_processor.process_tokens
        for seq, token_ids, logprobs in new_tokens:
            process_tokens(seq, token_ids, logprobs)
            touched[seq.request.request_id] = seq.request
        return [self._make_output(r) for r in touched.values()]

    def _make_output(self, request: Request) -> RequestOutput:
        output = self.output_processor.make_output(request)
        if output.finished:
            self.requests.pop(request.request_id, None)
        return output

    def check_health(self) -> None:
        """Raise if the engine can no longer step (a tensor-parallel worker died); no-op otherwise."""
        check = getattr(self.executor, "check_health", None)
        if check is not None:
            check()

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict:
        """Counters and gauges for metrics (ints, but prefix_cache_hit_rate and the list
        spec_accepted_per_pos).

        running / waiting count requests (a request with n>1 counts once). kv_blocks_free
        includes free blocks that still hold a cached prefix (they are reclaimed on demand).
        prefix_cache_queries / prefix_cache_hits count prompt tokens looked up / served from the
        cache at a request's first admission. preemptions counts sequences preempted.
        prompt_tokens_total counts each request's prompt once, when its first token is sampled;
        generation_tokens_total counts every sampled token (speculative decoding's tokens
        past a stop excluded). spec_num_drafts counts sequence-steps that verified drafts,
        spec_num_draft_tokens the drafts verified, spec_num_accepted_tokens those accepted,
        spec_accepted_per_pos[j] the steps whose draft j (0-based) was accepted.
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
                "prompt_tokens_total": self.output_processor.prompt_tokens_total,
                "generation_tokens_total": self.output_processor.generation_tokens_total,
                "num_steps": self.num_steps,
                "spec_num_drafts": sched.spec_num_drafts,
                "spec_num_draft_tokens": sched.spec_num_draft_tokens,
                "spec_num_accepted_tokens": sched.spec_num_accepted_tokens,
                "spec_accepted_per_pos": list(sched.spec_accepted_per_pos),
            }
