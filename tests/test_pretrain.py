"""Pretraining from raw text: learning on a generated grammar, exact resume after SIGKILL, the token cache
(reuse, interrupted builds, exact tokenization), HF export, tokenizer training, FLOPs/MFU, and the
one-line errors of bad inputs.

Tiny models run on one thread (a shared 2-core machine); the subprocess tests import this module for
their helpers. Nothing here reads /work/shared: the corpus is generated.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmforge import cli as cli_pretrain
from lmforge.config import ModelConfig, preset
from lmforge.data import tokens as T
from lmforge.errors import ConfigError, DataError, TokenizerError, TrainingError
from lmforge.flops import flops_per_token, matmul_params, mfu, peak_flops
from lmforge.tasks.pretrain import PretrainConfig, pretrain, train_tokenizer
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig, list_checkpoints, read_metrics

TESTS_DIR = Path(__file__).resolve().parent
PEAK = "1e11"  # a given peak: no matmul measurement in tests


# ---- helpers (also used by test_distributed and the subprocess script) --------------------------------
NOUNS = ["cat", "dog", "bird", "fish", "king", "queen", "child", "farmer"]
VERBS = ["sees", "likes", "chases", "finds", "helps", "feeds"]
ADJS = ["big", "small", "red", "old", "happy", "quiet"]
PLACES = ["in the garden", "on the hill", "by the river", "at home", "under the tree"]


def make_corpus(d: Path, files: int = 3, paragraphs: int = 120, seed: int = 0) -> Path:
    """A simple English grammar: few words, much structure; a model can learn it in a few hundred steps."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)

    def sentence() -> str:
        return (f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)} "
                f"{rng.choice(PLACES)}.").capitalize()

    for k in range(files):
        lines = [" ".join(sentence() for _ in range(rng.randint(2, 5))) for _ in range(paragraphs)]
        (d / f"part{k}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def tiny_config(path: Path, family: str = "gpt2", vocab: int = 320, context: int = 64) -> Path:
    if family == "gpt2":
        d = dict(family="gpt2", vocab_size=vocab, context_length=context, d_model=48, n_layers=2, n_heads=4,
                 d_ff=192, norm="layernorm", mlp="gelu", activation="gelu_tanh", attn_bias=True, mlp_bias=True,
                 position="learned")
    else:
        d = dict(family="llama", vocab_size=vocab, context_length=context, d_model=48, n_layers=2, n_heads=4,
                 n_kv_heads=2, d_ff=96, norm="rmsnorm", mlp="swiglu", activation="silu", position="rotary",
                 tie_embeddings=False)
    path.write_text(json.dumps(d))
    return path


def pretrain_args(corpus: Path, cfg: Path, out: Path, cache: Path, *extra: str, steps: int = 20) -> list[str]:
    return ["pretrain", "--data", str(corpus), "--model-config", str(cfg), "--vocab-size", "320",
            "--context-length", "32", "--batch-size", "8", "--max-steps", str(steps), "--lr", "3e-3",
            "--warmup", "5", "--eval-every", "10", "--save-every", "10", "--log-every", "1", "--samples", "1",
            "--sample-tokens", "8", "--output", str(out), "--cache-dir", str(cache), "--peak-flops", PEAK,
            "--no-progress", "--no-plot", "--seed", "3",
            "--precision", "fp32",  # the numbers these tests compare (DDP, FSDP, resume) are float32's
            *extra]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch, tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "lmforge-cache"))
    monkeypatch.setenv("LMFORGE_MALLOC_TUNING", "0")  # in-process CLI runs: leave pytest's allocator alone
    yield
    torch.set_num_threads(n)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli_pretrain.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err[-2000:]
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("lmforge: error:")]
    assert len(lines) == 1, err[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ---- learning ------------------------------------------------------------------------------------
def test_learns_grammar_well_below_unigram_entropy(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    logs: list[str] = []
    c = PretrainConfig(data=[str(corpus)], model_config=str(tiny_config(tmp_path / "tiny.json")), vocab_size=320,
                       context_length=32, val_fraction=0.1, cache_dir=str(tmp_path / "cache"), samples=2,
                       sample_tokens=12, peak_flops=1e11)
    tc = TrainConfig(output_dir=tmp_path / "run", max_steps=240, batch_size=16, lr=3e-3, warmup=20,
                     schedule="cosine", weight_decay=0.1, eval_every=120, log_every=20, progress=False, plot=False)
    s = pretrain(c, tc, log=logs.append)

    cache = T.open_token_cache(Path(s["data"]["cache"]))
    counts = np.bincount(np.asarray(cache.val), minlength=320).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())  # nats per token
    v = s["validation"]
    assert v["val_loss"] < 0.45 * unigram, (v, unigram)
    assert v["perplexity"] == pytest.approx(math.exp(v["val_loss"]), rel=1e-6)
    assert s["steps"] == 240 and s["tokens_seen"] == 240 * 16 * 32
    assert s["tokens_per_s"] > 0 and 0 < s["mfu"] < 1
    assert s["model_flops_per_token"] == flops_per_token(ModelConfig.load(tmp_path / "tiny.json"), 32)
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [r for r in recs if "eval_val_loss" in r]
    assert [r["step"] for r in evals] == [120, 240] and all("eval_mfu" in r for r in evals)
    assert sum("sample 1:" in m for m in logs) == 2 and any("sample 2:" in m for m in logs)

    # the run dir is a model dir that generation loads, with the tokenizer it was trained with
    from lmforge.api import Generator

    gen = Generator.load(tmp_path / "run")
    text = gen.generate("The big cat", max_new_tokens=12)
    assert isinstance(text, str) and text.strip()
    assert json.loads((tmp_path / "run" / "pretrain.json").read_text())["context_length"] == 32


def test_mfu_is_taken_in_the_precision_the_trainer_resolved(tmp_path, monkeypatch):
    """The MFU peak is read in the Trainer's precision once the Trainer has settled it: a run resumed with
    precision auto where auto now means bf16 keeps computing in its recorded fp32, and so does its MFU."""
    import lmforge.tasks.pretrain as PT
    from lmforge.train import precision as P

    peaks: list[torch.dtype] = []
    monkeypatch.setattr(PT, "peak_flops", lambda device, dtype: peaks.append(dtype) or 1e11)
    corpus = make_corpus(tmp_path / "corpus", files=1, paragraphs=40)
    c = PretrainConfig(data=[str(corpus)], model_config=str(tiny_config(tmp_path / "tiny.json")), vocab_size=320,
                       context_length=32, cache_dir=str(tmp_path / "cache"), samples=0)

    def tc(steps: int) -> TrainConfig:
        return TrainConfig(output_dir=tmp_path / "run", max_steps=steps, batch_size=8, lr=1e-3, eval_every=2,
                           save_every=2, log_every=1, precision="auto", progress=False, plot=False)

    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: None)  # auto: fp32 on this CPU
    s = pretrain(c, tc(2), log=lambda m: None)
    assert s["mfu_precision"] == "fp32" and peaks == [torch.float32]
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: "avx512_bf16")  # the run continued where auto is bf16
    s = pretrain(c, tc(4), resume=True, log=lambda m: None)
    rec = json.loads((tmp_path / "run" / "trainer_config.json").read_text())
    assert s["steps"] == 4 and rec["precision"] == "fp32" and s["mfu_precision"] == rec["precision"]
    assert peaks == [torch.float32, torch.float32]


