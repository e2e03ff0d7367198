"""o200k_harmony tokenizer: ids equal to tiktoken's o200k_base and openai-harmony's encoder, specials, decoding,
streaming detokenization, the GGUF vocabulary form."""

import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from gguf import TokenType
from hypothesis import given, settings
from hypothesis import strategies as st

from ossrt.errors import ModelFileError
from ossrt.testing import synthetic
from ossrt.tokenizer import (
    N_VOCAB,
    SPECIAL_TOKENS,
    Tokenizer,
    bytes_to_unicode_token,
    load_tiktoken_ranks,
    unicode_token_to_bytes,
)


@pytest.fixture(scope="module")
def ranks(o200k_path):
    return load_tiktoken_ranks(o200k_path)


@pytest.fixture(scope="module")
def reference(monkeypatch_module, ranks):
    """tiktoken's own o200k_base and o200k_harmony definitions (pattern and specials from tiktoken_ext), with its
    vocabulary loader pointed at the local file so nothing is downloaded."""
    from tiktoken_ext import openai_public

    monkeypatch_module.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: dict(ranks))
    return (tiktoken.Encoding(**openai_public.o200k_base()), tiktoken.Encoding(**openai_public.o200k_harmony()))


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _stdlib_code() -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return [(lib / name).read_text(encoding="utf-8") for name in ("textwrap.py", "json/encoder.py", "difflib.py")]


def _random_unicode(seed: int, n: int) -> str:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        cp = rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0x3000), rng.randrange(0x3000, 0xD800),
                         rng.randrange(0xE000, 0x110000), rng.randrange(0x1F300, 0x1FAFF), rng.randrange(0, 0x20)])
        out.append(chr(cp))
    return "".join(out)


CORPUS = [
    "", "hello world", "Hello, World!", "  leading and trailing  ", "\n\n\n", "\t\ttabs\tand  spaces   \n",
    "a \r\n b\r\n\r\n  \r c", " " * 37 + "x" + " " * 5, "\u00a0\u2003\u3000 odd spaces \u200b",
    "I'm you're they'll we've she'd it's DON'T I'M THEY'LL We'Ve", "o'clock rock'n'roll 'quoted' \"dq\"",
    "1234567890 3.14159 -42 1,000,000 0x1F 1e-9 2025-06-28 12:34:56 ١٢٣٤ ⅓ ²³",
    "中文测试：你好，世界！这是一个分词器。", "日本語のテキストとカタカナ、ひらがな。", "한국어 텍스트입니다.",
    "Привет, мир! Ελληνικά. עברית. العربية. हिन्दी। ภาษาไทย",
    "emoji 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇩🇪🇯🇵 ❤️ 🫠", "math ∑∫√∞≠≈ ∀x∈ℝ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙𝟚",
    "combining é é ñ ñ a\u0301\u0302\u0303 Z̵̡̢a̷l̶g̸o̴",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] << 2; } // c++\n#include <stdio.h>",
    "<|start|>user<|message|>not special<|end|> <|endoftext|> <|return|> <|constrain|>json",
    "https://example.com/path?query=1&x=y#frag user@example.com /usr/local/bin",
    "ALLCAPS camelCase PascalCase snake_case kebab-case SCREAMING_SNAKE",
    "!!!??? ... --- *** ### $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}} ||| ~~~ ```python```",
    "\x00\x01\x02\x7f\x1b[31mred\x1b[0m", "\ufeffBOM \ufffd replacement \U0010ffff last",
] + _stdlib_code() + [_random_unicode(seed, 400) for seed in range(8)]


def test_pattern_and_specials_match_tiktoken_definitions(reference, o200k_tokenizer):
    base, harmony = reference
    assert o200k_tokenizer._enc._pat_str == base._pat_str
    # tiktoken's o200k_harmony also names 200018 `<|reserved_200018|>` (and 200019.. reserved): ours is HF's table.
    assert {s: i for i, s in SPECIAL_TOKENS.items()}.items() <= harmony._special_tokens.items()
    assert sorted(i for i in harmony._special_tokens.values() if i <= 200018) == sorted(SPECIAL_TOKENS) + [200018]
    assert base.n_vocab == 200019 and o200k_tokenizer.n_vocab == N_VOCAB == 201088


@pytest.mark.parametrize("k", range(len(CORPUS)))
def test_ordinary_ids_equal_tiktoken_and_harmony(k, reference, o200k_tokenizer, harmony_encoding):
    text = CORPUS[k]
    base, _ = reference
    ids = o200k_tokenizer.encode(text)
    assert ids == base.encode_ordinary(text)
    assert ids == harmony_encoding.encode(text, disallowed_special=())
    assert o200k_tokenizer.decode(ids) == text
    assert o200k_tokenizer.decode(ids, errors="strict") == text


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_random_text_ids_equal_tiktoken(reference, o200k_tokenizer, text):
    assert o200k_tokenizer.encode(text) == reference[0].encode_ordinary(text)


