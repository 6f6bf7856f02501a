"""The decoder families beyond the first four (issue 35), each on a tiny random model that transformers builds from
the family's own config class with its features switched on (biases, q/k norms, sliding windows, rope scaling,
soft-capping, fused projections), saved with save_pretrained:

- logits equal transformers' (float32), on unpadded, left- and right-padded batches;
- a greedy 32-token continuation equal to transformers' `generate`;
- save_pretrained output (after a LoRA step, merged) loads back in transformers with equal logits;
- every field of the family's config class is read or known to be inert, and an unknown one is refused.
"""

from __future__ import annotations

import pytest
import torch
from conftest import perturbed

from lmforge.checkpoints import load_checkpoint, save_pretrained
from lmforge.config import ModelConfig
from lmforge.decoding import greedy
from lmforge.errors import ConfigError
from lmforge.families import BY_NAME, COMMON_INERT

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _llama3():
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return transformers.LlamaConfig(**SMALL, rope_parameters=rope, tie_word_embeddings=True), \
        transformers.LlamaForCausalLM


def _phi3():
    rot = 16 // 2  # head_dim 16 x partial_rotary_factor 0.5 = 8 rotated dims: 4 frequencies
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.3, 1.7, 2.5][: rot // 2],
            "long_factor": [1.0, 2.0, 4.0, 8.0][: rot // 2]}
    cfg = transformers.Phi3Config(**SMALL, partial_rotary_factor=0.5, rope_parameters=rope,
                                  original_max_position_embeddings=16, sliding_window=9)
    return cfg, transformers.Phi3ForCausalLM


CASES = {
    "llama3": _llama3,
    "mistral": lambda: (transformers.MistralConfig(**SMALL, sliding_window=5), transformers.MistralForCausalLM),
    "qwen2": lambda: (transformers.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4,
                                               max_window_layers=1), transformers.Qwen2ForCausalLM),
    "qwen3": lambda: (transformers.Qwen3Config(**SMALL, head_dim=24, attention_bias=True),
                      transformers.Qwen3ForCausalLM),
    "olmo2": lambda: (transformers.Olmo2Config(**SMALL), transformers.Olmo2ForCausalLM),
    "phi3": _phi3,
    "qwen3_moe": lambda: (transformers.Qwen3MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2,
                                                      moe_intermediate_size=32, norm_topk_prob=True,
                                                      mlp_only_layers=[1]), transformers.Qwen3MoeForCausalLM),
    "mixtral": lambda: (transformers.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2,
                                                   sliding_window=6), transformers.MixtralForCausalLM),
    "gemma2": lambda: (transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                                 attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
                       transformers.Gemma2ForCausalLM),
}


def make(case: str, seed: int = 0):
    cfg, cls = CASES[case]()
    torch.manual_seed(seed)
    model = cls(cfg)
    return perturbed(model)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict:
    out = {}
    for case in CASES:
        d = tmp_path_factory.mktemp(f"fam-{case}")
        make(case).save_pretrained(d)
        out[case] = d
    return out


