"""Sequence-to-sequence fine-tuning of decoders: prompt + target, with the prompt masked out of the loss.

The prompt is the same one the zero-shot task verbs use (tasks/prompts.py), wrapped in the model's chat
template when it has one, so a fine-tuned model answers `lmforge summarize/translate` as it was trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import DataError
from lmforge.model.heads import IGNORE, lm_loss
from lmforge.tasks.common import (
    LoraArgs,
    TaskRun,
    apply_lora,
    check_quantized_base,
    check_resumable,
    export_model,
    quantize_base,
    run_training,
    write_json,
)
from lmforge.tasks.prompts import cut_middle, summarize_prompt, translate_prompt

TASKS = ("summarize", "translate", "instruct")


def task_prompt(task: str, text: str, to: str | None = None, src: str | None = None,
                sentences: int | None = None) -> str:
    if task == "summarize":
        return summarize_prompt(text, sentences)
    if task == "translate":
        if not to:
            raise DataError("--task translate needs --to LANG (the target language)")
        return translate_prompt(text, to, src)
    if task == "instruct":
        return text.strip()
    raise DataError(f"--task: unknown task {task!r} (one of {', '.join(TASKS)})")


def render_prompt(tokenizer, prompt: str) -> tuple[str, bool]:
    """-> (text to tokenize, whether the tokenizer should add its own special tokens)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True), False
    return prompt + "\n\nResponse:", True


def sentence_budget(sentences: int | None, model: str | None) -> int | None:
    """The sentence budget a summarize prompt states: the one given, else the one a fine-tuned run dir was trained
    with (trained_sentences), else None (no budget). The summarize verb, eval, the server's /v1/summarize and
    tasks.textgen.summarize all ask here, so they prompt a model alike."""
    if sentences is not None:
        return sentences
    return trained_sentences(str(model)) if model else None


def trained_sentences(model: str) -> int | None:
    """The summarize sentence budget a fine-tuned run dir was trained with (its finetune.json), else None:
    the task verbs and eval then prompt it as it was trained unless told otherwise."""
    return finetune_info(model).get("sentences")


def trained_prompt_length(model: str) -> int | None:
    """The prompt tokens a fine-tuned run dir was trained with, else None: finetune.json's max_prompt_length
    (max_length less max_target_length); a run from before it was recorded: max_length less the
    max_target_length of the run's finetune_config.json. Eval and the task verbs cut longer prompts to it."""
    info = finetune_info(model)
    length, prompt = info.get("max_length"), info.get("max_prompt_length")
    if _count(prompt):
        return prompt
    if not _count(length):
        return None
    for d in (Path(model), Path(model).parent):
        target = _read_json(d / "finetune_config.json").get("max_target_length")
        if _count(target) and target < length:
            return length - target
    return length


def finetune_info(model: str) -> dict:
    """A fine-tuned run dir's finetune.json ({} for any other model or an unreadable file)."""
    return _read_json(Path(model) / "finetune.json")


def _read_json(f: Path) -> dict:
    import json

    try:
        info = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


@dataclass
class Seq2SeqExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens, the token id on target tokens (and the closing eos)

    def __len__(self) -> int:
        return len(self.input_ids)


def build_example(tokenizer, prompt: str, target: str, max_length: int, max_target_length: int | None = None,
                  eos_id: int | None = None) -> Seq2SeqExample:
    """Tokenize prompt and target; truncate the prompt's *source text side* first so the target survives."""
    text, special = render_prompt(tokenizer, prompt)
    p_ids = tokenizer.encode(text, add_special_tokens=special)
    sep = "" if text.endswith((" ", "\n")) else " "
    t_ids = tokenizer.encode(sep + target.strip(), add_special_tokens=False)
    if max_target_length:
        t_ids = t_ids[:max_target_length]
    eos = eos_id if eos_id is not None else tokenizer.eos_id
    if eos is not None:
        t_ids = t_ids + [eos]
    room = max_length - len(t_ids)
    if room < 8:
        raise DataError(f"--max-length {max_length} leaves no room for the prompt next to a {len(t_ids)}-token "
                        "target: raise --max-length or set --max-target-length")
    p_ids = cut_middle(p_ids, room)  # keep the start (instruction) and the end (chat-template suffix)
    return Seq2SeqExample(p_ids + t_ids, [IGNORE] * len(p_ids) + t_ids)