# ---- resume ----------------------------------------------------------------------------------------
SCRIPT = """
import sys, time
import torch
torch.set_num_threads(1)
import lmforge.tasks.pretrain as P
from lmforge import cli as cli_pretrain

mode, argv = sys.argv[1], sys.argv[2:]
if mode == "kill":
    orig = P.lm_loss
    def slow(m, b):
        time.sleep(0.05)  # slow enough for the parent to kill it between two checkpoints
        return orig(m, b)
    P.lm_loss = slow
sys.exit(cli_pretrain.main(argv))
"""


def _popen(script: Path, mode: str, argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, str(script), mode, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    cfg = tiny_config(tmp_path / "tiny.json")
    cache = tmp_path / "cache"
    script = tmp_path / "run_pretrain.py"
    script.write_text(SCRIPT)
    full_run, cut_run = tmp_path / "full", tmp_path / "cut"
    full = _popen(script, "full", pretrain_args(corpus, cfg, full_run, cache, "--dropout", "0.1", steps=30))
    cut = _popen(script, "kill", pretrain_args(corpus, cfg, cut_run, cache, "--dropout", "0.1", steps=30))
    deadline = time.monotonic() + 120
    while not (cut_run / "checkpoints" / "step-10").is_dir():
        assert cut.poll() is None, cut.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no checkpoint step-10 in time"
        time.sleep(0.005)
    cut.send_signal(signal.SIGKILL)
    cut.communicate(timeout=60)
    assert cut.returncode == -signal.SIGKILL
    assert max(s for s, _ in list_checkpoints(cut_run)) < 30

    resumed = _popen(script, "resume", ["pretrain", "--resume", str(cut_run), "--no-progress", "--no-plot"])
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err[-2000:]
    assert "resuming from step-" in err and "token cache: reused" in err
    out, err = full.communicate(timeout=120)
    assert full.returncode == 0, err[-2000:]

    a, b = load_file(str(full_run / "model.safetensors")), load_file(str(cut_run / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    loss = [r["loss"] for r in read_metrics(full_run / "metrics.jsonl") if "loss" in r]
    assert loss == [r["loss"] for r in read_metrics(cut_run / "metrics.jsonl") if "loss" in r]


# ---- token cache ------------------------------------------------------------------------------------
def _tok(corpus: Path, vocab: int = 320) -> Tokenizer:
    return train_tokenizer(sorted(corpus.iterdir()), vocab)


def test_token_cache_reused_and_interrupted_build_redone(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", files=2, paragraphs=40)
    tok = _tok(corpus)
    logs: list[str] = []
    a = T.build_token_cache([corpus], tok, tmp_path / "cache", val_fraction=0.1, log=logs.append)
    assert not a.reused and "built" in logs[-1] and a.train.dtype == np.uint16
    b = T.build_token_cache([corpus], tok, tmp_path / "cache", val_fraction=0.1, log=logs.append)
    assert b.reused and "reused" in logs[-1] and b.dir == a.dir
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)

    # each file is one document: its tokens, then EOS; the last 10% of each file is held out
    files = sorted(corpus.iterdir())
    docs = [tok.encode(f.read_text(), add_special_tokens=False) + [tok.eos_id] for f in files]
    cuts = [len(d) - round(len(d) * 0.1) for d in docs]
    assert a.train.tolist() == docs[0][:cuts[0]] + docs[1][:cuts[1]]
    assert a.val.tolist() == docs[0][cuts[0]:] + docs[1][cuts[1]:]

    # a build killed half-way: files cut short and no completion marker -> detected and rebuilt
    train, val, cache_dir = np.array(a.train), np.array(a.val), a.dir
    del a, b  # unmap before cutting the file under the maps (else SIGBUS on the next read)
    with open(cache_dir / T.TRAIN_FILE, "r+b") as f:
        f.truncate(100)
    (cache_dir / T.META).unlink()
    stale = tmp_path / "cache" / f".tmp-{cache_dir.name}-999999-x"  # a dead builder's temp dir
    stale.mkdir()
    c = T.build_token_cache([corpus], tok, tmp_path / "cache", val_fraction=0.1, log=logs.append)
    assert "incomplete or damaged" in logs[-2] and "built" in logs[-1] and not c.reused
    assert np.array_equal(c.train, train) and not stale.exists()
    # a damaged file with its marker (sizes disagree) is rebuilt too
    with open(c.dir / T.VAL_FILE, "ab") as f:
        f.write(b"\0\0")
    d = T.build_token_cache([corpus], tok, tmp_path / "cache", val_fraction=0.1, log=logs.append)
    assert not d.reused and np.array_equal(d.val, val)

    # another tokenizer or a changed file -> another cache
    e = T.build_token_cache([corpus], _tok(corpus, 300), tmp_path / "cache", val_fraction=0.1, log=logs.append)
    assert e.dir != cache_dir
    time.sleep(0.01)
    files[0].write_text(files[0].read_text() + "The end.\n")
    f2 = T.build_token_cache([corpus], tok, tmp_path / "cache", val_fraction=0.1, log=logs.append)
    assert f2.dir != cache_dir and not f2.reused

    # validation files are held out whole and left out of training
    g = T.build_token_cache([corpus], tok, tmp_path / "cache", val_files=[files[1]], log=logs.append)
    assert g.meta["train_files"] == [str(files[0].resolve())] and g.val_tokens == len(docs[1])
    assert T.token_dtype(50257) == np.uint16 and T.token_dtype(70000) == np.uint32


def test_chunked_tokenization_equals_whole_file(tmp_path, monkeypatch):
    text = ("Hello  world!\n\n  indented line\r\nWindows line\nnext:\tword\n" * 40
            + "caf\u00e9 \u65e5\u672c\u8a9e \U0001F600\n" * 30 + "no final newline")
    f = tmp_path / "doc.txt"
    f.write_text(text, encoding="utf-8")
    corpus = make_corpus(tmp_path / "c", files=1, paragraphs=30)
    tok = train_tokenizer([corpus / "part0.txt", f], 400)
    monkeypatch.setattr(T, "_READ_BYTES", 97)  # many reads, cuts inside multi-byte characters
    monkeypatch.setattr(T, "_PIECE_CHARS", 50)
    chunks = list(T.read_text_chunks(f, read_bytes=97))
    assert len(chunks) > 10 and "".join(chunks) == text
    ids, chars = T._tokenize_file(f, tok, np.dtype(np.uint16))
    assert chars == len(text)
    assert ids.tolist() == tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == text


def test_packed_batches_deterministic_resumable_and_sharded():
    tokens = np.arange(1000, dtype=np.uint16)
    src = T.PackedBatches(tokens, block_size=10, batch_size=4, seed=1)
    assert len(src) == 99 // 4
    e0, e1 = list(src.batches(0)), list(src.batches(1))
    again = list(T.PackedBatches(tokens, 10, 4, seed=1).batches(1))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(e1, again))
    assert not torch.equal(e0[0]["input_ids"], e1[0]["input_ids"])
    assert all(torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:]) for b in e0)  # targets = inputs + 1
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(e0[7:], src.batches(0, 7)))
    # epoch 0 covers disjoint blocks at multiples of T
    starts = sorted(int(r[0]) for b in e0 for r in b["input_ids"])
    assert len(set(starts)) == len(starts) and all(s % 10 == 0 for s in starts)
    # two ranks with batch 2 see, step by step, the blocks one process sees with batch 4
    one = list(T.PackedBatches(tokens, 10, 4, seed=1, rank=0, world_size=1).batches(2))
    r0 = list(T.PackedBatches(tokens, 10, 2, seed=1, rank=0, world_size=2).batches(2))
    r1 = list(T.PackedBatches(tokens, 10, 2, seed=1, rank=1, world_size=2).batches(2))
    assert len(r0) == len(r1) == len(one)
    for full, a, b in zip(one, r0, r1):
        assert torch.equal(full["input_ids"], torch.cat([a["input_ids"], b["input_ids"]]))
    with pytest.raises(DataError, match="too small"):
        T.PackedBatches(tokens[:20], block_size=32, batch_size=1)


