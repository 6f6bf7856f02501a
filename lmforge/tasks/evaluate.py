"""`lmforge eval`: run a model on a task's data and score it with the task's standard metric.

summarize -> ROUGE-1/2/L (rouge-score); translate -> BLEU and chrF (sacrebleu); qa -> SQuAD exact match
and F1 (official normalisation), extractive with a QA run dir or generative with an instruct model.
Predictions go to a JSONL file beside the summary, so a score can always be traced to its outputs.
Each output is checked against its source (tasks/grounding.py): `unsupported_rate` is the share of outputs
with at least one number, amount, year, century or name (names not for translate) that the source lacks.
With `shots` > 0 (summarize, translate) a base model sees a few-shot prompt (prompts.FewShot) whose examples
come from `shots_file` and are never evaluated rows. A prompt too long for the model (or, for a fine-tuned
run dir, longer than the prompts it was trained on) is cut to its start and end as fine-tuning cuts it
(textgen.prompt_cut), said once on stderr.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import DataError
from lmforge.io import atomic_write
from lmforge.tasks.prompts import FewShot

TASKS = ("summarize", "translate", "qa")


@dataclass
class EvalConfig:
    task: str
    model: str
    data: str
    limit: int | None = None
    input_field: str | None = None  # default: document (summarize), the --from code (translate)
    target_field: str | None = None  # default: summary (summarize), the --to code (translate)
    to: str | None = None
    src: str | None = None
    batch_size: int | None = None  # prompts decoded together (default 8), or qa windows per forward (default 64)
    max_new_tokens: int = 128
    num_beams: int = 1
    output: str | None = None  # predictions JSONL (default: beside the summary in runs/)
    tail: bool = False  # take the last `limit` rows instead of the first (e.g. a held-out tail)
    quantize: int | str | None = "auto"  # Generator.load's setting: a quantized GGUF decodes quantized
    shots: int = 0  # > 0: few-shot prompt with this many examples from shots_file (summarize, translate)
    shots_file: str | None = None
    sentences: int | None = None  # summarize: the prompt's sentence budget (None: what the model was trained with)
    ensemble: tuple[str, ...] = ()  # qa: more extractive run dirs whose span logits are averaged with model's
    device: str = "cpu"  # auto | cpu | cuda[:N] (lmforge.device.resolve_device)
    max_prompt_tokens: int | None = None  # longer prompts are cut to their start and end (textgen.prompt_cut)
    speculative: str = "auto"  # prompt lookup (decoding/speculative.py) when prompts decode one at a time
    draft_tokens: int | None = None  # drafts verified per forward (None: the default)


def _is_qa_run(model: str) -> bool:
    from lmforge.tasks.common import find_run_dir
    from lmforge.tasks.qa import RUN_INFO

    return Path(model).is_dir() and find_run_dir(model, RUN_INFO) is not None


def _lead_sentences(text: str, n: int = 3) -> str:
    import re

    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    return " ".join(parts[:n])


PARTIAL_SUFFIX = ".partial"  # predictions.jsonl.partial: the outputs of an unfinished run, one JSON line each
BAD_SUFFIX = ".bad"  # predictions.jsonl.partial.bad: a partial file that failed its check, set aside


def _weight_files(name: str) -> list[list[Any]]:
    """(path, size, mtime) of a local model's weight files: a model retrained in place is another model."""
    p = Path(name)
    files = [p] if p.is_file() else sorted([*p.glob("*.safetensors"), *p.glob("*.gguf")]) if p.is_dir() else []
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def partial_key(models: list[str], settings: list[Any], inputs: list[str]) -> str:
    """What an unfinished run's outputs depend on: the models and their weight files, the settings that change
    an output, and the inputs."""
    import hashlib

    h = hashlib.sha256(json.dumps([models, [_weight_files(m) for m in models], settings]).encode())
    for x in inputs:
        h.update(x.encode() + b"\0")
    return h.hexdigest()


def text_output(v: Any) -> str | None:
    """Why `v` is not a generated output as PartialOutputs.keep writes it (a str), else None."""
    return None if isinstance(v, str) else f'"text" is {type(v).__name__}, not a string'


