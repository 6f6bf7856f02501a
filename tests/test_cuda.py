"""The CUDA paths (marked `cuda`, skipped where torch sees no CUDA device): the model, generation, the compiled
decode step, the quantized layers' fallback, training in bf16 autocast with resume, and the server's scheduler.

CI has no GPU, so these run on a lent GPU machine through `benchmarks/device_check.sh` (one prepared command; see
docs/benchmarks.md). They use the tiny random models of tests/conftest.py and transformers on the same device as
the reference, so they need no weights from PyPI. float32 comparisons turn TF32 off: TF32 matmuls round to
10 mantissa bits (~1e-3 relative), which would hide a real difference of that size.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, make_hf_model

from lmforge.checkpoints import load_checkpoint

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
transformers = pytest.importorskip("transformers")
CUDA = torch.device("cuda")
TOL = 1e-4  # float32 on both sides, different kernels (cuBLAS tiles, SDPA backends): rounding only


@pytest.fixture(autouse=True)
def true_float32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random llama with a BPE tokenizer (conftest's own needs the server's packages, which a GPU machine
    may lack)."""
    import random

    from lmforge.tokenizer import Tokenizer

    rng = random.Random(0)
    words = "the cat sat on mat a dog ran far away one two three four five six hat and bat".split()
    tok = Tokenizer.train_bpe([" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(300)],
                              vocab_size=300, min_frequency=1)
    d = tmp_path_factory.mktemp("cuda-llama")
    make_hf_model("llama", vocab=tok.vocab_size).save_pretrained(d)
    tok.save(d)
    return d


def _left_padded(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    return ids.masked_fill(mask == 0, 0).to(CUDA), mask.to(CUDA)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_matches_transformers_on_cuda(family, hf_dirs):
    auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    hf = auto.from_pretrained(hf_dirs[family]).to(CUDA).eval()
    ours = load_checkpoint(hf_dirs[family], tokenizer=False, device="cuda").model
    assert {p.device.type for p in ours.parameters()} == {"cuda"}
    ids, mask = _left_padded(ours.cfg.vocab_size)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        h = ours(ids, mask)
        got = h if family == "bert" else ours.lm_logits(h)
        # bf16 autocast (what training and `--precision auto` use on CUDA): close, not equal
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h16 = ours(ids, mask)
            low = h16 if family == "bert" else ours.lm_logits(h16)
    want = ref.last_hidden_state if family == "bert" else ref.logits
    real = mask.bool()
    assert (got - want)[real].abs().max() < TOL
    assert (low.float() - want)[real].abs().max() < 0.05 * want[real].abs().max()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_with_kv_cache_equals_transformers_on_cuda(family, tmp_path):
    from lmforge.decoding import greedy

    hf = make_hf_model(family, seed=3)
    hf.save_pretrained(tmp_path)
    hf = hf.to(CUDA)
    ours = load_checkpoint(tmp_path, tokenizer=False, device="cuda").model
    prompt = torch.tensor([[5, 17, 33, 8, 41, 12, 9]], device=CUDA)
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert greedy(ours, prompt, 24).tolist() == ref.tolist()


def test_batched_generation_on_cuda_equals_cpu(tiny_dir):
    """Left-padded batch, sampling with a seed and beams: the same tokens on both devices (float32)."""
    from lmforge.generator import Generator

    cpu = Generator.load(tiny_dir, compile="off")
    gpu = Generator.load(tiny_dir, device="cuda", dtype="float32", compile="off")  # float32 on both devices
    prompts = ["the cat sat on the mat", "a dog", "one two three four five six"]
    assert gpu.generate(prompts, max_new_tokens=16) == cpu.generate(prompts, max_new_tokens=16)
    assert gpu.generate(prompts[0], max_new_tokens=12, num_beams=3) == \
        cpu.generate(prompts[0], max_new_tokens=12, num_beams=3)
    for kw in ({"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2}, {"num_beams": 2, "repetition_penalty": 1.2}):
        assert gpu.generate(prompts, max_new_tokens=12, **kw) == cpu.generate(prompts, max_new_tokens=12, **kw), kw
    a = gpu.generate(prompts[1], max_new_tokens=12, temperature=1.0, top_k=20, seed=7)
    assert a == gpu.generate(prompts[1], max_new_tokens=12, temperature=1.0, top_k=20, seed=7)  # seeded on CUDA


def test_cli_decodes_on_the_gpu_in_bf16_by_default(tiny_dir, capsys):
    """`--device auto` picks the GPU; weights load in bfloat16 there (float32 on a GPU without it), and
    --verbose says so."""
    from lmforge.cli import main
    from lmforge.generator import Generator

    want = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    assert Generator.load(tiny_dir, device="auto").runs_on == f"cuda:0, {want} weights"
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "the cat", "--max-new-tokens", "8",
                 "--verbose", "--no-stream"]) == 0
    assert f"(cuda:0, {want} weights)" in capsys.readouterr().err
    assert Generator.load(tiny_dir, device="cuda", dtype="float32").runs_on == "cuda:0, float32 weights"
    assert main(["info", str(tiny_dir)]) == 0  # --device auto: the GPU
    out = capsys.readouterr().out
    assert "cuda:0" in out and f"torch's {want} matmul on cuda:0" in out and torch.cuda.get_device_name() in out


def test_compiled_decode_step_on_cuda_equals_eager(tiny_dir):
    """The static step compiled for CUDA ("reduce-overhead": CUDA graphs) gives the eager step's greedy tokens, and
    says which path it took."""
    from lmforge.decoding import DecodeOptions, compiler_missing
    from lmforge.generator import Generator

    if why := compiler_missing("cuda"):
        pytest.skip(why)
    gen = Generator.load(tiny_dir, device="cuda", dtype="float32")  # bf16 (the GPU default) could flip a near-tie
    off = gen.generate("the cat sat on the mat", max_new_tokens=40, compile="off")
    assert gen.decode_step == "eager (compile off)"
    on = gen.generate("the cat sat on the mat", max_new_tokens=40, compile="on")
    assert gen.decode_step.startswith("compiled"), gen.decode_step
    assert "cuda" in gen.decode_step and on == off
    assert DecodeOptions("auto").compile == "auto"


def test_quantized_layers_on_cuda_fall_back_to_dequantized_matmuls(tiny_dir):
    """The int4/int8 kernels are CPU code: on CUDA a quantized model runs its dequantized weights, with the same
    logits as the same integers on the CPU."""
    from lmforge.quant import DECODE_PRESETS, quantize_model

    for bits in (8, 4):
        cpu = quantize_model(load_checkpoint(tiny_dir, tokenizer=False).model, **DECODE_PRESETS[bits])
        gpu = quantize_model(load_checkpoint(tiny_dir, tokenizer=False).model, **DECODE_PRESETS[bits]).to(CUDA)
        ids = torch.tensor([[5, 17, 33, 8, 41, 12, 9]])
        with torch.no_grad():
            want, got = cpu.logits(ids), gpu.logits(ids.to(CUDA)).cpu()
        # the CPU side may run the packed kernels (bf16 or int8 activations): close to the dequantized math
        assert (got - want).abs().max() < 0.05 * want.abs().max(), bits


def test_scheduler_on_cuda_gives_each_request_its_text_alone(tiny_dir):
    """Continuous batching on CUDA: staggered requests of different lengths each get the tokens they get alone."""
    import threading

    from lmforge.decoding import GenerationConfig, generate
    from lmforge.generator import Generator
    from lmforge.serve.batching import Scheduler
    from lmforge.serve.requests import GenRequest, SamplingParams

    gen = Generator.load(tiny_dir, device="cuda", dtype="float32")
    sched = Scheduler(gen.model, gen.tokenizer, max_batch=4, max_queue=8)
    sched.eos = set()
    prompts = [gen.tokenizer.encode(p, add_special_tokens=False)
               for p in ("the cat sat", "a dog ran far away", "one two", "the mat and the hat and the bat")]
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    done = [threading.Event() for _ in prompts]

    def collect(i: int):
        def emit(ev) -> None:
            if ev.kind == "text":
                got[i].extend(lp.token for lp in ev.logprobs or [])
            else:
                assert ev.error is None, ev.error
                done[i].set()
        return emit

    try:
        for i, ids in enumerate(prompts):
            sched.submit(GenRequest(list(ids), SamplingParams(max_tokens=8 + 6 * i, logprobs=0), collect(i)))
        for d in done:
            assert d.wait(120), "a request did not finish"
    finally:
        sched.close()
    for i, ids in enumerate(prompts):
        alone = generate(gen.model, torch.tensor([ids], device=CUDA),
                         gc=GenerationConfig(max_new_tokens=8 + 6 * i, stop_token_ids=[]))[0]
        assert got[i] == alone, i


def test_pretrain_on_cuda_picks_bf16_and_learns(tmp_path, monkeypatch):
    """`lmforge pretrain --device cuda --precision auto`: bf16 autocast on a bf16 GPU, and the loss falls."""
    from test_pretrain import make_corpus, pretrain_args, tiny_config

    from lmforge import cli as cli_pretrain

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache-home"))
    corpus, cfg = make_corpus(tmp_path / "corpus"), tiny_config(tmp_path / "tiny.json", "llama")
    out = tmp_path / "run"
    argv = [a if a != "fp32" else "auto" for a in pretrain_args(corpus, cfg, out, tmp_path / "cache", steps=60)]
    assert cli_pretrain.main([*argv, "--device", "cuda"]) == 0
    tc = json.loads((out / "trainer_config.json").read_text())
    assert tc["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 10 and losses[-1] < 0.7 * losses[0], losses
    ck = load_checkpoint(out, device="cuda")
    with torch.no_grad():
        assert torch.isfinite(ck.model.logits(torch.tensor([[1, 5, 9]], device=CUDA))).all()


def test_trainer_on_cuda_resumes_after_a_crash_to_the_same_weights(tmp_path):
    """A run that dies after its step-8 checkpoint, resumed on CUDA (weights, AdamW state, schedule, data order
    and the CUDA RNG of dropout restored), ends with the weights of the run that never stopped."""
    import dataclasses

    import test_trainer as T

    from lmforge.train import Trainer

    def cfg(run):
        return dataclasses.replace(T.resume_config(run), device="cuda", precision="fp32")

    full = Trainer(T.tiny_model(0), cfg(tmp_path / "full"), T.toy_data(96, 0), T.cls_loss,
                   T.make_eval(T.toy_data(64, 1)))
    assert full.train().step == 24
    assert next(full.model.parameters()).device.type == "cuda"

    calls = 0

    def dying_loss(m, b):
        nonlocal calls
        calls += 1
        if calls > 20:  # 2 micro-batches a step: after the step-8 checkpoint, before step 12's
            raise RuntimeError("simulated crash")
        return T.cls_loss(m, b)

    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(T.tiny_model(0), cfg(tmp_path / "cut"), T.toy_data(96, 0), dying_loss,
                T.make_eval(T.toy_data(64, 1))).train()
    resumed = Trainer(T.tiny_model(5), cfg(tmp_path / "cut"), T.toy_data(96, 0), T.cls_loss,
                      T.make_eval(T.toy_data(64, 1)))
    assert resumed.train(resume=True).step == 24
    a, b = full.model.state_dict(), resumed.model.state_dict()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    # equal up to the rounding of the attention backward's atomic adds; different dropout masks or a lost AdamW
    # state move the weights by ~1e-3
    assert worst < 1e-5, worst


def test_task_training_on_cuda(tmp_path):
    """classify and qa train a few steps on CUDA through the CLI, in bf16 autocast, and their run dirs load."""
    from test_classify import toy_rows, write_csv
    from test_qa import tiny_qa_bert, write_squad

    from lmforge import cli

    d = tiny_qa_bert(tmp_path / "bert")
    train, dev = write_squad(tmp_path / "train.json", 120, seed=1), write_squad(tmp_path / "dev.json", 30, seed=2)
    assert cli.main(["qa", "train", "--model", str(d), "--data", str(train), "--eval-data", str(dev),
                     "--max-length", "48", "--doc-stride", "16", "--max-question-length", "8", "--max-steps", "6",
                     "--batch-size", "8", "--eval-every", "3", "--no-progress", "--device", "cuda",
                     "--output", str(tmp_path / "qa")]) == 0
    assert json.loads((tmp_path / "qa" / "trainer_config.json").read_text())["device"].startswith("cuda")
    csv_train, csv_dev = write_csv(tmp_path / "t.csv", toy_rows(120, seed=1)), write_csv(tmp_path / "d.csv",
                                                                                          toy_rows(40, seed=2))
    assert cli.main(["classify", "train", "--model", str(d), "--data", str(csv_train), "--eval-data", str(csv_dev),
                     "--max-length", "32", "--max-steps", "6", "--batch-size", "8", "--eval-every", "3",
                     "--no-progress", "--device", "cuda", "--output", str(tmp_path / "clf")]) == 0
    from lmforge.tasks.classify import load_classifier, predict

    assert len(predict(load_classifier(tmp_path / "clf"), ["the cat is good"])) == 1
