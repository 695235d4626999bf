"""GPT-2 byte-level BPE: the vocabulary of a GGUF file or of the original encoder.json + vocab.bpe.

Tokens are strings in GPT-2's byte-level alphabet (each byte is one printable character, a space is `Ġ`);
merges are `"a b"` strings whose index is their rank. Encoding splits the text with GPT-2's pre-tokenizer
regex, maps each piece to its bytes, and merges the lowest-ranked adjacent pair until none is left, as
OpenAI's encoder.py, HF's GPT2Tokenizer and llama.cpp do.
"""

from __future__ import annotations

import codecs
import heapq
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import gguf
import regex

from gpt2cli.errors import Gpt2Error

PRETOKENIZE_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
# A pre-token longer than this is split into chunks of this many characters before BPE, so a run without
# whitespace (a line of digits, /dev/zero) costs linear time and memory. It never changes the tokens of
# ordinary text: the longest vocabulary token is 128 bytes and WikiText-2's longest pre-token 28 characters.
MAX_PIECE_CHARS = 4096
# A cut inside a whitespace-free run keeps at least this many characters after it: enough that the regex's
# fixed alternatives ('ll, 're, ...) and the special token's text cannot straddle it.
_CUT_MARGIN = 16
# A non-space followed by a space: no pre-tokenizer piece spans it, and none looks across it (the only
# lookahead, `\s+(?!\S)`, ends inside whitespace), so text cut there tokenizes exactly as the whole text.
_SAFE_CUT = regex.compile(r"(?r)\S\s")
_WHITESPACE = regex.compile(r"\s")
# Bounds the per-piece cache so a long-running process fed arbitrary text cannot grow it without limit;
# natural text has far fewer distinct pieces (WikiText-2 test: 21k).
MAX_CACHED_PIECES = 200_000


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character map: printable Latin-1 bytes map to themselves, the rest to U+0100 on."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


# Byte-level characters -> the Latin-1 characters of their bytes: str.translate does the whole vocabulary in
# C, ten times faster than a Python loop per character, which matters at start-up.
_TO_LATIN1 = str.maketrans({c: chr(b) for c, b in CHAR_TO_BYTE.items()})


def token_text_to_bytes(token: str) -> bytes:
    """The bytes a byte-level token string stands for; characters outside the alphabet are taken as UTF-8."""
    try:
        return token.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:  # a character outside the byte alphabet
        return token.encode("utf-8")


