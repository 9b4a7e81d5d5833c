import numpy as np
import pytest

from edge_awq.errors import InputError
from edge_awq.generate import SamplingArgs, TextStream, _draw, _nucleus, fit_prompt, generate, penalize, sample
from edge_awq.backends import select_backend
from tests.conftest import LLAMA2C_GREEDY

ops = select_backend("reference")


def run(w, tok, prompt, **kw):
    pieces = list(generate(w, ops, tok, prompt, SamplingArgs(**kw)))
    return "".join(p.text for p in pieces), pieces


def test_greedy_stream_reproduces_llama2c(stories_weights):
    src, w = stories_weights
    text, pieces = run(w, src.tokenizer(), [1], max_new_tokens=200)
    assert text == LLAMA2C_GREEDY and pieces[-1].finish == "length" and len(pieces) == 200


def test_stop_string_cuts_and_never_leaks(stories_weights):
    src, w = stories_weights
    text, pieces = run(w, src.tokenizer(), [1], max_new_tokens=200, stop=("Lily's mom",))
    assert text == LLAMA2C_GREEDY[: LLAMA2C_GREEDY.index("Lily's mom")]
    assert pieces[-1].finish == "stop"


def test_eos_ends_with_stop(stories_weights):
    src, w = stories_weights
    tok = src.tokenizer()
    import dataclasses

    first = run(w, tok, [1], max_new_tokens=3)[1][0].token  # make the first greedy token an end token
    tok2 = dataclasses.replace(tok, eos_ids=(first,))
    text, pieces = run(w, tok2, [1], max_new_tokens=10)
    assert text == "" and len(pieces) == 1 and pieces[0].finish == "stop"


def test_seeded_sampling_is_reproducible_and_varies(stories_weights):
    src, w = stories_weights
    tok = src.tokenizer()
    a = run(w, tok, [1], max_new_tokens=30, temperature=1.0, top_p=0.9, seed=42)[0]
    b = run(w, tok, [1], max_new_tokens=30, temperature=1.0, top_p=0.9, seed=42)[0]
    c = run(w, tok, [1], max_new_tokens=30, temperature=1.0, top_p=0.9, seed=7)[0]
    assert a == b and a != c


def test_sample_rules_on_hand_made_logits():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    assert sample(logits, SamplingArgs(), rng) == 0
    draws = {sample(logits, SamplingArgs(temperature=1.0, top_k=2), rng) for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample(logits, SamplingArgs(temperature=1.0, top_p=0.7), rng) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 alone is short of 0.7; 0.5 + 0.3 reaches it
    assert sample(logits, SamplingArgs(temperature=1.0, top_p=0.4), rng) == 0


def test_draw_is_the_inverse_cumulative_sum():
    """Blocks of 1024 then within a block: the same index as a search in the whole cumulative sum,
    and never a token of probability zero."""
    rng = np.random.default_rng(3)
    for n in (7, 1024, 5000, 49152):
        p = rng.random(n).astype(np.float32) ** 4
        p[rng.random(n) < 0.5] = 0  # masked tokens, whole empty blocks among them
        p[n // 3 : n // 3 + min(2048, n // 3)] = 0
        c = np.cumsum(p, dtype=np.float64)
        for u in np.concatenate([rng.random(300), [0.0, 1 - 1e-12]]):
            got = _draw(p, float(u))
            assert p[got] > 0
            want = min(int(np.searchsorted(c, u * c[-1], side="right")), n - 1)
            assert got == want or abs(c[got] - c[want]) <= 1e-9 * c[-1]


def test_nucleus_is_the_smallest_prefix_of_the_sorted_order():
    rng = np.random.default_rng(4)
    for flat, top_p in [(False, 0.9), (True, 0.9), (False, 0.3), (True, 0.999)]:
        z = rng.standard_normal(3000) * (0.01 if flat else 4)
        p = np.exp(z - z.max()).astype(np.float32)
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order], dtype=np.float64) - p[order]
        want = set(order[before < top_p * p.sum(dtype=np.float64)].tolist())
        assert set(_nucleus(p, top_p).tolist()) == want


def test_sampling_follows_the_tempered_softmax():
    """20,000 draws over 3,000 tokens (three blocks): each of the likeliest tokens within 5 sigma of
    its probability, and top-k / top-p never draw outside their set."""
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(3000) * 2).astype(np.float32)
    q = np.exp((logits - logits.max()) / 0.8)
    q /= q.sum()
    draws = np.array([sample(logits, SamplingArgs(temperature=0.8), rng) for _ in range(20000)])
    counts = np.bincount(draws, minlength=3000)
    for i in np.argsort(-q)[:5]:
        sigma = np.sqrt(20000 * q[i] * (1 - q[i]))
        assert abs(counts[i] - 20000 * q[i]) <= 5 * sigma
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert {sample(logits, SamplingArgs(temperature=0.8, top_k=5), rng) for _ in range(500)} <= top5
    nucleus = set(_nucleus(q.astype(np.float32), 0.5).tolist())
    assert {sample(logits, SamplingArgs(temperature=0.8, top_p=0.5), rng) for _ in range(500)} <= nucleus


def test_repetition_penalty():
    logits = np.array([2.0, -2.0, 1.0], np.float32)
    out = penalize(logits, np.array([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_utf8_is_never_split(smollm2_weights):
    src, _ = smollm2_weights
    tok = src.tokenizer()
    text = "Grüße 😀 日本語"
    ids = tok.encode(text)
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert len(ids) > len(text.split())  # the emoji and CJK span several byte-level tokens


@pytest.mark.parametrize("which", ["smollm2", "stories"])
def test_streamed_text_is_the_decoded_text(which, smollm2_weights, stories_weights):
    """Pieces decoded a window at a time add up to the whole answer decoded at once, for a byte-level
    BPE (SmolLM2) and a sentencepiece vocabulary (stories260K: leading spaces), over a long text."""
    src, _ = smollm2_weights if which == "smollm2" else stories_weights
    tok = src.tokenizer()
    text = "Once upon a time,  there was a  little dog.\nIt said: \"Grüße!\" 😀 and then  ran off. " * 20
    ids = tok.encode(text)
    stream = TextStream(tok)
    assert "".join(stream.push(t) for t in ids) == tok.decode(ids)


def test_prompt_too_long_is_refused_or_trimmed():
    ids = list(range(100))
    with pytest.raises(InputError, match="prompt of 100 tokens leaves no room"):
        fit_prompt(ids, 64, 16, trim=False)
    assert fit_prompt(ids, 64, 16, trim=True) == ids[-48:]
    assert fit_prompt(ids[:10], 64, 16, trim=False) == ids[:10]
