"""Incremental detokenization: streamed text deltas that concatenate to the offline decode.

Decoding each new token alone is wrong in two ways (TensorRT-LLM's postprocessing does it, and
it is their most reported streaming bug): SentencePiece-style tokenizers strip the leading space
of whatever they decode, so " world" comes out as "world"; and a multi-byte character split over
several tokens decodes as U+FFFD per piece. Like vLLM (prefix_offset / read_offset), we decode a
short window: a few already-emitted tokens (the context) plus the new ones, and emit the text
that the new ones add to the context's text. Only an incomplete UTF-8 character at the end
(and the tokens that carry it) is held back, and released once it completes (or by `flush()`).

Guarantee (byte for byte, tested for byte-level BPE and SentencePiece-style Metaspace + byte
fallback tokenizers, CJK and emoji included)::

    "".join(det.add_tokens(chunk) for chunk in chunks) + det.flush()
        == tokenizer.decode(all_output_ids, skip_special_tokens=skip_special_tokens)

The text is that of the generated ids decoded alone (as `tokenizer.decode(output_ids)` after
HF `generate`): the prompt is not context for the first output token.

How "incomplete" is decided, per tokenizer decoder (found once per tokenizer and cached):
  * ByteLevel (GPT-2 / Llama-3 / Qwen): from the raw bytes of the last tokens — the tokens
    carrying a proper prefix of a valid UTF-8 sequence at the end (at most 3 bytes) are held.
    Invalid bytes come out at once as U+FFFD, the same U+FFFD the full decode has.
  * ByteFallback (Llama-2 / Mistral): the `tokenizers` ByteFallback decoder turns a whole run of
    consecutive `<0xXX>` tokens into text only if the entire run is valid UTF-8, otherwise into
    one U+FFFD per byte token — so a later byte can still change earlier text of the run. A
    trailing run of byte tokens (skipped special tokens do not end it) is therefore held until a
    normal token ends it.
  * anything else (vLLM's rule): the text must not end in U+FFFD; the window end is moved back
    by up to 4 tokens to find such a point, otherwise everything new is held.

Stateless use (the ensemble's postprocessing model; any number of instances)::

    ids, read_offset = det.window()       # engine side, after add_tokens()/flush()
    decode_window(tokenizer, ids, read_offset, skip_special_tokens, final=is_last_response)

reproduces exactly the text returned since the previous `add_tokens` call: the last
`add_tokens` delta, plus the `flush()` tail when `flush()` followed it in the same step (pass
`final=True` for the request's last response so the held tail comes out, as `flush()` does).
When `flush()` is called after `window()` was already taken for the last `add_tokens` (e.g. an
abort in a later step), `window()` then describes the `flush()` text alone. The window covers
the last emitted token(s) plus every token added since, held-back ones included, so it is short
(usually 2 tokens) and decoding costs O(window) per step, not O(sequence).

Windows compose: for the window (ids[p:L1], r - p) of an earlier step, the longer window
ids[p:L2] (same p, same read_offset, L2 = tokens now) decodes to all the text returned from
that step through the latest one. The serving layer uses this to reach back over text that the
engine held for a possible stop string.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field

_REPLACEMENT_CHAR = "\ufffd"

# An incomplete UTF-8 character is at most 3 bytes (4-byte sequences minus their last byte).
_MAX_INCOMPLETE_UTF8_BYTES = 3


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable-char table used by the ByteLevel pre-tokenizer."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


@dataclass
class _TokenizerInfo:
    """What the incremental logic needs to know about one tokenizer's decoder."""

    mode: str  # "byte_level" | "byte_fallback" | "generic"
    special_ids: frozenset  # ids dropped by decode(..., skip_special_tokens=True)
    id_to_token: object  # callable id -> token string (None for "generic")
    # The backend's decode(ids, skip_special_tokens=...) where it returns exactly what the
    # tokenizer's decode returns, else None. It skips the wrapper's per-call Python work (input
    # conversion, keyword handling), most of the cost of decoding a 2-token window.
    fast_decode: object = None
    _token_bytes: dict = field(default_factory=dict)  # byte_level: id -> raw bytes
    _is_byte_token: dict = field(default_factory=dict)  # byte_fallback: id -> bool
    # fast_decode([id]) by skip_special_tokens, then id: the context of most windows is the one
    # token emitted last, so this saves one of the two decodes of a step.
    _token_text: dict = field(default_factory=lambda: {False: {}, True: {}})

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of a token, exactly as the `tokenizers` ByteLevel decoder produces them."""
        raw = self._token_bytes.get(token_id)
        if raw is None:
            token = self.id_to_token(token_id) or ""
            try:
                raw = bytes(_UNICODE_TO_BYTE[c] for c in token)
            except KeyError:  # the decoder passes such tokens (added tokens) through as UTF-8
                raw = token.encode("utf-8")
            self._token_bytes[token_id] = raw
        return raw

    def token_text(self, token_id: int, skip_special_tokens: bool) -> str:
        """fast_decode([token_id], skip_special_tokens=...), cached."""
        cache = self._token_text[skip_special_tokens]
        text = cache.get(token_id)
        if text is None:
            text = self.fast_decode([token_id], skip_special_tokens=skip_special_tokens)
            cache[token_id] = text
        return text

    def is_byte_token(self, token_id: int) -> bool:
        """True for ByteFallback's `<0xXX>` tokens."""
        flag = self._is_byte_token.get(token_id)
        if flag is None:
            token = self.id_to_token(token_id) or ""
            flag = len(token) == 6 and token.startswith("<0x") and token.endswith(">")
            if flag:
                try:
                    int(token[3:5], 16)
                except ValueError:
                    flag = False
            self._is_byte_token[token_id] = flag
        return flag


