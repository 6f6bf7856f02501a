"""Long inputs at inference are cut the way fine-tuning cuts them (issue 36, item 8): the prompt's first and last
tokens (prompts.cut_middle, shared with seq2seq.build_example), to the prompt length a fine-tuned run dir
recorded, said once on stderr."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_seq2seq import tiny_lm  # noqa: F401  (the fixture: a tiny llama with a chat template)

from lmforge.cli import main
from lmforge.tasks.prompts import cut_middle, summarize_prompt
from lmforge.tasks.seq2seq import IGNORE, FinetuneConfig, build_example, finetune, trained_prompt_length
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig

WORDS = "one two three four five six seven eight nine ten red green blue".split()
NOTE = "are cut to their first"


def long_document(tok: Tokenizer, n_tokens: int, seed: int) -> str:
    """A document of about n_tokens tokens whose start and end differ from its middle."""
    body = " ".join(WORDS[(seed + i * 7) % len(WORDS)] for i in range(n_tokens))
    doc = f"red red red {body} blue blue blue"
    while len(tok.encode(doc, add_special_tokens=False)) > n_tokens:
        doc = doc[: int(len(doc) * 0.95)].rsplit(" ", 1)[0] + " blue blue blue"
    return doc


@pytest.fixture(scope="module")
def tuned(tiny_lm, tmp_path_factory) -> Path:  # noqa: F811
    """A summarize run fine-tuned for 2 steps with 48-token prompts (max_length 64 less max_target_length 16)."""
    d = tmp_path_factory.mktemp("tuned")
    data = d / "train.jsonl"
    data.write_text("".join(json.dumps({"document": f"{a} {b} {a}", "summary": f"{a} {b}"}) + "\n"
                            for a in WORDS for b in WORDS[:3]))
    c = FinetuneConfig(model=str(tiny_lm), task="summarize", data=str(data), input_field="document",
                       target_field="summary", max_length=64, max_target_length=16)
    tc = TrainConfig(output_dir=d / "run", max_steps=2, batch_size=4, eval_every=2, save_every=2, progress=False,
                     plot=False, seed=0)
    return Path(finetune(c, tc, log=lambda *_: None)["run_dir"])


def recording(monkeypatch) -> list[tuple[list[str], dict]]:
    from lmforge.generator import Generator

    calls: list[tuple[list[str], dict]] = []
    real = Generator.generate

    def generate(self, prompts, **kw):
        calls.append(([prompts] if isinstance(prompts, str) else list(prompts), kw))
        return real(self, prompts, **kw)

    monkeypatch.setattr(Generator, "generate", generate)
    return calls


def full_prompt_ids(tok: Tokenizer, doc: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": summarize_prompt(doc)}], add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def assert_cut_like_finetuning(tok: Tokenizer, prompt: str, doc: str, limit: int) -> None:
    got, full = tok.encode(prompt, add_special_tokens=False), full_prompt_ids(tok, doc)
    want = cut_middle(full, limit)
    assert len(full) > 2500 and limit - 2 <= len(got) <= limit
    assert got[:limit // 2 - 2] == want[:limit // 2 - 2] and got[-(limit // 2 - 2):] == want[-(limit // 2 - 2):]
    assert prompt.startswith("<|im_start|>user\nSummarize")  # the instruction survives
    assert "red red" in prompt or limit < 100  # and the document's lead, when the head reaches past the instruction
    assert prompt.endswith("blue blue<|im_end|>\n<|im_start|>assistant\n")  # the turn end survives


def test_finetuning_records_its_prompt_length_and_cuts_with_the_shared_function(tuned):
    tok = Tokenizer.from_dir(tuned)
    assert json.loads((tuned / "finetune.json").read_text())["max_prompt_length"] == 48
    assert trained_prompt_length(str(tuned)) == 48 and trained_prompt_length(str(tuned / "final")) == 48
    doc = long_document(tok, 3000, 0)
    ex = build_example(tok, summarize_prompt(doc), "red blue", max_length=64, max_target_length=16)
    n_prompt = sum(1 for x in ex.labels if x == IGNORE)
    assert ex.input_ids[:n_prompt] == cut_middle(full_prompt_ids(tok, doc), n_prompt)


def test_eval_cuts_a_long_document_as_the_run_was_fine_tuned(tuned, tmp_path, capsys, monkeypatch):
    tok = Tokenizer.from_dir(tuned)
    docs = [long_document(tok, 3000, s) for s in range(3)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"document": d, "summary": "red blue"}) + "\n" for d in docs))
    calls = recording(monkeypatch)
    assert main(["eval", "--task", "summarize", "--model", str(tuned), "--data", str(data), "--max-new-tokens", "4",
                 "--batch-size", "2", "--json", "--predictions", str(tmp_path / "p.jsonl")]) == 0
    err = capsys.readouterr().err
    assert err.count(NOTE) == 1, err  # said once for the run, not per batch
    assert ("inputs over 48 tokens are cut to their first 24 and last 24 tokens, as fine-tuning did (the prompt "
            f"length {tuned} was fine-tuned with): 3 of 3 inputs") in err
    prompts = [p for batch, _ in calls for p in batch]
    assert len(calls) == 2 and all(kw["chat"] is False and kw["add_special_tokens"] is False for _, kw in calls)
    assert len(prompts) == 3
    for doc in docs:  # each prompt is found by the end fine-tuning's cut keeps
        tail = tok.decode(cut_middle(full_prompt_ids(tok, doc), 48)[-20:], skip_special_tokens=False)
        [prompt] = [p for p in prompts if p.endswith(tail)]
        assert_cut_like_finetuning(tok, prompt, doc, 48)


def test_eval_of_a_base_model_keeps_the_start_too(tiny_lm, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Not fine-tuned: cut to the context (128) less --max-new-tokens, still start and end (the last tokens
    alone would lose the instruction); --max-prompt-tokens sets the length."""
    tok = Tokenizer.from_dir(tiny_lm)
    doc = long_document(tok, 3000, 1)
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"document": doc, "summary": "red blue"}) + "\n")
    calls = recording(monkeypatch)
    argv = ["eval", "--task", "summarize", "--model", str(tiny_lm), "--data", str(data), "--max-new-tokens", "8",
            "--json", "--predictions", str(tmp_path / "p.jsonl")]
    assert main(argv) == 0
    assert capsys.readouterr().err.count("inputs over 120 tokens are cut to their first 60 and last 60") == 1
    assert_cut_like_finetuning(tok, calls[-1][0][0], doc, 120)
    assert main([*argv, "--max-prompt-tokens", "40"]) == 0
    assert capsys.readouterr().err.count("inputs over 40 tokens are cut to their first 20 and last 20") == 1
    assert_cut_like_finetuning(tok, calls[-1][0][0], doc, 40)


def test_task_verbs_cut_as_the_run_was_fine_tuned(tuned, tmp_path, capsys):
    tok = Tokenizer.from_dir(tuned)
    files = []
    for s in range(2):
        f = tmp_path / f"doc{s}.txt"
        f.write_text(long_document(tok, 3000, s))
        files.append(str(f))
    for argv in (["summarize", "--model", str(tuned), "--max-new-tokens", "4", *files],  # batched
                 ["summarize", "--model", str(tuned), "--max-new-tokens", "4", "--no-stream", files[0]],  # one
                 ["translate", "--model", str(tuned), "--to", "es", "--max-new-tokens", "4", files[1]],  # streamed
                 ["ask", "--model", str(tuned), "--max-new-tokens", "4", "--context", files[0], "one?", "two?"]):
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert err.count(NOTE) == 1 and "inputs over 48 tokens" in err and "fine-tuned with" in err, err
    short = tmp_path / "short.txt"
    short.write_text("red green blue")
    assert main(["summarize", "--model", str(tuned), "--max-new-tokens", "4", "--max-prompt-tokens", "100",
                 str(short)]) == 0
    assert NOTE not in capsys.readouterr().err  # nothing cut, nothing said