class Tokenizer:
    """GPT-2 byte-level BPE. `tokens` in id order, `merges` as `"a b"` in rank order."""

    def __init__(self, tokens: list[str], merges: list[str], eos_id: int = 50256) -> None:
        if not 0 <= eos_id < len(tokens):
            raise Gpt2Error(f"eos token id {eos_id} is outside the vocabulary of {len(tokens)} tokens")
        if not tokens[eos_id]:
            raise Gpt2Error(f"eos token {eos_id} is an empty string")
        self.tokens = list(tokens)
        self.merges = list(merges)
        self.eos_id = eos_id
        self.token_to_id = dict(zip(self.tokens, range(len(self.tokens)), strict=True))

        byte_ids = [self.token_to_id.get(BYTE_TO_CHAR[b]) for b in range(256)]
        if None in byte_ids:
            missing = byte_ids.index(None)
            raise Gpt2Error(f"vocabulary has no token for byte 0x{missing:02x}: not byte-level BPE")

        # "left right" -> rank, built in C (a loop over 50k merges in Python costs 0.15 s of start-up); a
        # repeated merge keeps its first, lowest rank. The BPE loop works on the token strings.
        self._merge_ranks = dict(zip(reversed(self.merges), range(len(self.merges) - 1, -1, -1), strict=True))

        self.special_text = self.tokens[eos_id]
        self._cache: dict[str, tuple[int, ...]] = {}

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """The vocabulary in GGUF metadata (`tokenizer.ggml.*`); Gpt2Error unless it is GPT-2 BPE."""
        model = metadata.get("tokenizer.ggml.model")
        if model is None:
            raise Gpt2Error("GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
        if not isinstance(model, str) or model != "gpt2":
            raise Gpt2Error(f"GGUF tokenizer is {model!r:.40}, not GPT-2 byte-level BPE ('gpt2')")
        tokens = metadata.get("tokenizer.ggml.tokens")
        merges = metadata.get("tokenizer.ggml.merges")
        if tokens is None or merges is None:
            raise Gpt2Error("GGUF file lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
        for key, value in (("tokens", tokens), ("merges", merges)):
            # The element types collected in C: half the time of a generator over the 100k strings.
            if not isinstance(value, list) or not set(map(type, value)) <= {str}:
                raise Gpt2Error(f"tokenizer.ggml.{key} is not an array of strings")
        eos_id = metadata.get("tokenizer.ggml.eos_token_id", 50256)
        if type(eos_id) is not int:
            raise Gpt2Error(f"tokenizer.ggml.eos_token_id is {eos_id!r:.40}, not an integer")
        return cls(tokens, merges, eos_id)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """`vocab.json` + `merges.txt` (HF) or `encoder.json` + `vocab.bpe` (OpenAI) in directory `path`."""
        path = Path(path)
        for vocab_name, merges_name in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if (path / vocab_name).is_file() and (path / merges_name).is_file():
                break
        else:
            raise Gpt2Error(f"no vocab.json + merges.txt or encoder.json + vocab.bpe in {path}")
        try:
            vocab = json.loads((path / vocab_name).read_text(encoding="utf-8"))
            lines = (path / merges_name).read_text(encoding="utf-8").split("\n")
        except ValueError as e:  # not JSON, or not UTF-8
            raise Gpt2Error(
                f"{path}: cannot read the vocabulary ({' '.join(str(e).split())[:120]})"
            ) from None
        if not isinstance(vocab, dict) or not all(type(i) is int for i in vocab.values()):
            raise Gpt2Error(f"{path / vocab_name}: not a JSON object of token -> integer id")
        tokens = sorted(vocab, key=vocab.__getitem__)
        if [vocab[t] for t in tokens] != list(range(len(tokens))):
            raise Gpt2Error(f"{path / vocab_name}: token ids are not 0..{len(tokens) - 1}")
        if ENDOFTEXT not in vocab:
            raise Gpt2Error(f"{path / vocab_name}: no {ENDOFTEXT} token")
        merges = [line for line in lines if line and not line.startswith("#version")]
        return cls(tokens, merges, vocab[ENDOFTEXT])

    def add_to_gguf(self, writer: gguf.GGUFWriter) -> None:
        """Write the `tokenizer.ggml.*` keys llama.cpp's converter writes for GPT-2."""
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types())
        writer.add_token_merges(self.merges)
        # llama.cpp falls back to id 11 for a gpt2 vocab without these keys: always write them.
        writer.add_bos_token_id(self.eos_id)
        writer.add_eos_token_id(self.eos_id)

    def token_types(self) -> list[int]:
        types = [TOKEN_TYPE_NORMAL] * self.n_vocab
        types[self.eos_id] = TOKEN_TYPE_CONTROL
        return types

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of `text`; with `allow_special` a literal `<|endoftext|>` is the eos id, else text."""
        if not allow_special:
            return self._encode_ordinary(text)
        ids: list[int] = []
        for i, segment in enumerate(text.split(self.special_text)):
            if i:
                ids.append(self.eos_id)
            ids.extend(self._encode_ordinary(segment))
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for piece in PRETOKENIZE_PATTERN.findall(text):
            for start in range(0, len(piece), MAX_PIECE_CHARS):
                chunk = piece[start : start + MAX_PIECE_CHARS]
                chunk_ids = cache.get(chunk)
                if chunk_ids is None:
                    chunk_ids = self._bpe(chunk)
                    if len(cache) >= MAX_CACHED_PIECES:
                        cache.clear()
                    cache[chunk] = chunk_ids
                ids.extend(chunk_ids)
        return ids

    def stable_prefix_length(self, text: str) -> int:
        """The length of the longest prefix of `text` found whose tokens no following text can change:
        `encode(text[:n]) + encode(text[n:] + more) == encode(text + more)` for any `more`.

        The cut goes after a non-space followed by a space; failing that (a run without whitespace), at the
        start of a pre-token that does not follow whitespace or at a MAX_PIECE_CHARS chunk boundary inside
        one, at least _CUT_MARGIN characters before the end and never inside the special token's text. So
        text streamed through this is held for at most about MAX_PIECE_CHARS characters.
        """
        if m := _SAFE_CUT.search(text):
            return m.start() + 1
        special = self.special_text
        last_cut = len(text) - max(_CUT_MARGIN, len(special) + 1)
        if last_cut <= 0:
            return 0
        # The special token splits the text into segments before the pre-tokenizer runs. One starting past
        # last_cut + 1 cannot move a piece boundary at or before last_cut (its only reach is one character
        # back: the last character of a whitespace run before it); any starting earlier is complete here.
        special_start = text.rfind(special, 0, last_cut + 1 + len(special))
        segment_start = 0 if special_start < 0 else special_start + len(special)
        cut = segment_start  # the end of a special token is always a cut
        for m in PRETOKENIZE_PATTERN.finditer(text, segment_start):
            start, end = m.span()
            if start > last_cut:
                break
            # Chunk boundaries at least 3 characters before the piece's end: the rest of the run is then
            # matched again as the same kind of piece, never as 's or 'll.
            last_chunk = start + (min(last_cut, end - 3) - start) // MAX_PIECE_CHARS * MAX_PIECE_CHARS
            if last_chunk > start:
                cut = last_chunk
            elif not _WHITESPACE.match(text, start - 1):
                # Not after whitespace: `\s+(?!\S)` would take a whole run ending at the cut, where the text
                # goes on to give its last character to the next piece.
                cut = start
        return cut

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Merge the lowest-ranked adjacent pair, leftmost first, until no pair is ranked.

        A heap of (rank, position, pair) over a linked list of symbols keeps this O(n log n), so a long
        piece (a run of digits) stays fast. It gives OpenAI's result (merge every occurrence of the best
        pair, then look again) because a merge only creates pairs of higher rank than its own in a
        trained BPE.
        """
        symbols: list[str] = [BYTE_TO_CHAR[b] for b in piece.encode("utf-8")]
        n = len(symbols)
        ranks = self._merge_ranks
        heap = []
        for i in range(n - 1):
            if (rank := ranks.get(f"{symbols[i]} {symbols[i + 1]}")) is not None:
                heap.append((rank, i, symbols[i], symbols[i + 1]))
        heapq.heapify(heap)
        next_pos = list(range(1, n + 1))
        prev_pos = list(range(-1, n - 1))
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = next_pos[i]
            # Entries go stale when a neighbour merges first; the pair must still be there.
            if symbols[i] != left or j == n or symbols[j] != right:
                continue
            merged = symbols[i] = left + right
            symbols[j] = ""  # merged away
            k = next_pos[i] = next_pos[j]
            if k < n:
                prev_pos[k] = i
                if (rank := ranks.get(f"{merged} {symbols[k]}")) is not None:
                    heapq.heappush(heap, (rank, i, merged, symbols[k]))
            h = prev_pos[i]
            if h >= 0 and (rank := ranks.get(f"{symbols[h]} {merged}")) is not None:
                heapq.heappush(heap, (rank, h, symbols[h], merged))
        try:
            return tuple(self.token_to_id[s] for s in symbols if s)
        except KeyError as e:
            raise Gpt2Error(f"a merge makes {e.args[0]!r}, which is not a vocabulary token") from None

    def token_bytes(self, token_id: int) -> bytes:
        return token_text_to_bytes(self.tokens[token_id])

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        tokens = self.tokens
        return b"".join(token_text_to_bytes(tokens[i]) for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class StreamDecoder:
    """Turns generated ids into text as they come, holding back a UTF-8 character split across tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        # Emits the longest complete prefix, keeps an unfinished trailing sequence, replaces invalid bytes.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """The held-back bytes (as U+FFFD if they never completed a character); the decoder starts afresh."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
