"""Task quality on ../shared/data: extractive QA, summarization, English->Spanish translation.

    python benchmarks/tasks.py [--data ../shared/data] [--scale quick|full] [--steps qa,sum,mt] [--qa-models N]
                               [--out benchmarks/results/tasks[_full].json]

Every number comes from an `lmforge` command that this script runs and records, so each row can be
reproduced by hand:
  qa   minilm-l6 fine-tuned on nyt_v1.0.json (SQuADShifts NYT), evaluated on new_wiki_v1.0.json: EM / F1.
       `--scale full --qa-models N` (N > 1): N runs of the ensemble recipe of docs/qa.md (all of nyt, keep-best
       on the Amazon + Reddit questions that squadshifts.py builds, seeds 42, 43, ...) and their ensemble.
  sum  wikilingua_en_1k.jsonl: ROUGE-1/2/L of the lead-3 baseline, of zero-shot smollm2-135m-instruct, and of a
       fine-tune on the other documents, all on the last N documents.
  mt   bible_ot_en_es.jsonl, the last 500 pairs (or N with --scale quick): BLEU / chrF zero-shot (3-shot for the
       base model), then after a fine-tune on all earlier pairs.
`--scale quick` uses small limits and short SmolLM2 LoRA runs that finish in well under an hour on 2 CPU cores.
`--scale full` runs the measured recipes, i.e. the commands' defaults (`qa train`, `finetune --task summarize`,
`finetune --task translate`; docs/qa.md, docs/summarization.md, docs/translation.md), on the sizes the issue
names, and draws each run's validation curve against training minutes into benchmarks/results/tasks_curves.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, format_table, machine_info, measured_peaks, write_json
from lmforge.train.plots import eval_key

SCALES = {  # quick: the LoRA fine-tunes are sized to ~10 minutes each on 2 CPU cores (SmolLM2 at ~1.5 s per 1k tokens)
    "quick": {"qa_train": 5000, "qa_eval": 300, "sum_eval": 30, "sum_train": 300, "sum_ft_steps": 40,
              "mt_eval": 60, "mt_train": 600, "mt_ft_steps": 80},
    "full": {"qa_train": 0, "qa_eval": 0, "sum_eval": 100, "sum_train": 0, "sum_ft_steps": 0,
             "mt_eval": 500, "mt_train": 0, "mt_ft_steps": 800},  # 0: all rows / the recipe's schedule
}


STEP_TASKS = {"qa": "qa", "sum": "summarize", "mt": "translate"}  # --steps name -> row "task" prefix


def _command_task(command: str) -> str:
    """Which step a recorded command belongs to (for keeping a partial rerun's other commands)."""
    for t, keys in (("qa", ("qa train", "qa eval", "--task qa")), ("summarize", ("summarize", "sum-")),
                    ("translate", ("translate", "mt-"))):
        if any(k in command for k in keys):
            return t
    return ""


def run(cmd: list[str], log: list[dict]) -> dict:
    """Run an lmforge command; return the JSON it printed (eval --json) or {}; record command and time."""
    t0 = time.perf_counter()
    print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t0
    rec = {"command": shlex.join(cmd), "seconds": round(dt, 1), "rc": p.returncode}
    log.append(rec)
    if p.returncode != 0:
        rec["error"] = (p.stderr.strip().splitlines() or ["?"])[-1]
        print("  failed: " + rec["error"], file=sys.stderr)
        return {"error": rec["error"]}
    try:
        return json.loads(p.stdout)
    except json.JSONDecodeError:
        return {}


def _tail_split(f: Path, n: int, out: Path) -> Path:
    """All rows of a JSONL file but the last n (the evaluation rows) -> out: training never sees them."""
    lines = [x for x in f.read_text(encoding="utf-8").split("\n") if x.strip()]  # not splitlines(): U+2028
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines[:-n]) + "\n", encoding="utf-8")
    return out


def _curve(run_dir: Path, metric: str) -> list[tuple[float, float]]:
    """(training minutes, validation metric) from a run's metrics.jsonl."""
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    pts = []
    for line in f.read_text().split("\n"):
        r = json.loads(line) if line.strip() else {}
        key = next((k for k in (eval_key(metric), "eval_" + metric) if k in r), None)  # the second: runs
        if key:                                                                          # before 2026-12-04
            pts.append((r["elapsed"] / 60, r[key]))
    return pts


