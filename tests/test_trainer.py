"""The shared trainer on a tiny random classifier: learning, exact resume after SIGKILL, crash-safe
checkpoints, parameter groups, bucketing, early stopping, time budget.

Tiny models run on one thread: on a shared 2-core machine, two threads per process make every step
slower by orders of magnitude. The subprocess tests import this module for their helpers.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge.config import ModelConfig
from lmforge.errors import TrainingError
from lmforge.io import atomic_dir, clean_partial
from lmforge.model.heads import SequenceClassifier
from lmforge.model.transformer import Transformer
from lmforge.train import (
    BucketSampler,
    Collator,
    DatasetBatches,
    TrainConfig,
    Trainer,
    collate,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    pad_batch,
    param_groups,
    read_metrics,
    save_checkpoint,
    seed_everything,
)
from lmforge.train import checkpoint as ckpt_mod
from lmforge.train.optim import lr_factor

TESTS_DIR = Path(__file__).resolve().parent


# ---- helpers (also used by the subprocess script) -------------------------------------------------
def tiny_model(seed: int = 0, dropout: float = 0.1, family: str = "llama") -> SequenceClassifier:
    seed_everything(seed)
    cfg = ModelConfig(family=family, vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                      context_length=64, dropout=dropout)
    if family == "gpt2":
        cfg = ModelConfig(family="gpt2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                          context_length=64, norm="layernorm", mlp="gelu", activation="gelu_tanh",
                          attn_bias=True, mlp_bias=True, position="learned", dropout=dropout)
    return SequenceClassifier(Transformer(cfg), 2)


def toy_data(n: int, seed: int, min_len: int = 4, max_len: int = 16) -> list[dict]:
    """label = whether token 5 appears (other tokens are drawn from 6..63)."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [r.randrange(6, 64) for _ in range(r.randint(min_len, max_len))]
        label = r.random() < 0.5
        if label:
            ids[r.randrange(len(ids))] = 5
        out.append({"input_ids": ids, "labels": int(label)})
    return out


def cls_loss(model, batch):
    logits = model(batch["input_ids"], batch["attention_mask"])
    return F.cross_entropy(logits, batch["labels"]), batch["labels"].shape[0]


def make_eval(examples: list[dict]):
    b = collate(examples)

    def eval_fn(model) -> dict[str, float]:
        logits = model(b["input_ids"], b["attention_mask"])
        return {"accuracy": (logits.argmax(-1) == b["labels"]).float().mean().item(),
                "loss": F.cross_entropy(logits, b["labels"]).item()}

    return eval_fn


def resume_config(run_dir) -> TrainConfig:
    """The run of the kill/resume tests: 96 examples, 12 batches = 6 steps per epoch, 4 epochs."""
    return TrainConfig(output_dir=run_dir, max_steps=24, batch_size=8, grad_accum=2, lr=3e-3, warmup=3,
                       schedule="cosine", save_every=4, eval_every=6, keep_best="accuracy", log_every=5,
                       seed=7, progress=False, plot=False)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SCRIPT = """
import os, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
import test_trainer as T
import lmforge.train.checkpoint as C
from lmforge.train import Trainer
from safetensors.torch import save_model

mode, run_dir, out = sys.argv[1:4]
model = T.tiny_model(0)

def loss_fn(m, b):
    if mode == "kill":
        time.sleep(0.03)  # slow enough for the parent to kill it between two checkpoints
    return T.cls_loss(m, b)

if mode == "crash":  # die like SIGKILL in the middle of writing the step-8 checkpoint
    orig = C.write_training_state
    def crashing(tmp, *a, **k):
        orig(tmp, *a, **k)
        if tmp.name.startswith(".tmp-step-8-"):
            os._exit(3)
    C.write_training_state = crashing

trainer = Trainer(model, T.resume_config(run_dir), T.toy_data(96, 0), loss_fn, T.make_eval(T.toy_data(64, 1)))
result = trainer.train(resume=mode == "resume")
save_model(model, out)
print("RESULT", result.step, result.stopped)
"""


def _script(tmp_path: Path) -> Path:
    p = tmp_path / "run_train.py"
    p.write_text(SCRIPT.format(tests=str(TESTS_DIR)))
    return p