def test_known_single_token_ids(o200k_tokenizer):
    """Spec §6: ids seen in harmony's test data; `commentary` is two tokens."""
    t = o200k_tokenizer
    assert t.encode("assistant") == [173781]
    assert t.encode("analysis") == [35644]
    assert t.encode("final") == [17196]
    assert t.encode("commentary") == [12606, 815]


def test_special_ids_and_stop_tokens(o200k_tokenizer):
    t = o200k_tokenizer
    assert (t.startoftext, t.endoftext, t.return_, t.constrain, t.channel, t.start, t.end, t.message, t.call) == (
        199998, 199999, 200002, 200003, 200005, 200006, 200007, 200008, 200012)
    assert t.stop_tokens_for_assistant == {200002, 200012, 199999}
    assert t.end not in t.stop_tokens_for_assistant
    assert t.special_id("<|endofprompt|>") == 200018
    with pytest.raises(ValueError, match="no special token '<\\|nope\\|>'"):
        t.special_id("<|nope|>")


def test_special_strings_stay_text_unless_allowed(o200k_tokenizer, reference):
    t, harmony = o200k_tokenizer, reference[1]
    text = "<|start|>user<|message|>Hi<|end|>"
    assert 200006 not in t.encode(text)
    assert t.encode(text, allowed_special="all") == harmony.encode(text, allowed_special="all")
    assert t.encode(text, allowed_special="all")[:1] == [200006]
    only_start = t.encode(text, allowed_special={"<|start|>"})
    assert only_start[0] == 200006 and 200008 not in only_start and 200007 not in only_start
    assert t.decode(only_start) == text


def test_decode_specials_unassigned_and_bad_ids(o200k_tokenizer):
    t = o200k_tokenizer
    assert t.decode([200006, 173781, 200008]) == "<|start|>assistant<|message|>"
    # 200019..201087 have embedding rows but no string: they decode to nothing.
    assert t.decode([200019, 24912, 201087]) == t.decode([24912]) == "hello"
    assert not t.has_string(200500) and t.has_string(200018) and t.has_string(0)
    for bad in (201088, -1, 10**12, "5", 1.0):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            t.decode([24912, bad])
    assert t.decode_bytes([]) == b""
    # Sampled ids arrive as NumPy integers.
    assert t.decode(np.array([24912, 200500], dtype=np.int64)) == "hello" and t.has_string(np.int32(0))


def test_incremental_decoder_never_splits_a_character(o200k_tokenizer):
    t = o200k_tokenizer
    for text in CORPUS:
        ids = t.encode(text)
        dec = t.incremental_decoder()
        pieces = [dec.feed(i) for i in ids] + [dec.flush()]
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


def test_incremental_decoder_holds_back_partial_utf8(o200k_tokenizer, ranks):
    t = o200k_tokenizer
    # "𝔘" (4 UTF-8 bytes) encodes as several byte tokens: nothing is emitted until the character is complete.
    ids = t.encode("𝔘")
    assert len(ids) > 1
    dec = t.incremental_decoder()
    out = [dec.feed(i) for i in ids]
    assert out[:-1] == [""] * (len(ids) - 1) and out[-1] == "𝔘"
    # A lone lead byte waits, then becomes U+FFFD when the next byte proves it invalid, or at flush.
    e4, a = ranks[b"\xe4"], ranks[b"a"]
    dec = t.incremental_decoder()
    assert dec.feed(e4) == "" and dec.pending
    assert dec.feed(a) == "\ufffda" and not dec.pending
    assert dec.feed(e4) == "" and dec.flush() == "\ufffd"
    # A byte that can never start a character is replaced at once.
    assert dec.feed(ranks[b"\xff"]) == "\ufffd"
    assert t.decode([ranks[b"\xe4"], ranks[b"\xff"]]) == "\ufffd\ufffd"


def test_bytes_to_unicode_token():
    assert bytes_to_unicode_token(b" hello") == "Ġhello"
    assert bytes_to_unicode_token(b"\n\t") == "Ċĉ"
    assert bytes_to_unicode_token("é".encode()) == "Ã©"
    every = bytes(range(256))
    s = bytes_to_unicode_token(every)
    assert len(set(s)) == 256 and unicode_token_to_bytes(s) == every
    assert unicode_token_to_bytes("Ā") == b"\x00"  # the 68 unprintable bytes map to U+0100..U+0143
    with pytest.raises(ValueError, match="'ſ' is not"):
        unicode_token_to_bytes("ſ")


def _gguf_lists(ranks):
    tokens = [f"[PAD{i}]" for i in range(N_VOCAB)]
    types = [TokenType.UNUSED.value] * N_VOCAB
    for b, i in ranks.items():
        tokens[i], types[i] = bytes_to_unicode_token(b), TokenType.NORMAL.value
    for i, s in SPECIAL_TOKENS.items():
        tokens[i], types[i] = s, TokenType.CONTROL.value
    return tokens, types


