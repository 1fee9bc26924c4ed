"""IncrementalDetokenizer / decode_window against the independent reference tokenizer.decode().

For every feeding pattern (one token at a time, random chunk sizes) and both tokenizer families
(byte-level BPE, SentencePiece-style Metaspace + byte fallback), with special tokens skipped
and kept:
  * the text after every step is a prefix of tokenizer.decode(all_ids) (so no delta ever carries
    a U+FFFD, or anything else, that the full decode does not have at that place);
  * concatenated deltas + flush() == tokenizer.decode(all_ids), byte for byte;
  * decode_window(*window()) reproduces every delta (final=True for the last step, with flush).
"""

from __future__ import annotations

import random

import pytest

from paged_engine.output.detokenizer import IncrementalDetokenizer, _bytes_to_unicode, decode_window

TEXTS = [
    "Hello world",
    " leading space",
    "  two leading spaces and  double  spaces",
    "trailing space ",
    "line one\nline two\n\n  indented\tand\ttabs",
    "日本語のテキストも少し含めます。東京は日本の首都です。",
    "中文文本也需要测试。你好，世界！",
    "한국어 문장도 있습니다.",
    "Emoji: 😀 🚀 👍🏽 ❤️ 🇯🇵🇫🇷 👨‍👩‍👧 — café naïve résumé Zürich",
    "mixed: a日b😀c 🇯🇵 x  y\n🎉🎉🎉",
    "Ελληνικά Русский текст ∑∫√ ½ €",
]


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tok(request, tmp_path_factory):
    from transformers import AutoTokenizer

    from paged_engine.deploy.tiny_model import save_tokenizer

    directory = tmp_path_factory.mktemp(f"tok_{request.param}")
    save_tokenizer(directory, request.param)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    tokenizer.kind = request.param  # test-only tag
    return tokenizer


def byte_token_id(tokenizer, byte: int) -> int:
    """Id of the token that is exactly one raw byte."""
    if tokenizer.kind == "byte_level":
        token = _bytes_to_unicode()[byte]
    else:
        token = f"<0x{byte:02X}>"
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert token_id is not None and token_id != tokenizer.unk_token_id, token
    return token_id


def byte_ids(tokenizer, data: bytes) -> list[int]:
    return [byte_token_id(tokenizer, b) for b in data]


