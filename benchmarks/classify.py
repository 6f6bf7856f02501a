"""Fine-tuning for classification: lmforge vs transformers, same model, data, hyperparameters and epochs.

    python benchmarks/classify.py [--datasets tweets-sentiment,bbc-news] [--train-rows 8000] [--threads 2]
                                  [--out benchmarks/results/classify.json]

Each side runs in its own subprocess (its own peak RSS). Both start from minilm-l6 with a fresh
classification head (CLS + pooler, as BertForSequenceClassification), see the same training rows (a
seeded, class-balanced subset of the dataset's fixed train split) and are scored on the whole test split.
  lmforge       the Trainer with length-bucketed batches and dynamic padding (what `lmforge classify train`
                does), AdamW (no decay on norms/biases/embeddings), linear schedule with 10% warmup.
  transformers  AutoModelForSequenceClassification in a plain PyTorch loop: shuffled DataLoader,
                DataCollatorWithPadding, AdamW, get_linear_schedule_with_warmup (10%).
  tfidf+lr      scikit-learn TF-IDF (1-2 grams) + logistic regression on the FULL training split.
Reported: training samples/s (training loop only), peak RSS, test accuracy and macro-F1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    RESULTS_DIR,
    format_table,
    machine_info,
    peak_rss_mb,
    report,
    run_worker,
    set_threads,
    write_json,
)

SETTINGS = {  # the setting for tweets; bbc-news articles are long, so 256 tokens
    "tweets-sentiment": {"max_length": 64, "batch_size": 32, "lr": 5e-5, "epochs": 1.0},
    "bbc-news": {"max_length": 256, "batch_size": 16, "lr": 5e-5, "epochs": 1.0},
}
MODEL = "minilm-l6"
SEED = 42


def _data(dataset: str, train_rows: int):
    from lmforge.data import build_label_map, load_builtin
    from lmforge.tasks.classify import stratified_head

    train, test, _ = load_builtin(dataset)
    labels = build_label_map(train)
    return stratified_head(train, train_rows, SEED) if train_rows else train, test, labels


def _scores(y_true, y_pred, labels) -> dict:
    from lmforge.metrics import classification_report

    rep = classification_report(y_true, y_pred, labels)
    return {"accuracy": round(100 * rep["accuracy"], 2), "macro_f1": round(100 * rep["macro_f1"], 2)}


# ---- workers ---------------------------------------------------------------------------------------------
def worker_lmforge(dataset: str, train_rows: int, threads: int) -> dict:
    import torch

    set_threads(threads)
    from lmforge.tasks.classify import (
        ClassifyConfig,
        build_model,
        classification_loss,
        encode,
        make_collate,
        predict_logits,
    )
    from lmforge.train import TrainConfig, Trainer, seed_everything

    s = SETTINGS[dataset]
    train, test, labels = _data(dataset, train_rows)
    ids = {lab: i for i, lab in enumerate(labels)}
    seed_everything(SEED)
    c = ClassifyConfig(model=MODEL, data=dataset, max_length=s["max_length"])
    model, tok, _ = build_model(c, len(labels), labels)
    feats = encode(tok, train, ids, s["max_length"])
    collate = make_collate(tok.pad_id)
    with tempfile.TemporaryDirectory() as d:
        tc = TrainConfig(output_dir=d, epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], warmup=0.1,
                         weight_decay=0.01, seed=SEED, progress=False, log_every=50)
        trainer = Trainer(model, tc, feats, classification_loss, collate_fn=collate,
                          lengths=[len(f["input_ids"]) for f in feats])
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
    peak_train = peak_rss_mb()
    test_feats = encode(tok, test, ids, s["max_length"])
    t0 = time.perf_counter()
    logits = predict_logits(model, test_feats, collate, batch_size=64)
    eval_s = time.perf_counter() - t0
    tokens = sum(len(f["input_ids"]) for f in feats)
    return {"impl": "lmforge", "dataset": dataset, "train_rows": len(feats), "train_s": round(train_s, 1),
            "samples_per_s": round(len(feats) / train_s, 2), "real_tokens": tokens, "peak_mb": round(peak_train),
            "eval_samples_per_s": round(len(test_feats) / eval_s, 1),
            **_scores([f["label"] for f in test_feats], logits.argmax(-1).tolist(), labels),
            "torch_threads": torch.get_num_threads()}


def worker_transformers(dataset: str, train_rows: int, threads: int) -> dict:
    import torch

    set_threads(threads)
    import transformers
    from torch.utils.data import DataLoader

    from lmforge.checkpoints.registry import resolve

    s = SETTINGS[dataset]
    train, test, labels = _data(dataset, train_rows)
    ids = {lab: i for i, lab in enumerate(labels)}
    path, _ = resolve(MODEL)
    torch.manual_seed(SEED)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=ids)
    enc = tok([e.text for e in train], truncation=True, max_length=s["max_length"])
    rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "token_type_ids": enc["token_type_ids"][i], "labels": ids[e.label]} for i, e in enumerate(train)]
    collator = transformers.DataCollatorWithPadding(tok)
    g = torch.Generator().manual_seed(SEED)
    loader = DataLoader(rows, batch_size=s["batch_size"], shuffle=True, collate_fn=collator, generator=g)
    steps = len(loader) * int(s["epochs"])
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.01)
    sched = transformers.get_linear_schedule_with_warmup(opt, int(0.1 * steps), steps)
    model.train()
    t0 = time.perf_counter()
    for _ in range(int(s["epochs"])):
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0
    peak_train = peak_rss_mb()
    model.eval()
    tenc = tok([e.text for e in test], truncation=True, max_length=s["max_length"])
    trows = [{"input_ids": tenc["input_ids"][i], "attention_mask": tenc["attention_mask"][i],
              "token_type_ids": tenc["token_type_ids"][i]} for i in range(len(test))]
    preds = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in DataLoader(trows, batch_size=64, shuffle=False, collate_fn=collator):
            preds += model(**b).logits.argmax(-1).tolist()
    eval_s = time.perf_counter() - t0
    tokens = sum(len(r["input_ids"]) for r in rows)
    return {"impl": "transformers", "dataset": dataset, "train_rows": len(rows), "train_s": round(train_s, 1),
            "samples_per_s": round(len(rows) / train_s, 2), "real_tokens": tokens, "peak_mb": round(peak_train),
            "eval_samples_per_s": round(len(test) / eval_s, 1),
            **_scores([ids[e.label] for e in test], preds, labels)}


def worker_tfidf(dataset: str, threads: int) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train, test, labels = _data(dataset, 0)
    ids = {lab: i for i, lab in enumerate(labels)}
    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x = vec.fit_transform([e.text for e in train])
    clf = LogisticRegression(max_iter=2000, C=4.0).fit(x, [ids[e.label] for e in train])
    train_s = time.perf_counter() - t0
    pred = clf.predict(vec.transform([e.text for e in test])).tolist()
    return {"impl": "tfidf+lr", "dataset": dataset, "train_rows": len(train), "train_s": round(train_s, 1),
            "samples_per_s": round(len(train) / train_s, 1), "peak_mb": round(peak_rss_mb()),
            **_scores([ids[e.label] for e in test], pred, labels)}


# ---- parent ----------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="tweets-sentiment,bbc-news")
    ap.add_argument("--train-rows", type=int, default=8000, help="training rows per dataset (0 = all)")
    ap.add_argument("--impls", default="lmforge,transformers,tfidf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS_DIR / "classify.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dataset", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        fn = {"lmforge": lambda: worker_lmforge(a.dataset, a.train_rows, a.threads),
              "transformers": lambda: worker_transformers(a.dataset, a.train_rows, a.threads),
              "tfidf": lambda: worker_tfidf(a.dataset, a.threads)}[a.worker]
        report(fn())
        return
    rows = []
    for ds in a.datasets.split(","):
        for impl in a.impls.split(","):
            print(f"running {impl} on {ds} ...", file=sys.stderr, flush=True)
            r = run_worker([__file__, "--worker", impl, "--dataset", ds, "--train-rows", str(a.train_rows),
                            "--threads", str(a.threads)], a.threads, timeout=4 * 3600)
            r.setdefault("impl", impl)
            r.setdefault("dataset", ds)
            rows.append(r)
            print(r, file=sys.stderr, flush=True)
        ref = next((r for r in rows if r["dataset"] == ds and r["impl"] == "transformers"), None)
        for r in rows:
            comparable = "samples_per_s" in r and ref and "samples_per_s" in ref and r["impl"] != "tfidf+lr"
            if r["dataset"] == ds and comparable:
                r["speed_ratio"] = round(r["samples_per_s"] / ref["samples_per_s"], 2)
                r["acc_delta"] = round(r["accuracy"] - ref["accuracy"], 2)
    cols = [("dataset", "dataset"), ("impl", "impl"), ("train_rows", "train rows"),
            ("samples_per_s", "train samples/s"),
            ("speed_ratio", "vs transformers"), ("peak_mb", "peak MB"), ("accuracy", "test acc %"),
            ("acc_delta", "acc delta"), ("macro_f1", "macro-F1 %"), ("error", "error")]
    print(format_table(rows, cols))
    write_json(a.out, {"machine": machine_info(), "settings": SETTINGS, "train_rows": a.train_rows, "rows": rows})
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
