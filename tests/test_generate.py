"""The decoding engine: parity with transformers' generate, cache correctness, filters, streaming, stops."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import make_hf_model

from lmforge.checkpoints import load_checkpoint
from lmforge.decoding import GenerationConfig, TextStreamer, beam_search, filter_logits, generate, greedy
from lmforge.errors import GenerationError

transformers = pytest.importorskip("transformers")
PROMPT = torch.tensor([[5, 17, 33, 8, 41, 12, 9]])


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tmp_path_factory):
    hf = make_hf_model(request.param, seed=3)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return hf, load_checkpoint(d, tokenizer=False).model


def _hf_new_tokens(out: torch.Tensor, n_prompt: int, pad: int = 0) -> list[int]:
    toks = out[0, n_prompt:].tolist()
    while toks and toks[-1] == pad:
        toks.pop()
    return toks


def test_greedy_equals_transformers(pair):
    hf, ours = pair
    ref = hf.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=24, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert greedy(ours, PROMPT, 24).tolist() == ref.tolist()


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,use_eos",
                         [(3, 1.0, False, False), (3, 1.0, False, True), (4, 0.5, True, True), (2, 2.0, False, True)])
def test_beam_search_equals_transformers(pair, num_beams, length_penalty, early_stopping, use_eos):
    hf, ours = pair
    eos = []
    if use_eos:  # a token the model often emits, so hypotheses really finish early
        sample = generate(ours, PROMPT, gc=GenerationConfig(max_new_tokens=30, stop_token_ids=[]))[0]
        eos = [Counter(sample).most_common(2)[-1][0]]
    ref = hf.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=15, num_beams=num_beams,
                      do_sample=False, length_penalty=length_penalty, early_stopping=early_stopping,
                      eos_token_id=eos or None, pad_token_id=0)
    got = beam_search(ours, PROMPT, gc=GenerationConfig(max_new_tokens=15, num_beams=num_beams,
                                                         length_penalty=length_penalty,
                                                         early_stopping=early_stopping, stop_token_ids=eos))
    want = ref[0, PROMPT.shape[1]:].tolist()
    assert got[0] == want[: len(got[0])]
    assert all(t == 0 for t in want[len(got[0]):])


def test_kv_cache_equals_full_recomputation(pair):
    _, ours = pair
    out = greedy(ours, PROMPT, 16)
    with torch.no_grad():
        full = ours.logits(out[:, :-1])  # one forward over everything, no cache
    steps = full[0, PROMPT.shape[1] - 1:].argmax(-1)
    assert steps.tolist() == out[0, PROMPT.shape[1]:].tolist()
    # and the cached logits themselves match
    from lmforge.decoding import DecodeRuntime, Stepper

    st = Stepper(DecodeRuntime(ours), PROMPT, None, 16)
    logits = [st.prefill(PROMPT)]
    for t in out[0, PROMPT.shape[1]:-1]:
        logits.append(st.step(t.view(1)))
    cached = torch.cat(logits)
    assert (cached - full[0, PROMPT.shape[1] - 1:]).abs().max() < 1e-4


def test_batched_left_padded_equals_one_by_one(pair):
    _, ours = pair
    prompts = [[5, 17, 33, 8, 41, 12, 9], [7, 3], [60, 61, 62, 63]]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    for gc in (GenerationConfig(max_new_tokens=12, stop_token_ids=[]),
               GenerationConfig(max_new_tokens=12, num_beams=3, stop_token_ids=[])):
        batched = generate(ours, ids, mask, gc)
        alone = [generate(ours, torch.tensor([p]), None, gc)[0] for p in prompts]
        assert batched == alone


def test_sampling_is_seeded(pair):
    _, ours = pair
    gc = GenerationConfig(max_new_tokens=10, temperature=1.0, top_k=20, seed=123, stop_token_ids=[])
    a = generate(ours, PROMPT, gc=gc)
    assert a == generate(ours, PROMPT, gc=gc)
    assert a != generate(ours, PROMPT, gc=GenerationConfig(**{**gc.__dict__, "seed": 124}))


def _kept(logits: torch.Tensor) -> set[int]:
    return set((logits[0] > torch.finfo(logits.dtype).min).nonzero().flatten().tolist())


def test_top_k_top_p_min_p_sets():
    p = torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.15]])
    logits = p.log()
    assert _kept(filter_logits(logits, top_k=2)) == {1, 3}
    assert _kept(filter_logits(logits, top_k=5)) == {0, 1, 2, 3, 4}
    # top_p: the smallest top set reaching p: 0.40 -> {1}; 0.41..0.70 -> {1, 3}; 0.71..0.85 -> +4
    assert _kept(filter_logits(logits, top_p=0.40)) == {1}
    assert _kept(filter_logits(logits, top_p=0.5)) == {1, 3}
    assert _kept(filter_logits(logits, top_p=0.7)) == {1, 3}
    assert _kept(filter_logits(logits, top_p=0.8)) == {1, 3, 4}
    assert _kept(filter_logits(logits, top_p=1.0)) == {0, 1, 2, 3, 4}
    # min_p: keep p >= min_p * 0.40
    assert _kept(filter_logits(logits, min_p=0.5)) == {1, 3}  # threshold 0.20
    assert _kept(filter_logits(logits, min_p=0.3)) == {1, 3, 4}  # threshold 0.12
    assert _kept(filter_logits(logits, min_p=0.1)) == {0, 1, 2, 3, 4}  # threshold 0.04
    # combined, applied in order k -> p -> min_p
    assert _kept(filter_logits(logits, top_k=3, top_p=0.9)) == {1, 3, 4}


def _byte_decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("text", ["héllo wörld", "日本語のテキスト", "emoji 🙂👍🏽 end", "plain ascii"])
def test_streaming_never_splits_characters(text):
    ids = list(text.encode("utf-8"))  # one token per byte: multi-byte characters span several tokens
    st = TextStreamer(_byte_decode)
    pieces = [st.put(t) for t in ids] + [st.end()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


@pytest.mark.parametrize("text,stops,expect", [
    ("Answer: Paris.\nUser: next", ["\nUser:"], "Answer: Paris."),
    ("abc STOP def STOP", ["STOP"], "abc "),
    ("no stop here", ["XYZ"], "no stop here"),
    ("first ## second", ["##", "second"], "first "),
    ("café<end>more", ["<end>"], "café"),
])
def test_stop_strings_cut_at_the_right_place(text, stops, expect):
    st = TextStreamer(_byte_decode, stops)
    pieces = [st.put(t) for t in text.encode("utf-8")] + [st.end()]
    assert "".join(pieces) == expect
    # nothing of a stop string is ever shown before it is complete
    shown = ""
    st = TextStreamer(_byte_decode, stops)
    for t in text.encode("utf-8"):
        shown += st.put(t)
        assert shown == expect[: len(shown)]


def test_bad_arguments(pair):
    _, ours = pair
    with pytest.raises(GenerationError, match="empty prompt"):
        generate(ours, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(GenerationError, match="max_new_tokens must be > 0"):
        generate(ours, PROMPT, gc=GenerationConfig(max_new_tokens=0))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(GenerationError, match="top_p must be in"):
            generate(ours, PROMPT, gc=GenerationConfig(top_p=bad))
    with pytest.raises(GenerationError, match="exceeds the model's context length"):
        generate(ours, torch.ones(1, 120, dtype=torch.long), gc=GenerationConfig(max_new_tokens=20))


def test_a_runtime_serves_only_its_own_model(pair):
    """Captures hold a model's tensors: a runtime passed with another model is refused, and a Generator whose model
    object is replaced gets a new runtime instead of decoding through the old model's."""
    from lmforge.decoding import DecodeRuntime, GenerationConfig, stream_tokens
    from lmforge.errors import GenerationError

    _, ours = pair
    other = DecodeRuntime(torch.nn.Linear(2, 2))
    with pytest.raises(GenerationError, match="belongs to another model"):
        next(stream_tokens(ours, PROMPT, None, GenerationConfig(max_new_tokens=2), runtime=other))