# ---- export --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_saved_model_loads_in_transformers_with_equal_logits(tmp_path, capsys, family):
    transformers = pytest.importorskip("transformers")
    corpus = make_corpus(tmp_path / "corpus", files=2, paragraphs=40)
    cfg = tiny_config(tmp_path / "tiny.json", family)
    rc, out, err = run_cli(pretrain_args(corpus, cfg, tmp_path / "run", tmp_path / "cache", steps=4), capsys)
    assert rc == 0, err[-2000:]
    assert "validation loss" in out and "MFU" in out

    from lmforge.checkpoints import load_checkpoint

    ck = load_checkpoint(tmp_path / "run")
    cls = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.LlamaForCausalLM
    hf = cls.from_pretrained(tmp_path / "run").float().eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "run")
    text = "The quiet farmer feeds the red bird by the river."
    ids = ck.tokenizer.encode(text, add_special_tokens=False)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ck.model.logits(x), rtol=1e-4, atol=1e-4)
    assert ck.cfg.eos_token_id == ck.tokenizer.eos_id is not None


# ---- tokenizer -----------------------------------------------------------------------------------
def test_tokenizer_train_round_trips_text_exactly(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus", files=2, paragraphs=40)
    rc, out, err = run_cli(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "300", "--output",
                            str(tmp_path / "tok"), "--special-tokens", "<|endoftext|>", "<pad>"], capsys)
    assert rc == 0, err
    assert "300 tokens" in out and (tmp_path / "tok" / "tokenizer.json").is_file()
    tok = Tokenizer.from_dir(tmp_path / "tok")
    assert tok.vocab_size == 300 and tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<pad>") == 1
    texts = ["The big cat sees the dog.", "  two  spaces\tand a tab\n\nnew lines\r\n",
             "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001F600 \u0645\u0631\u062d\u0628\u0627", "x" * 300,
             "unseen words: zyzzyva, quixotic!?", "<|endoftext|> inside text"]
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == t
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    for t in texts:
        assert hf(t, add_special_tokens=False)["input_ids"] == tok.encode(t, add_special_tokens=False)