def batch(T: int, padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, T), generator=g)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :5] = 0
    elif padding == "right":
        mask[0, -5:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def hf_logits(model, ids, mask, padding):
    kw = {} if padding == "none" else dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_match_transformers(case, padding, dirs):
    hf = transformers.AutoModelForCausalLM.from_pretrained(dirs[case]).eval()
    ours = load_checkpoint(dirs[case], tokenizer=False).model
    T = 24 if case == "phi3" else 14  # phi3: past its original context (16), where longrope switches
    ids, mask = batch(T, padding)
    ref = hf_logits(hf, ids, mask, padding)
    with torch.no_grad():
        got = ours.logits(ids, None if padding == "none" else mask)
    real = mask.bool()
    assert (got - ref)[real].abs().max() < TOL


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_32_tokens_match_transformers_generate(case, dirs):
    hf = transformers.AutoModelForCausalLM.from_pretrained(dirs[case]).eval()
    ours = load_checkpoint(dirs[case], tokenizer=False).model
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                           do_sample=False, pad_token_id=0)
    got = greedy(ours, ids, 32)
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", list(CASES))
def test_lora_step_then_save_pretrained_loads_in_transformers(case, dirs, tmp_path):
    from lmforge.model.lora import LoraConfig, inject_lora, merge_lora

    ours = load_checkpoint(dirs[case], tokenizer=False).model.train()
    inject_lora(ours, LoraConfig(rank=4, alpha=8, targets=("q", "v", "down")))
    params = [p for p in ours.parameters() if p.requires_grad]
    assert params
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids, _ = batch(14, "none")
    loss = torch.nn.functional.cross_entropy(ours.logits(ids)[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    merged = merge_lora(ours, inplace=True).eval()
    save_pretrained(merged, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = batch(14, "left")
    with torch.no_grad():
        assert (merged.logits(ids, mask) - hf_logits(hf, ids, mask, "left"))[mask.bool()].abs().max() < TOL


FAMILY_OF = {"llama3": "llama"}


@pytest.mark.parametrize("case", list(CASES))
def test_every_config_field_is_read_or_inert(case):
    """A field that changes the computation is implemented or refused: every field transformers' config class of
    the family writes is one the family reads, or one listed as inert."""
    cfg, _ = CASES[case]()
    spec = BY_NAME[FAMILY_OF.get(case, case)]
    fields = set(cfg.to_dict())
    unknown = sorted(f for f in fields if f not in spec.reads | spec.inert | COMMON_INERT and not f.startswith("_"))
    assert not unknown, f"{case}: config fields neither read nor known inert: {unknown}"


@pytest.mark.parametrize("case", list(CASES))
def test_an_unknown_field_with_a_value_is_refused(case, dirs):
    import json

    hf = json.loads((dirs[case] / "config.json").read_text())
    ModelConfig.from_hf(dict(hf))  # as saved: accepted
    with pytest.raises(ConfigError, match="'attention_sink_size'"):
        ModelConfig.from_hf({**hf, "attention_sink_size": 4})
    ModelConfig.from_hf({**hf, "attention_sink_size": None})  # an empty value changes nothing


def test_unsupported_model_type_names_the_supported_ones():
    with pytest.raises(ConfigError, match=r"unsupported model_type 'mamba'.*qwen2.*lmforge info --families"):
        ModelConfig.from_hf({"model_type": "mamba"})


def test_info_families_lists_every_family(capsys):
    from lmforge.cli import main

    assert main(["info", "--families"]) == 0
    out = capsys.readouterr().out
    for name in BY_NAME:
        assert name in out


@pytest.mark.parametrize("case", list(CASES))
def test_server_batched_steps_equal_each_row_alone(case, dirs):
    """The server's continuous batch (rows of different lengths, left-padded into one cache, stepping through
    Transformer.decode_hidden) gives each row the logits of a plain forward over that row alone."""
    from lmforge.serve.engine import BatchDecoder

    model = load_checkpoint(dirs[case], tokenizer=False).model.eval()
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 6, 8)]  # + 6 steps < 16 (phi3)
    eng = BatchDecoder(model, compile="off")
    eng.join([(eng.prefill(r)[0], r) for r in rows])
    for step in range(6):
        toks = [(7 * step + 3 * b) % (VOCAB - 3) + 3 for b in range(len(rows))]
        got = eng.step(toks)  # (B, V)
        for b, r in enumerate(rows):
            r.append(toks[b])
            with torch.no_grad():
                want = model.logits(torch.tensor([r]))[0, -1]
            torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bits", [8, 4])
def test_int8_and_int4_decode_paths(case, bits, dirs):
    """The quantized decode path runs every family: its kernels compute what its own dequantized weights compute
    (up to the kernels' activation rounding), and greedy decoding runs through the cache on it."""
    from lmforge.quant import DECODE_PRESETS, kernel_mode, quantize_model

    model = load_checkpoint(dirs[case], tokenizer=False).model.eval()
    ids, mask = batch(14, "left")
    with torch.no_grad():
        q = quantize_model(model, **DECODE_PRESETS[bits])
        with kernel_mode(q, "dequant"):
            want = q.logits(ids[1:])[0, -1]
            ref = greedy(q, ids[1:], 8)
        got = q.logits(ids[1:])[0, -1]
        out = greedy(q, ids[1:], 8)  # the decode steps through the cache, kernels on
    assert float((got - want).abs().max() / want.abs().max()) < 0.06  # int8 activation blocks, 3 layers
    assert out.shape == ref.shape == (1, 22)


@pytest.mark.parametrize("case", ["qwen3_moe", "mixtral"])
def test_a_decode_step_runs_only_the_chosen_experts(case, dirs):
    """One token runs k of the E experts in each mixture layer, never the others (qwen3_moe's mlp_only_layers
    keep their dense MLP)."""
    from lmforge.model.moe import MoE

    model = load_checkpoint(dirs[case], tokenizer=False).model.eval()
    ran: list[tuple[int, int]] = []
    for li, block in enumerate(model.blocks):
        if isinstance(block.mlp, MoE):
            for e, expert in enumerate(block.mlp.experts):
                expert.register_forward_hook(lambda m, a, o, li=li, e=e: ran.append((li, e)))
    moe_layers = [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoE)]
    assert moe_layers == ([0, 2] if case == "qwen3_moe" else [0, 1, 2])
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    for t in range(ids.shape[1]):  # one token per forward, as a decode step feeds it
        ran.clear()
        with torch.no_grad():
            model(ids[:, t:t + 1], position_ids=torch.tensor([[t]]))
        k = model.cfg.n_experts_active
        assert all(sum(1 for la, _ in ran if la == li) == k for li in moe_layers), ran