def _popen(script: Path, mode: str, run_dir: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(script), mode, str(run_dir), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out + err


# ---- learning ------------------------------------------------------------------------------------
def test_learns_toy_task_and_writes_run_files(tmp_path):
    run = tmp_path / "run"
    model = tiny_model(0)
    cfg = TrainConfig(output_dir=run, epochs=6, batch_size=32, lr=3e-3, warmup=0.1, eval_every=32,
                      log_every=4, keep_best="accuracy", progress=False)
    eval_fn = make_eval(toy_data(256, 1))
    before = eval_fn(model.eval())
    result = Trainer(model, cfg, toy_data(512, 0), cls_loss, eval_fn).train()

    assert result.stopped == "completed" and result.step == result.total_steps == 96
    assert before["accuracy"] < 0.7
    assert result.eval_metrics["accuracy"] >= 0.9
    recs = read_metrics(run / "metrics.jsonl")
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_accuracy" in r]
    assert train[-1]["loss"] < train[0]["loss"] / 3
    assert [r["step"] for r in evals] == [32, 64, 96]
    for key in ("step", "epoch", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "elapsed"):
        assert key in train[0]
    assert result.best_metric == max(r["eval_accuracy"] for r in evals)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "best" / "best_metric.json").read_text())["step"] == result.best_step
    assert (run / "final" / "model.safetensors").is_file()
    assert_same_weights(weights(run / "final" / "model.safetensors"),
                        dict(model.state_dict()))
    assert [s for s, _ in list_checkpoints(run)] == [96]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-96"
    # resuming a finished run does nothing
    again = Trainer(tiny_model(1), cfg, toy_data(512, 0), cls_loss, eval_fn).train(resume=True)
    assert again.step == 96 and again.stopped == "completed"


