"""From sampled tokens to what users see: detokenization, stop decisions, RequestOutputs.

Holds: detokenizer.py (incremental and stateless-window decoding), stop_checker.py (the one place
that decides stops), output_processor.py (per-token logprobs, text, hold-back), request_output.py
(RequestOutput, CompletionOutput, Logprob). Imports: core/ and the tokenizer (transformers); no
torch.
"""