_QA_NUMBERS = {"score": (int, float), "start": (int, type(None)), "end": (int, type(None)),
               "logit": (int, float, type(None))}


def qa_output(v: Any) -> str | None:
    """Why `v` is not an extractive answer as qa.predict_examples gives it ({answer, score, start, end, logit})."""
    if not isinstance(v, dict) or set(v) != {"answer", *_QA_NUMBERS}:
        return '"text" is not an answer {answer, score, start, end, logit}'
    if not isinstance(v["answer"], str):
        return '"text"."answer" is not a string'
    bad = [k for k, types in _QA_NUMBERS.items() if isinstance(v[k], bool) or not isinstance(v[k], types)]
    return f'"text".{bad[0]!r} has the wrong type' if bad else None


class PartialOutputs:
    """`predictions.jsonl.partial`: the outputs of an unfinished run, appended as each batch finishes, so an
    interrupted run loses at most one batch. The same command with the same --predictions reads them back
    (`done`, by input index) when its key matches, i.e. same models, settings and inputs; else it starts over.

    Each row read back is checked (`valid`: the output's type, as keep writes it; an index in [0, total),
    none twice): the file is not trusted with a prediction. A file with a bad row is set aside as
    `<name>.bad`, said in one line naming it and the row, and its outputs are decoded again. A last line cut
    short by the interruption (no newline) is dropped, not bad."""

    def __init__(self, out: Path, key: str, total: int, log, what: str = "eval",
                 valid: Callable[[Any], str | None] = text_output) -> None:
        self.path, self.out = out.with_name(out.name + PARTIAL_SUFFIX), out
        self.total, self.log, self.what = total, log, what
        self.done: dict[int, Any] = {}
        header = json.dumps({"key": key})
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            text = ""
        lines = text.splitlines()
        if lines and lines[0] == header:
            if not text.endswith("\n"):  # the interruption cut the last line short: drop it, append after the rest
                lines.pop()
                self._rewrite(lines)
            bad = self._read(lines[1:], valid)
            if bad is not None:
                self.done = {}
                aside = self.path.with_name(self.path.name + BAD_SUFFIX)
                os.replace(self.path, aside)
                log(f"{what}: {self.path}: line {bad[0]}: {bad[1]}; set aside as {aside}, its outputs are "
                    "decoded again")
        if self.done:
            log(f"{what}: continuing an interrupted run: {len(self.done)} of {total} outputs read from {self.path}")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(header + "\n", encoding="utf-8")
        self.kept = len(self.done)

    def _read(self, lines: list[str], valid: Callable[[Any], str | None]) -> tuple[int, str] | None:
        """Fill `done` from the rows; (line number, why) of the first bad row, else None."""
        for n, line in enumerate(lines, start=2):
            try:
                row = json.loads(line)
            except ValueError:
                return n, "not a JSON row"
            if not isinstance(row, dict) or set(row) != {"i", "text"}:
                return n, 'not a row {"i": index, "text": output}'
            i = row["i"]
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.total:
                return n, f"index {i!r} is not in [0, {self.total})"
            if i in self.done:
                return n, f"index {i} is there twice"
            why = valid(row["text"])
            if why is not None:
                return n, why
            self.done[i] = row["text"]
        return None

    def _rewrite(self, lines: list[str]) -> None:
        atomic_write(self.path, "".join(line + "\n" for line in lines))

    def keep(self, batch: dict[int, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps({"i": i, "text": t}, ensure_ascii=False) + "\n" for i, t in batch.items()))
            f.flush()
        self.kept += len(batch)

    def interrupted(self) -> None:
        self.log(f"{self.what}: interrupted; {self.kept} of {self.total} outputs kept in {self.path}: run the same "
                 f"command with --predictions {self.out} to continue")


