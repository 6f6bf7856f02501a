"""benchmarks/train_speed.py's workloads: the settings both sides train with (what the CLI builds), the same rows
and batches for both, the two training loops with their step clock, and the worker of each (implementation,
workload): what runs inside a worker process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import peak_rss_mb, reset_peak_rss

DATA_FILES = {"finetune": Path("summarization") / "wikilingua_en_1k.jsonl", "qa": Path("qa") / "nyt_v1.0.json",
              "finetune-q4": Path("summarization") / "wikilingua_en_1k.jsonl"}
FT_LORA_LR = 2e-4  # cmd_finetune's late default lr with --lora (3e-5 without), below any recipe's
HF_LORA_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                 "down": "down_proj"}  # our short LoRA targets -> Llama module names in transformers


# ---- settings ----------------------------------------------------------------------------------------------
FT_ARGV = ["finetune", "--task", "summarize", "--lora", "--input-field", "document", "--target-field", "summary"]
QA_ARGV = ["qa", "train"]


def cli_configs(ft_data: str, qa_data: str) -> dict[str, tuple[Any, Any]]:
    """(task config, TrainConfig) that `lmforge finetune --task summarize --lora` and `lmforge qa train` build from
    their flags: lmforge's own parser and defaults, the task's recipe where the CLI has one, the late defaults."""
    from lmforge.cli import build_parser
    from lmforge.cli import qa as cli_qa
    from lmforge.cli import seq2seq as cli_ft
    from lmforge.cli.common import pick, train_config
    from lmforge.tasks.qa import QAConfig
    from lmforge.tasks.seq2seq import FinetuneConfig

    parser = build_parser()
    a = parser.parse_args([*FT_ARGV, "--data", ft_data])
    recipe = cli_ft.apply_recipe(a) if hasattr(cli_ft, "apply_recipe") else {}  # per-task recipes, where they exist
    ft = FinetuneConfig(**pick(a, cli_ft.FINETUNE_FLAGS))
    ft_tc = train_config(a, ".", {"lr": FT_LORA_LR, **recipe})  # cmd_finetune's late defaults
    a = parser.parse_args([*QA_ARGV, "--data", qa_data])
    return {"finetune": (ft, ft_tc), "qa": (QAConfig(**pick(a, cli_qa.QA_FLAGS)), train_config(a, "."))}


def settings(a: argparse.Namespace, precision: str) -> dict[str, dict[str, Any]]:
    """Per workload: every knob both sides use: the CLI's (cli_configs) unless a flag of this script overrides it."""
    data = {w: str(a.data_dir / f) for w, f in DATA_FILES.items()}
    cli = cli_configs(data["finetune"], data["qa"])

    def over(flag: Any, default: Any) -> Any:
        return default if flag is None else flag

    def loop(tc, batch_size: int | None, lr: float | None) -> dict[str, Any]:
        return {"batch_size": over(batch_size, tc.batch_size), "lr": over(lr, tc.lr), "lr_warmup": tc.warmup,
                "weight_decay": tc.weight_decay, "adam_betas": list(tc.adam_betas), "adam_eps": tc.adam_eps,
                "schedule": tc.schedule, "min_lr_ratio": tc.min_lr_ratio, "max_grad_norm": tc.max_grad_norm,
                "bucket_size_multiplier": tc.bucket_size_multiplier, "seed": tc.seed, "precision": precision,
                "steps": a.steps, "warmup_steps": a.warmup, "threads": a.threads, "max_rows": a.max_rows or None}

    (ft, ft_tc), (qa, qa_tc) = cli["finetune"], cli["qa"]
    out = {
        "finetune": {"model": ft.model, "data": data["finetune"], "task": ft.task, "input_field": ft.input_field,
                     "target_field": ft.target_field, "sentences": getattr(ft, "sentences", None),
                     "eval_fraction": ft.eval_fraction, "max_length": over(a.ft_max_length, ft.max_length),
                     "max_target_length": over(a.ft_max_target_length, ft.max_target_length),
                     "lora_rank": over(a.lora_rank, ft.lora_rank), "lora_alpha": over(a.lora_alpha, ft.lora_alpha),
                     "lora_dropout": over(a.lora_dropout, ft.lora_dropout),
                     "lora_targets": over(a.lora_targets, ft.lora_targets),
                     **loop(ft_tc, a.ft_batch_size, a.ft_lr)},
        "qa": {"model": qa.model, "data": data["qa"], "eval_fraction": qa.eval_fraction,
               "max_length": over(a.qa_max_length, qa.max_length), "doc_stride": over(a.qa_doc_stride, qa.doc_stride),
               "max_question_length": qa.max_question_length, **loop(qa_tc, a.qa_batch_size, a.qa_lr)},
    }
    out["finetune-q4"] = {**out["finetune"], "data": data["finetune-q4"], "val_rows": a.val_rows}
    return out