@pytest.mark.parametrize("case", ["qwen3_moe", "phi3"])
def test_auto_decode_stays_eager_quietly_where_a_capture_cannot_hold(case, dirs, caplog):
    """A mixture picks its experts per token and longrope its frequencies per position: "auto" runs them eagerly,
    says why in the decode path, and does not warn (asking for "trace" by name does)."""
    import logging

    from lmforge.decoding import DecodeOptions, GenerationConfig, generate

    model = load_checkpoint(dirs[case], tokenizer=False).model.eval()
    ids = torch.randint(3, VOCAB, (1, 4), generator=torch.Generator().manual_seed(5))
    want = greedy(model, ids, 20)[0, 4:].tolist()
    opts = DecodeOptions("auto")
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        got = generate(model, ids, None, GenerationConfig(max_new_tokens=20, stop_token_ids=[]), opts)
    assert got[0] == want
    assert opts.path.startswith("eager (") and ("mixture" in opts.path or "longrope" in opts.path), opts.path
    assert not caplog.records
    opts = DecodeOptions("trace")
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        generate(model, ids, None, GenerationConfig(max_new_tokens=4), opts)
    assert any("not traced" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_mixture_decodes_traced_with_the_eager_tokens(dirs, own, bits):
    """Where every expert runs on lmforge's int4/int8 kernels, the step is traced with its routing inside one
    op (moe_mm): the tokens each step chooses are its own (a trace that fixed the first token's experts would
    drift), and the steps give the eager steps' tokens and logits, on a padded batch of two rows too."""
    from lmforge.decoding import DecodeOptions, DecodeRuntime, GenerationConfig, generate
    from lmforge.decoding.stepper import Stepper
    from lmforge.quant import DECODE_PRESETS, quantize_model

    model = quantize_model(load_checkpoint(dirs["qwen3_moe"], tokenizer=False).model.eval(), **DECODE_PRESETS[bits])
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    gc = GenerationConfig(max_new_tokens=24, stop_token_ids=[])
    for rows in (ids[:1], ids):
        m = None if rows.shape[0] == 1 else mask
        want = generate(model, rows, m, gc, DecodeOptions("off"))
        opts = DecodeOptions("trace")
        assert generate(model, rows, m, gc, opts) == want
        assert opts.path.startswith("traced"), opts.path
    with torch.no_grad():  # the logits of each step, eager and traced, from one prompt and the same tokens
        logits = {}
        for mode in ("off", "trace"):
            opts = DecodeOptions(mode)
            st = Stepper(DecodeRuntime(model), ids, mask, 8, opts)
            out = [st.prefill(ids)]
            for t in range(6):
                out.append(st.step(torch.tensor([3 + t, 40 + t])))
            logits[mode] = torch.stack(out)
        assert opts.path.startswith("traced"), opts.path
        torch.testing.assert_close(logits["trace"], logits["off"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("compile", ["off", "trace"])
def test_a_quantized_mixture_serves_batched_rows_as_each_row_alone(dirs, own, compile):
    """The server's steps of a quantized mixture (batched rows: decode_hidden with the experts' batched loop; a
    lone row: its traced step, moe_mm, where compile is "trace") give the logits of the same rows stepped one at
    a time through the eager forward, also after rows left."""
    from lmforge.quant import DECODE_PRESETS, quantize_model
    from lmforge.serve.engine import BatchDecoder

    model = quantize_model(load_checkpoint(dirs["qwen3_moe"], tokenizer=False).model.eval(), **DECODE_PRESETS[4])
    prompts = [[3 + i, 17, 29 + 2 * i, 44][: 2 + i] for i in range(3)]

    def run(batched: bool) -> list[torch.Tensor]:
        eng = BatchDecoder(model, compile=compile if batched else "off")
        eng.batched_ok = batched
        eng.join([(eng.prefill(p)[0], p) for p in prompts])
        out = [eng.step([5, 6, 7], steps_left=40), eng.step([8, 9, 10], steps_left=40)]
        eng.drop([1])
        out += [eng.step([11, 12], steps_left=40), eng.step([13, 14], steps_left=40)]
        eng.drop([0])
        out += [eng.step([15], steps_left=40), eng.step([16], steps_left=40)]
        assert not batched or eng.path.startswith("traced" if compile == "trace" else "eager"), eng.path
        return out

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_quantized_mixture_speculates_with_the_plain_greedy_tokens(dirs, own):
    """Prompt lookup over a quantized mixture: the verifications (traced, their rows routed inside moe_mm) give
    the plain greedy tokens, and some drafts are verified (the path ran)."""
    from lmforge.decoding import DecodeOptions, GenerationConfig, generate
    from lmforge.decoding.speculative import SpeculativeOptions, speculative_generate
    from lmforge.quant import DECODE_PRESETS, quantize_model

    model = quantize_model(load_checkpoint(dirs["qwen3_moe"], tokenizer=False).model.eval(), **DECODE_PRESETS[4])
    ids = torch.tensor([[5, 9, 14, 22, 31, 5, 9, 14, 22, 31, 5, 9, 14]])  # a prompt that repeats: drafts to find
    gc = GenerationConfig(max_new_tokens=32, stop_token_ids=[])
    want = generate(model, ids, None, gc, DecodeOptions("off"))[0]
    spec = SpeculativeOptions("prompt-lookup", min_ngram=1)
    opts = DecodeOptions("trace")
    assert speculative_generate(model, ids, gc, spec, opts) == want
    assert spec.proposed > 0 and opts.path.startswith("traced"), (spec.proposed, opts.path)