def _generate_all(gen, prompts: list[str], c: EvalConfig, log, out: Path, fewshot: FewShot | None = None
                  ) -> list[str]:
    """Batched (c.batch_size prompts per call, left-padded) generation through the chat template, or as plain
    text with the few-shot stop strings; a progress bar with an ETA on stderr. Finished batches are kept in
    PartialOutputs, so the same command with the same --predictions continues an interrupted run."""
    from lmforge.tasks.textgen import generate_batched, prompt_cut

    cut = prompt_cut(gen, c.model, max_new_tokens=c.max_new_tokens, max_prompt_tokens=c.max_prompt_tokens,
                     truncate=True)
    settings = [c.quantize, c.max_new_tokens, c.num_beams] + ([cut.limit] if cut else [])
    kept = PartialOutputs(out, partial_key([c.model, *c.ensemble], settings, prompts), len(prompts), log)
    kw = dict(chat=False, stop_strings=fewshot.stop_strings) if fewshot else dict(chat=True)
    try:
        return generate_batched(gen, prompts, batch_size=c.batch_size or 8, desc=f"eval {c.task}", progress=True,
                                done=kept.done, on_batch=kept.keep, truncate=True, cut=cut, log=log,
                                max_new_tokens=c.max_new_tokens, num_beams=c.num_beams,
                                speculative=c.speculative, draft_tokens=c.draft_tokens,
                                quoting=c.task == "qa", **kw)  # answers copy their context, as textgen.answer
    except KeyboardInterrupt:
        kept.interrupted()
        raise


def qa_answers(lq, examples, batch_size: int, out: Path, models: list[str], log, what: str = "eval"
               ) -> list[dict[str, Any]]:
    """Extractive answers (qa.predict_examples), kept chunk by chunk in PartialOutputs like _generate_all's."""
    from lmforge.tasks import qa

    inputs = [json.dumps([ex.id, ex.question, ex.context]) for ex in examples]
    settings = [lq.max_length, lq.doc_stride, lq.max_question_length, lq.n_best, lq.max_answer_length,
                lq.answer_selection, batch_size]
    kept = PartialOutputs(out, partial_key(models, settings, inputs), len(examples), log, what, valid=qa_output)
    try:
        return qa.predict_examples(lq, examples, batch_size, progress=True, done=kept.done, on_chunk=kept.keep)
    except KeyboardInterrupt:
        kept.interrupted()
        raise


