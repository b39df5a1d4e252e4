"""The pure-Python open_clip tokenizer: the token arrays recorded by ../shared/oracle/v2
(open_clip.tokenize), transformers' CLIPTokenizer built offline from the same vocabulary, and the
`regex` pre-tokenisation pattern it replaces."""
import gzip
import hashlib
import json

import numpy as np
import pytest

from cdv2.sample.tokenizer import (EOT, PACKAGED_VOCAB, SOT, SimpleTokenizer, bytes_to_unicode, find_vocab,
                                   pre_tokenize, tokenize)

PROMPTS = ["blue hair", "", "everything", "a girl with long silver hair, red dress & blue eyes!",
           "Girl's  RED-dress!! 123 ... it'll be 2x", "  multiple\tspaces\nand lines  ", "café naïve résumé",
           "&amp;quot;html&quot; entities", "don't stop", "日本語のテキスト", "emoji 🎨🖌 colors"]


def test_packaged_vocab_is_open_clips():
    assert find_vocab() == PACKAGED_VOCAB
    digest = hashlib.sha256(PACKAGED_VOCAB.read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"  # open_clip 2.24.0's file


def test_oracle_tokens(oracle_v2_dir):
    """Every text the authors' app encoded (open_clip.tokenize), in order, with its token array."""
    meta = json.loads((oracle_v2_dir / "tiny_v2_fixtures.json").read_text())
    npz = np.load(oracle_v2_dir / "tiny_v2_fixtures.npz")
    n = 0
    for mode in ("manip_target", "manip_prompt", "manip_target_bg"):
        for i, texts in enumerate(meta["modes"][mode]["text_encoded_in_order"]):
            name = f"mode/{mode}/text/{i}/tokens"
            ref = npz[meta["aliases"].get(name, name)]
            got = tokenize(texts)
            assert got.dtype == np.int64 and got.shape == ref.shape == (len(texts), 77)
            np.testing.assert_array_equal(got, ref)
            n += len(texts)
    assert n == 10  # 2 + 1, 4 + 1, 2 texts


def test_layout_and_truncation():
    t = tokenize(["blue hair", "word " * 100])
    assert t[0, 0] == SOT and t[0, 3] == EOT and not t[0, 4:].any()
    assert t[1, 0] == SOT and t[1, 76] == EOT and (t[1, 1:76] != 0).all()
    tok = SimpleTokenizer()
    assert tok.decode(tok.encode("blue hair")).strip() == "blue hair"


def test_matches_transformers_clip_tokenizer(tmp_path):
    """transformers' CLIPTokenizer with vocab.json/merges.txt written from the packaged file."""
    transformers = pytest.importorskip("transformers")
    merges = gzip.open(PACKAGED_VOCAB).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    units = list(bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    hf = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ascii_prompts = [p for p in PROMPTS if p.isascii() and "&" not in p]  # HF's fallback cleaner differs on HTML
    ours = tokenize(ascii_prompts)
    for p, row in zip(ascii_prompts, ours):
        ids = hf(p)["input_ids"]
        assert row[:len(ids)].tolist() == ids and not row[len(ids):].any(), p


def test_pre_tokenize_matches_regex_pattern():
    regex = pytest.importorskip("regex")
    pat = regex.compile(r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                        regex.IGNORECASE)
    extra = ["it's a girl's 'll ''s !'s x<start_of_text>y 12ab ab12 ٣٤ ½ e\u0301 ..., ;; a_b", "tab\tnbsp\u00a0x"]
    for s in PROMPTS + extra:
        assert pre_tokenize(s) == pat.findall(s), s


def test_cleaning():
    t = tokenize(["Blue “HAIR”", 'blue "hair"', "ＢＬＵＥ hair", "blue &amp;amp; hair", "blue & hair"])
    np.testing.assert_array_equal(t[0], t[1])
    np.testing.assert_array_equal(t[2], tokenize("blue hair")[0])
    np.testing.assert_array_equal(t[3], t[4])  # HTML unescaped twice, as open_clip


def test_missing_vocab_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CDV2_BPE_VOCAB", str(tmp_path / "nope.txt.gz"))
    with pytest.raises(FileNotFoundError, match="nope"):
        find_vocab()
    with pytest.raises(TypeError, match="strings"):
        tokenize([None])
