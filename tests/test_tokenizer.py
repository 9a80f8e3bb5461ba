"""Tokenizer tests: exact ids against HF `tokenizers` (recorded fixtures), a hand-checked BPE,
sentencepiece against sentencepiece itself, and the error messages."""

import json
import unicodedata
from pathlib import Path

import pytest
import sentencepiece

from conftest import FAMILIES as QWEN
from tokenizer import Tokenizer, bytes_to_unicode

SHARED = Path(__file__).resolve().parents[2] / "shared"
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct"
FIXTURE = SHARED / "fixtures" / "tokenizer" / "smollm2_ids.jsonl"


@pytest.fixture(scope="module")
def smollm2():
    if not (SMOLLM2 / "tokenizer.json").exists() or not FIXTURE.exists():
        pytest.skip(f"needs {SMOLLM2} and {FIXTURE}")
    return Tokenizer.from_pretrained(SMOLLM2)


def special_strings():
    spec = json.loads((SMOLLM2 / "tokenizer.json").read_text(encoding="utf-8"))
    return {t["content"]: t["id"] for t in spec["added_tokens"] if t["special"]}


def test_smollm2_properties(smollm2):
    properties = (smollm2.bos_id, smollm2.eos_id, smollm2.add_bos, smollm2.vocab_size)
    assert properties == (1, 2, False, 49152)


def test_smollm2_matches_hf_ids(smollm2):
    """Every fixture line: same ids as HF and lossless decode. Lines containing a special-token
    string differ on purpose: HF maps "<|im_end|>" in text to id 2, we keep it as plain text."""
    specials = special_strings()
    rows = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    plain = [r for r in rows if not any(s in r["text"] for s in specials)]
    with_special = [r for r in rows if any(s in r["text"] for s in specials)]
    for r in plain:
        ids = smollm2.encode(r["text"])
        assert ids == r["ids"], (r["source_id"], r["text"][:80])
        if r["decode_roundtrip"]:
            assert smollm2.decode(ids) == r["text"], r["source_id"]
    for r in with_special:
        ids = smollm2.encode(r["text"])
        assert not set(ids) & set(specials.values()), r["text"]
        assert smollm2.decode(ids) == r["text"]
        # same as HF's ids with each special id spelled out as ordinary text
        content = {i: s for s, i in specials.items()}
        spelled = [smollm2.encode(content[ref]) if ref in content else [ref] for ref in r["ids"]]
        assert ids == sum(spelled, []), r["text"]
    meta = json.loads(FIXTURE.with_name("smollm2_ids.meta.json").read_text(encoding="utf-8"))
    assert {r["text"] for r in with_special} == set(meta["texts_whose_ids_contain_special_tokens"])
    print(f"\nfixture lines: {len(plain)} exact, {len(with_special)} with special-token strings")
    assert (len(plain), len(with_special)) == (334, 6)


def test_special_strings_are_plain_text(smollm2):
    for content, special_id in special_strings().items():
        ids = smollm2.encode(content)
        assert special_id not in ids and smollm2.decode(ids) == content
        # the real special id still decodes to its string
        assert smollm2.decode([special_id]) == content
    assert 2 not in smollm2.encode("<|im_end|>")


# --- a hand-checkable byte-level BPE ---------------------------------------------------------
BYTE_CHARS = list(bytes_to_unicode().values())  # ids 0..255: the single bytes
MERGES = ["b c", "a b", "Ġ a", "Ġa bc", "3 4"]  # rank = position: "b c" is merged before "a b"
BYTE_LEVEL = {
    "type": "ByteLevel",
    "add_prefix_space": False,
    "trim_offsets": True,
    "use_regex": True,
}
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def write_mini(folder, pre_tokenizer=BYTE_LEVEL, merges=MERGES, model_type="BPE", normalizer=None):
    vocab = {c: i for i, c in enumerate(BYTE_CHARS)}
    for m in merges:
        vocab["".join(m.split(" ") if isinstance(m, str) else m)] = len(vocab)
    spec = {
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "decoder": {"type": "ByteLevel"},
        "added_tokens": [{"id": len(vocab), "content": "<|end|>", "special": True}],
        "model": {"type": model_type, "vocab": vocab, "merges": merges},
    }
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    id_to_token = {i: t for t, i in vocab.items()}

    def tokens(text, tok):  # the token strings of text's ids
        return [id_to_token[i] for i in tok.encode(text)]

    return Tokenizer.from_pretrained(folder), tokens