def describe(cfg: dict[str, dict[str, Any]]) -> str:
    """One line per workload with the settings that shape a step."""
    out = []
    for w, s in cfg.items():
        head = f"{w}: {s['model']}, batch {s['batch_size']}, lr {s['lr']:g}, max length {s['max_length']}"
        if w in ("finetune", "finetune-q4"):
            head += (f", max target {s['max_target_length']}, LoRA r{s['lora_rank']} alpha {s['lora_alpha']:g} "
                     f"dropout {s['lora_dropout']:g} on {s['lora_targets']}")
        else:
            head += f", stride {s['doc_stride']}, full fine-tuning"
        out.append(head + f"; {s['data']}")
    return "\n".join(out)


def train_config(s: dict[str, Any], output_dir: str):
    """The lmforge side's TrainConfig: the workload's settings, no eval, no plots, no progress bar."""
    from lmforge.train import TrainConfig

    return TrainConfig(output_dir=output_dir, max_steps=s["warmup_steps"] + s["steps"], batch_size=s["batch_size"],
                       lr=s["lr"], warmup=s["lr_warmup"], weight_decay=s["weight_decay"],
                       adam_betas=tuple(s["adam_betas"]), adam_eps=s["adam_eps"], schedule=s["schedule"],
                       min_lr_ratio=s["min_lr_ratio"], max_grad_norm=s["max_grad_norm"],
                       bucket_size_multiplier=s["bucket_size_multiplier"],
                       seed=s["seed"], precision=s["precision"], progress=False, plot=False)


# ---- data (the same rows for both sides) ---------------------------------------------------------------------
def finetune_examples(s: dict[str, Any], tok) -> list:
    """What `finetune` trains on: the file minus its last eval_fraction, as prompt + target token ids."""
    from lmforge.data.squad import read_jsonl_pairs
    from lmforge.tasks.seq2seq import build_example, task_prompt

    pairs = read_jsonl_pairs(s["data"], s["input_field"], s["target_field"], skip_empty=True)
    pairs = pairs[: -max(1, int(len(pairs) * s["eval_fraction"]))]
    if s["max_rows"]:
        pairs = pairs[: s["max_rows"]]
    budget = {"sentences": s["sentences"]} if s.get("sentences") else {}  # the summarize prompt's, when set
    return [build_example(tok, task_prompt(s["task"], x, **budget), y, s["max_length"], s["max_target_length"])
            for x, y in pairs]


def qa_features(s: dict[str, Any], tok) -> list[dict[str, Any]]:
    """What `qa train` trains on: windows of the training questions whose answer is where the file says."""
    from lmforge.tasks.qa import QAConfig, load_data, make_features

    c = QAConfig(model=s["model"], data=s["data"], eval_fraction=s["eval_fraction"], max_length=s["max_length"],
                 doc_stride=s["doc_stride"], max_question_length=s["max_question_length"],
                 max_train_samples=s["max_rows"])
    train, _, _ = load_data(c, seed=s["seed"])
    feats = make_features(tok, train, max_length=c.max_length, doc_stride=c.doc_stride,
                          max_question_length=c.max_question_length)
    return [f for f in feats if f["start"] >= 0]


def seed_qa_head(linear, seed: int) -> None:
    """The new span head, identical on both sides: normal(0, 0.02) weights from a seeded generator, zero bias."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * 0.02)  # (2, D)
        linear.bias.zero_()


def batch_order(lengths: Sequence[int], s: dict[str, Any], n: int) -> list[list[int]]:
    """The first n batches (row indices) the Trainer takes: lmforge's bucket sampler, same seed, epoch by epoch."""
    from lmforge.train.batching import BucketSampler

    sampler = BucketSampler(lengths, s["batch_size"], seed=s["seed"],
                            bucket_size_multiplier=s["bucket_size_multiplier"])
    out: list[list[int]] = []
    epoch = 0
    while len(out) < n:
        out += sampler.batches(epoch)
        epoch += 1
    return out[:n]


