"""Tokenizers: byte-level BPE read from a Hugging Face tokenizer.json (SmolLM2, Llama-3, GPT-2,
Qwen2/2.5/3 families), or a sentencepiece tokenizer.model (Llama-1/2, TinyLlama, Mistral).

The byte-level scheme is GPT-2's (Radford et al. 2019, openai/gpt-2 encoder.py): text -> UTF-8
bytes -> one printable unicode char per byte, split into "words" by a regex, and each word
merged by BPE. Every byte has a token, so there is no <unk> and decoding is lossless.
The pre-tokenizer and decoder rules follow HF `tokenizers` so that ids match it exactly.
"""

import heapq
import unicodedata
from pathlib import Path

import regex  # stdlib `re` has no \p{L} / \p{N} classes, which the GPT-2 pattern needs
import sentencepiece

from eval import read_json

# GPT-2's split: contractions, letter runs, number runs, punctuation runs, each taking at most
# one leading space. `\s+(?!\S)` leaves the last space of a run to the next word, so " world"
# is tokenized the same way after one space or after five.
GPT2_SPLIT = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> char table: printable Latin-1 bytes stand for themselves, the other 68
    (control chars, space, ...) are shifted to chr(256), chr(257), ... so that every token in
    the vocab is a readable string without whitespace (space is 'Ġ', newline 'Ċ')."""
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b], shifted = chr(256 + shifted), shifted + 1
    return table


def _split_isolated(pattern):
    """HF 'Isolated' split: every match is a piece, and so is the text between matches. Lazy, so
    that encode(text, limit) stops reading a long text where its ids stop."""

    def split(piece):
        start = 0
        for m in pattern.finditer(piece):
            yield from filter(None, (piece[start : m.start()], m.group()))
            start = m.end()
        if piece[start:]:
            yield piece[start:]

    return split


def _then(step, pieces):
    """The pieces of every piece, in order, one at a time."""
    for piece in pieces:
        yield from step(piece)


def _pre_tokenizer_steps(spec, unsupported):
    """tokenizer.json "pre_tokenizer" -> list of functions piece -> pieces, applied in order."""
    kind = spec["type"]
    if kind == "Sequence":
        return [
            step for sub in spec["pretokenizers"] for step in _pre_tokenizer_steps(sub, unsupported)
        ]
    if kind == "Digits":  # HF uses char::is_numeric, i.e. any \p{N}, not just 0-9
        return [
            _split_isolated(regex.compile(r"\p{N}" if spec["individual_digits"] else r"\p{N}+"))
        ]
    if kind == "ByteLevel":
        prefix_space = [lambda p: [p if p.startswith(" ") else " " + p]]
        steps = prefix_space if spec.get("add_prefix_space") else []
        return steps + ([_split_isolated(GPT2_SPLIT)] if spec.get("use_regex", True) else [])
    if kind == "Split" and spec["behavior"] == "Isolated" and not spec.get("invert"):
        pattern = spec["pattern"]  # Llama-3 stores {"Regex": ...}; {"String": ...} is a literal
        pattern = pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"])
        return [_split_isolated(regex.compile(pattern))]
    raise unsupported(
        f"pre_tokenizer {kind!r} { ({k: v for k, v in spec.items() if k != 'type'}) }"
    )


def _template_adds_bos(post) -> bool:
    """Llama-3 adds <|begin_of_text|> through a TemplateProcessing post-processor."""
    if not post:
        return False
    if post["type"] == "Sequence":
        return any(_template_adds_bos(p) for p in post["processors"])
    return post["type"] == "TemplateProcessing" and "SpecialToken" in post["single"][0]


class Tokenizer:
    """text <-> ids. encode() never adds BOS/EOS; callers prepend bos_id when add_bos is True."""

    def __init__(self, bos_id, eos_id, add_bos, vocab_size, sp=None):
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.vocab_size, self.sp = vocab_size, sp

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        folder = Path(path)
        json_file, sp_file = folder / "tokenizer.json", folder / "tokenizer.model"
        if json_file.exists():
            try:
                return cls._from_tokenizer_json(json_file)
            except ValueError:
                if not sp_file.exists():  # Llama-2 ships both; its tokenizer.json is not byte-level
                    raise
        if sp_file.exists():
            sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_file))
            add_bos = read_json(folder / "tokenizer_config.json").get("add_bos_token", True)
            ids = [i if i >= 0 else None for i in (sp.bos_id(), sp.eos_id())]  # -1 = not defined
            return cls(ids[0], ids[1], add_bos, sp.get_piece_size(), sp=sp)
        raise FileNotFoundError(
            f"no tokenizer in {folder}: looked for tokenizer.json and tokenizer.model"
        )

    @classmethod
    def _from_tokenizer_json(cls, file: Path) -> "Tokenizer":
        def unsupported(what):
            return ValueError(
                f"{file}: unsupported {what}; only byte-level BPE tokenizer.json is implemented"
            )

        spec = read_json(file, required=True)
        model = spec.get("model", {})
        if model.get("type") != "BPE":
            raise unsupported(f"model type {model.get('type')!r}")
        # byte-level models leave the text untouched, except Qwen's, which compose it first (NFC)
        if spec.get("normalizer") not in (None, {"type": "NFC"}):
            raise unsupported(f"normalizer {spec['normalizer']}")
        if (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise unsupported(f"decoder {spec.get('decoder')}")
        no_split = {"type": "Sequence", "pretokenizers": []}
        steps = _pre_tokenizer_steps(spec.get("pre_tokenizer") or no_split, unsupported)
        vocab = model["vocab"]
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        token_ids = {**vocab, **added}
        folder = file.parent
        config = read_json(folder / "config.json")
        tok_config = read_json(folder / "tokenizer_config.json")

        def special_id(name):  # config.json's id, else the id of tokenizer_config's token string
            value = config.get(f"{name}_token_id")
            if value is None:
                token = tok_config.get(f"{name}_token")
                value = token_ids.get(token["content"] if isinstance(token, dict) else token)
            return value[0] if isinstance(value, list) else value  # Llama-3.1 lists several eos ids

        add_bos = tok_config.get("add_bos_token", _template_adds_bos(spec.get("post_processor")))
        tok = cls(special_id("bos"), special_id("eos"), bool(add_bos), max(token_ids.values()) + 1)
        tok.steps, tok.vocab, tok.ignore_merges = steps, vocab, model.get("ignore_merges", False)
        tok.nfc = spec.get("normalizer") is not None
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        # lower rank = learned earlier = merged first
        tok.ranks = {pair: rank for rank, pair in enumerate(merges)}
        byte_char = bytes_to_unicode()
        # latin-1 char -> GPT-2 char
        tok.byte_chars = str.maketrans({chr(b): c for b, c in byte_char.items()})
        char_byte = {c: b for b, c in byte_char.items()}
        # Decoding follows HF's ByteLevel decoder: a token made of table chars is mapped back to its
        # bytes; any other token (e.g. an added token with non-table chars) is taken as its UTF-8.
        tok.id_bytes = {
            i: bytes(char_byte[c] for c in t) if all(c in char_byte for c in t) else t.encode()
            for t, i in token_ids.items()
        }
        tok.cache = {}  # pre-token -> ids; passages repeat the same words over and over
        return tok

    def encode(self, text: str, limit=None) -> list[int]:
        """Text -> ids, no BOS/EOS; with `limit`, its first `limit` ids, and the text after them is
        never merged (a long passage costs what its kept start costs, except that one pre-token as
        long as a web page is merged whole: linear, ~2.5 s per million characters).

        Added-token strings in `text`, special or not ("<|im_end|>", Qwen's "<tool_call>") are NOT
        mapped to their ids (HF does that): text from a web passage must not be able to close the
        prompt's turn or inject control tokens. Here they are just characters. NFC uses Python's
        Unicode tables, which may be newer than HF's: marks added since can compose differently
        (rare)."""
        if self.sp is not None:
            # sentencepiece only matches user-defined symbols, not <s>/</s>
            return self.sp.encode(text)[:limit]
        pieces = iter([unicodedata.normalize("NFC", text) if self.nfc else text])
        for step in self.steps:
            pieces = _then(step, pieces)
        ids = []
        for piece in pieces:
            if limit is not None and len(ids) >= limit:
                break
            if piece not in self.cache:
                self.cache[piece] = self._bpe(piece)
            ids.extend(self.cache[piece])
        return ids[:limit]

    def _bpe(self, piece: str) -> list[int]:
        # the piece's UTF-8 bytes, each as its GPT-2 char
        word = piece.encode("utf-8").decode("latin-1").translate(self.byte_chars)
        if self.ignore_merges and word in self.vocab:  # Llama-3: a word that is a token stays whole
            return [self.vocab[word]]
        return [self.vocab[p] for p in self._merge(list(word))]

    def _merge(self, parts):
        """BPE: merge the adjacent pair of lowest rank, leftmost on ties, until none is mergeable.
        Plainly that is a scan of every pair per merge, quadratic in the word's length (a 200,000
        character URL or base64 blob would take hours); here the candidate pairs wait in a heap
        keyed (rank, position of the left part), and a merged part keeps its left position, so
        the heap pops exactly what the scan would pick, in n log n."""
        n = len(parts)
        right = list(range(1, n)) + [-1]  # index of the next live part, -1 at the end
        left = list(range(-1, n - 1))
        heap = [
            (self.ranks[pair], i)
            for i, pair in enumerate(zip(parts, parts[1:]))
            if pair in self.ranks
        ]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = right[i]
            # stale: i was merged away (None), or a neighbour changed since the pair was pushed;
            # ranks are unique per pair, so an equal rank means the same pair
            if parts[i] is None or j < 0 or self.ranks.get((parts[i], parts[j])) != rank:
                continue
            parts[i], parts[j] = parts[i] + parts[j], None
            right[i] = right[j]
            if right[i] >= 0:
                left[right[i]] = i
            for a in (left[i], i):  # the two pairs the new part belongs to
                b = right[a] if a >= 0 else -1
                if a >= 0 and b >= 0 and (parts[a], parts[b]) in self.ranks:
                    heapq.heappush(heap, (self.ranks[parts[a], parts[b]], a))
        return [p for p in parts if p is not None]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.sp is not None:
            return self.sp.decode(ids)
        # join bytes first: one character's UTF-8 bytes may be spread over several tokens
        return b"".join(self.id_bytes[i] for i in ids).decode("utf-8", errors="replace")