@pytest.mark.parametrize("as_pairs", [False, True])  # merges stored as "a b" or as ["a", "b"]
def test_bpe_merge_order_by_hand(tmp_path, as_pairs):
    tok, tokens = write_mini(tmp_path, merges=[m.split(" ") if as_pairs else m for m in MERGES])
    # rank 0 "b c" wins over rank 1 "a b", though "a b" is leftmost
    assert tokens("abc", tok) == ["a", "bc"]
    assert tokens(" abc", tok) == ["Ġabc"]  # Ġ a b c -> Ġ a bc -> Ġa bc -> Ġabc
    assert tokens("abab", tok) == ["ab", "ab"]  # equal ranks: leftmost first
    # the run's last space goes to the next word
    assert tokens("ab  abc", tok) == ["ab", "Ġ", "Ġabc"]
    assert tokens("é", tok) == ["Ã", "©"]  # two UTF-8 bytes, no merge: two byte tokens
    assert tok.decode(tok.encode("ab  abc é\n")) == "ab  abc é\n"
    assert tok.decode([tok.vocab_size - 1]) == "<|end|>" and tok.vocab_size == 256 + len(MERGES) + 1
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (None, None, False)


def digits_then_byte_level(individual_digits):
    digits = {"type": "Digits", "individual_digits": individual_digits}
    return {"type": "Sequence", "pretokenizers": [digits, BYTE_LEVEL]}


@pytest.mark.parametrize(
    "pre_tokenizer, expected",
    [
        (BYTE_LEVEL, ["1", "2", "34", "5", "Ġabc"]),  # GPT-2: " ?\p{N}+" keeps 12345 together
        # SmolLM2: one piece per digit
        (digits_then_byte_level(True), ["1", "2", "3", "4", "5", "Ġabc"]),
        (digits_then_byte_level(False), ["1", "2", "34", "5", "Ġabc"]),
        (
            {
                "type": "Sequence",
                "pretokenizers": [  # Llama-3: numbers in chunks of three, "123" "45"
                    {
                        "type": "Split",
                        "pattern": {"Regex": LLAMA3_SPLIT},
                        "behavior": "Isolated",
                        "invert": False,
                    },
                    {**BYTE_LEVEL, "use_regex": False},
                ],
            },
            ["1", "2", "3", "4", "5", "Ġabc"],
        ),
    ],
)
def test_pre_tokenizers(tmp_path, pre_tokenizer, expected):
    tok, tokens = write_mini(tmp_path, pre_tokenizer)
    assert tokens("12345 abc", tok) == expected
    assert tok.decode(tok.encode("12345 abc")) == "12345 abc"


def test_add_prefix_space(tmp_path):
    tok, tokens = write_mini(tmp_path, {**BYTE_LEVEL, "add_prefix_space": True})
    assert tokens("abc", tok) == ["Ġabc"]


# --- sentencepiece -----------------------------------------------------------------------------
WORDS = (
    "the a of to and in is was for on that with as by at from river bank money water flow "
    "city town people year first time after new high school world state national".split()
)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_matches_sentencepiece(tmp_path, model_type):
    lines = [
        " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(4 + i % 9)).capitalize() + "."
        for i in range(400)
    ]
    (tmp_path / "train.txt").write_text(
        "\n".join(lines + ["Digits 0123456789, punctuation: ; ! ? ( ) ' \" - <>/"])
    )
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "train.txt"),
        model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=120,
        model_type=model_type,
        character_coverage=1.0,
        minloglevel=2,
    )
    # a tokenizer.json that is not byte-level BPE: ignored, the sentencepiece model is used
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}}))
    tok = Tokenizer.from_pretrained(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    for text in [
        "The river bank was high.",
        "Money for the new school, 2024!",
        "a",
        "",
        "people (of the world)",
    ]:
        ids = tok.encode(text)
        assert ids == sp.encode(text) and tok.decode(ids) == text
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 120)
    assert not {1, 2} & set(tok.encode("<s>the</s>"))  # control strings in text stay text here too


