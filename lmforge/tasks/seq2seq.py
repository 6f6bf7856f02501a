"""Sequence-to-sequence fine-tuning of decoders: prompt + target, with the prompt masked out of the loss.

The prompt is the same one the zero-shot task verbs use (tasks/prompts.py), wrapped in the model's chat
template when it has one, so a fine-tuned model answers `lmforge summarize/translate` as it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.errors import DataError
from lmforge.model.transformer import Transformer
from lmforge.tasks.prompts import summarize_prompt, translate_prompt

IGNORE = -100
TASKS = ("summarize", "translate", "instruct")


def task_prompt(task: str, text: str, to: str | None = None, src: str | None = None) -> str:
    if task == "summarize":
        return summarize_prompt(text)
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
    if len(p_ids) > room:  # keep the start (instruction) and the end (chat-template suffix) of the prompt
        head = room // 2
        p_ids = p_ids[:head] + p_ids[len(p_ids) - (room - head):]
    return Seq2SeqExample(p_ids + t_ids, [IGNORE] * len(p_ids) + t_ids)


def collate(examples: list[Seq2SeqExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; pad positions get mask 0 and label IGNORE."""
    T = max(len(e) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_loss(model: Transformer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy on target positions only; the LM head runs only where a label exists,
    which skips the large vocabulary matmul on every prompt and pad token."""
    h = model(batch["input_ids"], batch["attention_mask"])  # (B, T, D)
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE
    logits = model.lm_logits(h[:, :-1][keep])  # (N, V)
    n = int(keep.sum())
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="mean") if n else h.sum() * 0.0
    return loss, n
