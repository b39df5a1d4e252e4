"""The open_clip / OpenAI CLIP BPE tokenizer (`open_clip.tokenize`), in pure Python.

`tokenize(["blue hair"])` -> (1, 77) int64: [SOT 49406, BPE ids..., EOT 49407, 0...], truncated to
77 with EOT last, as open_clip's `SimpleTokenizer` (clean "lower"). Nothing is downloaded: the
BPE merges are read from

  1. the `vocab_path` argument, else the `CDV2_BPE_VOCAB` environment variable, else
  2. `cdv2/sample/data/bpe_simple_vocab_16e6.txt.gz` (package data, 1.36 MB, copied unchanged from
     the open_clip_torch wheel; MIT, see cdv2/sample/data/README.md), else
  3. an installed open_clip package's copy (found without importing open_clip).

Text cleaning follows open_clip's (`ftfy.fix_text`, double HTML unescape, whitespace collapse,
lowercase) without the ftfy dependency: for ftfy we substitute NFC normalisation, straight quotes
for curly ones, fullwidth ASCII to ASCII and the Latin ligatures split. This is exact for ordinary
prompts; it differs from ftfy only on mojibake (text decoded with the wrong codec), which ftfy repairs.
The pre-tokenisation pattern (`'s|'t|...|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`) is a hand-written scanner
over Unicode categories, so the `regex` package is not needed either.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
import os
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

SOT = 49406
EOT = 49407
CONTEXT_LENGTH = 77
PACKAGED_VOCAB = Path(__file__).resolve().parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
_SPECIALS = ("<start_of_text>", "<end_of_text>")
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")  # after an apostrophe, in the pattern's order
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"'})


def find_vocab(vocab_path: Optional[str | os.PathLike] = None) -> Path:
    """Where the BPE merges are read from (see the module docstring for the order)."""
    explicit = vocab_path or os.environ.get("CDV2_BPE_VOCAB")
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise FileNotFoundError(f"CLIP BPE vocabulary not found: {p}")
        return p
    if PACKAGED_VOCAB.is_file():
        return PACKAGED_VOCAB
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / "bpe_simple_vocab_16e6.txt.gz"
            if p.is_file():
                return p
    raise FileNotFoundError(
        f"CLIP BPE vocabulary bpe_simple_vocab_16e6.txt.gz not found (expected {PACKAGED_VOCAB}, shipped with "
        "cdv2). Point CDV2_BPE_VOCAB at a copy (it is inside the open_clip_torch wheel: open_clip/).")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _fix_text(text: str) -> str:
    """The part of ftfy.fix_text that plain prompts can need (see the module docstring)."""
    text = unicodedata.normalize("NFC", text).translate(_QUOTES)
    out = []
    for ch in text:
        o = ord(ch)
        if 0xFF01 <= o <= 0xFF5E:  # fullwidth ASCII
            ch = chr(o - 0xFEE0)
        elif o == 0x3000:  # ideographic space
            ch = " "
        elif 0xFB00 <= o <= 0xFB06:  # Latin ligatures ff, fi, fl, ffi, ffl, long st, st
            ch = unicodedata.normalize("NFKC", ch)
        out.append(ch)
    return "".join(out)


def clean_text(text: str) -> str:
    """open_clip's clean "lower": fix, unescape HTML twice, strip, collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return " ".join(text.split()).lower()


def _kind(ch: str) -> str:
    if ch.isspace():
        return "space"
    cat = unicodedata.category(ch)
    return "letter" if cat[0] == "L" else "number" if cat[0] == "N" else "other"


def pre_tokenize(text: str) -> list[str]:
    """`regex.findall(special|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+, text, IGNORECASE)`."""
    out, i, n = [], 0, len(text)
    low = text.lower()
    while i < n:
        special = next((s for s in _SPECIALS if low.startswith(s, i)), None)
        if special:
            out.append(text[i:i + len(special)])
            i += len(special)
            continue
        if text[i] == "'":
            c = next((c for c in _CONTRACTIONS if low.startswith(c, i + 1)), None)
            if c:
                out.append(text[i:i + 1 + len(c)])
                i += 1 + len(c)
                continue
        kind = _kind(text[i])
        if kind == "space":
            i += 1
        elif kind == "number":
            out.append(text[i])
            i += 1
        else:  # a run of letters, or of "other" characters (greedy, as the regex)
            j = i + 1
            while j < n and _kind(text[j]) == kind:
                j += 1
            out.append(text[i:j])
            i = j
    return out


class SimpleTokenizer:
    """BPE encoder with open_clip's vocabulary layout: 256 bytes, 256 bytes+</w>, 48,894 merges,
    <start_of_text> 49406, <end_of_text> 49407."""

    def __init__(self, vocab_path: Optional[str | os.PathLike] = None):
        self.vocab_path = find_vocab(vocab_path)
        merges = gzip.open(self.vocab_path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]
        self.byte_encoder = bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + list(_SPECIALS)
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.decoder = {i: v for v, i in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {s: s for s in _SPECIALS}
        if (self.encoder[_SPECIALS[0]], self.encoder[_SPECIALS[1]]) != (SOT, EOT):
            raise ValueError(f"{self.vocab_path} is not the CLIP 49,408-token vocabulary")

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in pre_tokenize(clean_text(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: Union[str, Sequence[str]], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), context_length), np.int64)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"tokenize expects strings, got {type(text).__name__}")
            ids = [SOT] + self.encode(text) + [EOT]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = EOT
            out[row, :len(ids)] = ids
        return out


@lru_cache(maxsize=4)
def get_tokenizer(vocab_path: Optional[str] = None) -> SimpleTokenizer:
    return SimpleTokenizer(vocab_path)


def tokenize(texts: Union[str, Sequence[str]], context_length: int = CONTEXT_LENGTH,
             vocab_path: Optional[str] = None) -> np.ndarray:
    """`open_clip.tokenize`: (n, context_length) int64, zero-padded."""
    return get_tokenizer(vocab_path)(texts, context_length)