def test_a_limit_keeps_the_first_ids_and_merges_nothing_after(smollm2, monkeypatch):
    """encode(text, limit) == encode(text)[:limit] on every fixture text and several limits; and
    the text after the limit is never merged: 10,000 words, limit 3, three pieces merged."""
    rows = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        for limit in (0, 1, 5, 40):
            assert smollm2.encode(row["text"], limit) == smollm2.encode(row["text"])[:limit]
    merged = []
    bpe = smollm2._bpe
    monkeypatch.setattr(smollm2, "_bpe", lambda piece: merged.append(piece) or bpe(piece))
    # 10,000 different letter words ("qaaa", "raaa", ...): no piece is in the cache yet
    words = " ".join(
        "".join(chr(97 + i // 26**k % 26) for k in range(4)) for i in range(16, 10_016)
    )
    assert len(smollm2.encode(words, 3)) == 3 and 1 <= len(merged) <= 3
    merged.clear()
    smollm2.cache.clear()
    assert len(smollm2.encode(words)) >= 10_000 and len(merged) == 10_000


def test_qwen_style_tokenizer_matches_hf_ids(tmp_path):
    """A tokenizer.json built as Qwen2/2.5/3 build theirs (NFC normalizer, Qwen's split regex,
    byte-level BPE without the GPT-2 regex): HF tokenizers' ids for the 90 edge cases, decoded
    back to their NFC form (texts with a special-token string aside, as for SmolLM2). The real
    Qwen files are not on these machines; their rules are."""
    if not FIXTURE.exists():
        pytest.skip(f"needs {FIXTURE}")
    (tmp_path / "tokenizer.json").write_bytes((QWEN / "qwen_tokenizer.json").read_bytes())
    tok = Tokenizer.from_pretrained(tmp_path)
    texts = [json.loads(line)["text"] for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    expected = [json.loads(line) for line in (QWEN / "qwen_tokenizer_ids.jsonl").open()]
    assert len(expected) == 90
    spec = json.loads((QWEN / "qwen_tokenizer.json").read_text(encoding="utf-8"))
    specials = [t["content"] for t in spec["added_tokens"]]  # HF maps them in text; we do not
    composed = 0
    for row in expected:
        text = texts[row["line"]]
        if any(special in text for special in specials):
            continue
        assert tok.encode(text) == row["ids"], text
        assert tok.decode(row["ids"]) == unicodedata.normalize("NFC", text)
        composed += unicodedata.normalize("NFC", text) != text
    assert composed > 0  # some texts have decomposed accents: the normalizer is exercised


# --- errors -------------------------------------------------------------------------------------
def test_missing_tokenizer_names_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json and tokenizer.model") as err:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize(
    "change, part",
    [
        ({"model_type": "WordPiece"}, "WordPiece"),
        ({"normalizer": {"type": "NFKC"}}, "normalizer {'type': 'NFKC'}"),  # only NFC is done
        ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}, "Metaspace"),
        (
            {
                "pre_tokenizer": {
                    "type": "Split",
                    "pattern": {"Regex": " "},
                    "behavior": "Removed",
                    "invert": False,
                }
            },
            "Split",
        ),
    ],
)
def test_unsupported_tokenizer_json_names_file(tmp_path, change, part):
    with pytest.raises(ValueError, match=part) as err:
        write_mini(tmp_path, **change)
    assert str(tmp_path / "tokenizer.json") in str(err.value)