def curves_png(out: Path) -> Path:
    """Where the curves of the results file `out` go: tasks_full.json -> tasks_curves.png, tasks_full_X.json ->
    tasks_curves_X.png, any other name X.json -> X_curves.png (next to `out`)."""
    stem = out.stem
    for prefix in ("tasks_full", "tasks"):
        if stem == prefix or stem.startswith(prefix + "_"):
            return out.with_name("tasks_curves" + stem.removeprefix(prefix) + ".png")
    return out.with_name(stem + "_curves.png")


def plot_curves(curves: dict[str, dict], path: Path) -> None:
    """One panel per task: the validation metric against training minutes, the held-out score as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (task, c) in zip(axes[0], curves.items()):
        if c["points"]:
            xs, ys = zip(*c["points"])
            ax.plot(xs, ys, marker="o", label=f"validation {c['metric']}")
        ax.set_xlabel("training minutes")
        ax.set_ylabel(c["metric"])
        ax.set_title(task)
        if c.get("final") is not None and c["points"]:
            ax2 = ax.twinx()
            ax2.plot([c["points"][-1][0]], [c["final"]], "r*", markersize=12, label=f"held-out {c['final_name']}")
            ax2.set_ylabel(f"held-out {c['final_name']}", color="r")
            ax2.legend(loc="lower right", fontsize=8)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def run_full(steps: list[str], data: Path, runs: Path, lm: list[str], rows: list[dict], log: list[dict],
             save: Callable[[], None], curves: dict[str, dict], qa_models: int = 1) -> None:
    """The measured recipes: each fine-tune is the command with no recipe flag, then its held-out score.

    qa_models > 1 trains the ensemble recipe of docs/qa.md that many times with consecutive seeds (all of nyt,
    keep-best on the Amazon + Reddit questions of squadshifts.py) and adds the ensemble's row."""
    if "qa" in steps:
        dirs, minutes = [], 0.0
        val: list[str] = []  # one model: the default recipe (validation on 10% of nyt's articles)
        if qa_models > 1:  # the measured ensemble members (docs/qa.md, A and C): all of nyt, out-of-domain keep-best
            from benchmarks import squadshifts

            squadshifts.main(["--out", str(runs / "squadshifts")])  # downloads once; exits with the reason
            val = ["--eval-data", str(runs / "squadshifts/ood_val.json"), "--max-eval-samples", "1004",
                   "--eval-every", "300"]
        for i in range(qa_models):  # seeds 42 (the default), 43, ...: the same recipe, another data order and head
            run_dir = runs / ("qa-recipe" if i == 0 else f"qa-recipe-seed{42 + i}")
            run([*lm, "qa", "train", "--data", str(data / "qa/nyt_v1.0.json"), *val, "--output", str(run_dir),
                 "--overwrite", "--no-progress", *(["--seed", str(42 + i)] if i else [])], log)
            cmd = log[-1]
            minutes += cmd["seconds"] / 60
            dirs.append(run_dir)
            r = run([*lm, "eval", "--task", "qa", "--model", str(run_dir / "best"), "--data",
                     str(data / "qa/new_wiki_v1.0.json"), "--json", "--predictions",
                     str(runs / f"{run_dir.name}-eval/p.jsonl")], log)
            rows.append({"task": "qa (new_wiki)", "model": ("minilm-l6 on all of nyt, keep-best on Amazon + Reddit"
                                                             if val else "minilm-l6, `qa train` recipe on nyt")
                         + (f", --seed {42 + i}" if i else ""),
                         "minutes": round(cmd["seconds"] / 60, 1), "precision": _precision(run_dir),
                         "examples": r.get("examples"), "EM": r.get("exact_match"), "F1": r.get("f1"),
                         "command": cmd["command"], "error": r.get("error")})
            curves[f"qa: minilm-l6 on nyt{f', seed {42 + i}' if i else ''}"] = {
                "metric": "f1", "points": _curve(run_dir, "f1"), "final": r.get("f1"), "final_name": "new_wiki F1"}
            save()
        if qa_models > 1:  # the runs above answering as one (docs/qa.md: their span logits averaged)
            r = run([*lm, "qa", "eval", "--model", *(str(d / "best") for d in dirs), "--data",
                     str(data / "qa/new_wiki_v1.0.json"), "--json", "--predictions",
                     str(runs / "qa-ensemble-eval/p.jsonl")], log)
            rows.append({"task": "qa (new_wiki)", "model": f"ensemble of the {qa_models} runs above",
                         "minutes": round(minutes, 1), "precision": _precision(dirs[0]), "examples": r.get("examples"),
                         "EM": r.get("exact_match"), "F1": r.get("f1"), "command": log[-1]["command"],
                         "error": r.get("error")})
            save()
    if "sum" in steps:
        f = data / "summarization/wikilingua_en_1k.jsonl"
        n = 100
        train_f = _tail_split(f, n, runs / "sum-train.jsonl")
        for model in ("lead-3", "smollm2-135m-instruct"):
            r = run([*lm, "eval", "--task", "summarize", "--model", model, "--data", str(f), "--limit", str(n),
                     "--tail", "--json", "--predictions", str(runs / f"sum-{model}/p.jsonl")], log)
            rows.append({"task": "summarize", "model": model + ("" if model == "lead-3" else " zero-shot"),
                         "examples": r.get("examples"), "ROUGE-1": r.get("rouge1"), "ROUGE-2": r.get("rouge2"),
                         "ROUGE-L": r.get("rougeL"), "error": r.get("error")})
        ft = runs / "sum-recipe"
        run([*lm, "finetune", "--task", "summarize", "--data", str(train_f), "--input-field", "document",
             "--target-field", "summary", "--output", str(ft), "--overwrite", "--no-progress"], log)
        cmd = log[-1]
        r = run([*lm, "eval", "--task", "summarize", "--model", str(ft / "best"), "--data", str(f), "--limit",
                 str(n), "--tail", "--json", "--predictions", str(runs / "sum-recipe-eval/p.jsonl")], log)
        rows.append({"task": "summarize", "model": "`finetune --task summarize` recipe", "examples": r.get("examples"),
                     "minutes": round(cmd["seconds"] / 60, 1), "precision": _precision(ft),
                     "ROUGE-1": r.get("rouge1"), "ROUGE-2": r.get("rouge2"), "ROUGE-L": r.get("rougeL"),
                     "command": cmd["command"], "error": r.get("error")})
        curves["summarize: WikiLingua"] = {"metric": "eval_loss", "points": _curve(ft, "eval_loss"),
                                           "final": r.get("rougeL"), "final_name": "ROUGE-L"}
        save()
    if "mt" in steps:
        f = data / "translation/bible_ot_en_es.jsonl"
        n = 500
        train_f = _tail_split(f, n, runs / "mt-train.jsonl")
        r = run([*lm, "eval", "--task", "translate", "--from", "en", "--to", "es", "--model", "gemma3-270m",
                 "--data", str(f), "--limit", str(n), "--tail", "--shots", "3", "--shots-file", str(train_f),
                 "--json", "--max-new-tokens", "128", "--predictions", str(runs / "mt-gemma-3shot/p.jsonl")], log)
        rows.append({"task": "translate en-es", "model": "gemma3-270m 3-shot (no training)",
                     "examples": r.get("examples"), "BLEU": r.get("bleu"), "chrF": r.get("chrf"),
                     "error": r.get("error")})
        ft = runs / "mt-recipe"
        run([*lm, "finetune", "--task", "translate", "--from", "en", "--to", "es", "--data", str(train_f),
             "--input-field", "en", "--target-field", "es", "--max-steps", str(SCALES["full"]["mt_ft_steps"]),
             "--eval-every", "200", "--save-every", "200", "--output", str(ft), "--overwrite", "--no-progress"], log)
        cmd = log[-1]
        r = run([*lm, "eval", "--task", "translate", "--from", "en", "--to", "es", "--model", str(ft / "best"),
                 "--data", str(f), "--limit", str(n), "--tail", "--json", "--max-new-tokens", "128",
                 "--predictions", str(runs / "mt-recipe-eval/p.jsonl")], log)
        rows.append({"task": "translate en-es", "model": "`finetune --task translate` recipe",
                     "examples": r.get("examples"), "minutes": round(cmd["seconds"] / 60, 1),
                     "precision": _precision(ft), "BLEU": r.get("bleu"), "chrF": r.get("chrf"),
                     "command": cmd["command"], "error": r.get("error")})
        curves["translate: bible en-es"] = {"metric": "eval_loss", "points": _curve(ft, "eval_loss"),
                                            "final": r.get("chrf"), "final_name": "chrF"}
        save()