# ---- flops ---------------------------------------------------------------------------------------
def test_flops_per_token_and_mfu(tmp_path, monkeypatch):
    cfg = preset("gpt2-small")
    n = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 50257 * 768
    assert matmul_params(cfg) == n
    assert flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 768 * 1024
    assert flops_per_token(cfg, 1024, training=False) == 2 * n + 4 * 12 * 768 * 1024
    llama = preset("llama-tiny")  # GQA: k and v are narrower; gated MLP has three matrices
    assert matmul_params(llama) == 4 * (256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 688) + 8192 * 256
    assert mfu(100.0, 1e9, 2e11) == pytest.approx(0.5)

    import lmforge.flops as fl

    calls, values, busy = [], [1.0e11, 1.5e11, 1.2e11], [True]
    monkeypatch.setattr(fl, "measure_matmul_flops", lambda dev, dtype: calls.append(1) or values[len(calls) - 1])
    monkeypatch.setattr(fl, "_machine_busy", lambda dev: busy[0])
    assert peak_flops("cpu") == 1.0e11  # measured while busy: measured again next time, the best kept
    busy[0] = False
    assert peak_flops("cpu") == 1.5e11 and peak_flops("cpu") == 1.5e11 and len(calls) == 2  # then cached
    assert peak_flops("cpu", remeasure=True) == 1.5e11 and len(calls) == 3  # a slower measurement: kept max
    assert json.loads((tmp_path / "lmforge-cache" / "peak_flops.json").read_text())
    assert fl.measure_matmul_flops.__name__ == "<lambda>"
    monkeypatch.undo()
    assert fl.measure_matmul_flops("cpu", torch.float32, size=128, seconds=0.01) > 1e6


