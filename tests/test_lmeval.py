"""lm-evaluation-harness as a real client (issue 37): `lm_eval --model local-completions` against `lmforge serve`
on a local multiple-choice task gives, item by item, the log-likelihoods of lm-eval's own `--model hf` backend on
the same model directory (float32, within 1e-3), and the same accuracy.

The task is 200 cloze items built from lmforge's own docs (docs/*.md, in every clone): eight words of context,
the next word and three distractor words; a task YAML over a local JSONL file (the Hub is not needed). The model
is a tiny random llama saved by transformers, with a byte-level BPE trained on the items.

Skipped when lm-eval is not installed (`pip install lm-eval torch==<installed>`; it does not replace torch).
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm-eval)")
httpx = pytest.importorskip("httpx")

from conftest import make_hf_model  # noqa: E402

from lmforge.tokenizer import Tokenizer  # noqa: E402

pytestmark = [pytest.mark.lmeval, pytest.mark.slow]  # two lm_eval runs and a server: about a minute

ROOT = Path(__file__).resolve().parents[1]
N_ITEMS = 200
CONTEXT_WORDS = 8
TOL = 1e-3  # the bound: per-item log-likelihood, local-completions vs lm-eval's hf backend


def cloze_items(n: int = N_ITEMS, seed: int = 0) -> list[dict]:
    """n cloze items from the words of docs/*.md: context, four choices (one the true next word), label."""
    words = []
    for f in sorted((ROOT / "docs").glob("*.md")):
        words += re.findall(r"[A-Za-z]{2,}", f.read_text(encoding="utf-8"))
    vocab = sorted(set(w.lower() for w in words))
    if len(words) < 20 * n:
        pytest.skip(f"docs/*.md has only {len(words)} words: too few for {n} cloze items")
    rng = random.Random(seed)
    items = []
    for start in sorted(rng.sample(range(len(words) - CONTEXT_WORDS - 1), n)):
        context = " ".join(words[start: start + CONTEXT_WORDS])
        answer = words[start + CONTEXT_WORDS].lower()
        choices = [answer] + rng.sample([w for w in vocab if w != answer], 3)
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return items


TASK_YAML = """task: lmforge_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """The model directory (tiny llama + its tokenizer), and the task folder (YAML + JSONL)."""
    root = tmp_path_factory.mktemp("lmeval")
    items = cloze_items()
    texts = [f"{it['context']} {c}" for it in items for c in it["choices"]]
    tok = Tokenizer.train_bpe(texts * 2, vocab_size=400, min_frequency=1)
    model_dir = root / "model"
    make_hf_model("llama", vocab=tok.vocab_size).save_pretrained(model_dir)
    tok.save(model_dir)
    task_dir = root / "task"
    task_dir.mkdir()
    data = task_dir / "cloze.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    (task_dir / "lmforge_cloze.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")
    return {"root": root, "model": model_dir, "tasks": task_dir}


def lm_eval(model: str, model_args: str, tasks: Path, out: Path, *extra: str) -> dict:
    """Run the lm_eval CLI -> {doc_id: [log-likelihood per choice]}, accuracy."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(out / "datasets-cache")}
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", "lmforge_cloze",
           "--include_path", str(tasks), "--batch_size", "16", "--log_samples", "--output_path", str(out),
           "--seed", "0", *extra]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    [results] = list(out.rglob("results_*.json"))
    [samples] = list(out.rglob("samples_lmforge_cloze_*.jsonl"))
    acc = json.loads(results.read_text())["results"]["lmforge_cloze"]["acc,none"]
    per_item = {}
    for line in samples.read_text().splitlines():
        s = json.loads(line)
        per_item[s["doc_id"]] = [float(r[0][0]) for r in s["resps"]]
    return {"acc": acc, "loglik": per_item}


def test_local_completions_matches_the_hf_backend(setup):
    port = free_port()
    log = open(setup["root"] / "serve.log", "w+")  # a file, not a pipe: a full pipe would block the server
    server = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--model", str(setup["model"]),
                               "--port", str(port), "--quantize", "none", "--log-level", "warning"],
                              stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (setup["root"] / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "lmforge serve did not come up in 120 s"
            time.sleep(0.5)
        served = lm_eval("local-completions",
                         f"base_url={url}/v1/completions,model={setup['model']},tokenizer={setup['model']},"
                         "tokenizer_backend=huggingface,max_length=128",
                         setup["tasks"], setup["root"] / "out-served")
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    hf = lm_eval("hf", f"pretrained={setup['model']},dtype=float32", setup["tasks"], setup["root"] / "out-hf",
                 "--device", "cpu")
    assert sorted(served["loglik"]) == sorted(hf["loglik"]) == list(range(N_ITEMS))
    worst = max(abs(a - b) for d in hf["loglik"] for a, b in zip(served["loglik"][d], hf["loglik"][d]))
    assert worst < TOL, worst
    assert all(len(served["loglik"][d]) == 4 for d in served["loglik"])
    assert served["acc"] == hf["acc"]
