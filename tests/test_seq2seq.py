"""Decoder fine-tuning on input/target pairs: loss mask, training, export; task evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model

from lmforge.cli import main
from lmforge.tasks.seq2seq import IGNORE, FinetuneConfig, build_example, collate, finetune, lm_loss
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig

transformers = pytest.importorskip("transformers")

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    words = "one two three four five six seven eight nine ten red green blue".split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 10
    tok = Tokenizer.train_bpe(corpus, vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                              min_frequency=1, eos_token="<|im_end|>", bos_token="<|endoftext|>")
    tok.chat_template = CHAT
    d = tmp_path_factory.mktemp("lm")
    make_hf_model("llama", vocab=tok.vocab_size).save_pretrained(d)
    tok.save(d)
    return d


def test_loss_mask_covers_exactly_the_target_tokens(tiny_lm):
    tok = Tokenizer.from_dir(tiny_lm)
    ex = build_example(tok, "translate this: one two three", "red green", max_length=64)
    n_prompt = sum(1 for x in ex.labels if x == IGNORE)
    prompt_text = tok.apply_chat_template([{"role": "user", "content": "translate this: one two three"}])
    assert ex.input_ids[:n_prompt] == tok.encode(prompt_text, add_special_tokens=False)
    target = ex.input_ids[n_prompt:]
    assert ex.labels[n_prompt:] == target  # every target token is supervised, nothing else
    assert target[-1] == tok.eos_id  # the model learns to stop
    assert tok.decode(target[:-1]).strip() == "red green"
    batch = collate([ex, build_example(tok, "x", "blue", max_length=64)], pad_id=tok.pad_id)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()  # padding never counts


def test_lm_loss_equals_full_cross_entropy_on_targets(tiny_lm):
    from lmforge.checkpoints import load_checkpoint

    ck = load_checkpoint(tiny_lm)
    tok = ck.tokenizer
    batch = collate([build_example(tok, "one two", "three four", 64), build_example(tok, "five", "six", 64)],
                    pad_id=tok.pad_id)
    loss, n = lm_loss(ck.model, batch)
    logits = ck.model.logits(batch["input_ids"], batch["attention_mask"])  # collate's labels are the next tokens
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                            ignore_index=IGNORE)
    assert abs(float(loss) - float(ref)) < 1e-5 and n == int((batch["labels"] != IGNORE).sum())


def test_finetune_learns_and_exports(tiny_lm, tmp_path):
    rows = [{"input": f"{a} {b}", "target": f"{b} {a}"} for a in ("one", "two", "three", "four")
            for b in ("red", "green", "blue")] * 4
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = FinetuneConfig(model=str(tiny_lm), task="instruct", data=str(data), max_length=64, eval_fraction=0.1)
    tc = TrainConfig(output_dir=tmp_path / "run", epochs=8, batch_size=8, lr=3e-3, warmup=0.1, eval_every=20,
                     keep_best="eval_loss", progress=False, seed=0)
    s = finetune(c, tc, log=lambda *_: None)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] < losses[0] * 0.5
    run = Path(s["run_dir"])
    assert (run / "finetune.json").exists() and (run / "config.json").exists()
    # the run dir loads in transformers with equal logits
    from lmforge.checkpoints import load_checkpoint

    ours = load_checkpoint(run).model
    hf = transformers.AutoModelForCausalLM.from_pretrained(run).eval()
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        assert (ours.logits(ids) - hf(ids).logits).abs().max() < 1e-4


def test_finetune_bad_input(tiny_lm, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"input": "a", "target": "b"}\n{"input": "c"}\n')
    assert main(["finetune", "--model", str(tiny_lm), "--data", str(data)]) == 2
    assert "target" in capsys.readouterr().err
    assert main(["finetune", "--model", str(tiny_lm), "--data", str(data), "--task", "translate",
                 "--to", "xx"]) == 2
    assert "unknown language code 'xx'" in capsys.readouterr().err


def test_eval_summarize_lead_baseline_and_translate(tiny_lm, tmp_path, capsys):
    f = tmp_path / "s.jsonl"
    f.write_text(json.dumps({"document": "The cat sat. It was happy. Then it left. Later it rained.",
                             "summary": "The cat sat. It was happy. Then it left."}) + "\n")
    assert main(["eval", "--task", "summarize", "--model", "lead-3", "--data", str(f), "--json",
                 "--predictions", str(tmp_path / "p.jsonl")]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["rouge1"] == 100.0 and Path(s["predictions"]).exists()
    t = tmp_path / "t.jsonl"
    t.write_text("".join(json.dumps({"en": "one two", "es": "uno dos"}) + "\n" for _ in range(3)))
    assert main(["eval", "--task", "translate", "--to", "es", "--model", str(tiny_lm), "--data", str(t),
                 "--max-new-tokens", "4", "--json", "--predictions", str(tmp_path / "tp.jsonl")]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["examples"] == 3 and 0.0 <= s["bleu"] <= 100.0
    assert main(["eval", "--task", "translate", "--to", "zz", "--model", str(tiny_lm), "--data", str(t)]) == 2


def test_an_interrupted_eval_keeps_its_outputs_and_continues(tiny_lm, tmp_path, capsys, monkeypatch):
    """Ctrl-C during `eval` keeps every finished batch in predictions.jsonl.partial and says how to continue;
    the same command then decodes only the rest, and scores what an uninterrupted run scores."""
    from lmforge.generator import Generator

    t = tmp_path / "t.jsonl"
    t.write_text("".join(json.dumps({"en": f"one two {w}", "es": f"uno dos {w}"}) + "\n"
                         for w in "red green blue black white pink gray brown".split()))
    argv = ["eval", "--task", "translate", "--to", "es", "--model", str(tiny_lm), "--data", str(t),
            "--max-new-tokens", "4", "--batch-size", "3", "--json"]
    assert main([*argv, "--predictions", str(tmp_path / "full" / "p.jsonl")]) == 0
    full = json.loads(capsys.readouterr().out)
    real, calls, die = Generator.generate, [], [True]

    def dies_on_the_third_batch(self, prompts, **kw):
        calls.append(len(prompts))
        if len(calls) == 3 and die[0]:
            raise KeyboardInterrupt
        return real(self, prompts, **kw)

    monkeypatch.setattr(Generator, "generate", dies_on_the_third_batch)
    out = tmp_path / "cut" / "p.jsonl"
    assert main([*argv, "--predictions", str(out)]) == 130
    err = capsys.readouterr().err
    assert "6 of 8 outputs kept" in err and f"--predictions {out} to continue" in err
    assert not out.exists() and len(out.with_name("p.jsonl.partial").read_text().splitlines()) == 1 + 6
    calls.clear()
    assert main([*argv, "--predictions", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert calls == [2]  # only the two outputs the interrupted run had not finished
    assert again["bleu"] == full["bleu"] and again["chrf"] == full["chrf"]
    assert [json.loads(x)["prediction"] for x in out.read_text().splitlines()] == \
        [json.loads(x)["prediction"] for x in (tmp_path / "full" / "p.jsonl").read_text().splitlines()]
    assert not out.with_name("p.jsonl.partial").exists()
    # other decoding settings never reuse an interrupted run's outputs
    calls.clear()
    other = tmp_path / "other" / "p.jsonl"
    assert main([*argv, "--predictions", str(other)]) == 130
    calls.clear()
    die[0] = False
    longer = [("6" if a == "4" else a) for a in argv]  # --max-new-tokens 6
    assert main([*longer, "--predictions", str(other)]) == 0
    assert calls == [3, 3, 2] and "continuing" not in capsys.readouterr().err


def test_bucketed_batches_give_the_loss_of_one_example_at_a_time(tiny_lm):
    """Length-bucketed, padded micro-batches weighted by their target counts (as the Trainer does) give the
    mean over all target tokens of unpadded one-example computation: the same loss and the same gradients."""
    from lmforge.checkpoints import load_checkpoint
    from lmforge.train import DatasetBatches

    ck = load_checkpoint(tiny_lm)
    model, tok = ck.model.eval(), ck.tokenizer  # eval: no dropout, backward still works
    words = "one two three four five six seven eight nine ten red green blue".split()
    exs = [build_example(tok, " ".join(words[i % 13:][: 1 + i % 7]), " ".join(words[: 1 + (3 * i) % 5]), 64)
           for i in range(14)]
    assert len({len(e) for e in exs}) > 4  # varied lengths: batches need padding

    def summed(batches) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        tot, n = torch.zeros((), dtype=torch.float64), 0
        for b in batches:
            loss, k = lm_loss(model, b)
            (loss * k).backward()  # the Trainer's weighting: sum over the micro-batch's targets
            tot, n = tot + loss.detach().double() * k, n + k
        return tot / n, n, {k: p.grad.clone() for k, p in model.named_parameters()}

    ref, n_ref, g_ref = summed(collate([e], pad_id=tok.pad_id) for e in exs)  # unpadded, one at a time
    source = DatasetBatches(exs, 4, collate_fn=lambda b: collate(b, pad_id=tok.pad_id), lengths=[len(e) for e in exs],
                            seed=3, bucket_size_multiplier=2)
    batches = list(source.batches(0))
    assert sum(int((b["attention_mask"] == 0).sum()) for b in batches) > 0  # padding is really there
    got, n_got, g_got = summed(batches)
    assert n_got == n_ref == sum(sum(1 for x in e.labels if x != IGNORE) for e in exs)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for k in g_ref:
        torch.testing.assert_close(g_got[k], g_ref[k], rtol=1e-4, atol=1e-6)


def test_finetune_hands_the_trainer_lengths_for_bucketing(tiny_lm, tmp_path, monkeypatch):
    import lmforge.tasks.seq2seq as S

    rows = [{"input": "one two " * (1 + i % 5), "target": "red " * (1 + i % 3)} for i in range(12)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = []
    monkeypatch.setattr(S, "run_training", lambda run, tc, resume=False: runs.append(run) or {})
    finetune(FinetuneConfig(model=str(tiny_lm), data=str(data), max_length=64), TrainConfig(output_dir=tmp_path),
             log=lambda *_: None)
    (run,) = runs
    assert run.lengths == [len(e) for e in run.train_data] and len(set(run.lengths)) > 1


def test_finetune_task_recipes_are_the_defaults_and_flags_override_them(tmp_path, monkeypatch):
    """`finetune --task translate|summarize` with no flags runs the task's measured recipe (RECIPES); each
    flag given wins over its part of the recipe; --task instruct keeps the generic defaults."""
    from lmforge.tasks.seq2seq import RECIPES

    seen: list = []
    monkeypatch.setattr("lmforge.tasks.seq2seq.finetune",
                        lambda c, tc, **kw: seen.append((c, tc)) or {"run_dir": "r", "steps": 0, "stopped": "x",
                                                                   "elapsed_s": 0, "validation": {}})
    data = tmp_path / "p.jsonl"
    data.write_text('{"input": "a", "target": "b"}\n')
    base = ["finetune", "--data", str(data), "--output", str(tmp_path / "run")]
    assert main(base + ["--task", "translate", "--to", "es"]) == 0
    c, tc = seen[-1]
    r = RECIPES["translate"]
    assert (c.model, c.lora, c.lora_rank, c.lora_targets, c.max_length) == (
        r["model"], True, r["lora_rank"], r["lora_targets"], r["max_length"])
    assert (tc.lr, tc.batch_size, tc.max_steps) == (r["lr"], r["batch_size"], r["max_steps"])
    assert main(base + ["--task", "translate", "--to", "es", "--epochs", "2", "--overwrite"]) == 0
    assert (seen[-1][1].epochs, seen[-1][1].max_steps) == (2.0, None)  # --epochs replaces the step budget
    assert main(base + ["--task", "translate", "--to", "es", "--no-lora", "--lr", "1e-5", "--model", "m",
                        "--overwrite"]) == 0
    c, tc = seen[-1]
    assert (c.model, c.lora, tc.lr, tc.batch_size) == ("m", False, 1e-5, r["batch_size"])
    assert main(base + ["--task", "translate", "--to", "es", "--no-lora", "--overwrite"]) == 0
    assert seen[-1][1].lr == 3e-5  # the recipe's LoRA lr is not used for full fine-tuning
    assert main(base + ["--task", "instruct", "--overwrite"]) == 0
    c, tc = seen[-1]
    assert (c.model, c.lora, tc.lr, tc.batch_size, c.max_length) == ("smollm2-135m-instruct", False, 3e-5, 4, 512)
    assert main(base + ["--task", "instruct", "--lora", "--overwrite"]) == 0
    assert seen[-1][1].lr == 2e-4
    assert main(base + ["--task", "summarize", "--overwrite"]) == 0
    c, tc = seen[-1]
    s = RECIPES["summarize"]
    assert (c.model, c.lora, tc.lr, c.max_length) == (s["model"], bool(s.get("lora")), s["lr"], s["max_length"])