def test_same_seed_same_weights(tmp_path):
    def run(name: str, seed: int):
        model = tiny_model(0)
        cfg = TrainConfig(output_dir=tmp_path / name, max_steps=8, batch_size=8, lr=1e-3, seed=seed,
                          progress=False)
        Trainer(model, cfg, toy_data(64, 0), cls_loss).train()
        return {k: v.clone() for k, v in model.state_dict().items()}

    a, b, c = run("a", 1), run("b", 1), run("c", 2)
    assert_same_weights(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another seed: other data order and dropout


class ListSource:
    """A minimal BatchSource: the same fixed batches every epoch."""

    def __init__(self, batches):
        self.b = batches

    def __len__(self):
        return len(self.b)

    def batches(self, epoch, start=0):
        return iter(self.b[start:])


def test_grad_accum_weights_micro_batches_by_item_count(tmp_path):
    # a huge eps makes AdamW's first update proportional to the gradient, so a wrong weighting would show
    ex = toy_data(16, 3, min_len=10, max_len=10)
    full = collate(ex)
    parts = [collate(ex[:5]), collate(ex[5:])]

    def run(name, source, accum):
        model = tiny_model(0, dropout=0.0)
        cfg = TrainConfig(output_dir=tmp_path / name, max_steps=1, grad_accum=accum, lr=10.0, adam_eps=10.0,
                          weight_decay=0.0, max_grad_norm=None, progress=False)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        Trainer(model, cfg, ListSource(source), cls_loss).train()
        return {k: v - before[k] for k, v in model.state_dict().items()}

    one, accum = run("one", [full], 1), run("accum", parts, 2)
    assert max(v.abs().max().item() for v in one.values()) > 1e-3
    for k in one:
        torch.testing.assert_close(accum[k], one[k], rtol=1e-4, atol=1e-7)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    cfg = TrainConfig(output_dir=tmp_path, max_steps=3, batch_size=8, lr=1e-3, bf16=True, log_every=1,
                      progress=False)
    model = tiny_model(0)
    result = Trainer(model, cfg, toy_data(32, 0), cls_loss).train()
    assert math.isfinite(result.train_loss)
    assert next(model.parameters()).dtype == torch.float32


def test_free_heap_pages_go_back_every_trim_every_steps(tmp_path, monkeypatch):
    import platform

    import lmforge.train.trainer as T

    if platform.libc_ver()[0] == "glibc":
        assert T.release_free_memory() is True  # the real malloc_trim is found and runs
    calls = []
    monkeypatch.setattr(T, "TRIM_EVERY", 3)
    monkeypatch.setattr(T, "release_free_memory", lambda: calls.append(1) or True)
    cfg = TrainConfig(output_dir=tmp_path, max_steps=7, batch_size=8, lr=1e-3, progress=False)
    Trainer(tiny_model(0), cfg, toy_data(32, 0), cls_loss).train()
    assert len(calls) == 2  # after steps 3 and 6


def test_cpu_training_caps_onednn_primitive_cache_unless_the_environment_says(tmp_path, monkeypatch):
    import lmforge.train.trainer as T

    cfg = TrainConfig(output_dir=tmp_path, max_steps=1, batch_size=8, progress=False, device="cpu")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    Trainer(tiny_model(0), cfg, toy_data(16, 0), cls_loss)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == T.ONEDNN_CACHE
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    Trainer(tiny_model(0), cfg, toy_data(16, 0), cls_loss)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"


# ---- resume --------------------------------------------------------------------------------------
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    script = _script(tmp_path)
    full_run, cut_run = tmp_path / "full", tmp_path / "cut"
    full = _popen(script, "full", full_run, tmp_path / "full.safetensors")
    cut = _popen(script, "kill", cut_run, tmp_path / "unused.safetensors")
    deadline = time.monotonic() + 120
    while not (cut_run / "checkpoints" / "step-12").is_dir():
        assert cut.poll() is None, cut.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no checkpoint step-12 in time"
        time.sleep(0.005)
    cut.send_signal(signal.SIGKILL)
    rc, _ = _finish(cut)
    assert rc == -signal.SIGKILL
    steps = [s for s, _ in list_checkpoints(cut_run)]
    # killed mid-run, maybe between the rename of step-12 and the pruning that keeps the last 2
    assert 12 in steps and max(steps) < 24 and len(steps) <= 3

    resumed = _popen(script, "resume", cut_run, tmp_path / "resumed.safetensors")
    rc, log = _finish(resumed)
    assert rc == 0, log[-2000:]
    assert "RESULT 24 completed" in log and "resuming from step-" in log
    rc, log = _finish(full)
    assert rc == 0, log[-2000:]

    assert_same_weights(weights(tmp_path / "full.safetensors"), weights(tmp_path / "resumed.safetensors"))
    assert_same_weights(weights(full_run / "best" / "model.safetensors"),
                        weights(cut_run / "best" / "model.safetensors"))
    # the records of the killed session after its checkpoint were dropped: each step is logged once
    recs = [r for r in read_metrics(cut_run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == [5, 10, 15, 20, 24]
    ref = [r for r in read_metrics(full_run / "metrics.jsonl") if "loss" in r]
    assert [r["loss"] for r in recs] == [r["loss"] for r in ref]


def test_crash_during_checkpoint_write_keeps_previous(tmp_path):
    script = _script(tmp_path)
    run = tmp_path / "run"
    rc, log = _finish(_popen(script, "crash", run, tmp_path / "unused.safetensors"))
    assert rc == 3, log[-2000:]
    root = run / "checkpoints"
    partial = [p for p in root.iterdir() if p.name.startswith(".tmp-step-8-")]
    assert partial and (partial[0] / "optimizer.pt").is_file()  # died after writing part of it
    assert not (root / "step-8").exists()
    assert latest_checkpoint(run) == root / "step-4"
    assert (root / "latest").read_text().strip() == "step-4"

    model = tiny_model(5)
    trainer = Trainer(model, resume_config(run), toy_data(96, 0), cls_loss, make_eval(toy_data(64, 1)))
    state = load_checkpoint(latest_checkpoint(run), model, trainer.optimizer, trainer.scheduler)
    assert state["step"] == 4 and (state["epoch"], state["batch_index"]) == (0, 8)
    assert state["config"]["seed"] == 7 and len(state["rng"]) == 1

    (root / "step-30").mkdir()  # a step dir without trainer_state.json is not a checkpoint
    result = trainer.train(resume=True)
    assert result.step == 24 and result.stopped == "completed"
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # leftovers cleaned


def test_failed_checkpoint_write_leaves_nothing_and_previous_loadable(tmp_path, monkeypatch):
    model = tiny_model(0)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, 1, model.state_dict(), opt.state_dict(), None, {"epoch": 0, "batch_index": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "write_training_state", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, model.state_dict(), opt.state_dict(), None, {"epoch": 0, "batch_index": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-1"]
    assert load_checkpoint(latest_checkpoint(tmp_path), tiny_model(1), opt)["step"] == 1


class Tied(torch.nn.Module):
    """An output projection that shares the embedding matrix: two names, one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.out = torch.nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight


def test_checkpoint_of_tied_weights_round_trips(tmp_path):
    a, b = Tied(), Tied()
    save_checkpoint(tmp_path, 1, a.state_dict(), None, None, {})  # safetensors refuses shared tensors as they are
    load_checkpoint(latest_checkpoint(tmp_path), b)
    assert torch.equal(b.embed.weight, a.embed.weight) and b.out.weight is b.embed.weight


def test_strategy_outside_torchrun(monkeypatch):
    from lmforge.train import DDP, FSDP, Single, choose_strategy

    monkeypatch.delenv("RANK", raising=False)
    assert type(choose_strategy(find_unused_parameters=True)) is Single
    for cls in (DDP, FSDP):
        with pytest.raises(TrainingError, match=f"{cls.__name__} strategy: needs a process group .* torchrun"):
            cls()


def test_resume_errors(tmp_path):
    cfg = TrainConfig(output_dir=tmp_path / "empty", max_steps=2, batch_size=8, progress=False)
    trainer = Trainer(tiny_model(0), cfg, toy_data(16, 0), cls_loss)
    msg = r"empty: no checkpoint to resume from \(expected .*empty/checkpoints/step-N\)"
    with pytest.raises(TrainingError, match=msg):
        trainer.train(resume=True)
    with pytest.raises(TrainingError, match="no checkpoint to resume from"):
        trainer.train(resume_from=tmp_path / "empty")
    assert trainer.train(resume="auto").step == 2  # auto: nothing to resume, start fresh
    with pytest.raises(TrainingError, match=r"already holds checkpoints; continue with --resume .*empty \(or "
                       r"train\(resume=True\)\), or start over with --overwrite"):
        Trainer(tiny_model(0), cfg, toy_data(16, 0), cls_loss).train()
    cfg.overwrite = True
    assert Trainer(tiny_model(0), cfg, toy_data(16, 0), cls_loss).train().step == 2


# ---- optimizer, schedule, config ------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_weight_decay_on_norms_biases_embeddings(family):
    model = tiny_model(0, family=family)
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert no_decay | decay == set(names.values()) and not no_decay & decay
    assert "backbone.embed.tok.weight" in no_decay
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])
    assert not any("norm" in n or n.endswith(".bias") or "embed" in n for n in decay)
    assert any(n.endswith("attn.q.weight") or ".attn." in n for n in decay) and "score.weight" in decay
    if family == "gpt2":
        assert {"backbone.embed.pos.weight", "backbone.norm.bias", "backbone.norm.weight"} <= no_decay
    trainer = Trainer(model, TrainConfig(output_dir="unused", batch_size=4, progress=False), toy_data(8, 0),
                      cls_loss)
    assert [(g["name"], g["weight_decay"]) for g in trainer.optimizer.param_groups] == \
        [("decay", 0.01), ("no_decay", 0.0)]


def test_layer_lr_decay_scales_lr_by_depth(tmp_path):
    model = tiny_model(0, family="gpt2")  # 2 blocks
    cfg = TrainConfig(output_dir=tmp_path / "run", batch_size=4, progress=False, lr=1e-3, layer_lr_decay=0.5,
                      warmup=0, schedule="constant")
    trainer = Trainer(model, cfg, toy_data(8, 0), cls_loss)
    lr_of = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["score.weight"])] == pytest.approx(1e-3)  # the head: depth n + 1
    assert lr_of[id(named["backbone.norm.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["backbone.blocks.1.attn.q.weight"])] == pytest.approx(5e-4)
    assert lr_of[id(named["backbone.blocks.0.mlp.fc1.weight"])] == pytest.approx(2.5e-4)
    assert lr_of[id(named["backbone.embed.tok.weight"])] == pytest.approx(1.25e-4)
    assert set(lr_of) == {id(p) for p in model.parameters()}
    wd = {g["name"]: g["weight_decay"] for g in trainer.optimizer.param_groups}
    assert wd["decay.3"] == 0.01 and wd["no_decay.0"] == 0.0 and "decay.0" not in wd  # embeddings: no decay
    trainer.train()
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(1e-3)  # the logged lr is the top group's
    with pytest.raises(TrainingError, match="layer_lr_decay"):
        TrainConfig(output_dir="unused", layer_lr_decay=1.5)
    with pytest.raises(TrainingError, match="layer_lr_decay.*no embeddings"):
        param_groups(torch.nn.Linear(2, 2), 0.0, layer_decay=0.5)


def test_lr_schedules():
    assert lr_factor(0, "linear", 4, 20) == 0.25 and lr_factor(3, "linear", 4, 20) == 1.0
    assert lr_factor(4, "linear", 4, 20) == 1.0 and lr_factor(12, "linear", 4, 20) == 0.5
    assert lr_factor(12, "cosine", 4, 20) == pytest.approx(0.5)
    assert lr_factor(20, "cosine", 4, 20, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(19, "constant", 4, 20) == 1.0


def test_config_validation():
    with pytest.raises(TrainingError, match="'schedule'"):
        TrainConfig(schedule="step")
    with pytest.raises(TrainingError, match="'early_stopping_patience': needs keep_best"):
        TrainConfig(early_stopping_patience=2)
    assert TrainConfig(keep_best="loss").mode == "min" and TrainConfig(keep_best="f1").mode == "max"
    cfg = TrainConfig(output_dir=Path("x"), keep_best="f1")
    assert TrainConfig.from_dict(cfg.to_dict()) == TrainConfig(output_dir="x", keep_best="f1")


def test_keep_best_is_resolved_by_train_config_for_the_task_and_the_loop(tmp_path, capsys):
    """TrainConfig.best_metric is the one check of keep_best: the task's up-front check (run_training), the
    CLI's (one line, exit 2, naming the flag) and the loop's lookup of what eval_fn returned all go through it."""
    metrics = ("exact_match", "f1", "eval_loss")
    assert TrainConfig().best_metric(metrics) is None
    assert TrainConfig(keep_best="f1").best_metric(metrics) == "f1"
    assert TrainConfig(keep_best="eval_f1").best_metric(metrics) == "f1"  # metrics.jsonl's spelling
    assert TrainConfig(keep_best="eval_loss").best_metric(metrics) == "eval_loss"
    with pytest.raises(TrainingError, match="'keep_best': 'acc' is not among the metrics qa returns "
                                            r"\(exact_match, f1, eval_loss\)"):
        TrainConfig(keep_best="acc").best_metric(metrics, "qa")
    cfg = TrainConfig(output_dir=tmp_path, max_steps=2, batch_size=8, eval_every=1, keep_best="acc", progress=False)
    with pytest.raises(TrainingError, match="'keep_best': 'acc' is not among the metrics eval_fn returns"):
        Trainer(tiny_model(0), cfg, toy_data(16, 0), cls_loss, lambda m: {"f1": 1.0}).train()

    from lmforge.cli import main

    capsys.readouterr()
    assert main(["qa", "train", "--data", str(tmp_path / "missing.json"), "--keep-best", "acc",
                 "--output", str(tmp_path / "cli")]) == 2  # before the data is read
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: error: --keep-best acc: qa evaluates exact_match"), err
    assert not (tmp_path / "cli").exists()


def test_trainer_exposes_the_device_and_precision_it_resolved(tmp_path):
    from lmforge.cli import build_parser
    from lmforge.cli.common import train_config
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="train config field 'device': unknown device 'gpu9'"):
        TrainConfig(device="gpu9").resolved_device()
    a = build_parser().parse_args(["classify", "train", "--device", "gpu9"])
    with pytest.raises(ConfigError, match="^--device: unknown device 'gpu9'"):  # the CLI names its flag
        train_config(a, str(tmp_path / "x"), {"epochs": 1.0, "batch_size": 8, "lr": 1e-3})
    cfg = TrainConfig(output_dir=tmp_path, max_steps=1, batch_size=8, progress=False, plot=False, device="cpu")
    t = Trainer(tiny_model(0), cfg, toy_data(16, 0), cls_loss)
    assert t.device == torch.device("cpu") and t.precision.name == "fp32"
    seen = []
    t = Trainer(tiny_model(0), cfg, toy_data(16, 0), cls_loss,
                on_start=lambda tr: seen.append((tr.device.type, tr.precision.name)))
    result = t.train(resume="auto")
    assert seen == [("cpu", "fp32")] and (result.device, result.precision) == ("cpu", "fp32")


# ---- early stopping and time budget ---------------------------------------------------------------
def test_early_stopping_stops(tmp_path):
    scores = iter([0.5, 0.6, 0.55, 0.6, 0.9, 0.9])

    cfg = TrainConfig(output_dir=tmp_path, max_steps=100, batch_size=8, eval_every=2, keep_best="acc",
                      early_stopping_patience=2, progress=False)
    result = Trainer(tiny_model(0), cfg, toy_data(64, 0), cls_loss, lambda m: {"acc": next(scores)}).train()
    assert result.stopped == "early_stopping"
    assert result.step == 8 and result.best_metric == 0.6 and result.best_step == 4
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-8"
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "eval_acc" in r] == [2, 4, 6, 8]
    again = Trainer(tiny_model(0), cfg, toy_data(64, 0), cls_loss, lambda m: {"acc": 1.0}).train(resume=True)
    assert again.stopped == "early_stopping" and again.step == 8


def test_eval_metrics_are_prefixed_once_in_metrics_jsonl(tmp_path):
    # the task verbs' eval_fn return "eval_loss" beside "f1": metrics.jsonl holds eval_loss and eval_f1 (never
    # eval_eval_loss), and keep-best on eval_loss reads the same number
    losses = iter([0.9, 0.7, 0.8])
    cfg = TrainConfig(output_dir=tmp_path, max_steps=6, batch_size=8, eval_every=2, keep_best="eval_loss",
                      progress=False)
    result = Trainer(tiny_model(0), cfg, toy_data(64, 0), cls_loss,
                     lambda m: {"f1": 50.0, "eval_loss": next(losses)}).train()
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "eval_f1" in r]
    assert [r["eval_loss"] for r in evals] == [0.9, 0.7, 0.8]
    assert not any(k.startswith("eval_eval") for r in evals for k in r)
    assert result.best_metric == 0.7 and result.best_step == 4


def test_max_time_stops_saves_and_resumes(tmp_path, capsys):
    cfg = TrainConfig(output_dir=tmp_path, max_steps=6, batch_size=8, max_time_s=1e-6, progress=False)
    result = Trainer(tiny_model(0), cfg, toy_data(64, 0), cls_loss).train()
    assert result.stopped == "max_time" and result.step == 1
    assert "max_time_s=1e-06 reached" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path).name == "step-1" and (tmp_path / "final").is_dir()
    cfg.max_time_s = None
    result = Trainer(tiny_model(0), cfg, toy_data(64, 0), cls_loss).train(resume=True)
    assert result.stopped == "completed" and result.step == 6


def test_run_that_did_all_its_steps_says_nothing_about_max_time(tmp_path, capsys):
    # the budget is spent after the last step as well: the run completed, so no "continue" advice
    cfg = TrainConfig(output_dir=tmp_path, max_steps=1, batch_size=8, max_time_s=1e-6, progress=False)
    result = Trainer(tiny_model(0), cfg, toy_data(64, 0), cls_loss).train()
    assert result.stopped == "completed" and result.step == 1
    assert "max_time" not in capsys.readouterr().err


# ---- a full disk ---------------------------------------------------------------------------------
def _disk_full_config(run: Path) -> TrainConfig:
    return TrainConfig(output_dir=run, max_steps=8, batch_size=8, lr=3e-3, save_every=2, eval_every=4,
                       keep_best="accuracy", log_every=2, seed=3, progress=False, plot=False)


def test_disk_full_during_checkpoint_keeps_last_good_one_and_resumes_exactly(tmp_path, monkeypatch):
    data, eval_fn = toy_data(64, 0), make_eval(toy_data(32, 1))
    full = tiny_model(0)
    Trainer(full, _disk_full_config(tmp_path / "full"), data, cls_loss, eval_fn).train()

    run = tmp_path / "run"
    real = ckpt_mod.torch_save

    def full_disk(obj, path):
        if path.parent.name.startswith(".tmp-step-6-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(ckpt_mod, "torch_save", full_disk)
    with pytest.raises(TrainingError) as e:
        Trainer(tiny_model(0), _disk_full_config(run), data, cls_loss, eval_fn).train()
    assert str(e.value) == (f"{run}: could not write checkpoint step-6: [Errno 28] No space left on device; the last "
                            f"good checkpoint (step-4) is kept: free space and continue with --resume {run} "
                            "(or train(resume=True))")
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2", "step-4"]  # no partial step-6
    assert (root / "latest").read_text().strip() == "step-4"

    monkeypatch.setattr(ckpt_mod, "torch_save", real)  # space freed
    model = tiny_model(5)
    result = Trainer(model, _disk_full_config(run), data, cls_loss, eval_fn).train(resume=True)
    assert result.step == 8 and result.stopped == "completed"
    assert_same_weights(dict(full.state_dict()), dict(model.state_dict()))


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_failed_final_export_is_one_line_and_keeps_checkpoint(tmp_path, err):
    def save_fn(model, out_dir, state_dict):
        raise OSError(err, os.strerror(err))

    run = tmp_path / "run"
    cfg = TrainConfig(output_dir=run, max_steps=4, batch_size=8, save_every=2, progress=False, plot=False)
    with pytest.raises(TrainingError, match=r"could not write final/ \(step 4\): \[Errno \d+\] .*the last good "
                       r"checkpoint \(step-2\) is kept: (free space|make it writable) and continue with --resume"):
        Trainer(tiny_model(0), cfg, toy_data(64, 0), cls_loss, save_model_fn=save_fn).train()
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert not (run / "final").exists() and not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


WRITE_LIMIT_SCRIPT = """
import resource, signal, sys
import torch
from lmforge.train.checkpoint import save_checkpoint

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG instead of a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
small, big = {"w": torch.zeros(10)}, {"w": torch.zeros(100_000)}
for name, model_sd, optim_sd in [("model", big, None), ("optimizer", small, {"state": {0: big}})]:
    try:
        save_checkpoint(sys.argv[1], 1, model_sd, optim_sd, None, {})
        print(name, "written")
    except OSError as e:
        print(name, "OSError", e.errno)
"""


def test_real_write_failures_surface_as_oserror(tmp_path):
    """safetensors and torch.save report a failed write as their own errors; the checkpoint writer must
    raise the OSError (here EFBIG from a file-size limit, as ENOSPC from a full disk) and leave nothing."""
    script = tmp_path / "limit.py"
    script.write_text(WRITE_LIMIT_SCRIPT)
    p = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split("\n")[:2] == [f"model OSError {errno.EFBIG}", f"optimizer OSError {errno.EFBIG}"]
    assert os.listdir(tmp_path / "run" / "checkpoints") == []


# ---- batching ------------------------------------------------------------------------------------
def test_bucket_sampler_deterministic_sorted_and_resumable():
    lengths = [random.Random(i).randint(1, 200) for i in range(1000)]
    s = BucketSampler(lengths, batch_size=16, seed=3, bucket_size_multiplier=10)
    e0, e1 = s.batches(0), s.batches(1)
    assert e0 == BucketSampler(lengths, 16, seed=3, bucket_size_multiplier=10).batches(0)
    assert e0 != e1 and e0 != BucketSampler(lengths, 16, seed=4, bucket_size_multiplier=10).batches(0)
    assert sorted(i for b in e0 for i in b) == list(range(1000))
    assert len(s) == len(e0) == 63 and sum(len(b) < 16 for b in e0) == 1

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    rnd = list(range(1000))
    random.Random(0).shuffle(rnd)
    assert padding(e0) < padding([rnd[i:i + 16] for i in range(0, 1000, 16)]) / 5

    s.set_epoch(1, start=40)
    assert list(s) == e1[40:]
    assert list(s) == e1  # the start applies to one iteration only
    assert list(s.iter_from(0, 62)) == e0[62:]

    shards = [BucketSampler(lengths, 16, seed=3, bucket_size_multiplier=10, rank=r, world_size=3).batches(0)
              for r in range(3)]
    assert [len(x) for x in shards] == [21, 21, 21]
    assert sorted(tuple(b) for shard in shards for b in shard) == sorted(map(tuple, e0))

    for n, bs, mult, drop in [(0, 4, 2, False), (7, 4, 2, False), (7, 4, 2, True), (33, 4, 3, False),
                              (33, 4, 3, True), (24, 4, 3, False)]:
        sm = BucketSampler(list(range(n)), bs, bucket_size_multiplier=mult, drop_last=drop)
        assert len(sm) == len(sm.batches(0)), (n, bs, mult, drop)
    fixed = BucketSampler(lengths, 16, shuffle=False, bucket_size_multiplier=1).batches(5)
    assert sorted(fixed[0]) == list(range(16))


def test_pad_batch_and_collate():
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=9, side="left", pad_to_multiple_of=4)
    assert ids.tolist() == [[9, 1, 2, 3], [9, 9, 9, 4]] and mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    with pytest.raises(TrainingError, match="side"):
        pad_batch([[1]], 0, side="middle")

    b = Collator(pad_id=7)([{"input_ids": [1, 2], "labels": [3, 4], "y": 1, "id": "a"},
                            {"input_ids": [5], "labels": [6], "y": 0, "id": "b"}])
    assert b["input_ids"].tolist() == [[1, 2], [5, 7]] and b["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert b["labels"].tolist() == [[3, 4], [6, -100]] and b["y"].tolist() == [1, 0] and b["id"] == ["a", "b"]
    with pytest.raises(TrainingError, match="'y' is missing"):
        collate([{"input_ids": [1], "y": 1}, {"input_ids": [2]}])

    data = toy_data(50, 0)
    src = DatasetBatches(data, batch_size=8, seed=1)
    got = list(src.batches(2, start=3))
    assert len(src) == 7 and len(got) == 4
    assert all(g["input_ids"].shape[1] == int(g["attention_mask"].sum(1).max()) for g in got)


def test_dir_replaced_halfway_is_restored(tmp_path):
    # killed between moving best/ aside and renaming the new one into place: the old best/ comes back
    aside = tmp_path / ".tmp-old-best-x1"
    (aside / "best").mkdir(parents=True)
    (aside / "best" / "model.safetensors").write_text("old")
    (tmp_path / ".tmp-best-x2").mkdir()
    (tmp_path / ".tmp-del-step-3-x3" / "step-3").mkdir(parents=True)  # a pruned checkpoint stays deleted
    clean_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert (tmp_path / "best" / "model.safetensors").read_text() == "old"


def test_cache_dir_built_twice_at_once_keeps_the_first(tmp_path):
    # two runs train the same cached tokenizer: the second to finish finds the first's copy in place
    # (a CI failure: os.replace onto the non-empty dir raised "directory not empty" and ended the run)
    final = tmp_path / "key"
    with atomic_dir(final, keep_existing=True) as tmp:
        (tmp / "tokenizer.json").write_text("ours")
        final.mkdir()
        (final / "tokenizer.json").write_text("theirs")  # the other process finished first
    assert [p.name for p in tmp_path.iterdir()] == ["key"] and (final / "tokenizer.json").read_text() == "theirs"
    with atomic_dir(final) as tmp:  # the default replaces (checkpoints, best/)
        (tmp / "tokenizer.json").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["key"] and (final / "tokenizer.json").read_text() == "new"
