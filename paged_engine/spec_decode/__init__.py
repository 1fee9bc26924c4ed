"""Speculative decoding: proposers (n-gram, draft model) and verification (rejection sampler).

Where it plugs in: the scheduler reserves draft slots (`ScheduledSequence.num_lookahead_tokens`:
token budget and blocks); between schedule and execute the engine's proposer fills
`ScheduledSequence.draft_token_ids`; the runner computes their KV with the step and the
`RejectionSampler` returns 1..k+1 tokens per sequence in `ModelRunnerOutput.sampled_token_ids`;
the scheduler counts the accepted ones as computed and the output processor stops at the first
stop token. Configured by `EngineConfig.speculative_config` (config.py here).
Imports: core/batch.py, executor/ (the draft model's runner, the sampler), torch.
"""

from __future__ import annotations


def make_proposer(config):
    """The proposer `config.speculative_config` asks for (an EngineConfig with one set)."""
    spec = config.speculative_config
    if spec.method == "ngram":
        from paged_engine.spec_decode.ngram_proposer import NgramProposer

        return NgramProposer(spec)
    from paged_engine.spec_decode.draft_model import DraftModelProposer

    return DraftModelProposer(config)