# ---- timing ------------------------------------------------------------------------------------------------
class StepClock:
    """The start time of each optimizer step and the end of the last, with each step's rows, tokens and loss."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.samples: list[int] = []
        self.tokens: list[int] = []
        self.losses: list[float] = []
        self.load_peak_mb = self.train_peak_mb = 0.0
        self.peak_reset = False

    def begin(self) -> None:
        """Before the first step: keep the loading peak, then restart the high-water mark for training's own."""
        self.load_peak_mb = peak_rss_mb()
        self.peak_reset = reset_peak_rss()

    def start(self, batch: dict[str, Any], t0: float | None = None) -> None:
        self.marks.append(time.perf_counter() if t0 is None else t0)
        mask = batch["attention_mask"]  # (B, T), 1 on real tokens
        self.samples.append(int(mask.shape[0]))
        self.tokens.append(int(mask.sum()))

    def stop(self) -> None:
        if len(self.marks) == len(self.samples):  # once: the end of the last step
            self.marks.append(time.perf_counter())
            self.train_peak_mb = peak_rss_mb()

    def result(self, warmup: int) -> dict[str, Any]:
        steps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        timed = steps[warmup:]
        if not timed:
            raise RuntimeError(f"no timed steps: {len(steps)} steps ran, {warmup} of them warm-up")
        t, n, k = sum(timed), sum(self.samples[warmup:]), sum(self.tokens[warmup:])
        return {"steps": len(timed), "step_s": statistics.median(timed), "samples_per_s": n / t,
                "tokens_per_s": k / t, "tokens_per_step": k / len(timed), "times": [round(x, 4) for x in steps],
                "losses": [round(x, 5) for x in self.losses], "first_loss": self.losses[0],
                "final_loss": self.losses[-1], "load_peak_mb": round(self.load_peak_mb),
                "train_peak_mb": round(self.train_peak_mb), "peak_reset": self.peak_reset,
                "peak_mb": round(max(self.load_peak_mb, self.train_peak_mb))}


def timed_loss(loss_fn: Callable, clock: StepClock) -> Callable:
    """The task's loss_fn, noting each call's start (one call per optimizer step: grad_accum is 1) and its loss."""
    def fn(model, batch):
        clock.start(batch)
        loss, n = loss_fn(model, batch)
        clock.losses.append(float(loss.detach()))
        return loss, n
    return fn


def run_trainer(model, tc, rows: Sequence[Any], loss_fn: Callable, collate_fn: Callable, lengths: Sequence[int],
                find_unused_parameters: bool = False) -> StepClock:
    """lmforge's Trainer over rows; the export it calls after the last step (save_model_fn) ends the clock."""
    from lmforge.train import Trainer

    clock = StepClock()
    trainer = Trainer(model, tc, rows, timed_loss(loss_fn, clock), save_model_fn=lambda *_: clock.stop(),
                      collate_fn=collate_fn, lengths=lengths, find_unused_parameters=find_unused_parameters)
    clock.begin()
    trainer.train()
    clock.stop()
    return clock


