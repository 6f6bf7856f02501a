"""LoRA: injection is exact, only adapters + head train, merge/export and adapter files round-trip."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.checkpoints import save_pretrained
from lmforge.checkpoints.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapters, save_adapters
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError, ConfigError
from lmforge.model.heads import SequenceClassifier
from lmforge.model.lora import (
    LORA_TARGETS,
    LoraConfig,
    LoraLinear,
    has_lora,
    inject_lora,
    lora_state_dict,
    merge_lora,
    trainable_parameters,
)
from lmforge.model.transformer import Transformer

LLAMA = {"family": "llama", "vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
         "d_ff": 64, "context_length": 64}
GPT2 = {"family": "gpt2", "vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64,
        "context_length": 64, "norm": "layernorm", "mlp": "gelu", "activation": "gelu_tanh",
        "attn_bias": True, "mlp_bias": True, "position": "learned"}
BERT = {**GPT2, "family": "bert", "norm_eps": 1e-12, "norm_placement": "post", "final_norm": False,
        "embed_norm": True, "activation": "gelu", "causal": False, "type_vocab_size": 2, "pooler": True}
CFGS = {"llama": LLAMA, "gpt2": GPT2, "bert": BERT}


def build(family: str, task: str = "lm", seed: int = 0) -> nn.Module:
    """A tiny random model; the same seed gives the same base weights."""
    torch.manual_seed(seed)
    extra = {"id2label": {0: "neg", 1: "pos", 2: "mid"}, "pad_token_id": 0} if task == "cls" else {}
    backbone = Transformer(ModelConfig(**CFGS[family], **extra))
    with torch.no_grad():  # norms start at 1/0: move them so a wrong mapping cannot hide
        for name, p in backbone.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model = SequenceClassifier(backbone, 3) if task == "cls" else backbone
    return model.eval()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x) if hasattr(model, "backbone") else model.logits(x)


def perturb(model: nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Stand-in for training: non-zero B everywhere and a moved head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)
        if hasattr(model, "score"):
            model.score.weight.add_(torch.randn(model.score.weight.shape, generator=g) * 0.1)


X = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))


# ---- config --------------------------------------------------------------------------------------
def test_config_validation():
    with pytest.raises(ConfigError, match=r"unknown module 'qproj'.*valid: q, k, v"):
        LoraConfig(targets=("q", "qproj"))
    assert LoraConfig(targets="q, v,q").targets == ("q", "v")
    assert LoraConfig(targets="all-linear").targets == LORA_TARGETS
    for bad in ({"rank": 0}, {"alpha": -1}, {"dropout": 1.0}, {"targets": ""}):
        with pytest.raises(ConfigError):
            LoraConfig(**bad)


def test_target_missing_in_family_and_all_linear():
    with pytest.raises(ConfigError, match="'fc1' matches no layer of this llama model"):
        inject_lora(build("llama"), LoraConfig(targets="q,fc1"))
    names = inject_lora(build("gpt2"), LoraConfig(targets="all-linear"))
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q", "k", "v", "o", "fc1", "fc2"} and len(names) == 12
    m = build("llama")
    inject_lora(m, LoraConfig())
    with pytest.raises(ConfigError, match="already has adapters"):
        inject_lora(m, LoraConfig())


# ---- injection, training, merging ----------------------------------------------------------------
@pytest.mark.parametrize("family,task", [("llama", "cls"), ("gpt2", "lm")])
def test_injection_is_exact_and_freezes_backbone(family, task):
    model = build(family, task)
    ref = run(model, X)
    keys, q_weight = set(model.state_dict()), model.get_submodule(
        ("backbone." if task == "cls" else "") + "blocks.0.attn.q").weight
    names = inject_lora(model, LoraConfig(rank=4, alpha=8))
    prefix = "backbone." if task == "cls" else ""
    assert names == [f"{prefix}blocks.{i}.attn.{t}" for i in range(2) for t in "qv"]
    assert torch.equal(run(model, X), ref)  # B = 0
    assert model.get_submodule(prefix + "blocks.0.attn.q").weight is q_weight  # wrapped, not copied
    new_keys = set(model.state_dict())
    assert keys < new_keys and all(k.endswith((".lora_A", ".lora_B")) for k in new_keys - keys)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expect = {f"{n}.lora_{ab}" for n in names for ab in "AB"} | ({"score.weight"} if task == "cls" else set())
    assert trainable == expect
    assert trainable_parameters(model) == sum(p.numel() for n, p in model.named_parameters() if n in expect)
    assert set(lora_state_dict(model)) == expect


def test_training_touches_only_adapters_and_head_then_merge_is_exact():
    model = build("llama", "cls")
    inject_lora(model, LoraConfig(rank=4, alpha=8, targets="q,v,down"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = run(model, X)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):  # B moves on step 1, A once B is non-zero
        loss = nn.functional.cross_entropy(model(X), torch.tensor([0, 2]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.endswith((".lora_A", ".lora_B"))} | {"score.weight"}
    out = run(model, X)
    assert not torch.allclose(out, ref)

    copy = merge_lora(model, inplace=False)
    assert has_lora(model) and not has_lora(copy)
    merged = merge_lora(model)
    assert merged is model
    assert torch.allclose(run(model, X), out, atol=1e-5)
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in LORA_TARGETS:
            assert type(m) is nn.Linear, name
    assert set(model.state_dict()) == {k for k in before if not k.endswith((".lora_A", ".lora_B"))}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_export_loads_in_transformers(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = build(family)
    inject_lora(model, LoraConfig(rank=4, alpha=8, targets="all-linear"))
    perturb(model)
    out = run(model, X)
    merge_lora(model)
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(X).logits, out, atol=1e-5, rtol=1e-5)


# ---- adapter files -------------------------------------------------------------------------------
@pytest.mark.parametrize("family,task,targets", [
    ("llama", "cls", "q,v,gate"),
    ("gpt2", "lm", "q,v,o,fc2"),  # a partial fused c_attn
    ("bert", "cls", "all-linear"),  # 'dense' suffixes that must not hit the pooler
])
def test_adapter_round_trip(family, task, targets, tmp_path):
    model = build(family, task, seed=3)
    cfg = LoraConfig(rank=4, alpha=8, targets=targets)
    names = inject_lora(model, cfg)
    perturb(model)
    out = run(model, X)
    save_adapters(model, tmp_path, cfg, base_model="some/base")

    pc = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert pc["peft_type"] == "LORA" and pc["r"] == 4 and pc["lora_alpha"] == 8
    assert pc["base_model_name_or_path"] == "some/base" and pc["target_modules"]
    head = ["classifier"] if family == "bert" else ["score"]
    assert pc["modules_to_save"] == (head if task == "cls" else None)
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    assert all(k.startswith("base_model.model.") for k in tensors)
    assert all(".lora_" in k or k.split(".")[2] in ("score", "classifier") for k in tensors)

    fresh = build(family, task, seed=3)
    assert not torch.allclose(run(fresh, X), out)
    loaded = load_adapters(fresh, tmp_path)
    assert loaded == names
    torch.testing.assert_close(run(fresh, X), out, atol=1e-6, rtol=1e-6)
    assert trainable_parameters(fresh) == trainable_parameters(model)
    # the reloaded model saves the same files again (its config was recovered from the header)
    save_adapters(fresh, tmp_path / "again")
    again = load_file(tmp_path / "again" / ADAPTER_WEIGHTS)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_load_into_model_that_already_has_adapters(tmp_path):
    model = build("llama")
    inject_lora(model, LoraConfig(rank=4, alpha=8))
    perturb(model)
    save_adapters(model, tmp_path)
    same = build("llama")
    inject_lora(same, LoraConfig(rank=4, alpha=8))
    load_adapters(same, tmp_path)
    torch.testing.assert_close(run(same, X), run(model, X))
    other = build("llama")
    inject_lora(other, LoraConfig(rank=2, alpha=8))
    with pytest.raises(CheckpointError, match="rank 4, the model's has rank 2"):
        load_adapters(other, tmp_path)


def test_load_errors_name_file_and_tensor(tmp_path):
    with pytest.raises(CheckpointError, match=r"no adapter_config\.json"):
        load_adapters(build("llama"), tmp_path)
    model = build("llama", "cls")
    inject_lora(model, LoraConfig(rank=4))
    save_adapters(model, tmp_path)
    with pytest.raises(CheckpointError, match="trained on a llama model, this model is gpt2"):
        load_adapters(build("gpt2"), tmp_path)
    with pytest.raises(CheckpointError, match="task head"):
        load_adapters(build("llama"), tmp_path)  # no score head to load into

    f = tmp_path / ADAPTER_WEIGHTS
    with safe_open(str(f), framework="pt") as h:
        meta = h.metadata()
    good = load_file(f)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    save_file({**good, key: torch.zeros(4, 48)}, str(f), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"{ADAPTER_WEIGHTS}: tensor '{key}' gives a \(16x48\) update"):
        load_adapters(build("llama", "cls"), tmp_path)
    save_file({**good, "base_model.model.model.layers.0.mystery.lora_A.weight": torch.zeros(4, 32)}, str(f))
    with pytest.raises(CheckpointError, match=r"mystery\.lora_A\.weight' targets a module unknown"):
        load_adapters(build("llama", "cls"), tmp_path)
    save_file({**good, "base_model.model.score.weight": torch.zeros(5, 32)}, str(f))
    with pytest.raises(CheckpointError, match=r"'base_model.model.score.weight' has shape \(5, 32\)"):
        load_adapters(build("llama", "cls"), tmp_path)


# ---- inference paths -----------------------------------------------------------------------------
def test_no_grad_dropout_bf16_and_compile():
    model = build("llama")
    inject_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.1, targets="all-linear"))
    perturb(model, std=0.02)  # a trained-size update: large random ones make bf16 error blow up
    model.eval()
    with torch.no_grad(), torch.inference_mode():
        ref = run(model, X)
    torch.testing.assert_close(run(model, X), ref)  # eval: dropout off
    model.train()
    assert not torch.allclose(run(model, X), ref)  # train: dropout on the adapter input
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = run(model, X)
    assert low.dtype == torch.bfloat16 and (low.float() - ref).abs().max() < 0.03 * ref.abs().max()
    half = build("llama")
    inject_lora(half, LoraConfig())
    half.to(torch.bfloat16)
    lin = half.blocks[0].attn.q
    assert lin.weight.dtype == torch.bfloat16 and run(half, X).dtype == torch.bfloat16

    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 8), rank=2, alpha=4)
    nn.init.normal_(layer.lora_B)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # fullgraph: no graph breaks
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(compiled(x), layer(x))
    compiled(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


# ---- PEFT compatibility --------------------------------------------------------------------------
@pytest.mark.parametrize("family,task,targets", [("gpt2", "lm", "q,v,fc1"), ("llama", "cls", "all-linear")])
def test_peft_reads_our_adapters(family, task, targets, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = build(family, task, seed=5)
    save_pretrained(model, tmp_path / "base")
    inject_lora(model, LoraConfig(rank=4, alpha=8, targets=targets))
    perturb(model)
    save_adapters(model, tmp_path / "adapter", base_model=tmp_path / "base")
    auto = transformers.AutoModelForCausalLM
    if task == "cls":
        auto = transformers.AutoModelForSequenceClassification
    hf = peft.PeftModel.from_pretrained(auto.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(X).logits, run(model, X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,modules", [("gpt2", ["c_attn", "c_fc"]), ("llama", ["q_proj", "v_proj"])])
def test_we_read_peft_adapters(family, modules, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = build(family, seed=7)
    save_pretrained(model, tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules,
                                                 init_lora_weights=False, fan_in_fan_out=family == "gpt2"))
    pm.save_pretrained(tmp_path / "adapter")
    load_adapters(model, tmp_path / "adapter")  # gpt2: one shared A over q/k/v, B split by rows
    with torch.no_grad():
        torch.testing.assert_close(run(model, X), pm.eval()(X).logits, atol=1e-5, rtol=1e-5)


# ---- file permissions (issue 14.7) ------------------------------------------------------------------
@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_saved_model_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    """Temp files are private while being written; what lands on disk gets what open()/mkdir() would give,
    so others on a shared machine can read a saved model."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer(Backend(WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")))
    model = build("llama", "cls")
    old = os.umask(umask)
    try:
        out = save_pretrained(model, tmp_path / "runs" / "model", tokenizer=tok)
        inject_lora(model, LoraConfig())
        adapters = save_adapters(model, tmp_path / "runs" / "adapters")
    finally:
        os.umask(old)
    files = [f for d in (out, adapters) for f in d.iterdir()]
    assert {f.name for f in files} == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                       "special_tokens_map.json", ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == file_mode, f
    for d in (tmp_path / "runs", out, adapters):
        assert stat.S_IMODE(d.stat().st_mode) == dir_mode, d
