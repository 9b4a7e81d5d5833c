from pathlib import Path

import pytest

from edge_awq.errors import FormatError
from edge_awq.formats.tokenizer import from_llama2c_bin, from_sentencepiece
from tests.conftest import SHAKESPEARE, TINYSTORIES, TOK512_BIN, TOK512_MODEL, WIKITEXT


@pytest.fixture(scope="module")
def tok_pair():
    if not TOK512_BIN.is_file():
        pytest.skip("stories260K tokenizer not found")
    return from_llama2c_bin(TOK512_BIN, 512), from_sentencepiece(TOK512_MODEL)


@pytest.mark.parametrize("text_path", [TINYSTORIES, WIKITEXT, SHAKESPEARE])
def test_llama2c_bin_encodes_like_sentencepiece(tok_pair, text_path):
    """The tokenizers-library BPE built from tok512.bin gives sentencepiece's ids on whole texts."""
    bin_tok, spm_tok = tok_pair
    text = text_path.read_text(encoding="utf-8")[:200_000]
    ids = bin_tok.encode(text)
    assert ids == spm_tok.encode(text)
    assert bin_tok.decode(ids) == spm_tok.decode(ids)


def test_llama2c_specials_and_bytes(tok_pair):
    bin_tok, _ = tok_pair
    assert bin_tok.bos_id == 1 and bin_tok.eos_ids == (2,)
    assert bin_tok.encode("hi", bos=True)[0] == 1
    ids = bin_tok.encode("a\nb")
    assert 3 + 0x0A in ids  # newline falls back to its byte piece <0x0A>
    assert bin_tok.decode([1, *ids, 2]) == "a\nb"


def test_truncated_tokenizer_bin(tmp_path, tok_pair):
    bad = tmp_path / "tok512.bin"
    bad.write_bytes(TOK512_BIN.read_bytes()[:3000])
    with pytest.raises(FormatError, match="truncated or corrupt llama2.c tokenizer"):
        from_llama2c_bin(bad, 512)


def test_smollm2_tokenizer_chat_template(smollm2_weights):
    src, _ = smollm2_weights
    tok = src.tokenizer()
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, (2,), False)
    msgs = [{"role": "user", "content": "Hi"}]
    text = tok.render_chat(msgs)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode_chat(msgs)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> x3, <|im_end|> x2
    assert tok.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")


def test_smollm2_byte_level_round_trip_and_digits(smollm2_weights):
    src, _ = smollm2_weights
    tok = src.tokenizer()
    text = "Ünïcödé naïve café — 12345 tokens,\n\ttabs  and   spaces 😀"
    assert tok.decode(tok.encode(text)) == text
    digits = tok.encode("2024")
    assert len(digits) == 4  # the smollm pre-tokenizer splits every digit


def test_missing_tokenizer_model_file(tmp_path):
    with pytest.raises(FormatError, match="not a readable sentencepiece model"):
        from_sentencepiece(Path(tmp_path / "nope.model"))