def evaluate_task(c: EvalConfig, log=print) -> dict[str, Any]:
    from lmforge import metrics
    from lmforge.data.squad import read_jsonl_pairs, read_squad
    from lmforge.device import resolve_device
    from lmforge.tasks import prompts as P
    from lmforge.tasks.grounding import check

    device = str(resolve_device(c.device, "device"))
    out = Path(c.output) if c.output else Path("runs") / f"eval-{c.task}-{Path(c.model).name}-{int(time.time())}" \
        / "predictions.jsonl"
    if c.task not in TASKS:
        raise DataError(f"--task: unknown task {c.task!r} (one of {', '.join(TASKS)})")
    if c.shots and c.task == "qa":
        raise DataError("--shots: few-shot prompts exist for summarize and translate, not qa")
    if c.shots and not c.shots_file:
        raise DataError("--shots needs --shots-file FILE (JSONL with the same fields as --data)")
    if c.shots_file and not c.shots:
        raise DataError("--shots-file needs --shots K (the number of examples to show)")
    if c.ensemble and (c.task != "qa" or not all(map(_is_qa_run, (c.model, *c.ensemble)))):
        raise DataError("--model: several models answer as one only for --task qa with extractive run dirs "
                        "(`lmforge qa train`)")
    fewshot: FewShot | None = None
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    src = c.src or "en"
    if c.task in ("summarize", "translate"):
        if c.task == "translate":
            if not c.to:
                raise DataError("eval --task translate needs --to LANG")
            P.language_name(c.to, "--to")
            inp, tgt = c.input_field or src, c.target_field or c.to
        else:
            inp, tgt = c.input_field or "document", c.target_field or "summary"
        pairs = read_jsonl_pairs(c.data, inp, tgt)
        if c.limit:
            pairs = pairs[-c.limit:] if c.tail else pairs[: c.limit]
        if c.shots:  # before the model loads: a bad shots file fails fast
            fewshot = P.load_fewshot(c.shots_file, c.shots, c.task, inp, tgt, to=c.to, src=src,
                                     exclude=[x for x, _ in pairs])
        if c.model == "lead-3" and c.task == "summarize":
            preds = [_lead_sentences(x) for x, _ in pairs]
        else:
            from lmforge.generator import Generator

            gen = Generator.load(c.model, quantize=c.quantize, device=device)
            if fewshot:
                prompts = [fewshot.prompt(x) for x, _ in pairs]
            elif c.task == "summarize":
                from lmforge.tasks.seq2seq import sentence_budget

                budget = sentence_budget(c.sentences, c.model)
                prompts = [P.summarize_prompt(x, budget) for x, _ in pairs]
            else:
                prompts = [P.translate_prompt(x, c.to, c.src) for x, _ in pairs]
            preds = _generate_all(gen, prompts, c, log, out, fewshot)
        refs = [y for _, y in pairs]
        scores = metrics.rouge_scores(preds, refs) if c.task == "summarize" else metrics.bleu_chrf(preds, refs)
        rows = [{"input": x, "reference": y, "prediction": p, "unsupported": check(x, p, c.task)}
                for (x, y), p in zip(pairs, preds)]
    else:
        examples = read_squad(c.data)
        if c.limit:
            examples = examples[-c.limit:] if c.tail else examples[: c.limit]
        if _is_qa_run(c.model):  # an extractive model: all windows length-sorted in batches, as `qa eval`
            from lmforge.tasks import qa

            lq = qa.load_qa_ensemble([c.model, *c.ensemble], device=device)
            found = qa_answers(lq, examples, c.batch_size or 64, out, [c.model, *c.ensemble], log)
            preds_by_id = {ex.id: p["answer"] for ex, p in zip(examples, found)}
        else:
            from lmforge.generator import Generator

            gen = Generator.load(c.model, quantize=c.quantize, device=device)
            prompts = [P.answer_prompt(ex.context, ex.question) for ex in examples]
            answers = _generate_all(gen, prompts, c, log, out)
            preds_by_id = {ex.id: a.split("\n")[0].strip().rstrip(".") for ex, a in zip(examples, answers)}
        scores = metrics.squad_scores(preds_by_id, examples)
        rows = [{"id": ex.id, "question": ex.question, "answers": ex.answers, "prediction": preds_by_id[ex.id],
                 "unsupported": check(ex.context, preds_by_id[ex.id], "qa")} for ex in examples]
    elapsed = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out.with_name(out.name + PARTIAL_SUFFIX).unlink(missing_ok=True)  # the full file replaces what it kept
    summary = {"task": c.task, "model": [c.model, *c.ensemble] if c.ensemble else c.model, "data": c.data,
               "examples": len(rows),
               **{k: round(v, 2) if isinstance(v, float) else v for k, v in scores.items()},
               "unsupported_rate": round(100.0 * sum(bool(r["unsupported"]) for r in rows) / max(len(rows), 1), 2),
               "elapsed_s": round(elapsed, 1), "predictions": str(out)}
    if fewshot:
        summary.update(shots=c.shots, shots_file=c.shots_file, shot_rows=list(fewshot.rows))
    atomic_write(out.with_name("summary.json"), json.dumps(summary, indent=1) + "\n")
    return summary


def format_summary(s: dict[str, Any]) -> str:
    keys = [k for k in ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match", "f1", "unsupported_rate")
            if k in s]
    label = {"unsupported_rate": "unsupported%"}  # outputs with a number/amount/name their source lacks
    head = f"{'task':<10} {'examples':>8} " + " ".join(f"{label.get(k, k):>12}" for k in keys)
    row = f"{s['task']:<10} {s['examples']:>8} " + " ".join(f"{s[k]:>12.2f}" for k in keys)
    shots = f"  shots: {s['shots']} (rows {s['shot_rows']} of {s['shots_file']})" if s.get("shots") else ""
    return f"{head}\n{row}\npredictions: {s['predictions']}  ({s['elapsed_s']}s){shots}"
