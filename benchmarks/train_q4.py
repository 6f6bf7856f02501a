"""The `finetune-q4` workload of benchmarks/train_speed.py: LoRA on SmolLM2's Q4_1 file with the frozen base held in
the file's own int4 blocks (QLoRA's idea; `lmforge finetune --lora --quantize auto`), against the same LoRA on the
float base (the same file dequantized to float32: the same weight values), transformers + peft (float32, the same
GGUF) and transformers + peft over a bitsandbytes 4-bit (nf4) base where bitsandbytes runs on this CPU (its block
linears swapped for Linear4bit after loading: transformers refuses a quantization_config with a GGUF file).

Every side trains the same rows in the same batches (lmforge's bucket sampler, same seed) for the same steps, with
the settings of `lmforge finetune --task summarize --lora` (train_speed's finetune workload). Quoted beside
train_speed's step times, peaks and losses:
- val loss: the model's loss on the first --val-rows rows of the validation tail finetune keeps (the file's last
  5%), after training; the issue's target: the int4 base's within 2% of the float base's;
- the memory budget: quantized weights (bytes of every tensor of the loaded base) + adapters x 4 (weights,
  gradients, AdamW's two moments) + activations (bytes autograd saves in the forward of the longest timed batch,
  measured with saved-tensor hooks), against the peak RSS less the process's RSS before loading (the interpreter,
  torch, the libraries); the target: at most 1.25x the budget.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

from benchmarks.common import peak_rss_mb, rss_mb
from benchmarks.train_speed import (
    batch_order,
    finetune_examples,
    run_trainer,
    train_config,
)

IMPLS = ("lmforge-q4", "lmforge", "transformers", "bitsandbytes")
BUDGET_SLACK = 1.25  # the target: peak RSS <= (weights + adapters + optimizer + activations) x 1.25
VAL_LOSS_TOLERANCE = 0.02  # the target: the int4 base's validation loss within 2% of the float base's


def validation_examples(s: dict[str, Any], tok) -> list:
    """The first val_rows rows of the validation tail `finetune` splits off (the file's last eval_fraction)."""
    from lmforge.data.squad import read_jsonl_pairs
    from lmforge.tasks.seq2seq import build_example, task_prompt

    pairs = read_jsonl_pairs(s["data"], s["input_field"], s["target_field"], skip_empty=True)
    tail = pairs[-max(1, int(len(pairs) * s["eval_fraction"])):][: s["val_rows"]]
    budget = {"sentences": s["sentences"]} if s.get("sentences") else {}
    return [build_example(tok, task_prompt(s["task"], x, **budget), y, s["max_length"], s["max_target_length"])
            for x, y in tail]


def state_bytes(model) -> int:
    """Bytes of every parameter and buffer of the model, each storage counted once (tied tensors share one)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def saved_activation_bytes(model, loss_fn, batch: dict[str, Any]) -> int:
    """Bytes autograd keeps for the backward after one forward of `batch` (each storage once): the activations."""
    import torch

    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:  # a weight saved for the backward is the model's, not an activation
            seen[st.data_ptr()] = st.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = loss_fn(model, batch)
    del loss
    return sum(seen.values())


def longest_batch(rows: Sequence[Any], s: dict[str, Any], collate) -> dict[str, Any]:
    """The timed batch with the most padded tokens (rows x longest row): the largest activations of the run."""
    order = batch_order([len(e) for e in rows], s, s["warmup_steps"] + s["steps"])[s["warmup_steps"]:]
    idx = max(order, key=lambda b: len(b) * max(len(rows[i]) for i in b))
    return collate([rows[i] for i in idx])


def val_loss(model, rows: Sequence[Any], collate, loss_fn) -> float:
    """Mean target-token loss over rows, 8 at a time, length-sorted (as finetune's eval)."""
    import torch

    model.eval()
    tot, n = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    with torch.no_grad():
        for k in range(0, len(order), 8):
            loss, cnt = loss_fn(model, collate([rows[i] for i in order[k: k + 8]]))
            tot, n = tot + float(loss) * float(cnt), n + float(cnt)
    return tot / max(n, 1.0)


def worker_lmforge(s: dict[str, Any], quantized: bool) -> dict[str, Any]:
    from lmforge.checkpoints import load_checkpoint
    from lmforge.model.heads import lm_loss
    from lmforge.tasks.common import apply_lora, quantize_base
    from lmforge.tasks.seq2seq import FinetuneConfig, collate
    from lmforge.train import seed_everything

    c = FinetuneConfig(model=s["model"], task=s["task"], data=s["data"], max_length=s["max_length"],
                       max_target_length=s["max_target_length"], lora=True, lora_rank=s["lora_rank"],
                       lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"], lora_targets=s["lora_targets"],
                       quantize="auto" if quantized else "none")
    base_rss = rss_mb()  # the process before the model: interpreter, torch, lmforge
    seed_everything(s["seed"])
    ck = load_checkpoint(c.model, quantized=quantized)
    tok, model = ck.tokenizer, ck.model.train()
    held = quantize_base(model, c.quantize) if quantized else None
    weights = state_bytes(model)
    adapted = apply_lora(model, c)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    rows = finetune_examples(s, tok)
    col = partial(collate, pad_id=tok.pad_id if tok.pad_id is not None else 0)
    with tempfile.TemporaryDirectory(prefix="train_q4-") as d:
        clock = run_trainer(model, train_config(s, d), rows, lm_loss, col, [len(e) for e in rows])
    res = clock.result(s["warmup_steps"])
    acts = saved_activation_bytes(model, lm_loss, longest_batch(rows, s, col))
    t0 = time.perf_counter()
    vl = val_loss(model, validation_examples(s, tok), col, lm_loss)
    budget = weights + 4 * trainable + acts
    used = res["peak_mb"] - base_rss
    return {"rows": len(rows), "adapted_modules": len(adapted), "base": held or "float32 (the file dequantized)",
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            **res, "val_loss": vl, "val_rows": s["val_rows"], "val_s": round(time.perf_counter() - t0, 1),
            "base_rss_mb": round(base_rss), "weights_mb": round(weights / 2**20, 1),
            "adapters_optimizer_mb": round(4 * trainable / 2**20, 1), "activations_mb": round(acts / 2**20),
            "budget_mb": round(budget / 2**20), "used_mb": round(used),
            "budget_ratio": used / (budget / 2**20), "within_budget": used <= BUDGET_SLACK * budget / 2**20,
            "peak_after_mb": round(peak_rss_mb())}


def worker_lmforge_q4(s: dict[str, Any]) -> dict[str, Any]:
    return worker_lmforge(s, quantized=True)


def worker_lmforge_float(s: dict[str, Any]) -> dict[str, Any]:
    return worker_lmforge(s, quantized=False)


def _hf_lora(s: dict[str, Any], bnb: bool) -> dict[str, Any]:
    """transformers + peft on the same GGUF: float32, or with its block matrices in bitsandbytes nf4 (bnb)."""
    from benchmarks.train_workloads import hf_finetune_base, hf_lora_steps

    base_rss = rss_mb()
    base, rows, col = hf_finetune_base(s)
    if bnb:  # transformers refuses a quantization_config with a GGUF file: swap the block linears by hand
        version = to_bnb_4bit(base)
    weights = state_bytes(base)
    res = hf_lora_steps(s, base, rows, col)
    out = {**res, "base_rss_mb": round(base_rss), "weights_mb": round(weights / 2**20, 1),
           "used_mb": round(res["peak_mb"] - base_rss)}
    if bnb:
        out["base"] = f"bitsandbytes {version} nf4"
        out["quantized_linears"] = sum(1 for m in base.modules() if type(m).__name__ == "Linear4bit")
    else:
        out["base"] = "float32"
    return out


def to_bnb_4bit(model) -> str:
    """Every nn.Linear of the decoder blocks -> bitsandbytes Linear4bit (nf4, float32 compute), quantized now, as
    BitsAndBytesConfig(load_in_4bit=True) would (it cannot be combined with a GGUF file); the LM head stays float.
    Returns bitsandbytes' version."""
    import bitsandbytes as bnb
    import torch

    for name, m in list(model.named_modules()):
        if not isinstance(m, torch.nn.Linear) or ".layers." not in name:
            continue
        q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, quant_type="nf4",
                              compute_dtype=torch.float32)
        q.weight = bnb.nn.Params4bit(m.weight.data, requires_grad=False, quant_type="nf4")
        if m.bias is not None:
            q.bias = torch.nn.Parameter(m.bias.data, requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, q.to("cpu"))  # .to quantizes (bnb's CPU backend)
    return str(bnb.__version__)


def worker_transformers(s: dict[str, Any]) -> dict[str, Any]:
    return _hf_lora(s, bnb=False)


def worker_bitsandbytes(s: dict[str, Any]) -> dict[str, Any]:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        return {"error": f"bitsandbytes is not installed ({e}); pip install --no-deps bitsandbytes"}
    try:
        return _hf_lora(s, bnb=True)
    except Exception as e:  # noqa: BLE001 -- reported as the row's result: does it run on this CPU or not
        return {"error": f"bitsandbytes 4-bit on CPU: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}


WORKERS = {("lmforge-q4", "finetune-q4"): worker_lmforge_q4, ("lmforge", "finetune-q4"): worker_lmforge_float,
           ("transformers", "finetune-q4"): worker_transformers, ("bitsandbytes", "finetune-q4"): worker_bitsandbytes}


def summarize_q4(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's two checks, as lines for the report; also marks the rows (val_loss_vs_float, rss_vs_float)."""
    q4 = next((r for r in rows if r.get("workload") == "finetune-q4" and r.get("impl") == "lmforge-q4"), None)
    fl = next((r for r in rows if r.get("workload") == "finetune-q4" and r.get("impl") == "lmforge"), None)
    lines: list[str] = []
    if q4 is None or "val_loss" not in q4:
        return lines
    lines.append(f"finetune-q4 memory: peak {q4['peak_mb']} MB = {q4['base_rss_mb']} MB before loading + "
                 f"{q4['used_mb']} MB; budget {q4['budget_mb']} MB (weights {q4['weights_mb']} + adapters and "
                 f"optimizer {q4['adapters_optimizer_mb']} + activations {q4['activations_mb']}): "
                 f"{q4['budget_ratio']:.2f}x (target <= {BUDGET_SLACK}x: "
                 f"{'met' if q4['within_budget'] else 'not met'})")
    if fl is not None and "val_loss" in fl:
        rel = q4["val_loss"] / fl["val_loss"] - 1.0
        q4["val_loss_vs_float"] = rel
        q4["val_loss_target_met"] = abs(rel) <= VAL_LOSS_TOLERANCE
        q4["rss_vs_float"] = q4["peak_mb"] / max(fl["peak_mb"], 1)
        q4["step_vs_float"] = q4["step_s"] / max(fl["step_s"], 1e-9)
        lines.append(f"finetune-q4 validation loss: int4 base {q4['val_loss']:.4f}, float base {fl['val_loss']:.4f} "
                     f"({rel:+.2%}; target within {VAL_LOSS_TOLERANCE:.0%}: "
                     f"{'met' if q4['val_loss_target_met'] else 'not met'}); peak RSS {q4['rss_vs_float']:.2f}x "
                     f"and step time {q4['step_vs_float']:.2f}x the float base's")
        curve = [f"{a:.3f}/{b:.3f}" for a, b in zip(q4["losses"], fl["losses"])]
        lines.append("finetune-q4 training loss per step (int4 / float base): " + " ".join(curve))
    return lines
