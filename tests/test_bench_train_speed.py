"""benchmarks/train_speed.py's and train_workloads.py's parts that decide fairness: both sides get the same batches,
targets and updates.

No real model or ../shared data here: the end-to-end check is `python benchmarks/train_speed.py --quick
--threads 1`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.train_speed import add_ratios, build_parser, main
from benchmarks.train_workloads import (
    StepClock,
    batch_order,
    hf_causal_collate,
    plain_loop,
    run_trainer,
    seed_qa_head,
    settings,
    train_config,
)
from lmforge.model.heads import IGNORE
from lmforge.tasks.seq2seq import Seq2SeqExample, collate
from lmforge.train.batching import DatasetBatches


def _loop_settings(**kw) -> dict:
    s = {"weight_decay": 0.01, "adam_betas": [0.9, 0.999], "adam_eps": 1e-8, "schedule": "linear",
         "max_grad_norm": 1.0, "min_lr_ratio": 0.1, "bucket_size_multiplier": 2, "seed": 3, "precision": "fp32",
         "steps": 4, "warmup_steps": 2, "batch_size": 3, "lr": 0.05, "lr_warmup": 0.2}
    return {**s, **kw}


def test_batch_order_is_the_trainers_across_epochs():
    lengths = [5, 9, 2, 7, 7, 1, 3, 8, 4, 6, 2]
    s = _loop_settings()
    src = DatasetBatches(list(range(len(lengths))), s["batch_size"], collate_fn=list, lengths=lengths,
                         seed=s["seed"], bucket_size_multiplier=s["bucket_size_multiplier"])
    trainer_batches = list(src.batches(0)) + list(src.batches(1))
    assert batch_order(lengths, s, len(trainer_batches)) == trainer_batches
    assert len(src) < len(trainer_batches)  # the order runs on into a second epoch, as the Trainer does


def test_hf_collate_scores_the_same_targets_as_lmforge():
    exs = [Seq2SeqExample([5, 6, 7, 8, 9], [IGNORE, IGNORE, 7, 8, 9]), Seq2SeqExample([1, 2, 3], [IGNORE, 2, 3])]
    ours, theirs = collate(exs, pad_id=0), hf_causal_collate(exs, pad_id=0)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    # transformers scores logits[:, t] against labels[:, t + 1]; lmforge against its labels[:, t]
    assert torch.equal(theirs["labels"][:, 1:], ours["labels"][:, :-1])
    assert (ours["labels"][:, -1] == IGNORE).all()
    assert theirs["labels"].tolist() == [[IGNORE, IGNORE, 7, 8, 9], [IGNORE, 2, 3, IGNORE, IGNORE]]


def test_qa_head_init_is_seeded():
    a, b, c = nn.Linear(8, 2), nn.Linear(8, 2), nn.Linear(8, 2)
    seed_qa_head(a, 1)
    seed_qa_head(b, 1)
    seed_qa_head(c, 2)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    assert (a.bias == 0).all() and 0.005 < a.weight.std() < 0.05


def test_clock_times_steps_after_warmup():
    clock = StepClock()
    clock.marks = [0.0, 5.0, 7.0, 10.0, 11.0]  # 4 steps: 5, 2, 3, 1 s
    clock.samples, clock.tokens, clock.losses = [4, 4, 4, 2], [100, 80, 60, 20], [3.0, 2.5, 2.0, 1.5]
    r = clock.result(warmup=1)
    assert r["steps"] == 3 and r["step_s"] == 2.0
    assert r["samples_per_s"] == pytest.approx(10 / 6) and r["tokens_per_s"] == pytest.approx(160 / 6)
    assert (r["first_loss"], r["final_loss"]) == (3.0, 1.5)
    with pytest.raises(RuntimeError, match="no timed steps"):
        clock.result(warmup=4)


def test_ratios_on_lmforge_rows_only():
    rows = [{"workload": "qa", "impl": "lmforge", "samples_per_s": 6.0, "times": [9, 1.0, 2.0, 1.0],
             "warmup_steps": 1},
            {"workload": "qa", "impl": "transformers", "samples_per_s": 2.0, "times": [9, 3.0, 2.0, 4.0],
             "warmup_steps": 1},
            {"workload": "finetune", "impl": "lmforge", "samples_per_s": 1.0, "times": [1.0], "warmup_steps": 0},
            {"workload": "finetune", "impl": "transformers", "error": "boom"}]
    add_ratios(rows)
    assert rows[0]["vs_transformers"] == 3.0 and rows[0]["paired_step_ratio"] == 3.0 and rows[0]["target_met"]
    assert "vs_transformers" not in rows[1] and "vs_transformers" not in rows[2]


class _Stop(Exception):
    pass


def test_settings_are_what_the_cli_trains_with(tmp_path, monkeypatch):
    """The benchmark's settings equal the configs `lmforge finetune --task summarize --lora` and `lmforge qa train`
    hand to their task functions (caught here before any data or model is loaded)."""
    import lmforge.tasks.qa as qa_task
    import lmforge.tasks.seq2seq as ft_task
    from benchmarks.train_workloads import DATA_FILES, FT_ARGV, QA_ARGV
    from lmforge.cli import build_parser as cli_parser

    seen = {}

    def grab(name):
        def fn(c, tc, resume=False, log=print):
            seen[name] = (c, tc)
            raise _Stop
        return fn

    monkeypatch.setattr(ft_task, "finetune", grab("finetune"))
    monkeypatch.setattr(qa_task, "train", grab("qa"))
    for name, argv in (("finetune", FT_ARGV), ("qa", QA_ARGV)):
        a = cli_parser().parse_args([*argv, "--data", str(tmp_path / DATA_FILES[name]), "--output",
                                     str(tmp_path / f"run-{name}")])
        with pytest.raises(_Stop):
            a.func(a)
    s = settings(build_parser().parse_args(["--data-dir", str(tmp_path), "--steps", "3"]), "fp32")
    for name in ("finetune", "qa"):
        c, tc = seen[name]
        ours = train_config(s[name], tc.output_dir)
        for f in ("batch_size", "lr", "warmup", "weight_decay", "adam_betas", "adam_eps", "schedule", "min_lr_ratio",
                  "max_grad_norm", "bucket_size_multiplier", "seed", "grad_accum"):
            assert getattr(ours, f) == getattr(tc, f), (name, f)
        for f in ("model", "max_length") + (("doc_stride", "max_question_length", "eval_fraction") if name == "qa"
                                             else ("task", "max_target_length", "lora_rank", "lora_alpha",
                                                   "lora_dropout", "lora_targets", "input_field", "target_field")):
            assert s[name][f] == getattr(c, f), (name, f)
        assert s[name]["data"] == c.data
    c, _ = seen["finetune"]
    assert c.lora and c.task == "summarize" and (c.input_field, c.target_field) == ("document", "summary")


def test_flags_override_single_settings(tmp_path):
    base = settings(build_parser().parse_args(["--data-dir", str(tmp_path)]), "fp32")
    a = build_parser().parse_args(["--data-dir", str(tmp_path), "--ft-batch-size", "2", "--lora-targets",
                                   "all-linear", "--qa-lr", "1e-3", "--ft-max-length", "300"])
    s = settings(a, "bf16")
    assert (s["finetune"]["batch_size"], s["finetune"]["lora_targets"], s["qa"]["lr"]) == (2, "all-linear", 1e-3)
    assert s["finetune"]["max_length"] == 300 and s["finetune"]["precision"] == s["qa"]["precision"] == "bf16"
    assert s["qa"]["batch_size"] == base["qa"]["batch_size"] and s["finetune"]["lr"] == base["finetune"]["lr"]


def test_missing_data_is_one_line(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path), "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing data" in err and str(tmp_path) in err


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids)).squeeze(-1)  # (B, T)


def _loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    mask = batch["attention_mask"].float()  # (B, T)
    y = model(batch["input_ids"])  # (B, T)
    return ((y - 1.0) ** 2 * mask).sum() / mask.sum(), int(mask.shape[0])


def test_plain_loop_matches_the_trainer_step_for_step(tmp_path, one_thread):
    """Same rows, batches, optimizer groups, schedule and clipping: the two loops train the same weights."""
    rows = [{"input_ids": list(range(i % 7, i % 7 + 2 + i % 5))} for i in range(13)]
    lengths = [len(r["input_ids"]) for r in rows]
    s = _loop_settings()
    from lmforge.train.batching import collate as pad_collate

    a, b = _Tiny(), _Tiny()
    ours = run_trainer(a, train_config(s, str(tmp_path / "run")), rows, _loss, pad_collate, lengths)
    theirs = plain_loop(b, rows, pad_collate, lengths, lambda batch: _loss(b, batch)[0], s)
    n = s["warmup_steps"] + s["steps"]
    assert len(ours.marks) == len(theirs.marks) == n + 1
    assert ours.samples == theirs.samples and ours.tokens == theirs.tokens
    assert ours.losses == pytest.approx(theirs.losses, rel=1e-5)
    assert ours.losses[-1] < ours.losses[0]  # it trained
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_auto_steps_fit_the_budget_and_stay_in_range(tmp_path):
    from benchmarks.train_speed import AUTO_STEPS, auto_steps

    a = build_parser().parse_args(["--data-dir", str(tmp_path), "--steps", "1"])
    cfg = settings(a, "bf16")
    plan = [("finetune", "lmforge"), ("finetune", "transformers"), ("qa", "lmforge"), ("qa", "transformers")]
    slow, fast = auto_steps(cfg, plan, 1e11, 2, 12), auto_steps(cfg, plan, 2e12, 2, 12)
    assert slow == AUTO_STEPS[0] < fast <= AUTO_STEPS[1]
    assert auto_steps(cfg, plan, 2e12, 2, 20) >= fast and auto_steps(cfg, plan, 1e15, 2, 12) == AUTO_STEPS[1]