def test_from_gguf_vocab_equals_tiktoken_file(ranks, o200k_tokenizer):
    tokens, types = _gguf_lists(ranks)
    t = Tokenizer.from_gguf_vocab(tokens, types)
    assert t.n_vocab == N_VOCAB and t.special_tokens == o200k_tokenizer.special_tokens
    for text in CORPUS[:20]:
        assert t.encode(text) == o200k_tokenizer.encode(text)
        assert t.encode(text, allowed_special="all") == o200k_tokenizer.encode(text, allowed_special="all")
    assert t.decode([200006, 200500, 24912]) == "<|start|>hello"


def test_from_gguf_vocab_rejects_bad_vocabularies(ranks):
    tokens, types = _gguf_lists(ranks)
    with pytest.raises(ModelFileError, match="201088 entries but tokenizer.ggml.token_type has 3"):
        Tokenizer.from_gguf_vocab(tokens, types[:3])
    bad = list(types)
    bad[7] = 6
    with pytest.raises(ModelFileError, match=r"token_type\[7\] = 6"):
        Tokenizer.from_gguf_vocab(tokens, bad)
    bad_tokens = list(tokens)
    bad_tokens[100] = "ſ"
    with pytest.raises(ModelFileError, match=r"tokens\[100\]: .*'ſ'"):
        Tokenizer.from_gguf_vocab(bad_tokens, types)
    bad_tokens = list(tokens)
    bad_tokens[101] = tokens[100]
    with pytest.raises(ModelFileError, match=r"tokens\[101\] .* repeats token 100"):
        Tokenizer.from_gguf_vocab(bad_tokens, types)
    no_byte = list(types)
    no_byte[ranks[b"\x00"]] = TokenType.UNUSED.value
    with pytest.raises(ModelFileError, match="all 256 single bytes; missing \\[0\\]"):
        Tokenizer.from_gguf_vocab(tokens, no_byte)


def test_from_gguf_vocab_rejects_values_of_the_wrong_type(ranks):
    tokens, types = _gguf_lists(ranks)
    bad = list(types)
    bad[5] = True  # == 1, but not a token type
    with pytest.raises(ModelFileError, match=r"tokenizer.ggml.token_type\[5\] is True, not an integer"):
        Tokenizer.from_gguf_vocab(tokens, bad)
    bad_tokens = list(tokens)
    bad_tokens[3] = 3
    with pytest.raises(ModelFileError, match=r"tokenizer.ggml.tokens\[3\] is 3, not a string"):
        Tokenizer.from_gguf_vocab(bad_tokens, types)


class _VocabFile:
    """What Tokenizer.from_model_file reads of a ModelFile."""

    path = "m.gguf"

    def __init__(self, tokens, types):
        self.tokenizer_tokens, self.tokenizer_token_types = tokens, types

    def get(self, key):
        return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-4o"}.get(key)


def test_from_model_file_needs_every_special_token_at_its_id(ranks):
    tokens, types = _gguf_lists(ranks)
    normal = list(types)
    normal[200006] = TokenType.NORMAL.value  # <|start|> as ordinary text: encodes, but Harmony could not find it
    with pytest.raises(ModelFileError, match=r"m.gguf: tokenizer.ggml.tokens\[200006\] must be the special token "
                                             r"'<\|start\|>' \(token_type CONTROL = 3\), found '<\|start\|>' of type 1"):
        Tokenizer.from_model_file(_VocabFile(tokens, normal))
    bad = list(types)
    bad[9] = 0
    with pytest.raises(ModelFileError, match=r"m.gguf: tokenizer.ggml.token_type\[9\] = 0"):
        Tokenizer.from_model_file(_VocabFile(tokens, bad))


def test_vocabulary_read_back_from_converted_file(tiny_gguf, ranks, o200k_tokenizer):
    """The converter's GGUF (tokenizer.ggml.*) gives back exactly the source vocabulary."""
    from ossrt.format.modelfile import ModelFile

    with ModelFile.open(tiny_gguf()) as mf:
        t = Tokenizer.from_model_file(mf)
        assert mf.get("tokenizer.ggml.pre") == "gpt-4o"
    assert t.n_vocab == N_VOCAB
    assert t.special_tokens == {s: i for i, s in SPECIAL_TOKENS.items()}
    by_id = {i: b for b, i in ranks.items()}
    assert all(t.token_bytes(i) == by_id[i] for i in range(len(ranks)))
    assert [i for i in range(200019, N_VOCAB) if t.has_string(i)] == []
    text = CORPUS[19] + CORPUS[16]
    assert t.encode(text) == o200k_tokenizer.encode(text)


def test_from_tiktoken_file_names_bad_line(tmp_path):
    p = tmp_path / "bad.tiktoken"
    p.write_bytes(b"IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match="line 2"):
        Tokenizer.from_tiktoken_file(p)


def test_tiktoken_ranks_from_the_shipped_bytes(ranks):
    """The vocabulary the package ships (xz, read as bytes) gives the ranks of the plain file."""
    assert load_tiktoken_ranks(synthetic.o200k_base()) == ranks
    assert len(ranks) == 199998 and ranks[b"Hello"] == 13225
    with pytest.raises(ValueError, match="^the .tiktoken data: line 2 is not 'base64-token rank'$"):
        load_tiktoken_ranks(b"IQ== 0\nnot-base64!! 1\n")
