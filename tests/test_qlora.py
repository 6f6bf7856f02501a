"""LoRA over a frozen quantized base (QLoRA's idea): gradients through the int4/int8 layers equal those of the
float base holding the same (dequantized) weights, no float weight is saved for the backward, adapter files
round-trip and bad ones are refused in one line, and `finetune --quantize` trains and saves adapters alone."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lmforge.checkpoints.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapters, save_adapters
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError, ConfigError
from lmforge.model.heads import IGNORE, lm_loss
from lmforge.model.lora import LoraConfig, LoraLinear, inject_lora, merge_lora
from lmforge.model.transformer import Transformer
from lmforge.quant import DECODE_PRESETS, QuantLinear, kernel_mode, quantize_model

LLAMA = {"family": "llama", "vocab_size": 96, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
         "d_ff": 96, "context_length": 64}
TARGETS = ("q", "v", "down")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def base(seed: int = 0, **over) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(**{**LLAMA, **over}))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def quantized(bits: int, seed: int = 0, **over) -> Transformer:
    return quantize_model(base(seed, **over), **DECODE_PRESETS[bits])


def float_twin(qm: Transformer) -> Transformer:
    """The float model holding exactly the quantized model's weights: every QuantLinear (the head too) replaced by
    an nn.Linear of its dequantized weight: the reference the gradients must match."""
    fm = copy.deepcopy(qm)
    for name, m in list(fm.named_modules()):
        if isinstance(m, QuantLinear) and name != "quant_head":
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.dequantize(torch.float32)
            if m.bias is not None:
                lin.bias.data = m.bias.detach().clone()
            parent, _, attr = name.rpartition(".")
            setattr(fm.get_submodule(parent), attr, lin)
    for m in fm.modules():  # the fused layers serve the replaced parts no more
        for attr in ("qkv", "gate_up"):
            if hasattr(m, attr):
                setattr(m, attr, None)
    if fm.quant_head is not None:
        h = fm.quant_head
        head = nn.Linear(h.in_features, h.out_features, bias=False)
        head.weight.data = h.dequantize(torch.float32)
        fm.set_lm_head(head)
    for p in fm.parameters():
        p.requires_grad_(False)
    return fm


def adapt(model: nn.Module, seed: int = 3) -> nn.Module:
    """LoRA with seeded, non-zero A and B (B starts at zero: its gradient alone would not test A's)."""
    inject_lora(model, LoraConfig(rank=4, alpha=8, targets=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.2)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
    return model


def batch(n: int = 3, t: int = 20, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, -5:] = 0
    labels = torch.roll(ids, -1, 1)
    labels[:, :6] = IGNORE  # a prompt
    labels[mask == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lora_grads(model: nn.Module, b: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _ = lm_loss(model, b)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [4, 8])
def test_gradients_through_the_quantized_base_equal_the_float_base(bits, device, one_thread):
    qm = adapt(quantized(bits)).to(device).train()
    fm = adapt(float_twin(quantized(bits))).to(device).train()  # same seeds: same weights, same adapters
    assert any(isinstance(m, QuantLinear) for m in qm.modules())
    b = {k: v.to(device) for k, v in batch().items()}
    with kernel_mode(qm, "dequant"):  # rows without a gradient: the exact path too (the kernels round activations)
        lq, gq = lora_grads(qm, b)
    lf, gf = lora_grads(fm, b)
    assert set(gq) == set(gf) and len(gq) == 2 * 2 * len(TARGETS)
    assert abs(lq - lf) < 1e-5 * max(1.0, abs(lf))
    for n in gf:
        scale = gf[n].abs().max().item()
        assert scale > 0, n  # every adapter gets a gradient (also those below the int8 head and int4 layers)
        assert (gq[n] - gf[n]).abs().max().item() <= 1e-4 * scale, n


def test_the_backward_saves_no_float_weight_and_the_base_gets_no_gradient():
    qm = adapt(quantized(4)).train()
    shapes = {(m.out_features, m.in_features) for m in qm.modules() if isinstance(m, QuantLinear)}
    shapes |= {(k, n) for n, k in shapes}
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = lm_loss(qm, batch())
    loss.backward()
    assert saved and not [s for s in saved if s in shapes]  # activations only, never a (N, K) weight
    assert all(not b.requires_grad for b in qm.buffers())
    assert all(p.grad is None for n, p in qm.named_parameters() if "lora_" not in n)


def test_state_dict_keeps_the_names_of_the_unadapted_layers_and_loads_back():
    qm = adapt(quantized(4))
    sd = qm.state_dict()
    assert "blocks.0.attn.q.qweight" in sd and "blocks.0.attn.q.lora_A" in sd
    assert not [k for k in sd if ".base." in k]
    other = adapt(quantized(4, seed=5), seed=9)
    other.load_state_dict(sd, strict=True)
    x = batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(other.logits(x), qm.logits(x))


def test_adapter_only_save_reloads_with_equal_logits(tmp_path):
    qm = adapt(quantized(4))
    save_adapters(qm, tmp_path / "a", base_model="tiny")
    fresh = quantized(4)
    load_adapters(fresh, tmp_path / "a")
    x = batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(fresh.logits(x), qm.logits(x))
        # the same file on the float base that holds the dequantized weights: the same function
        fl = float_twin(quantized(4))
        load_adapters(fl, tmp_path / "a")
        with kernel_mode(qm, "dequant"):
            assert (fl.logits(x) - qm.logits(x)).abs().max() < 1e-4


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_bad_adapters_are_refused_in_one_line(tmp_path):
    qm = adapt(quantized(4))
    save_adapters(qm, tmp_path / "a", base_model="tiny")
    with pytest.raises(CheckpointError) as e:  # another base: a wider model of the same family
        load_adapters(quantized(4, d_model=128), tmp_path / "a")
    assert "layer" in one_line(e) and "a" in one_line(e)
    gpt2 = {"family": "gpt2", "vocab_size": 96, "d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 96,
            "context_length": 64, "norm": "layernorm", "mlp": "gelu", "activation": "gelu_tanh", "attn_bias": True,
            "mlp_bias": True, "position": "learned"}
    torch.manual_seed(0)
    g2 = quantize_model(Transformer(ModelConfig(**gpt2)), **DECODE_PRESETS[4])
    with pytest.raises(CheckpointError) as e:  # another family
        load_adapters(g2, tmp_path / "a")
    assert "llama" in one_line(e)
    cfg = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / ADAPTER_WEIGHTS).write_bytes((tmp_path / "a" / ADAPTER_WEIGHTS).read_bytes())
    (tmp_path / "b" / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(CheckpointError) as e:  # wrong rank
        load_adapters(quantized(4), tmp_path / "b")
    assert "rank-8" in one_line(e)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:  # weights missing
        load_adapters(quantized(4), tmp_path / "c")
    assert ADAPTER_WEIGHTS in one_line(e)
    with pytest.raises(CheckpointError) as e:  # no adapter dir at all
        load_adapters(quantized(4), tmp_path / "nothing")
    assert ADAPTER_CONFIG in one_line(e)


def test_merging_over_a_quantized_base_gives_float_layers_with_the_same_function():
    qm = adapt(quantized(8))
    x = batch()["input_ids"]
    with torch.no_grad(), kernel_mode(qm, "dequant"):
        ref = qm.logits(x)
        merged = merge_lora(copy.deepcopy(qm))
        assert isinstance(merged.blocks[0].attn.q, nn.Linear)
        assert (merged.logits(x) - ref).abs().max() < 1e-4


# ---- finetune --quantize -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from conftest import make_hf_model

    from lmforge.tokenizer import Tokenizer

    words = "one two three four five six seven eight nine ten red green blue".split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 10
    tok = Tokenizer.train_bpe(corpus, vocab_size=320, special_tokens=["<|endoftext|>", "<|im_end|>"],
                              min_frequency=1, eos_token="<|im_end|>", bos_token="<|endoftext|>")
    d = tmp_path_factory.mktemp("lm")
    make_hf_model("llama", vocab=tok.vocab_size).save_pretrained(d)
    tok.save(d)
    return d


def test_finetune_with_a_quantized_base_trains_and_saves_adapters_alone(tiny_lm, tmp_path, one_thread):
    from lmforge.checkpoints import load_checkpoint
    from lmforge.tasks.seq2seq import FinetuneConfig, finetune
    from lmforge.train import TrainConfig

    rows = [{"input": f"{a} {b}", "target": f"{b} {a}"} for a in ("one", "two", "three", "four")
            for b in ("red", "green", "blue")] * 4
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = FinetuneConfig(model=str(tiny_lm), task="instruct", data=str(data), max_length=64, eval_fraction=0.1,
                       lora=True, lora_rank=8, lora_targets="all-linear", quantize="4")
    tc = TrainConfig(output_dir=tmp_path / "run", epochs=5, batch_size=8, lr=5e-3, warmup=0.1, eval_every=100,
                     progress=False, seed=0)
    logs: list[str] = []
    s = finetune(c, tc, log=logs.append)
    assert any("int4" in m for m in logs)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] < losses[0] * 0.7
    d = tmp_path / "run" / "final"
    assert (d / ADAPTER_WEIGHTS).is_file() and not (d / "model.safetensors").exists()
    ck = load_checkpoint(tiny_lm)
    quantize_model(ck.model, **DECODE_PRESETS[4])
    load_adapters(ck.model, d)  # the saved adapters load on the same quantized base
    assert s["steps"] > 0


def test_finetune_quantize_needs_lora(tiny_lm, tmp_path):
    from lmforge.tasks.seq2seq import FinetuneConfig, finetune
    from lmforge.train import TrainConfig

    data = tmp_path / "d.jsonl"
    data.write_text('{"input": "a", "target": "b"}\n' * 4)
    with pytest.raises(ConfigError) as e:
        finetune(FinetuneConfig(model=str(tiny_lm), data=str(data), quantize="8"),
                 TrainConfig(output_dir=tmp_path / "r"), log=lambda *_: None)
    assert "--lora" in one_line(e)


def test_finetune_quantize_auto_trains_on_a_q4_0_gguf_files_own_blocks(tiny_lm, tmp_path, one_thread):
    from lmforge.checkpoints import load_checkpoint
    from lmforge.tasks.export import export
    from lmforge.tasks.seq2seq import FinetuneConfig, finetune
    from lmforge.train import TrainConfig

    gguf = export(tiny_lm, tmp_path / "base.q4_0.gguf", type="q4_0")
    held = load_checkpoint(gguf, quantized=True).model
    assert any(isinstance(m, QuantLinear) and m.bits == 4 for m in held.modules())
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input": f"{a} red", "target": f"red {a}"}) + "\n"
                            for a in ("one", "two", "three", "four") * 4))
    logs: list[str] = []
    finetune(FinetuneConfig(model=str(gguf), task="instruct", data=str(data), max_length=64, eval_fraction=0.2,
                            lora=True, quantize="auto"),
             TrainConfig(output_dir=tmp_path / "run", max_steps=3, batch_size=4, progress=False, seed=0),
             log=logs.append)
    assert any("from Q4_0 file" in m for m in logs), logs
    assert (tmp_path / "run" / "final" / ADAPTER_WEIGHTS).is_file()
