"""Turns sampled tokens into what the user sees: logprobs, text deltas, stops, RequestOutputs.

For each new token of a sequence, in order: record its logprobs, ask the `StopChecker` about the
token, advance the sequence's grammar (structured outputs), detokenize incrementally (`IncrementalDetokenizer`), ask about stop strings and length,
then emit the text that can no longer become part of a stop string. When a sequence stops at a
token that is not its last new one (speculative decoding verifies several per step), the tokens
after it are dropped. `make_output` snapshots a request after the step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from paged_engine.core.sequence import SequenceStatus
from paged_engine.output.detokenizer import IncrementalDetokenizer
from paged_engine.output.request_output import CompletionOutput, LivePrefix, Logprob, RequestOutput
from paged_engine.output.stop_checker import StopChecker

if TYPE_CHECKING:
    from paged_engine.core.sequence import Request, Sequence


class OutputProcessor:
    """Per-token output work of one engine.

    Args:
        tokenizer: the model's tokenizer.
        stop_checker: decides stops.
        finish_seq: `Scheduler.finish_seq(seq, reason, stop_reason)`, called on a stop.
    Attributes:
        prompt_tokens_total: each request's prompt counted once, when its first token comes.
        generation_tokens_total: every generated token.
    """

    def __init__(self, tokenizer, stop_checker: StopChecker, finish_seq: Callable):
        self.tokenizer = tokenizer
        self.stop_checker = stop_checker
        self._finish_seq = finish_seq
        self._decoded_token_cache: dict[int, str] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def init_sequence(self, seq: "Sequence") -> None:
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer, seq.prompt_token_ids, skip_special_tokens=seq.params.skip_special_tokens
        )
        seq.detok_window = seq.detokenizer.window()

    def add_prompt_logprobs(self, seq: "Sequence", chunk) -> None:
        """Record a step's prompt logprobs (a PromptLogprobs); a recomputed chunk after
        preemption repeats entries already recorded, which are kept."""
        recorded = seq.prompt_logprobs
        if recorded is None:
            return
        prompt = seq.prompt_token_ids
        for offset, (chosen, rank, top) in enumerate(chunk.logprobs):
            index = chunk.first_index + offset
            if index < len(recorded):
                continue
            assert index == len(recorded), "prompt logprobs arrive in order"
            skip = seq.params.skip_special_tokens
            recorded.append(self._logprob_entry(prompt[index], chosen, rank, top,
                                                self._decoded_token(prompt[index], skip), skip))

    # ------------------------------------------------------------------ per token

    def process_tokens(self, seq: "Sequence", token_ids: list[int], logprobs: list) -> None:
        """The bookkeeping of a step's new tokens (already appended to seq.output_token_ids)."""
        num_new = len(token_ids)
        base = len(seq.output_token_ids) - num_new
        det = seq.detokenizer
        window_start = 0
        for j, token_id in enumerate(token_ids):
            sample_logprobs = logprobs[j] if j < len(logprobs) else None
            reason, stop_reason = self._process_token(seq, token_id, sample_logprobs, base + j + 1)
            if j == 0:
                # Where the first token's window starts in the detokenizer's ids.
                window_start = len(det.token_ids) - len(seq.detok_window[0])
                first_read_offset = seq.detok_window[1]
            if reason is not None:
                surplus = num_new - j - 1
                if surplus:
                    del seq.output_token_ids[-surplus:]
                self._finish_seq(seq, reason, stop_reason)
                break
        if num_new > 1:
            # Several tokens in one step (speculative decoding): windows compose (see
            # detokenizer.py), so the first token's window extended to the last detokenized id
            # reproduces the text of the whole step, the flush() of a finishing one included.
            seq.detok_window = (det.token_ids[window_start:], first_read_offset)

    def _decoded_token(self, token_id: int, skip_special_tokens: bool) -> str:
        key = (token_id, skip_special_tokens)
        text = self._decoded_token_cache.get(key)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=skip_special_tokens)
            self._decoded_token_cache[key] = text
        return text

    def _logprob_entry(self, token_id: int, chosen: float, rank: int, top, token_text: str,
                       skip_special_tokens: bool) -> dict[int, Logprob]:
        """vLLM's per-position dict: the actual token (with `token_text`) first, then the top-N
        by rank, each decoded alone (special tokens as the params say)."""
        entry = {token_id: Logprob(float(chosen), int(rank), token_text)}
        for r, (tid, lp) in enumerate(top or (), start=1):
            tid = int(tid)
            if tid not in entry:
                entry[tid] = Logprob(float(lp), r, self._decoded_token(tid, skip_special_tokens))
        return entry

    def _record_logprobs(self, seq: "Sequence", token_id: int, sample_logprobs: Any,
                         token_text: str) -> None:
        """One token's logprobs. The sampled token's decoded_token is the text it added to the
        output (vLLM's incremental detokenization): the decoded tokens concatenate to the text,
        a skipped special token or a stop token is "", a partial character waits for the token
        that completes it."""
        chosen, rank, top = sample_logprobs
        seq.cumulative_logprob += float(chosen)
        if seq.logprobs is not None:
            seq.logprobs.append(self._logprob_entry(token_id, chosen, rank, top, token_text,
                                                    seq.params.skip_special_tokens))

    def _process_token(self, seq: "Sequence", token_id: int, sample_logprobs: Any,
                       num_out: int) -> tuple[str | None, Any]:
        """One token: logprobs, text delta, stop checks. Returns (finish_reason, stop_reason)."""
        params = seq.params
        request = seq.request
        checker = self.stop_checker
        if not request.prompt_counted and seq.index == 0:
            request.prompt_counted = True
            self.prompt_tokens_total += len(request.prompt_token_ids)
        self.generation_tokens_total += 1
        seq.pending_token_ids.append(token_id)
        text_len_before = len(seq.output_text)

        stops_active = checker.stops_active(seq, num_out)
        finish_reason = None
        stop_reason: Any = None
        detokenize = True
        if stops_active:
            hit = checker.token_stop(seq, token_id)
            if hit is not None:
                finish_reason, stop_reason = hit
                detokenize = params.include_stop_str_in_output
        grammar = seq.grammar
        if grammar is not None and finish_reason is None:
            # Structured outputs: the matcher follows every kept token. The runner only lets
            # allowed tokens through, so a rejection means nothing was allowed (e.g. min_tokens
            # banned the only way out of the grammar).
            if not grammar.accept_token(token_id):
                finish_reason, detokenize = "error", False
                request.error = (f"structured_outputs: token {token_id} is not allowed by the "
                                 "grammar (no allowed token was left to sample)")
            elif grammar.is_terminated():
                finish_reason = "stop"  # the grammar ended on its stop token (ignore_eos)

        det = seq.detokenizer
        if detokenize:
            delta = det.add_tokens([token_id])
            if delta:
                prev_len = len(seq.output_text)
                seq.output_text += delta
                if stops_active and finish_reason is None:
                    stop = checker.string_stop(seq, prev_len)
                    if stop is not None:
                        finish_reason, stop_reason = "stop", stop

        if finish_reason is None and checker.length_stop(seq, num_out):
            finish_reason = "length"

        if finish_reason is not None and not isinstance(stop_reason, str):
            # Release what the detokenizer held back (a dangling partial character).
            tail = det.flush()
            if tail:
                prev_len = len(seq.output_text)
                seq.output_text += tail
                if stops_active:
                    stop = checker.string_stop(seq, prev_len)
                    if stop is not None:
                        finish_reason, stop_reason = "stop", stop
        # Taken once per token, after flush(): decode_window(ids, offset, final=finished) then
        # reproduces this token's detokenizer text (add_tokens delta + flush tail);
        # process_tokens composes the windows of a step with several tokens.
        seq.detok_window = det.window()
        if sample_logprobs is not None:
            self._record_logprobs(seq, token_id, sample_logprobs,
                                  seq.output_text[text_len_before:])

        # Emit text, holding back a suffix that may still grow into a stop string.
        emit_to = len(seq.output_text)
        if finish_reason is None:
            emit_to -= checker.held_back_chars(seq)
        if emit_to > seq.num_emitted_chars:
            seq.pending_text += seq.output_text[seq.num_emitted_chars: emit_to]
            seq.num_emitted_chars = emit_to
        return finish_reason, stop_reason

    # ------------------------------------------------------------------ outputs

    def make_output(self, request: "Request") -> RequestOutput:
        """Snapshot of a request after a step; resets each sequence's pending delta."""
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
        prompt_logprobs = request.leader.prompt_logprobs
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=outs,
            finished=finished,
            num_cached_tokens=request.num_cached_tokens,
            prompt_logprobs=list(prompt_logprobs) if prompt_logprobs is not None else None,
            error=request.error,
        )