def collate(examples: list[Seq2SeqExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; pad positions get mask 0 and label IGNORE. labels[:, t] is the token position t
    predicts (the example's labels shifted by one), the convention of lmforge.model.heads.lm_loss."""
    T = max(len(e) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, : n - 1] = torch.tensor(e.labels[1:])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---- fine-tuning ---------------------------------------------------------------------------------------
EVAL_METRICS = ("eval_loss", "perplexity")

# The measured recipes (docs/translation.md, docs/summarization.md): what `lmforge finetune --task T` runs for
# every flag the user does not give. Keys are FinetuneConfig and TrainConfig fields. `instruct` has none.
RECIPES: dict[str, dict[str, object]] = {
    "translate": {"model": "gemma3-270m", "lora": True, "lora_rank": 32, "lora_alpha": 16.0,
                  "lora_targets": "all-linear", "lr": 5e-4, "batch_size": 16, "max_length": 256,
                  "max_target_length": 128, "max_steps": 800},  # a budget: 12,800 pairs, about an hour on 2 cores
    "summarize": {"model": "smollm2-135m-instruct", "lr": 1e-4, "batch_size": 8, "epochs": 1.0,
                  "max_length": 640, "max_target_length": 128},
}


@dataclass
class FinetuneConfig(LoraArgs):
    model: str = "smollm2-135m-instruct"
    task: str = "instruct"  # summarize | translate | instruct
    data: str = ""
    eval_data: str | None = None
    input_field: str = "input"
    target_field: str = "target"
    to: str | None = None  # translate: target language code
    src: str | None = None  # translate: source language code
    sentences: int | None = None  # summarize: the sentence budget the prompt states (None: "two or three")
    max_length: int = 512
    max_target_length: int | None = 256
    max_train_samples: int | None = None
    max_eval_samples: int | None = 200
    eval_fraction: float = 0.05
    # LoRA over a frozen int base: none (float), auto (a quantized GGUF's own blocks), 8 | 4 (quantized at load)
    quantize: str = "none"


def _examples(c: FinetuneConfig, tok, pairs: list[tuple[str, str]]) -> list[Seq2SeqExample]:
    return [build_example(tok, task_prompt(c.task, x, c.to, c.src, c.sentences), y, c.max_length,
                          c.max_target_length)
            for x, y in pairs]


def finetune(c: FinetuneConfig, tc, resume: bool = False, log=print) -> dict:
    """Fine-tune a decoder on input/target pairs; the result is a HF model dir that `generate` loads."""
    from dataclasses import asdict
    from functools import partial

    from lmforge.checkpoints import load_checkpoint
    from lmforge.data.squad import read_jsonl_pairs
    from lmforge.errors import ConfigError
    from lmforge.train.trainer import seed_everything

    if c.task not in TASKS:
        raise DataError(f"--task: unknown task {c.task!r} (one of {', '.join(TASKS)})")
    task_prompt(c.task, "x", c.to, c.src, c.sentences)  # validates --to/--from before anything heavy
    check_quantized_base(c.quantize, c)
    if resume:
        check_resumable(Path(tc.output_dir))
    pairs = read_jsonl_pairs(c.data, c.input_field, c.target_field, skip_empty=True)
    if c.eval_data:
        eval_pairs = read_jsonl_pairs(c.eval_data, c.input_field, c.target_field, skip_empty=True)
    else:
        n_eval = max(1, int(len(pairs) * c.eval_fraction))
        if len(pairs) < 2:
            raise DataError(f"{c.data}: needs at least 2 examples to split off a validation set")
        pairs, eval_pairs = pairs[:-n_eval], pairs[-n_eval:]  # the file's tail: no shuffling leaks
    if c.max_train_samples:
        pairs = pairs[: c.max_train_samples]
    if c.max_eval_samples:
        eval_pairs = eval_pairs[: c.max_eval_samples]
    seed_everything(tc.seed)
    ck = load_checkpoint(c.model, quantized=c.quantize == "auto")
    if ck.tokenizer is None:
        raise ConfigError(f"{c.model}: has no tokenizer files, cannot fine-tune on text")
    if not ck.cfg.causal:
        raise ConfigError(f"{c.model}: is a bidirectional encoder ({ck.cfg.family}); finetune needs a decoder")
    if c.max_length > ck.cfg.context_length:
        raise ConfigError(f"--max-length {c.max_length} is above the model's context length "
                          f"{ck.cfg.context_length} ({c.model})")
    tok, model = ck.tokenizer, ck.model.train()
    held = quantize_base(model, c.quantize) if c.quantize != "none" else None
    if held is not None:
        log(f"base: {held}, frozen; LoRA adapters train in float32 and save alone (PEFT format)")
        c.save_adapters_only = True  # int4 blocks cannot hold a merged update
    apply_lora(model, c)
    train_ex, eval_ex = _examples(c, tok, pairs), _examples(c, tok, eval_pairs)
    n_target = sum(sum(1 for x in e.labels if x != IGNORE) for e in train_ex)
    log(f"data: {len(train_ex)} train / {len(eval_ex)} validation pairs; {n_target} target tokens in training")
    pad = tok.pad_id if tok.pad_id is not None else 0
    col = partial(collate, pad_id=pad)

    @torch.no_grad()
    def eval_fn(m) -> dict[str, float]:
        tot: float | torch.Tensor = 0.0
        n: int | torch.Tensor = 0
        order = sorted(range(len(eval_ex)), key=lambda i: len(eval_ex[i]))  # length-sorted: little padding
        for s in range(0, len(order), 8):
            loss, k = lm_loss(m, col([eval_ex[i] for i in order[s: s + 8]]))
            tot, n = tot + loss.double() * k, n + k  # a tensor sum: one host sync per evaluation, not per batch
        loss = float(tot) / max(float(n), 1.0)
        return {"eval_loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}

    meta = {"task": c.task, "to": c.to, "from": c.src, "base_model": c.model, "max_length": c.max_length,
            "max_prompt_length": c.max_length - (c.max_target_length or 0), "sentences": c.sentences}

    def save_fn(m, d: Path, _sd) -> None:
        export_model(m, d, tok, c, c.model)
        write_json(d / "finetune.json", meta)

    run = TaskRun("finetune", asdict(c), model, train_ex, lm_loss, save_fn=save_fn, eval_fn=eval_fn,
                  eval_metrics=EVAL_METRICS, n_eval=len(eval_ex), marker="finetune.json", collate_fn=col,
                  lengths=[len(e) for e in train_ex])
    return run_training(run, tc, resume=resume)
