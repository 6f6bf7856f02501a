"""Training speed: lmforge vs transformers on the same rows, batches and settings, two workloads side by side.

    python benchmarks/train_speed.py [--workloads finetune,qa,finetune-q4] [--impls lmforge,transformers] [--steps N]
                                     [--minutes 12] [--warmup 2] [--threads 2] [--precision auto|fp32|bf16]
                                     [--val-rows 48] [--quick] [--out benchmarks/results/train_speed.json]

Workloads. Their settings are what the CLI builds from its own parser, defaults and task recipe for the command
shown (model, lengths, LoRA, batch size, lr, warmup, schedule, weight decay, clipping, seed); the --ft-*, --lora-*
and --qa-* flags override single ones. The run prints them, and the JSON records every one.
  finetune  `lmforge finetune --task summarize --lora` (SmolLM2-135M-Instruct: the built-in GGUF, dequantized to
            float32 on both sides) on WikiLingua rows (../shared/data/summarization/wikilingua_en_1k.jsonl, document
            -> summary, chat-template prompt; the file's tail that finetune keeps for validation is left out).
  finetune-q4  (not in the default list) the finetune workload's LoRA with the frozen base held in the Q4_1 file's
            int4 blocks (`--quantize auto`), against the same run on the float base, transformers + peft and
            transformers + peft + bitsandbytes nf4: peak RSS against the memory budget, step time, and the
            validation loss after the same steps (benchmarks/train_q4.py says how each is measured).
  qa        `lmforge qa train` (minilm-l6) on ../shared/data/qa/nyt_v1.0.json (the training side of its split by
            article), windows with the CLI's length and stride. The QA head is new on both sides and gets the same
            seeded init.

Implementations, each in its own fresh subprocess:
  lmforge       the task module's own pieces (tasks/seq2seq.py or tasks/qa.py: data, examples or windows, model,
                LoRA, collate, loss) and the Trainer, with the CLI's train settings: what `lmforge finetune` /
                `lmforge qa train` run, minus their evaluation and export. Step times come from a thin wrapper
                around the task's loss function that notes when each optimizer step starts.
  transformers  AutoModelForCausalLM (from the same GGUF) + peft LoraConfig with the same rank, alpha, dropout and
                modules, or AutoModelForQuestionAnswering (same minilm weights; dropout as lmforge's model: 0), in a
                plain PyTorch loop: the same tokenized rows (prompt masked with -100), the same batches in the same
                order (lmforge's length-bucketed sampler, same seed), torch's AdamW with the same groups, lr, betas
                and weight decay, the same lr curve (a LambdaLR over the Trainer's formula) and clipping,
                torch.autocast(bfloat16) around the forward when the precision is bf16.

Precision: --precision auto takes what `lmforge.train.precision.resolve_precision` picks for this CPU (bf16 autocast
only where the CPU has avx512_bf16 or AMX); both sides then compute in it. The table says which one and why.

Measured: `--warmup` untimed optimizer steps, then `--steps` timed ones (the same batches on both sides; by default
sized from the measured matmul peak so that the whole run takes about `--minutes`, 8 to 64 steps). A step
is everything from one step's start to the next one's: batch collation, forward, backward, clipping, AdamW and
the schedule. Quoted: samples/s and real (unpadded) tokens/s over the timed steps, the median step time, the
median of the per-step time ratios (paired: each step is the same batch on both sides), peak RSS of the worker
(loading included) and during training alone, and the first and last training loss of both sides (close, not
identical: adapter inits and kernels differ). The matmul peaks (2048^3, fp32 and bf16, same threads) are
measured in their own worker first. Target of the issue: lmforge >= 2x transformers on each workload.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    REPO_ROOT,
    RESULTS_DIR,
    format_table,
    machine_info,
    matmul_peak,
    peak_rss_mb,
    report,
    reset_peak_rss,
    run_worker,
    set_threads,
    write_json,
)

WORKLOADS = ("finetune", "qa", "finetune-q4")
DEFAULT_WORKLOADS = ("finetune", "qa")
IMPLS = ("lmforge", "transformers", "lmforge-q4", "bitsandbytes")
IMPLS_OF = {"finetune": ("lmforge", "transformers"), "qa": ("lmforge", "transformers"),
            "finetune-q4": ("lmforge-q4", "lmforge", "transformers", "bitsandbytes")}
DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DATA_FILES = {"finetune": Path("summarization") / "wikilingua_en_1k.jsonl", "qa": Path("qa") / "nyt_v1.0.json",
              "finetune-q4": Path("summarization") / "wikilingua_en_1k.jsonl"}
SEED = 42
FT_LORA_LR = 2e-4  # cmd_finetune's late default lr with --lora (3e-5 without), below any recipe's
HF_LORA_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                 "down": "down_proj"}  # our short LoRA targets -> Llama module names in transformers
# rough training FLOPs per token, for the ETA only: LoRA's backward skips weight gradients (~4N), full QA ~6N
EST_FLOPS_PER_TOKEN = {"finetune": 4 * 135e6, "qa": 6 * 11e6, "finetune-q4": 4 * 135e6}
# guessed shares of the matmul peak a training step reaches (ETA and --steps auto only; the ETA is refined with the
# pace of the workers that finished)
EST_EFFICIENCY = {"lmforge": 0.25, "transformers": 0.12, "lmforge-q4": 0.2, "bitsandbytes": 0.05}
EST_LOAD_S = 40.0  # per worker: loading, tokenizing, the final checkpoint
AUTO_STEPS = (8, 64)  # the range --steps auto picks from


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


def worker_transformers_finetune(s: dict[str, Any]) -> dict[str, Any]:
    from functools import partial

    import peft
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
    targets = [t.strip() for t in s["lora_targets"].split(",") if t.strip()]
    modules: str | list[str] = "all-linear" if "all-linear" in targets else [HF_LORA_NAMES[t] for t in targets]
    model = peft.get_peft_model(base, peft.LoraConfig(r=s["lora_rank"], lora_alpha=s["lora_alpha"],
                                                      lora_dropout=s["lora_dropout"], target_modules=modules,
                                                      task_type="CAUSAL_LM"))
    clock = plain_loop(model, rows, col, [len(e) for e in rows], lambda b: model(**b, use_cache=False).loss, s)
    return {"rows": len(rows),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            **clock.result(s["warmup_steps"])}


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


def worker_peak(seconds: float) -> dict[str, Any]:
    import torch

    return {"impl": "peak", **{f"peak_{n}": matmul_peak(dt, seconds)
                               for n, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}}


WORKERS = {("lmforge", "finetune"): worker_lmforge_finetune, ("transformers", "finetune"): worker_transformers_finetune,
           ("lmforge", "qa"): worker_lmforge_qa, ("transformers", "qa"): worker_transformers_qa}


def worker(a: argparse.Namespace) -> None:
    import torch

    set_threads(a.threads)
    if a.impl == "peak":
        report(worker_peak(a.peak_seconds))
        return
    s = json.loads(a.settings)
    t0 = time.perf_counter()
    if a.workload == "finetune-q4":
        from benchmarks.train_q4 import WORKERS as Q4_WORKERS

        res = Q4_WORKERS[(a.impl, a.workload)](s)
    else:
        res = WORKERS[(a.impl, a.workload)](s)
    report({"impl": a.impl, "workload": a.workload, "precision": s["precision"], **res,
            "wall_s": round(time.perf_counter() - t0, 1),
            "torch_threads": torch.get_num_threads()})


# ---- parent ------------------------------------------------------------------------------------------------
def step_estimate_s(s: dict[str, Any], workload: str, impl: str, peak: float) -> float:
    """A rough optimizer-step time: the step's FLOPs (full-length rows) at a guessed share of the matmul peak."""
    flops = EST_FLOPS_PER_TOKEN[workload] * s["batch_size"] * s["max_length"]
    return flops / max(peak * EST_EFFICIENCY[impl], 1e9)