# ---- bad input: one line, exit 2 ---------------------------------------------------------------------
def test_tokenizer_train_errors(tmp_path, capsys):
    out = str(tmp_path / "tok")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    rc, _, err = run_cli(["tokenizer", "train", "--data", str(empty), "--vocab-size", "300", "-o", out], capsys)
    assert_one_line_error(rc, err, "empty corpus", "empty.txt")

    binary = tmp_path / "data.bin"
    binary.write_bytes(b"some text\n" + bytes(range(256)))
    rc, _, err = run_cli(["tokenizer", "train", "--data", str(binary), "--vocab-size", "300", "-o", out], capsys)
    assert_one_line_error(rc, err, "data.bin", "binary file", "NUL byte at offset 10")

    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    rc, _, err = run_cli(["tokenizer", "train", "--data", str(latin), "--vocab-size", "300", "-o", out], capsys)
    assert_one_line_error(rc, err, "latin1.txt", "not UTF-8", "offset 3")

    corpus = make_corpus(tmp_path / "corpus", files=1, paragraphs=5)
    rc, _, err = run_cli(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "257", "-o", out,
                          "--special-tokens", "<|endoftext|>", "<pad>"], capsys)
    assert_one_line_error(rc, err, "--vocab-size 257", "256", "2 special", "at least 258")
    rc, _, err = run_cli(["tokenizer", "train", "--data", str(tmp_path / "nope"), "--vocab-size", "300", "-o", out],
                         capsys)
    assert_one_line_error(rc, err, "nope", "not found")
    with pytest.raises(TokenizerError):
        train_tokenizer([corpus / "part0.txt"], 100)


