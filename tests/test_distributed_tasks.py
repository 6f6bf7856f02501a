"""Every training verb under torchrun (2 CPU processes, gloo): classify train, qa train and finetune run with
DDP, rank 0 alone prints the result and writes the run directory, and the model learns and loads.

The pretrain verb's DDP/FSDP equivalence tests are in test_distributed.py; these check the wiring of the
other verbs: the process group is joined, the run directory named by the clock is the same on every rank,
parameters the forward never uses (BERT's pooler under mean pooling or span QA, frozen LoRA bases) do not
stall DDP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_hf_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_classify import toy_rows, write_csv  # noqa: E402
from test_qa import tiny_qa_bert, write_squad  # noqa: E402

from lmforge.tokenizer import Tokenizer  # noqa: E402

TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside this python")


def _torchrun(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "lmforge.cli", *argv]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def _bpe_model(d: Path, family: str) -> Path:
    corpus = [t for t, _ in toy_rows(400, seed=9)] + ["good bad"] * 20
    tok = Tokenizer.train_bpe(corpus, vocab_size=300, min_frequency=1)
    make_hf_model(family, vocab=tok.vocab_size).save_pretrained(d)
    tok.save(d)
    return d


def _check_run(p: subprocess.CompletedProcess, cwd: Path) -> tuple[Path, dict]:
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [x for x in p.stdout.splitlines() if x.startswith("run: ")]
    assert len(lines) == 1, p.stdout  # rank 0 alone reports
    runs = list((cwd / "runs").iterdir())
    assert len(runs) == 1, runs  # both ranks used rank 0's clock-named directory
    s = json.loads((runs[0] / "summary.json").read_text())
    tc = json.loads((runs[0] / "trainer_config.json").read_text())
    assert tc["world_size"] == 2
    return runs[0], s


@pytest.mark.parametrize("case", ["bert-mean", "llama-lora"])
def test_classify_train_under_torchrun(tmp_path, case):
    family = "bert" if case == "bert-mean" else "llama"
    model = _bpe_model(tmp_path / family, family)
    train = write_csv(tmp_path / "train.csv", toy_rows(240, seed=1))
    dev = write_csv(tmp_path / "dev.csv", toy_rows(60, seed=2))
    extra = ["--pooling", "mean"] if case == "bert-mean" else ["--lora", "--lora-targets", "q,v", "--lr", "1e-2"]
    p = _torchrun(["classify", "train", "--model", str(model), "--data", str(train), "--eval-data", str(dev),
                   "--max-length", "32", "--epochs", "6", "--batch-size", "8", "--eval-every", "20", "--no-progress",
                   "--seed", "0", *(["--lr", "3e-3"] if case == "bert-mean" else []), *extra], tmp_path)
    run, s = _check_run(p, tmp_path)
    assert s["validation"]["accuracy"] >= 0.9, s["validation"]

    from lmforge.tasks.classify import load_classifier, predict

    clf = load_classifier(run)
    assert [r["label"] for r in predict(clf, ["the cat is good", "the dog is bad"])] == ["pos", "neg"]


def test_qa_train_under_torchrun(tmp_path):
    d = tiny_qa_bert(tmp_path / "bert")
    train, dev = write_squad(tmp_path / "train.json", 120, seed=1), write_squad(tmp_path / "dev.json", 30, seed=2)
    p = _torchrun(["qa", "train", "--model", str(d), "--data", str(train), "--eval-data", str(dev),
                   "--max-length", "48", "--doc-stride", "16", "--max-question-length", "8", "--max-steps", "6",
                   "--batch-size", "8", "--eval-every", "0", "--no-progress"], tmp_path)
    run, s = _check_run(p, tmp_path)
    assert s["steps"] == 6 and (run / "qa.json").exists() and (run / "model.safetensors").exists()
    # distillation from that run: the first rank computes the teacher's logits, the other reads its file
    student = tmp_path / "student"
    p = _torchrun(["qa", "train", "--model", str(d), "--data", str(train), "--eval-data", str(dev),
                   "--max-length", "48", "--doc-stride", "16", "--max-question-length", "8", "--max-steps", "2",
                   "--batch-size", "8", "--eval-every", "0", "--no-progress", "--teacher", str(run),
                   "--output", str(student)], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stderr.count("distillation: 1 teacher model(s)") == 1 and (student / "teacher_logits.safetensors").exists()


def test_finetune_under_torchrun(tmp_path):
    model = _bpe_model(tmp_path / "llama", "llama")
    rows = [{"input": f"the {a} cat", "target": f"a {b} dog"} for a in ("big", "small", "red")
            for b in ("blue", "near", "far")] * 4
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = _torchrun(["finetune", "--task", "instruct", "--model", str(model), "--data", str(data), "--input-field",
                   "input", "--target-field", "target", "--max-length", "48", "--epochs", "6", "--batch-size", "4",
                   "--lr", "3e-3", "--eval-every", "0", "--no-progress", "--seed", "0"], tmp_path)
    run, s = _check_run(p, tmp_path)
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses[-1] < 0.5 * losses[0], losses
    assert (run / "finetune.json").exists() and (run / "config.json").exists()