_INFO_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_INFO_CACHE_BY_ID: dict = {}  # for tokenizer objects that cannot be weakly referenced


def _backend(tokenizer):
    """The `tokenizers.Tokenizer` behind an HF fast tokenizer, or the tokenizer itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend
    if hasattr(tokenizer, "get_added_tokens_decoder") and hasattr(tokenizer, "decoder"):
        return tokenizer  # already a raw tokenizers.Tokenizer
    return None


def _decoder_types(decoder_json) -> list[str]:
    if not decoder_json:
        return []
    if decoder_json.get("type") == "Sequence":
        return [t for d in decoder_json.get("decoders", []) for t in _decoder_types(d)]
    return [decoder_json.get("type")]


def _build_info(tokenizer) -> _TokenizerInfo:
    backend = _backend(tokenizer)
    if backend is None:
        special = getattr(tokenizer, "all_special_ids", ()) or ()
        return _TokenizerInfo("generic", frozenset(special), None)
    added = backend.get_added_tokens_decoder()
    special = frozenset(i for i, tok in added.items() if tok.special)
    decoder = backend.decoder
    decoder_json = json.loads(decoder.__getstate__()) if decoder is not None else None
    types = _decoder_types(decoder_json)
    if decoder_json and decoder_json.get("type") == "ByteLevel":
        mode = "byte_level"
    elif "ByteFallback" in types:
        mode = "byte_fallback"
    else:
        mode = "generic"
    return _TokenizerInfo(mode, special, backend.id_to_token, _fast_decode(tokenizer, backend))


def _fast_decode(tokenizer, backend):
    """backend.decode when calling it is what tokenizer.decode does, else None.

    That holds for an HF fast tokenizer whose class keeps the base class's decode and _decode
    (they convert the ids, then call the backend) and that does not clean up spaces afterwards.
    A raw `tokenizers.Tokenizer` is its own backend: nothing to skip.
    """
    if backend is tokenizer:
        return None
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    cls = type(tokenizer)
    if (
        not isinstance(tokenizer, PreTrainedTokenizerFast)
        or cls.decode is not PreTrainedTokenizerFast.decode
        or cls._decode is not PreTrainedTokenizerFast._decode
        or getattr(tokenizer, "clean_up_tokenization_spaces", True)
    ):
        return None
    return backend.decode


def _tokenizer_info(tokenizer) -> _TokenizerInfo:
    try:
        info = _INFO_CACHE.get(tokenizer)
        if info is None:
            info = _INFO_CACHE[tokenizer] = _build_info(tokenizer)
        return info
    except TypeError:  # not weak-referenceable / not hashable
        entry = _INFO_CACHE_BY_ID.get(id(tokenizer))
        if entry is None or entry[0] is not tokenizer:
            entry = _INFO_CACHE_BY_ID[id(tokenizer)] = (tokenizer, _build_info(tokenizer))
        return entry[1]


def _incomplete_utf8_len(tail: bytes) -> int:
    """Length of the incomplete UTF-8 sequence `tail` ends in (a proper prefix of a valid
    character, which more bytes could complete), or 0."""
    for k in range(1, min(_MAX_INCOMPLETE_UTF8_BYTES, len(tail)) + 1):
        if tail[-k] & 0xC0 != 0x80:  # the last non-continuation byte starts the final sequence
            try:
                tail[-k:].decode("utf-8")
            except UnicodeDecodeError as e:
                return k if e.start == 0 and e.reason == "unexpected end of data" else 0
            return 0
    return 0


def _continues_utf8(partial: bytes, next_byte: int) -> bool:
    """Whether `next_byte` extends the incomplete sequence `partial` (completes it or not)."""
    try:
        (partial + bytes([next_byte])).decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start == 0 and e.reason == "unexpected end of data"
    return True


def _clean_end_byte_level(info, ids, read_offset, skip_special_tokens) -> int:
    """Largest t in (read_offset, len(ids)] such that ids[:t] ends on a finished character of the
    byte stream: not inside a multi-byte character that the following bytes (if any) continue.
    An incomplete sequence followed by a byte that cannot continue it is finished: the decoder
    has already replaced it by U+FFFD. Returns read_offset when there is none."""
    special_ids = info.special_ids
    for token_id in reversed(ids):  # fastest path: the last decoded byte is ASCII
        if not (skip_special_tokens and token_id in special_ids):
            last = info.token_bytes(token_id)
            if last and last[-1] < 0x80:
                return len(ids)
            break
    tail = b""  # fast path: the window's last bytes end on a finished character
    for token_id in reversed(ids):
        if not (skip_special_tokens and token_id in info.special_ids):
            tail = info.token_bytes(token_id) + tail
            if len(tail) >= _MAX_INCOMPLETE_UTF8_BYTES:
                break
    if _incomplete_utf8_len(tail[-_MAX_INCOMPLETE_UTF8_BYTES:]) == 0:
        return len(ids)
    stream = bytearray()
    ends = []  # ends[i]: byte length of the stream after ids[i]
    for token_id in ids:
        if not (skip_special_tokens and token_id in info.special_ids):
            stream += info.token_bytes(token_id)
        ends.append(len(stream))
    for t in range(len(ids), read_offset, -1):
        end = ends[t - 1]
        k = _incomplete_utf8_len(bytes(stream[max(0, end - _MAX_INCOMPLETE_UTF8_BYTES):end]))
        if k == 0 or (end < len(stream) and not _continues_utf8(bytes(stream[end - k:end]),
                                                                 stream[end])):
            return t
    return read_offset


def _clean_end_byte_fallback(info, ids, read_offset, skip_special_tokens) -> int:
    """Largest t in (read_offset, len(ids)] whose last decoded token is not a `<0xXX>` byte
    token (a run of byte tokens only becomes final text when it ends). read_offset if none."""
    for token_id in reversed(ids):  # fast path: the last decoded token is a normal one
        if not (skip_special_tokens and token_id in info.special_ids):
            if not info.is_byte_token(token_id):
                return len(ids)
            break
    in_byte_run = []
    state = False
    for token_id in ids:
        if not (skip_special_tokens and token_id in info.special_ids):
            state = info.is_byte_token(token_id)
        in_byte_run.append(state)
    for t in range(len(ids), read_offset, -1):
        if not in_byte_run[t - 1]:
            return t
    return read_offset


# Generic tokenizers: how many trailing tokens may be cut to find a window end without U+FFFD.
_GENERIC_MAX_HELD_TOKENS = 4


def _window_delta(
    tokenizer, info: _TokenizerInfo, ids: list[int], read_offset: int, skip_special_tokens: bool,
    final: bool,
) -> tuple[str, int] | None:
    """(text that ids[read_offset:end] add to ids[:read_offset], end), where ids[end:] is the
    held-back incomplete tail (empty when final); None when nothing can be emitted."""

    decode = info.fast_decode
    if decode is None or "decode" in getattr(tokenizer, "__dict__", ()):
        decode = tokenizer.decode  # also when replaced on the instance (a wrapper, a counter)
    new_text = None
    if final:
        end = len(ids)
    elif info.mode == "byte_level":
        end = _clean_end_byte_level(info, ids, read_offset, skip_special_tokens)
    elif info.mode == "byte_fallback":
        end = _clean_end_byte_fallback(info, ids, read_offset, skip_special_tokens)
    else:  # vLLM's rule: the decoded text must not end in U+FFFD
        end = read_offset
        for t in range(len(ids), max(read_offset, len(ids) - _GENERIC_MAX_HELD_TOKENS), -1):
            text = decode(ids[:t], skip_special_tokens=skip_special_tokens)
            if not text.endswith(_REPLACEMENT_CHAR):
                end, new_text = t, text
                break
    if end <= read_offset:
        return None
    if new_text is None:
        new_text = decode(ids[:end], skip_special_tokens=skip_special_tokens)
    prefix_text = ""
    if read_offset == 1 and decode is info.fast_decode:
        prefix_text = info.token_text(ids[0], skip_special_tokens)
    elif read_offset > 0:
        prefix_text = decode(ids[:read_offset], skip_special_tokens=skip_special_tokens)
    if len(new_text) <= len(prefix_text):
        # Nothing new (e.g. only skipped special tokens): keep the context where it is.
        return None
    return new_text[len(prefix_text):], end


def decode_window(
    tokenizer, ids: list[int], read_offset: int, skip_special_tokens: bool = True,
    final: bool = False,
) -> str:
    """Stateless incremental decode of one window (see `IncrementalDetokenizer.window`).

    Args:
        tokenizer: HF tokenizer (or a raw `tokenizers.Tokenizer`).
        ids: token ids of the window: context ids, then the ids whose text is wanted.
        read_offset: number of context ids at the start of `ids`.
        skip_special_tokens: as in `tokenizer.decode`; must match the detokenizer's.
        final: True for the request's last response: emit the held-back tail too (a dangling
            partial character comes out as U+FFFD, like the full decode), as `flush()` does.
    Returns:
        The text of ids[read_offset:] in the context of ids[:read_offset], without the
        trailing tokens that carry an incomplete UTF-8 character (unless `final`); "" when
        nothing complete is left.
    """
    ids = [int(i) for i in ids]  # numpy / tensor elements from the postprocessing model
    read_offset = int(read_offset)
    if not 0 <= read_offset <= len(ids):
        raise ValueError(f"read_offset {read_offset} out of range for a window of {len(ids)} ids")
    info = _tokenizer_info(tokenizer)
    result = _window_delta(tokenizer, info, ids, read_offset, skip_special_tokens, final)
    return result[0] if result is not None else ""


class IncrementalDetokenizer:
    """Per-sequence streaming detokenizer (one per generated sequence, i.e. per n-sample).

    Args:
        tokenizer: HF tokenizer of the model (or a raw `tokenizers.Tokenizer`).
        prompt_token_ids: the prompt's ids; kept for reference only — the output text is that of
            the generated ids decoded alone (`tokenizer.decode(output_ids)`).
        skip_special_tokens: drop special tokens from the text (True) or keep them verbatim.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.prompt_token_ids = list(prompt_token_ids or [])
        self.skip_special_tokens = skip_special_tokens
        self._info = _tokenizer_info(tokenizer)
        self.token_ids: list[int] = []  # generated ids so far
        # ids[prefix_offset:read_offset] were emitted last (decode context); ids[read_offset:]
        # are not emitted yet (held back, or about to be decoded).
        self.prefix_offset = 0
        self.read_offset = 0
        self._text_chunks: list[str] = []
        self._finished = False
        # (prefix_offset, read_offset, end) of the window that reproduces the last step's text.
        self._window = (0, 0, 0)
        self._window_taken = False

    @property
    def text(self) -> str:
        """All text returned so far (the concatenation of the deltas)."""
        if len(self._text_chunks) > 1:
            self._text_chunks = ["".join(self._text_chunks)]
        return self._text_chunks[0] if self._text_chunks else ""

    @property
    def num_held_tokens(self) -> int:
        """Generated ids whose text has not been emitted yet."""
        return len(self.token_ids) - self.read_offset

    def add_tokens(self, new_token_ids: list[int]) -> str:
        """Append generated ids; return the text they complete ("" while held back)."""
        if self._finished:
            raise RuntimeError("add_tokens() after flush(): the detokenizer's stream has ended")
        self.token_ids.extend(map(int, new_token_ids))
        self._window = (self.prefix_offset, self.read_offset, len(self.token_ids))
        self._window_taken = False
        return self._advance(final=False)

    def flush(self) -> str:
        """End of generation: return whatever is held back (e.g. a dangling partial character,
        as U+FFFD exactly like the full decode). Idempotent; no add_tokens() afterwards."""
        if self._finished or self._window_taken:
            # The last add_tokens() text was already shipped: the window is this flush's alone.
            self._window = (self.prefix_offset, self.read_offset, len(self.token_ids))
            self._window_taken = False
        self._finished = True
        return self._advance(final=True)

    def window(self) -> tuple[list[int], int]:
        """(ids, read_offset) such that `decode_window(tokenizer, ids, read_offset,
        skip_special_tokens, final=<flush() was called>)` returns exactly the text returned
        by the last add_tokens() (plus the flush() that followed it in the same step)."""
        prefix_offset, read_offset, end = self._window
        self._window_taken = True
        return self.token_ids[prefix_offset:end], read_offset - prefix_offset

    def _advance(self, final: bool) -> str:
        if self.read_offset == len(self.token_ids):
            return ""
        result = _window_delta(
            self.tokenizer,
            self._info,
            self.token_ids[self.prefix_offset:],
            self.read_offset - self.prefix_offset,
            self.skip_special_tokens,
            final,
        )
        if result is None:
            return ""
        delta, end = result
        # The ids just emitted become the next step's context: their text ends on a finished
        # character, so decode(context + later ids) starts with decode(context).
        self.prefix_offset, self.read_offset = self.read_offset, self.prefix_offset + end
        self._text_chunks.append(delta)
        return delta