def auto_steps(cfg: dict[str, dict[str, Any]], plan: Sequence[tuple[str, str]], peak: float, warmup: int,
               minutes: float) -> int:
    """Timed steps per worker so that the whole run takes about `minutes` by the estimate (within AUTO_STEPS)."""
    per_step = sum(step_estimate_s(cfg[w], w, i, peak) for w, i in plan)  # one step of every worker
    room = minutes * 60 - EST_LOAD_S * len(plan) - warmup * per_step
    return int(min(max(room / max(per_step, 1e-9), AUTO_STEPS[0]), AUTO_STEPS[1]))


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """On each lmforge row: samples/s over transformers' and the median of the paired per-step time ratios."""
    for r in rows:
        ref = next((x for x in rows if x["workload"] == r["workload"] and x["impl"] == "transformers"), None)
        if r["impl"] not in ("lmforge", "lmforge-q4") or ref is None or "samples_per_s" not in r \
                or "samples_per_s" not in ref:
            continue
        r["vs_transformers"] = r["samples_per_s"] / ref["samples_per_s"]
        w = r["warmup_steps"]
        pairs = list(zip(ref["times"][w:], r["times"][w:]))
        if pairs:
            r["paired_step_ratio"] = statistics.median(h / max(m, 1e-9) for h, m in pairs)
        if r["workload"] in DEFAULT_WORKLOADS:  # the training-speed issue's target (finetune-q4 has its own)
            r["target_met"] = r["vs_transformers"] >= 2.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                   help=f"comma list of {', '.join(WORKLOADS)} (default: {','.join(DEFAULT_WORKLOADS)})")
    p.add_argument("--impls", default=None, help=f"comma list of {', '.join(IMPLS)} (default: each workload's: "
                   + "; ".join(f"{w}: {','.join(i)}" for w, i in IMPLS_OF.items()) + ")")
    p.add_argument("--val-rows", type=int, default=48, help="finetune-q4: validation rows the final loss is taken on")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per worker (default: sized from "
                   "the measured matmul peak so that the run takes about --minutes)")
    p.add_argument("--minutes", type=float, default=12.0, help="the run time the default --steps aims at")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: what lmforge's resolve_precision picks for this CPU; both sides use it")
    p.add_argument("--quick", action="store_true",
                   help="an end-to-end check: 2 timed steps after 1, 200 rows per workload, short peak runs")
    p.add_argument("--max-rows", type=int, default=0, help="first N training rows/questions (0 = all)")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="the shared data folder")
    p.add_argument("--peak-seconds", type=float, default=2.0, help="per dtype, for the matmul peaks")
    p.add_argument("--ft-batch-size", type=int, default=None)
    p.add_argument("--ft-max-length", type=int, default=None)
    p.add_argument("--ft-max-target-length", type=int, default=None)
    p.add_argument("--ft-lr", type=float, default=None)
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--lora-dropout", type=float, default=None)
    p.add_argument("--lora-targets", default=None, help="q,k,v,o,gate,up,down or all-linear")
    p.add_argument("--qa-batch-size", type=int, default=None)
    p.add_argument("--qa-max-length", type=int, default=None)
    p.add_argument("--qa-doc-stride", type=int, default=None)
    p.add_argument("--qa-lr", type=float, default=None)
    p.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/train_speed.json; "
                   "with --quick a file in the temp folder, so a check never replaces real results)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    p.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    if a.quick:
        a.steps, a.warmup, a.peak_seconds, a.max_rows = 2, 1, 0.3, a.max_rows or 200
        a.val_rows = min(a.val_rows, 8)
    out = a.out or str(Path(tempfile.gettempdir()) / "train_speed_quick.json" if a.quick
                       else RESULTS_DIR / "train_speed.json")
    workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    impls = [i.strip() for i in a.impls.split(",") if i.strip()] if a.impls else list(IMPLS)
    bad = [w for w in workloads if w not in WORKLOADS] + [i for i in impls if i not in IMPLS]
    if bad:
        p.error(f"unknown workload or implementation {bad} (workloads: {', '.join(WORKLOADS)}; "
                f"impls: {', '.join(IMPLS)})")
    if (a.steps is not None and a.steps < 1) or a.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    missing = [str(a.data_dir / DATA_FILES[w]) for w in workloads if not (a.data_dir / DATA_FILES[w]).is_file()]
    if missing:
        print(f"train_speed: missing data {', '.join(missing)} (the benchmark reads ../shared/data next to the "
              "repository; pass --data-dir)", file=sys.stderr)
        return 2

    import torch

    from lmforge.train.precision import cpu_has_native_bf16, resolve_precision

    prec = resolve_precision(a.precision, torch.device("cpu"))
    me = str(Path(__file__).resolve())
    t_start = time.perf_counter()
    print(f"{prec.describe()}; measuring the matmul peaks ...", file=sys.stderr, flush=True)
    peak = run_worker([me, "--worker", "--impl", "peak", "--threads", str(a.threads), "--peak-seconds",
                       str(a.peak_seconds)], a.threads, timeout=600)
    peak_now = peak.get(f"peak_{prec.name}", 0.0)
    plan = [(w, i) for w in workloads for i in impls if i in IMPLS_OF[w]]
    if not plan:
        p.error(f"no implementation of {', '.join(workloads)} among {', '.join(impls)}")
    steps_auto = a.steps is None
    if steps_auto:
        a.steps = 1  # a placeholder: the step count does not enter the per-step estimate
        a.steps = auto_steps(settings(a, prec.name), plan, peak_now, a.warmup, a.minutes)
        print(f"--steps {a.steps} (sized for about {a.minutes:g} min from the {prec.name} matmul peak "
              f"{peak_now / 1e9:.0f} GFLOP/s)", file=sys.stderr, flush=True)
    cfg = settings(a, prec.name)
    est = {(w, i): EST_LOAD_S + (a.warmup + a.steps) * step_estimate_s(cfg[w], w, i, peak_now) for w, i in plan}
    scale, done_est, done_real = 1.0, 0.0, 0.0
    rows: list[dict[str, Any]] = []
    for k, (w, impl) in enumerate(plan):
        left = scale * sum(est[x] for x in plan[k:])
        print(f"running {impl} on {w} ({k + 1}/{len(plan)}); about {left / 60:.1f} min left", file=sys.stderr,
              flush=True)
        t0 = time.perf_counter()
        r = run_worker([me, "--worker", "--impl", impl, "--workload", w, "--threads", str(a.threads),
                        "--settings", json.dumps(cfg[w])], a.threads, timeout=3600)
        done_est, done_real = done_est + est[(w, impl)], done_real + time.perf_counter() - t0
        scale = done_real / done_est  # the machine's pace so far
        r = {"workload": w, "impl": impl, "precision": prec.name, "warmup_steps": a.warmup, **r}
        if "error" in r:
            print(f"  {impl} on {w} failed: {r['error']}", file=sys.stderr, flush=True)
        rows.append(r)
    add_ratios(rows)

    info = machine_info()
    flags = [f for f in ("avx512_bf16", "amx_bf16") if f in info.get("simd", [])] or ["none"]
    gf = {n: peak[f"peak_{n}"] / 1e9 for n in ("fp32", "bf16") if f"peak_{n}" in peak}
    print(f"\n{describe(cfg)}")
    print(f"precision {prec.name} ({prec.reason}); CPU bf16 flags: {', '.join(flags)} "
          f"(native: {cpu_has_native_bf16() or 'no'}); matmul peak "
          + ", ".join(f"{n} {v:.0f} GFLOP/s" for n, v in gf.items())
          + f"; {a.threads} threads; {a.warmup} warm-up + {a.steps} timed steps\n")
    cols = [("workload", "workload"), ("impl", "impl"), ("precision", "precision"), ("steps", "timed steps"),
            ("step_s", "median step s"), ("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s"),
            ("vs_transformers", "vs transformers"), ("paired_step_ratio", "paired step ratio"),
            ("peak_mb", "peak MB"), ("train_peak_mb", "train peak MB"), ("first_loss", "first loss"),
            ("final_loss", "final loss"), ("val_loss", "val loss"), ("used_mb", "MB over start"),
            ("budget_mb", "budget MB"), ("error", "error")]
    print(format_table(rows, cols))
    if "finetune-q4" in workloads:
        from benchmarks.train_q4 import summarize_q4

        for line in summarize_q4(rows):
            print(line)
    for r in rows:
        if "target_met" in r:
            print(f"{r['workload']}: lmforge {r['vs_transformers']:.2f}x transformers "
                  f"(target >= 2x: {'met' if r['target_met'] else 'not met'})")
    payload = {"benchmark": "train_speed", "target": "lmforge >= 2x transformers samples/s on each workload",
               "precision": prec.name, "precision_reason": prec.reason, "cpu_bf16_flags": flags,
               "peak_flops": {n: peak.get(f"peak_{n}") for n in ("fp32", "bf16")}, "peak_error": peak.get("error"),
               "threads": a.threads, "steps": a.steps, "steps_auto": steps_auto, "warmup": a.warmup,
               "settings": cfg, "results": rows,
               "machine": info, "wall_s": round(time.perf_counter() - t_start, 1),
               "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"\nwrote {write_json(out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