def _precision(run_dir: Path) -> str | None:
    f = run_dir / "trainer_config.json"
    return json.loads(f.read_text()).get("precision") if f.is_file() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--scale", choices=list(SCALES), default="quick")
    ap.add_argument("--steps", default="qa,sum,mt")
    ap.add_argument("--runs", default="runs/bench-tasks")
    ap.add_argument("--out", default=None, help="default: results/tasks.json (quick), tasks_full.json (full)")
    ap.add_argument("--qa-models", type=int, default=1, metavar="N",
                    help="--scale full: with N > 1, train docs/qa.md's ensemble members N times (all of nyt, "
                    "keep-best on the Amazon + Reddit questions that squadshifts.py downloads; seeds 42, 43, ...) "
                    "and score each and their ensemble")
    a = ap.parse_args()
    a.out = a.out or str(RESULTS_DIR / ("tasks_full.json" if a.scale == "full" else "tasks.json"))
    data, runs, s = Path(a.data), Path(a.runs), SCALES[a.scale]
    if a.qa_models < 1:
        sys.exit(f"--qa-models: {a.qa_models} is not a positive number of runs")
    if not data.is_dir():
        sys.exit(f"{data}: no such directory (this benchmark needs ../shared/data)")
    lm = [sys.executable, "-m", "lmforge.cli"]
    steps = a.steps.split(",")
    rows: list[dict] = []
    log: list[dict] = []
    curves: dict[str, dict] = {}  # panel title ("qa: ...", "summarize: ...") -> validation curve and final score
    out = Path(a.out)
    if out.is_file() and set(steps) != set(STEP_TASKS):  # a partial rerun keeps the other steps' results
        old = json.loads(out.read_text())
        rows = [r for r in old.get("rows", []) if not any(r["task"].startswith(STEP_TASKS[k]) for k in steps)]
        keep = [STEP_TASKS[k] for k in STEP_TASKS if k not in steps]
        log = [c for c in old.get("commands", []) if any(_command_task(c["command"]) == t for t in keep)]
        curves = {k: c for k, c in old.get("curves", {}).items() if k.split(":")[0] in keep}

    peaks = measured_peaks(2)  # this host's own ceilings, measured before the work (the commands use 2 threads)

    def save() -> None:  # after every task, so an interrupted run keeps what it measured
        write_json(a.out, {"machine": machine_info(), "peaks": peaks, "scale": a.scale, "limits": s, "rows": rows,
                           "commands": log, "curves": curves})

    if a.scale == "full":
        run_full(steps, data, runs, lm, rows, log, save, curves, a.qa_models)
        steps = []  # the quick steps below are skipped
    if "qa" in steps:
        run_dir = runs / "qa-minilm"
        train = [*lm, "qa", "train", "--data", str(data / "qa/nyt_v1.0.json"), "--output", str(run_dir), "--overwrite",
                 "--no-progress", "--epochs", "1", "--lr", "1e-4"]  # a short run: 2x the default lr
        if s["qa_train"]:
            train += ["--max-train-samples", str(s["qa_train"])]
        run(train, log)
        ev = [*lm, "eval", "--task", "qa", "--model", str(run_dir), "--data", str(data / "qa/new_wiki_v1.0.json"),
              "--json", "--predictions", str(runs / "qa-eval/predictions.jsonl")]
        if s["qa_eval"]:
            ev += ["--limit", str(s["qa_eval"])]
        r = run(ev, log)
        rows.append({"task": "qa (new_wiki)", "model": f"minilm-l6 fine-tuned on nyt ({s['qa_train'] or 'all'} q)",
                     "examples": r.get("examples"), "EM": r.get("exact_match"), "F1": r.get("f1"),
                     "error": r.get("error")})
        save()

    if "sum" in steps:
        f = str(data / "summarization/wikilingua_en_1k.jsonl")
        n = s["sum_eval"]
        for model in ("lead-3", "smollm2-135m-instruct", "gemma3-270m"):
            r = run([*lm, "eval", "--task", "summarize", "--model", model, "--data", f, "--limit", str(n), "--tail",
                     "--json", "--max-new-tokens", "96", "--predictions", str(runs / f"sum-{model}/p.jsonl")], log)
            rows.append({"task": "summarize", "model": model + ("" if model == "lead-3" else " zero-shot"),
                         "examples": r.get("examples"), "ROUGE-1": r.get("rouge1"), "ROUGE-2": r.get("rouge2"),
                         "ROUGE-L": r.get("rougeL"), "error": r.get("error")})
        # short LoRA fine-tune on the head of the file (the evaluation rows are the tail: no overlap)
        train_f = runs / "sum-train.jsonl"
        lines = [x for x in Path(f).read_text(encoding="utf-8").split("\n") if x.strip()]  # not splitlines(): U+2028
        train_f.parent.mkdir(parents=True, exist_ok=True)
        train_f.write_text("\n".join(lines[: min(s["sum_train"], len(lines) - n)]) + "\n", encoding="utf-8")
        ft = runs / "sum-ft"
        run([*lm, "finetune", "--task", "summarize", "--data", str(train_f), "--input-field", "document",
             "--target-field", "summary", "--model", "smollm2-135m-instruct", "--lora",
             "--lora-targets", "q,k,v,o", "--max-length", "512",
             "--max-target-length", "96", "--max-steps", str(s["sum_ft_steps"]), "--batch-size", "4", "--lr", "3e-4",
             "--output", str(ft), "--overwrite", "--no-progress", "--eval-every", "0", "--save-every", "0"], log)
        r = run([*lm, "eval", "--task", "summarize", "--model", str(ft), "--data", f, "--limit", str(n), "--tail",
                 "--json", "--max-new-tokens", "96", "--predictions", str(runs / "sum-ft-eval/p.jsonl")], log)
        rows.append({"task": "summarize", "model": f"smollm2 LoRA {s['sum_ft_steps']} steps",
                     "examples": r.get("examples"), "ROUGE-1": r.get("rouge1"), "ROUGE-2": r.get("rouge2"),
                     "ROUGE-L": r.get("rougeL"),
                     "error": r.get("error")})
        save()

    if "mt" in steps:
        f = str(data / "translation/bible_ot_en_es.jsonl")
        n = s["mt_eval"]
        for model in ("smollm2-135m-instruct", "gemma3-270m"):
            r = run([*lm, "eval", "--task", "translate", "--from", "en", "--to", "es", "--model", model, "--data", f,
                     "--limit", str(n), "--tail", "--json", "--max-new-tokens", "96",
                     "--predictions", str(runs / f"mt-{model}/p.jsonl")], log)
            rows.append({"task": "translate en-es", "model": model + " zero-shot", "examples": r.get("examples"),
                         "BLEU": r.get("bleu"), "chrF": r.get("chrf"), "error": r.get("error")})
        train_f = runs / "mt-train.jsonl"
        lines = [x for x in Path(f).read_text(encoding="utf-8").split("\n") if x.strip()]  # not splitlines(): U+2028
        train_f.write_text("\n".join(lines[: s["mt_train"]]) + "\n", encoding="utf-8")
        ft = runs / "mt-ft"
        run([*lm, "finetune", "--task", "translate", "--from", "en", "--to", "es", "--data", str(train_f),
             "--input-field", "en", "--target-field", "es", "--model", "smollm2-135m-instruct", "--lora",
             "--lora-targets", "q,k,v,o", "--lora-rank", "8", "--lora-alpha", "16", "--max-length",
             "256", "--max-steps", str(s["mt_ft_steps"]), "--batch-size", "8", "--lr", "3e-4", "--output", str(ft),
             "--overwrite", "--no-progress", "--eval-every", "0", "--save-every", "0"], log)
        r = run([*lm, "eval", "--task", "translate", "--from", "en", "--to", "es", "--model", str(ft), "--data", f,
                 "--limit", str(n), "--tail", "--json", "--max-new-tokens", "96",
                 "--predictions", str(runs / "mt-ft-eval/p.jsonl")], log)
        rows.append({"task": "translate en-es", "model": f"smollm2 LoRA {s['mt_ft_steps']} steps",
                     "examples": r.get("examples"), "BLEU": r.get("bleu"), "chrF": r.get("chrf"),
                     "error": r.get("error")})

    if curves:
        png = curves_png(Path(a.out))
        plot_curves(curves, png)
        print(f"curves: {png}")
    cols = [("task", "task"), ("model", "model"), ("minutes", "train min"), ("precision", "precision"),
            ("examples", "n"), ("EM", "EM"), ("F1", "F1"),
            ("ROUGE-1", "R-1"), ("ROUGE-2", "R-2"), ("ROUGE-L", "R-L"), ("BLEU", "BLEU"), ("chrF", "chrF"),
            ("error", "error")]
    print(format_table(rows, cols))
    print("\ncommands:\n" + "\n".join(f"  {r['command']}   # {r['seconds']}s" for r in log))
    save()


if __name__ == "__main__":
    main()