def test_pretrain_errors(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus", files=1, paragraphs=20)
    cfg = tiny_config(tmp_path / "tiny.json")
    cache = tmp_path / "cache"

    def args(*extra: str, data: Path = corpus) -> list[str]:
        base = pretrain_args(data, cfg, tmp_path / "run", cache, steps=1)
        return base + list(extra)

    # a tokenizer bigger than the embeddings: both sizes named
    rc, _, err = run_cli(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "400", "-o",
                          str(tmp_path / "tok400")], capsys)
    assert rc == 0, err
    n = Tokenizer.from_dir(tmp_path / "tok400").vocab_size  # as many as the small corpus allows
    assert n > 320
    rc, _, err = run_cli(args("--tokenizer", str(tmp_path / "tok400")), capsys)
    assert_one_line_error(rc, err, f"tokenizer has {n} tokens", "320 rows", f"--vocab-size {n}")

    rc, _, err = run_cli(args("--context-length", "65"), capsys)  # the config's maximum is 64
    assert_one_line_error(rc, err, "--context-length 65", "maximum", "64")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("\n")
    rc, _, err = run_cli(args(data=empty), capsys)
    assert_one_line_error(rc, err, "empty corpus")

    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "ok.txt").write_text("Some text.\n" * 50)
    (binary / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    rc, _, err = run_cli(args(data=binary), capsys)
    assert_one_line_error(rc, err, "image.png", "binary file")

    rc, _, err = run_cli(args(data=tmp_path / "missing"), capsys)
    assert_one_line_error(rc, err, "missing", "not found")

    rc, _, err = run_cli(args("--init-from", "some-model"), capsys)
    assert_one_line_error(rc, err, "--model-config", "--init-from", "not both")

    rc, _, err = run_cli(args("--fsdp"), capsys)
    assert_one_line_error(rc, err, "--fsdp", "torchrun")

    rc, _, err = run_cli(args("--val-fraction", "1.5"), capsys)
    assert_one_line_error(rc, err, "--val-fraction")

    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("Tiny text.\n" * 3)
    rc, _, err = run_cli(args(data=small), capsys)
    assert_one_line_error(rc, err, "too small")

    rc, _, err = run_cli(["pretrain", "--data", str(corpus), "--model-config", "gpt9-huge"], capsys)
    assert_one_line_error(rc, err, "gpt9-huge", "preset")
    rc, _, err = run_cli(["pretrain", "--resume", str(tmp_path / "no-run")], capsys)
    assert_one_line_error(rc, err, "no-run")
    for exc in (ConfigError, DataError, TrainingError):
        assert issubclass(exc, Exception)


def test_cpu_allocator_tuning_can_be_turned_off(monkeypatch):
    from lmforge.tasks.pretrain import tune_cpu_allocator

    monkeypatch.setenv("LMFORGE_MALLOC_TUNING", "0")
    assert tune_cpu_allocator() is False