def run_stream(tokenizer, ids, chunk_sizes, skip_special_tokens, check_windows=True):
    """Feed `ids` in chunks, check all invariants, return the list of deltas (flush last)."""
    reference = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    det = IncrementalDetokenizer(tokenizer, [5, 6, 7], skip_special_tokens=skip_special_tokens)
    deltas = []
    window_starts = []  # per step: (context start, read start) in ids, for composed windows
    pos = 0
    sizes = iter(chunk_sizes)
    while pos < len(ids):
        size = next(sizes)
        chunk = ids[pos:pos + size]
        pos += size
        delta = det.add_tokens(chunk)
        deltas.append(delta)
        assert det.text == "".join(deltas)
        assert reference.startswith(det.text), (ids[:pos], det.text, reference)
        if pos < len(ids) and check_windows:
            window_ids, read_offset = det.window()
            assert window_ids == ids[pos - len(window_ids):pos]  # a suffix of the ids so far
            assert decode_window(tokenizer, window_ids, read_offset, skip_special_tokens) == delta
            start = pos - len(window_ids)
            window_starts.append((start, start + read_offset))
            # Composed windows: reaching back to an earlier step's window start covers all
            # text returned since that step.
            for k in (0, len(window_starts) // 2, len(window_starts) - 1):
                ctx, read = window_starts[k]
                composed = decode_window(tokenizer, ids[ctx:pos], read - ctx, skip_special_tokens)
                assert composed == "".join(deltas[k:]), (k, ids[:pos])
    last_add = deltas[-1] if deltas else ""
    tail = det.flush()
    deltas.append(tail)
    assert det.text == reference
    assert "".join(deltas) == reference
    assert "".join(deltas).encode("utf-8") == reference.encode("utf-8")
    if check_windows:
        # The last step (add_tokens + flush) through the stateless path, with final=True.
        window_ids, read_offset = det.window()
        assert decode_window(
            tokenizer, window_ids, read_offset, skip_special_tokens, final=True
        ) == last_add + tail
        for k in (0, len(window_starts) // 2):
            if k < len(window_starts):
                ctx, read = window_starts[k]
                assert decode_window(
                    tokenizer, ids[ctx:], read - ctx, skip_special_tokens, final=True
                ) == "".join(deltas[k:])
    return deltas


def chunkings(num_ids, rng):
    yield [1] * num_ids
    yield [rng.randint(1, 5) for _ in range(num_ids)]
    yield [num_ids]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_natural_text_streams_to_full_decode(tok, skip_special_tokens):
    rng = random.Random(0)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        # Special tokens in the middle and at the end (eos), skipped or kept verbatim.
        with_specials = ids[: len(ids) // 2] + [tok.eos_token_id] + ids[len(ids) // 2:] + [
            tok.eos_token_id
        ]
        for seq in (ids, with_specials):
            for sizes in chunkings(len(seq), rng):
                run_stream(tok, seq, sizes, skip_special_tokens)
        # The offline decode is the text itself (tokenizers round-trip), so deltas spell it.
        # (tiny_model's SentencePiece tokenizer registers its <0xXX> byte-fallback tokens as
        # *special* tokens, so decode(skip_special_tokens=True) drops them: no round trip.)
        if not skip_special_tokens or tok.kind == "byte_level":
            assert "".join(run_stream(tok, ids, [1] * len(ids), skip_special_tokens)) == text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_stream_to_full_decode(tok, skip_special_tokens):
    """Random ids, half of them drawn from raw high bytes (partial / invalid UTF-8 runs)."""
    rng = random.Random(1234)
    high_bytes = byte_ids(tok, bytes(range(0x80, 0x100)))
    # Valid multi-byte characters spelled as byte tokens, to complete runs now and then.
    char_bytes = [byte_ids(tok, ch.encode()) for ch in "é日😀👍🏽"]
    vocab_size = len(tok)
    for _ in range(120):
        ids: list[int] = []
        for _ in range(rng.randint(1, 30)):
            r = rng.random()
            if r < 0.4:
                ids.append(rng.randrange(vocab_size))
            elif r < 0.7:
                ids.append(rng.choice(high_bytes))
            elif r < 0.9:
                ids.extend(rng.choice(char_bytes))
            else:
                ids.append(tok.eos_token_id)
        sizes = [rng.randint(1, 4) for _ in range(len(ids))]
        run_stream(tok, ids, sizes, skip_special_tokens)
        run_stream(tok, ids, [1] * len(ids), skip_special_tokens, check_windows=False)


def test_multibyte_char_is_held_then_released(tok):
    """Bytes of one character: nothing until it completes; then exactly that character."""
    skip = True
    for ch in ["é", "日", "😀"]:
        ids = byte_ids(tok, ch.encode())
        det = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
        deltas = [det.add_tokens([i]) for i in ids]
        assert deltas[:-1] == [""] * (len(ids) - 1)
        if tok.kind == "byte_level":
            assert deltas[-1] == ch
            # The window reproducing the release covers every held-back id.
            window_ids, read_offset = det.window()
            assert window_ids[read_offset:] == ids
            assert decode_window(tok, window_ids, read_offset, skip) == ch
        else:
            # ByteFallback decodes a byte run only when it ends (a later byte could turn the
            # whole run into U+FFFDs), so the character comes with the next normal token.
            assert deltas[-1] == ""
            tail_id = tok.encode(" x", add_special_tokens=False)
            assert det.add_tokens(tail_id) == ch + tok.decode(ids + tail_id)[len(ch):]
        assert det.flush() == ""
        assert det.text == tok.decode(ids + ([] if tok.kind == "byte_level" else tail_id))


def test_only_the_incomplete_tail_is_held(tok):
    """A chunk with finished text and then a partial character returns the finished text."""
    skip = True
    ok = tok.encode("ok then", add_special_tokens=False)
    partial = byte_ids(tok, "😀".encode()[:3])
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
    assert det.add_tokens(ok + partial) == "ok then"
    assert det.num_held_tokens == len(partial)
    window_ids, read_offset = det.window()
    assert decode_window(tok, window_ids, read_offset, skip) == "ok then"
    rest = byte_ids(tok, "😀".encode()[3:]) + tok.encode(" x", add_special_tokens=False)
    assert det.add_tokens(rest) == tok.decode(ok + partial + rest)[len("ok then"):]
    assert det.flush() == ""


def test_dangling_partial_char_comes_out_at_flush(tok):
    skip = True
    hello = tok.encode("ok", add_special_tokens=False)
    ids = hello + byte_ids(tok, "日".encode()[:2])
    reference = tok.decode(ids, skip_special_tokens=skip)
    assert reference.endswith("\ufffd")
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
    text = det.add_tokens(hello)
    assert text == "ok"
    assert det.add_tokens(ids[len(hello):]) == ""
    window_ids, read_offset = det.window()
    assert decode_window(tok, window_ids, read_offset, skip) == ""
    tail = det.flush()
    assert text + tail == reference
    assert "\ufffd" in tail
    assert decode_window(tok, window_ids, read_offset, skip, final=True) == tail


def test_invalid_byte_is_not_held_byte_level(tok):
    """A byte that can never start a character is U+FFFD at once (nothing can complete it)."""
    if tok.kind != "byte_level":
        pytest.skip("byte runs are held until they end for ByteFallback")
    det = IncrementalDetokenizer(tok, [])
    ok = tok.encode("ok", add_special_tokens=False)
    assert det.add_tokens(ok) == "ok"
    for b in (0x80, 0xC0, 0xFF):
        delta = det.add_tokens(byte_ids(tok, bytes([b])))
        assert delta == "\ufffd"
    # A lead byte followed by a non-continuation: U+FFFD then the ASCII char, as decode() does.
    assert det.add_tokens(byte_ids(tok, b"\xe6")) == ""
    assert det.add_tokens(tok.encode("a", add_special_tokens=False)) == "\ufffda"
    # A partial character cut short by the start of another is final at once; the new one waits.
    assert det.add_tokens(byte_ids(tok, b"\xe6")) == ""
    assert det.add_tokens(byte_ids(tok, b"\xf0")) == "\ufffd"
    assert det.add_tokens(byte_ids(tok, "😀".encode()[1:])) == "😀"
    assert det.flush() == ""


def test_sentencepiece_leading_spaces_survive(tok):
    if tok.kind != "sentencepiece":
        pytest.skip("SentencePiece-specific")
    text = "Hello world  two  spaces\nnew line"
    ids = tok.encode(text, add_special_tokens=False)
    # skip_special_tokens=False: "\n" is a <0x0A> byte token, special in tiny_model's tokenizer.
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    deltas = [det.add_tokens([i]) for i in ids] + [det.flush()]
    assert "".join(deltas) == text
    # Decoding each token alone (TensorRT-LLM's postprocessing) loses the spaces.
    assert "".join(tok.decode([i]) for i in ids) != text
    assert any(d.startswith(" ") for d in deltas)


def test_special_tokens_skipped_or_verbatim(tok):
    ids = tok.encode("Hi there", add_special_tokens=False)
    seq = [tok.bos_token_id] + ids + [tok.eos_token_id]
    skipped = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    kept = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    text_skipped = "".join(skipped.add_tokens([i]) for i in seq) + skipped.flush()
    text_kept = "".join(kept.add_tokens([i]) for i in seq) + kept.flush()
    assert text_skipped == "Hi there"
    assert tok.bos_token in text_kept and text_kept.endswith(tok.eos_token)
    assert text_kept == tok.decode(seq, skip_special_tokens=False)
    # A lone skipped special token adds nothing and holds nothing.
    det = IncrementalDetokenizer(tok, [])
    assert det.add_tokens([tok.eos_token_id]) == ""
    assert det.flush() == ""


def test_window_after_flush_in_a_later_step(tok):
    """Abort after the last delta was shipped: the flush window must not repeat that delta."""
    skip = True
    ids = tok.encode("abc", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
    assert det.add_tokens(ids) == "abc"
    window_ids, read_offset = det.window()  # shipped with the "abc" response
    assert decode_window(tok, window_ids, read_offset, skip) == "abc"
    assert det.flush() == ""
    window_ids, read_offset = det.window()
    assert decode_window(tok, window_ids, read_offset, skip, final=True) == ""

    # Same with held text: the later flush's window carries exactly the held tail.
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
    assert det.add_tokens(ids) == "abc"
    assert det.add_tokens(byte_ids(tok, b"\xe6\x97")) == ""
    det.window()
    tail = det.flush()
    assert tail and "\ufffd" in tail
    window_ids, read_offset = det.window()
    assert decode_window(tok, window_ids, read_offset, skip, final=True) == tail


def test_window_stays_short_and_decodes_are_local(tok):
    """Per token only a short window is decoded, however long the sequence gets."""

    def max_decoded_ids(text):
        ids = tok.encode(text, add_special_tokens=False)
        decoded_lengths = []
        real_decode = tok.decode

        def counting_decode(token_ids, *args, **kwargs):
            decoded_lengths.append(len(token_ids))
            return real_decode(token_ids, *args, **kwargs)

        det = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
        tok.decode = counting_decode
        try:
            out = "".join(det.add_tokens([i]) for i in ids) + det.flush()
        finally:
            del tok.decode
        assert out == tok.decode(ids, skip_special_tokens=False)
        assert len(decoded_lengths) <= 2 * len(ids) + 2
        return len(ids), max(decoded_lengths)

    num_short, max_short = max_decoded_ids(" ".join(TEXTS))
    num_long, max_long = max_decoded_ids(" ".join(TEXTS) * 5)
    assert num_long > 5 * num_short - 10 and num_long > 500
    assert max_long == max_short  # independent of the sequence length
    if tok.kind == "byte_level":
        assert max_long <= 8  # context token(s) + at most 3 held bytes + the new token
    # (ByteFallback holds a whole run of <0xXX> tokens, e.g. a CJK phrase, until it ends.)


def test_decode_window_rejects_bad_offset(tok):
    with pytest.raises(ValueError, match="read_offset"):
        decode_window(tok, [1, 2], 3)


def test_raw_tokenizers_object_works():
    """decode_window / IncrementalDetokenizer also accept a raw `tokenizers.Tokenizer`."""
    from paged_engine.deploy.tiny_model import build_tokenizer

    raw, _ = build_tokenizer("byte_level")
    text = "raw 日本語 😀 ok"
    ids = raw.encode(text).ids
    det = IncrementalDetokenizer(raw, [])
    deltas = []
    for i in ids:
        deltas.append(det.add_tokens([i]))
        window_ids, read_offset = det.window()
        assert decode_window(raw, window_ids, read_offset) == deltas[-1]
    assert "".join(deltas) + det.flush() == raw.decode(ids) == text


def test_arbitrary_unicode_text_round_trips(tok):
    """Hypothesis: any text (astral planes, combining marks, ZWJ, controls), token by token."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    alphabet = st.characters(blacklist_categories=("Cs",))  # surrogates cannot be encoded
    pieces = st.sampled_from(["👍🏽", "🇯🇵", "👨‍👩‍👧", "  ", "\n", "日本", "é", "e\u0301", " a"])

    @settings(
        max_examples=40,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(st.one_of(st.text(alphabet, max_size=6), pieces), max_size=8), st.randoms())
    def check(parts, rnd):
        text = "".join(parts)
        ids = tok.encode(text, add_special_tokens=False)
        # skip_special_tokens=False: tiny_model's SentencePiece byte tokens are "special".
        run_stream(tok, ids, [rnd.randint(1, 3) for _ in ids], skip_special_tokens=False)

    check()


def test_decode_window_accepts_numpy_ids(tok):
    """The postprocessing model hands over numpy arrays."""
    import numpy as np

    ids = tok.encode("ok 日本語 👍🏽", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    for i in ids:
        delta = det.add_tokens(np.array([i], dtype=np.int32))
        window_ids, read_offset = det.window()
        assert decode_window(
            tok, np.array(window_ids, dtype=np.int64), np.int32(read_offset), False
        ) == delta
    det.flush()
    assert det.text == "ok 日本語 👍🏽"