def plain_loop(model, rows: Sequence[Any], collate_fn: Callable, lengths: Sequence[int],
               loss_of: Callable[[dict[str, Any]], Any], s: dict[str, Any]) -> StepClock:
    """The transformers side: a plain PyTorch loop over the Trainer's batches, with its optimizer settings."""
    import torch

    from lmforge.train.optim import lr_factor, param_groups, warmup_steps

    total = s["warmup_steps"] + s["steps"]
    opt = torch.optim.AdamW(param_groups(model, s["weight_decay"]), lr=s["lr"], betas=tuple(s["adam_betas"]),
                            eps=s["adam_eps"])
    # the Trainer's lr curve; transformers' get_scheduler would start the warmup at lr 0, one step behind it
    w = warmup_steps(train_config(s, "."), total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, s["schedule"], w, total, s["min_lr_ratio"]))
    params = [p for g in opt.param_groups for p in g["params"]]
    bf16 = s["precision"] == "bf16"
    clock = StepClock()
    model.train()
    clock.begin()
    for idx in batch_order(lengths, s, total):
        t0 = time.perf_counter()  # the step starts before its batch is collated
        batch = collate_fn([rows[i] for i in idx])
        clock.start(batch, t0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(batch)
        clock.losses.append(float(loss.detach()))
        loss.backward()
        if s["max_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(params, s["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    clock.stop()
    return clock


# ---- workers -----------------------------------------------------------------------------------------------
def worker_lmforge_finetune(s: dict[str, Any]) -> dict[str, Any]:
    from functools import partial

    from lmforge.checkpoints import load_checkpoint
    from lmforge.model.heads import lm_loss
    from lmforge.tasks.common import apply_lora
    from lmforge.tasks.seq2seq import FinetuneConfig, collate
    from lmforge.train import seed_everything

    c = FinetuneConfig(model=s["model"], task=s["task"], data=s["data"], max_length=s["max_length"],
                       max_target_length=s["max_target_length"], lora=True, lora_rank=s["lora_rank"],
                       lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"], lora_targets=s["lora_targets"])
    seed_everything(s["seed"])
    ck = load_checkpoint(c.model)
    tok, model = ck.tokenizer, ck.model.train()
    adapted = apply_lora(model, c)
    rows = finetune_examples(s, tok)
    col = partial(collate, pad_id=tok.pad_id if tok.pad_id is not None else 0)
    with tempfile.TemporaryDirectory(prefix="train_speed-") as d:
        clock = run_trainer(model, train_config(s, d), rows, lm_loss, col, [len(e) for e in rows])
    return {"rows": len(rows), "adapted_modules": len(adapted),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            **clock.result(s["warmup_steps"])}


def hf_causal_collate(examples: Sequence[Any], pad_id: int) -> dict[str, Any]:
    """transformers' side of seq2seq.collate: the same right padding, but labels unshifted (the model shifts them
    itself), -100 on the prompt and the padding."""
    import torch

    from lmforge.model.heads import IGNORE
    from lmforge.train.batching import pad_batch

    ids, mask = pad_batch([e.input_ids for e in examples], pad_id)  # (B, T) each
    labels = torch.full_like(ids, IGNORE)  # (B, T)
    for i, e in enumerate(examples):
        labels[i, : len(e)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hf_finetune_base(s: dict[str, Any]):
    """transformers' float32 model of the finetune workload's GGUF file, its rows and collate: (base, rows, col)."""
    from functools import partial

    import torch
    import transformers

    from lmforge.checkpoints.registry import resolve
    from lmforge.tokenizer import Tokenizer

    path = resolve(s["model"])[0]
    tok = Tokenizer.from_pretrained(path)
    rows = finetune_examples(s, tok)
    col = partial(hf_causal_collate, pad_id=tok.pad_id if tok.pad_id is not None else 0)
    torch.manual_seed(s["seed"])
    base = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    base.config.use_cache = False
    return base, rows, col


def hf_lora_steps(s: dict[str, Any], base, rows, col) -> dict[str, Any]:
    """peft's LoRA over `base` with the workload's settings, trained by plain_loop: rows, trainable params, clock."""
    import peft

    targets = [t.strip() for t in s["lora_targets"].split(",") if t.strip()]
    modules: str | list[str] = "all-linear" if "all-linear" in targets else [HF_LORA_NAMES[t] for t in targets]
    model = peft.get_peft_model(base, peft.LoraConfig(r=s["lora_rank"], lora_alpha=s["lora_alpha"],
                                                      lora_dropout=s["lora_dropout"], target_modules=modules,
                                                      task_type="CAUSAL_LM"))
    clock = plain_loop(model, rows, col, [len(e) for e in rows], lambda b: model(**b, use_cache=False).loss, s)
    return {"rows": len(rows),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            **clock.result(s["warmup_steps"])}


def worker_transformers_finetune(s: dict[str, Any]) -> dict[str, Any]:
    return hf_lora_steps(s, *hf_finetune_base(s))


def worker_lmforge_qa(s: dict[str, Any]) -> dict[str, Any]:
    from lmforge.tasks.qa import QAConfig, build_model, make_collate, span_loss
    from lmforge.train import seed_everything

    seed_everything(s["seed"])
    model, tok = build_model(QAConfig(model=s["model"], max_length=s["max_length"]))
    seed_qa_head(model.qa_outputs, s["seed"])
    rows = qa_features(s, tok)
    with tempfile.TemporaryDirectory(prefix="train_speed-") as d:
        clock = run_trainer(model, train_config(s, d), rows, span_loss, make_collate(tok.pad_id),
                            [len(f["input_ids"]) for f in rows], find_unused_parameters=True)  # as qa.train
    return {"rows": len(rows), "dropout": model.backbone.cfg.dropout,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            **clock.result(s["warmup_steps"])}


def worker_transformers_qa(s: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    from lmforge.checkpoints.registry import resolve
    from lmforge.config import ModelConfig
    from lmforge.tasks.qa import make_collate
    from lmforge.tokenizer import Tokenizer

    path = resolve(s["model"])[0]
    tok = Tokenizer.from_pretrained(path)
    rows = qa_features(s, tok)
    # the dropout lmforge's model trains with (ModelConfig.from_hf reads none from the file: 0.0)
    dropout = ModelConfig.from_hf(json.loads((path / "config.json").read_text())).dropout
    torch.manual_seed(s["seed"])
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(
        path, dtype=torch.float32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    seed_qa_head(model.qa_outputs, s["seed"])
    clock = plain_loop(model, rows, make_collate(tok.pad_id), [len(f["input_ids"]) for f in rows],
                       lambda b: model(**b).loss, s)
    return {"rows": len(rows), "dropout": dropout,
            "attn_implementation": model.config._attn_implementation,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            **clock.result(s["warmup_steps"])}



WORKERS = {("lmforge", "finetune"): worker_lmforge_finetune, ("transformers", "finetune"): worker_transformers_finetune,
           ("lmforge", "qa"): worker_lmforge_qa, ("transformers", "qa"): worker_transformers_qa}
