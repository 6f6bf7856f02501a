"""Extractive QA end to end on a tiny random bert and a generated SQuAD task: the answer is the name after 'is'."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_hf_model

from lmforge import cli
from lmforge.data.squad import SquadExample, read_squad
from lmforge.errors import CheckpointError, ConfigError
from lmforge.tasks.qa import (
    QAConfig,
    answer,
    best_answers,
    evaluate,
    load_qa,
    load_qa_ensemble,
    make_collate,
    make_features,
    pair_template,
    predict_examples,
    span_logits,
    split_by_article,
    train,
)
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

FILLER = "the a cat dog sat ran on under mat tree house car blue red small big quickly slowly near far".split()
NAMES = "alice bob carol dave erin frank grace heidi ivan judy mallory oscar peggy trent victor wendy".split()
QUESTIONS = ["what is it ?", "who is it ?", "which name is it ?", "tell me who it is ?"]


def make_example(rng: random.Random, qid: str, title: str, n_words: int | None = None) -> dict:
    """A context of filler words with one '... is NAME' inside; the answer is NAME."""
    words = [rng.choice(FILLER) for _ in range(n_words or rng.randint(6, 40))]
    at = rng.randint(0, len(words))
    name = rng.choice(NAMES)
    words[at:at] = ["is", name]
    context = " ".join(words)
    start = len(" ".join(words[: at + 1])) + 1
    assert context[start: start + len(name)] == name
    return {"title": title, "context": context, "qid": qid, "question": rng.choice(QUESTIONS),
            "answer": name, "start": start}


def squad_json(rows: list[dict]) -> dict:
    data: dict[str, list] = {}
    for r in rows:
        data.setdefault(r["title"], []).append(
            {"context": r["context"], "qas": [{"id": r["qid"], "question": r["question"],
                                               "answers": [{"text": r["answer"], "answer_start": r["start"]}]}]})
    return {"version": "1.1", "data": [{"title": t, "paragraphs": ps} for t, ps in data.items()]}


def write_squad(path: Path, n: int, seed: int, titles: int = 8) -> Path:
    rng = random.Random(seed)
    rows = [make_example(rng, f"s{seed}-{i}", f"article-{seed}-{i % titles}") for i in range(n)]
    path.write_text(json.dumps(squad_json(rows)))
    return path


def to_examples(rows: list[dict]) -> list[SquadExample]:
    return [SquadExample(r["qid"], r["question"], r["context"], [r["answer"]], [r["start"]], r["title"])
            for r in rows]


def wordpiece_tokenizer() -> Tokenizer:
    """A BERT-style WordPiece tokenizer built here; the template adds [CLS] q [SEP] ctx [SEP] with types 0/1."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    # A fixed vocabulary (trainers order ties differently from run to run): specials, whole words, characters.
    words = sorted(set(FILLER + NAMES + " ".join(QUESTIONS).split()) | {"is"})
    chars = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,?!'"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *[c for c in chars if c not in words],
             *[f"##{c}" for c in chars]]
    b = tokenizers.Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    b.normalizer = normalizers.BertNormalizer(lowercase=True)
    b.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    b.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", b.token_to_id("[CLS]")), ("[SEP]", b.token_to_id("[SEP]"))])
    b.decoder = decoders.WordPiece()
    return Tokenizer(b, unk_token="[UNK]", pad_token="[PAD]",
                     extra_special={"cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"})


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return tiny_qa_bert(tmp_path_factory.mktemp("qa-bert"))


def tiny_qa_bert(d: Path) -> Path:
    """A tiny random BERT (transformers) with the WordPiece tokenizer of these tests, saved in `d`."""
    tok = wordpiece_tokenizer()
    make_hf_model("bert", vocab=tok.vocab_size).save_pretrained(d)
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("qa-data")
    return {"train": write_squad(d / "train.json", 240, seed=1), "eval": write_squad(d / "eval.json", 40, seed=2)}


WINDOW = dict(max_length=48, doc_stride=16, max_question_length=8)


@pytest.fixture(scope="module")
def run(bert_dir, data, tmp_path_factory) -> dict:
    c = QAConfig(model=str(bert_dir), data=str(data["train"]), eval_data=str(data["eval"]), **WINDOW)
    tc = TrainConfig(output_dir=tmp_path_factory.mktemp("qa-run") / "run", max_steps=50, batch_size=16, lr=3e-3,
                     schedule="constant", warmup=5, eval_every=25, keep_best="f1", progress=False, plot=False, seed=0)
    return train(c, tc, log=lambda *_: None)


# ---- windows and offsets ---------------------------------------------------------------------------------
def _check_windows(tok, ex: SquadExample, max_length: int, doc_stride: int, exact: bool = True) -> None:
    feats = make_features(tok, [ex], max_length, doc_stride, max_question_length=8)
    assert len(feats) >= 1
    hits = 0
    for prev, f in zip([None, *feats], feats):
        assert len(f["input_ids"]) <= max_length
        w0, w1 = f["window"]
        if prev is not None:
            assert w0 == prev["window"][1] - doc_stride  # consecutive windows share doc_stride tokens
        if f["start"] != 0:
            hits += 1
            c0, offs = f["context_start"], f["offsets"]
            text = ex.context[offs[f["start"] - c0][0]: offs[f["end"] - c0][1]]
            assert (text if exact else text.strip()) == ex.answers[0]
    assert feats[0]["window"][0] == 0 and feats[-1]["window"][1] == len(tok.encode(ex.context, False))
    assert hits >= 1


def test_windows_recover_every_answer_position(bert_dir):
    """Each word of a long context as the answer: near window edges, in overlaps, in the last window."""
    tok = Tokenizer.from_dir(bert_dir)
    rng = random.Random(3)
    words = [rng.choice(FILLER + NAMES) for _ in range(70)]
    context = " ".join(words)
    for i, w in enumerate(words):
        start = len(" ".join(words[:i])) + (1 if i else 0)
        _check_windows(tok, SquadExample(f"w{i}", "who is it ?", context, [w], [start]), 24, 6)
        if i == len(words) - 1:  # the last word lives in the last window only
            feats = make_features(tok, [SquadExample("x", "who ?", context, [w], [start])], 24, 6, 8)
            assert feats[-1]["start"] != 0 and all(f["start"] == 0 for f in feats[:-1])


def test_feature_layout_is_cls_question_sep_context_sep(bert_dir):
    tok = Tokenizer.from_dir(bert_dir)
    ex = to_examples([make_example(random.Random(0), "a", "t", n_words=30)])[0]
    feats = make_features(tok, [ex], 24, 6, max_question_length=8)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    q = tok.encode(ex.question, False)
    for f in feats:
        ids, types, c0 = f["input_ids"], f["token_type_ids"], f["context_start"]
        assert ids[0] == cls_id and ids[1: 1 + len(q)] == q and ids[c0 - 1] == sep_id and ids[-1] == sep_id
        assert types == [0] * c0 + [1] * (len(ids) - c0)
    t = pair_template(tok)
    assert (t.prefix, t.middle, t.suffix) == ((cls_id,), (sep_id,), (sep_id,))


def test_byte_level_bpe_offsets_and_long_questions():
    """A tokenizer without special tokens and with space-carrying offsets; questions cut to max_question_length."""
    tok = Tokenizer.train_bpe([" ".join(FILLER + NAMES + ["is"])] * 20, vocab_size=300, min_frequency=1)
    rng = random.Random(5)
    words = [rng.choice(FILLER + NAMES) for _ in range(40)]
    context = " ".join(words)
    for i in (0, 1, 17, 39):
        start = len(" ".join(words[:i])) + (1 if i else 0)
        ex = SquadExample(f"b{i}", "who is it " * 20, context, [words[i]], [start])
        _check_windows(tok, ex, 28, 8, exact=False)


def test_doc_stride_too_large_is_a_config_error(bert_dir):
    from lmforge.errors import ConfigError

    tok = Tokenizer.from_dir(bert_dir)
    ex = to_examples([make_example(random.Random(0), "a", "t")])
    with pytest.raises(ConfigError, match=r"QAConfig\.doc_stride 20"):
        make_features(tok, ex, 24, 20, max_question_length=8)


# ---- post-processing -----------------------------------------------------------------------------------------
def _feature(example: int, n_question: int, offsets: list[tuple[int, int]]) -> dict:
    return {"input_ids": [0] * (n_question + len(offsets) + 1), "example": example,
            "context_start": n_question, "offsets": offsets}


def test_postprocessing_picks_the_valid_best_span():
    ctx = "alpha beta gamma delta epsilon"
    offs = [(0, 5), (6, 10), (11, 16), (17, 22), (23, 30)]
    ex = SquadExample("q", "which ?", ctx, ["gamma delta"], [11])
    f = _feature(0, 3, offs)  # positions 0-2: [CLS] question [SEP]; 3-7: the five words; 8: [SEP]
    s = np.array([20, 19, 0, 1, 0, 5, 0, 0, 0], dtype=np.float32)  # CLS and question are highest: ignored
    e = np.array([20, 0, 18, 0, 6, 0, 5, 0, 0], dtype=np.float32)
    # beta(4) as end with gamma(5) as start is end < start: discarded; alpha..beta = 1 + 6 = 7 < gamma..delta = 10
    best = best_answers([ex], [f], [s], [e], n_best=20, max_answer_length=30)[0]
    assert (best["answer"], best["start"], best["end"]) == ("gamma delta", 11, 22)
    assert 0 < best["score"] <= 1 and best["logit"] == 10
    # with answers limited to one token, the best one-token span wins (alpha..alpha 1+0 < beta..beta 0+6 ...)
    one = best_answers([ex], [f], [s], [e], n_best=20, max_answer_length=1)[0]
    assert one["answer"] == "beta"
    # n_best=1: only the top start (gamma) and top end (beta) pair, which is invalid -> no answer
    assert best_answers([ex], [f], [s], [e], n_best=1, max_answer_length=30)[0]["answer"] == ""


def test_postprocessing_compares_windows_and_trims_space():
    ctx = "one two three four"
    ex = SquadExample("q", "?", ctx, ["four"], [14])
    w1 = _feature(0, 2, [(0, 3), (3, 7), (7, 13)])  # byte-level style offsets carry the leading space
    w2 = _feature(0, 2, [(7, 13), (13, 18)])
    s1, e1 = np.array([0, 0, 3, 0, 0, 0.0]), np.array([0, 0, 0, 3, 0, 0.0])
    s2, e2 = np.array([0, 0, 0, 4, 0.0]), np.array([0, 0, 0, 4, 0.0])
    best = best_answers([ex], [w1, w2], [s1, s2], [e1, e2])[0]
    assert (best["answer"], best["start"], best["end"]) == ("four", 14, 18)


def test_expected_f1_selection_pools_overlapping_spans():
    """Four near-equal spans: "york" is the most probable alone, "new york city" overlaps the most mass."""
    from lmforge.metrics import squad_f1

    ctx = "new york city"
    ex = SquadExample("q", "where ?", ctx, ["new york"], [0])
    f = _feature(0, 2, [(0, 3), (4, 8), (9, 13)])
    s = np.array([0, 0, 1.2, 1.3, -30, 0])  # starts: new, york (city: never)
    e = np.array([0, 0, -30, 1.0, 0.9, 0])  # ends: york, city (new: never)
    top = best_answers([ex], [f], [s], [e], selection="max")[0]
    mbr = best_answers([ex], [f], [s], [e], selection="expected-f1")[0]
    assert (top["answer"], top["logit"]) == ("york", 2.3)
    assert (mbr["answer"], mbr["start"], mbr["end"], mbr["logit"]) == ("new york city", 0, 13, 2.1)
    # the pick really has the highest expected F1 under the four candidates' softmax probabilities
    spans = {"york": 2.3, "new york": 2.2, "york city": 2.2, "new york city": 2.1}
    p = dict(zip(spans, np.exp(list(spans.values())) / np.exp(list(spans.values())).sum()))
    expected = {a: sum(q * squad_f1(a, b) for b, q in p.items()) for a in spans}
    assert max(expected, key=expected.get) == "new york city"
    assert abs(mbr["score"] - p["new york city"]) < 1e-6
    # one dominant span: both selections agree
    s2 = np.array([0, 0, -5, 9.0, -30, 0])
    e2 = np.array([0, 0, -30, 9.0, -5, 0])
    assert best_answers([ex], [f], [s2], [e2], selection="expected-f1")[0]["answer"] == "york"
    with pytest.raises(ConfigError, match="answer selection"):
        best_answers([ex], [f], [s], [e], selection="mbr")


def test_dropout_is_on_embeddings_and_residuals_not_attention(bert_dir):
    from lmforge.model.layers import Attention
    from lmforge.tasks.qa import build_model

    model, _ = build_model(QAConfig(model=str(bert_dir), dropout=0.1, **WINDOW))
    drops = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(p == 0.1 for p in drops)
    assert all(m.dropout == 0.0 for m in model.modules() if isinstance(m, Attention))
    assert model.backbone.cfg.dropout == 0.1  # the saved config says what the run trained with
    x = torch.randint(5, 50, (2, 12))
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])  # active while training
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])
    with pytest.raises(ConfigError, match=r"QAConfig\.dropout"):
        build_model(QAConfig(model=str(bert_dir), dropout=1.0, **WINDOW))


# ---- training, loading, transformers ----------------------------------------------------------------------
def test_training_raises_f1(run, bert_dir, data):
    from lmforge.checkpoints import load_checkpoint
    from lmforge.data.squad import read_squad
    from lmforge.model.heads import SpanHead
    from lmforge.tasks.qa import LoadedQA

    examples = read_squad(data["eval"])
    ck = load_checkpoint(bert_dir)
    torch.manual_seed(0)
    untrained = LoadedQA(SpanHead(ck.model).eval(), ck.tokenizer, **WINDOW, template=pair_template(ck.tokenizer))
    before = evaluate(untrained, examples)["f1"]
    lq = load_qa(run["run_dir"])
    after = evaluate(lq, examples)
    assert before < 40 and after["f1"] >= 85 and after["exact_match"] >= 80, (before, after)
    assert run["best_metric"] >= 85
    info = json.loads((Path(run["run_dir"]) / "qa.json").read_text())
    assert info["max_length"] == 48 and info["doc_stride"] == 16
    assert (lq.max_length, lq.doc_stride) == (48, 16)


def test_answer_api(run):
    lq = load_qa(run["run_dir"])
    ctx = "the small cat sat on the mat near the tree is victor slowly"
    (r,) = answer(lq, ctx, ["who is it ?"])
    assert r["answer"] == "victor" and ctx[r["start"]: r["end"]] == "victor" and 0 < r["score"] <= 1


def test_ensemble_averages_member_logits_and_rejects_other_windows(run, bert_dir, data, tmp_path):
    """Two runs answer from the mean of their span logits; a run with other windows is refused by name."""
    other = tmp_path / "other"
    c = QAConfig(model=str(bert_dir), data=str(data["train"]), eval_data=str(data["eval"]), **WINDOW)
    tc = TrainConfig(output_dir=other, max_steps=8, batch_size=16, lr=3e-3, warmup=0, eval_every=0,
                     keep_best=None, progress=False, plot=False, seed=1)
    train(c, tc, log=lambda *_: None)
    a, b = load_qa(run["run_dir"]), load_qa(other)
    ens = load_qa_ensemble([run["run_dir"], other])
    assert len(ens.members) == 1
    exs = read_squad(data["eval"])[:6]
    feats = make_features(a.tokenizer, exs, **WINDOW, labels=False, template=a.template)
    collate = make_collate(a.tokenizer.pad_id)
    (sa, ea), (sb, eb) = span_logits(a.model, feats, collate), span_logits(b.model, feats, collate)
    assert not np.allclose(sa[0], sb[0])  # the members really differ
    mean = best_answers(exs, feats, [(x + y) / 2 for x, y in zip(sa, sb)], [(x + y) / 2 for x, y in zip(ea, eb)],
                        ens.n_best, ens.max_answer_length, ens.answer_selection)
    assert predict_examples(ens, exs) == mean
    bad = tmp_path / "bad"
    c2 = QAConfig(model=str(bert_dir), data=str(data["train"]), eval_data=str(data["eval"]), max_length=40,
                  doc_stride=16, max_question_length=8)
    train(c2, TrainConfig(output_dir=bad, max_steps=1, batch_size=16, eval_every=0, keep_best=None,
                          progress=False, plot=False), log=lambda *_: None)
    with pytest.raises(CheckpointError, match="max_length 40 differs"):
        load_qa_ensemble([run["run_dir"], bad])


def test_distillation_loss_and_training_from_a_teacher(run, bert_dir, data, tmp_path):
    """The KL term vanishes when the teacher is the model itself and weighs alpha * T^2; a student trained
    from the fixture's run learns the task; a teacher that reads other tokens is refused by name."""
    from lmforge.tasks.qa import span_loss

    lq = load_qa(run["run_dir"])
    feats = make_features(lq.tokenizer, read_squad(data["eval"])[:8], **WINDOW)
    batch = make_collate(lq.tokenizer.pad_id)(feats)
    mask = batch["attention_mask"] == 0
    with torch.no_grad():
        plain, n = span_loss(lq.model, batch)
        s, e = lq.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        own = {**batch, "teacher_start": s.masked_fill(mask, -1e4), "teacher_end": e.masked_fill(mask, -1e4)}
        assert float(span_loss(lq.model, own, alpha=0.3)[0]) == pytest.approx(0.7 * float(plain), abs=1e-5)
        flat = {**batch, "teacher_start": torch.zeros_like(s), "teacher_end": torch.zeros_like(e)}  # uniform
        assert float(span_loss(lq.model, flat, alpha=0.0)[0]) == pytest.approx(float(plain), abs=1e-6)
        assert float(span_loss(lq.model, flat, alpha=1.0, temperature=2.0)[0]) > 0 and n == 8

    c = QAConfig(model=str(bert_dir), data=str(data["train"]), eval_data=str(data["eval"]), **WINDOW,
                 teacher=[run["run_dir"]], distill_alpha=0.5, distill_temperature=2.0)
    tc = TrainConfig(output_dir=tmp_path / "student", max_steps=50, batch_size=16, lr=3e-3, schedule="constant",
                     warmup=5, eval_every=25, keep_best="f1", progress=False, plot=False, seed=0)
    s = train(c, tc, log=lambda *_: None)
    assert s["best_metric"] >= 80
    assert json.loads((tmp_path / "student" / "qa_config.json").read_text())["teacher"] == [run["run_dir"]]
    # the teacher's logits are kept in the run dir: a rerun (or --resume) reads them instead of recomputing
    from lmforge.tasks.qa import TEACHER_CACHE, add_teacher_logits

    cached = tmp_path / "student" / TEACHER_CACHE
    assert cached.is_file()
    fresh = make_features(lq.tokenizer, read_squad(data["train"])[:20], **WINDOW)
    logs: list[str] = []
    add_teacher_logits(c, lq.tokenizer, fresh, tmp_path / "cache", "cpu", logs.append)
    again = [dict(f) for f in fresh]
    add_teacher_logits(c, lq.tokenizer, again, tmp_path / "cache", "cpu", logs.append)
    assert "read from" not in logs[0] and "read from" in logs[1]
    for f, g in zip(fresh, again):
        assert np.array_equal(f["teacher_start"], g["teacher_start"]) and len(g["teacher_end"]) == len(f["input_ids"])
    add_teacher_logits(c, lq.tokenizer, [dict(f) for f in fresh[:-1]], tmp_path / "cache", "cpu", logs.append)
    assert "read from" not in logs[2]  # other windows: recomputed
    (tmp_path / "cache" / TEACHER_CACHE).write_bytes(b"not safetensors")
    add_teacher_logits(c, lq.tokenizer, [dict(f) for f in fresh], tmp_path / "cache", "cpu", logs.append)
    assert "read from" not in logs[3]  # unreadable: recomputed and replaced
    import lmforge.tasks.qa.training as qa_mod  # where add_teacher_logits looks the loader up

    def no_load(*_a, **_k):
        raise AssertionError("a cache hit must not load the teachers")

    with pytest.MonkeyPatch.context() as mp:  # a hit reads the file without loading the teacher models
        mp.setattr(qa_mod, "load_qa_ensemble", no_load)
        add_teacher_logits(c, lq.tokenizer, [dict(f) for f in fresh], tmp_path / "cache", "cpu", logs.append)
    assert "read from" in logs[4]

    other = tmp_path / "other-tok"  # the same run, one vocabulary entry renamed
    import shutil

    shutil.copytree(run["run_dir"], other)
    for f in other.rglob("tokenizer.json"):
        f.write_text(f.read_text().replace('"victor"', '"victory"'))
    with pytest.raises(CheckpointError, match="tokenizer differs"):
        train(QAConfig(model=str(bert_dir), data=str(data["train"]), eval_data=str(data["eval"]), **WINDOW,
                       teacher=[str(other)]), TrainConfig(output_dir=tmp_path / "x", max_steps=1), log=lambda *_: None)
    with pytest.raises(ConfigError, match="distill_alpha"):
        train(QAConfig(model=str(bert_dir), data=str(data["train"]), eval_data=str(data["eval"]), **WINDOW,
                       teacher=[run["run_dir"]], distill_alpha=1.5), TrainConfig(output_dir=tmp_path / "y",
                                                                                 max_steps=1), log=lambda *_: None)


def test_transformers_loads_the_run_dir_with_equal_logits(run, data):
    from lmforge.data.squad import read_squad

    run_dir = Path(run["run_dir"])
    assert json.loads((run_dir / "config.json").read_text())["architectures"] == ["BertForQuestionAnswering"]
    hf = transformers.AutoModelForQuestionAnswering.from_pretrained(run_dir).eval()
    lq = load_qa(run_dir)
    feats = make_features(lq.tokenizer, read_squad(data["eval"])[:8], **WINDOW, labels=False)
    b = make_collate(lq.tokenizer.pad_id)(feats)
    with torch.no_grad():
        s, e = lq.model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        ref = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"])
    mask = b["attention_mask"].bool()
    assert (s - ref.start_logits)[mask].abs().max() < 1e-4 and (e - ref.end_logits)[mask].abs().max() < 1e-4


def test_split_by_article_keeps_contexts_apart():
    rng = random.Random(0)
    exs = to_examples([make_example(rng, str(i), f"t{i % 10}") for i in range(200)])
    tr, va = split_by_article(exs, 0.1, seed=1)
    assert len(tr) + len(va) == 200 and 10 <= len(va) <= 40
    assert not {e.title for e in tr} & {e.title for e in va}
    assert [e.id for e in split_by_article(exs, 0.1, seed=1)[1]] == [e.id for e in va]
    one = [SquadExample(str(i), "q", f"c{i % 5}", ["c"], [0], "") for i in range(20)]  # untitled: by context
    tr, va = split_by_article(one, 0.2, seed=0)
    assert tr and va and not {e.context for e in tr} & {e.context for e in va}


# ---- CLI -------------------------------------------------------------------------------------------------
@pytest.fixture
def qa_cli():
    return cli.main  # `qa` is registered by lmforge.cli itself


def _cli_error(capsys, main, *argv) -> str:
    assert main(["qa", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_cli_train(qa_cli, bert_dir, tmp_path, capsys):
    """Wiring only (a few steps); no --eval-data, so validation is whole articles of --data."""
    f = write_squad(tmp_path / "all.json", 60, seed=4, titles=10)
    out = tmp_path / "run"
    assert qa_cli(["qa", "train", "--model", str(bert_dir), "--data", str(f), "--max-length", "48",
                   "--doc-stride", "16", "--max-question-length", "8", "--max-steps", "3", "--batch-size", "8",
                   "--eval-every", "0", "--output", str(out), "--no-progress", "--dropout", "0.1",
                   "--answer-selection", "expected-f1"]) == 0
    assert "validation exact match" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 3 and 0 < s["data"]["eval_examples"] < 60
    info = json.loads((out / "qa.json").read_text())
    assert info["doc_stride"] == 16 and info["answer_selection"] == "expected-f1"
    assert load_qa(out).answer_selection == "expected-f1"  # eval and predict use the run's own selection
    assert json.loads((out / "config.json").read_text())["hidden_dropout_prob"] == 0.1
    assert json.loads((out / "qa_config.json").read_text())["max_question_length"] == 8


def test_cli_distillation_knobs_need_a_teacher(qa_cli, bert_dir, data, tmp_path, capsys):
    """--distill-alpha/--distill-temperature without --teacher would be ignored: refused in one line instead."""
    for flag in ("--distill-alpha", "--distill-temperature"):
        err = _cli_error(capsys, qa_cli, "train", "--model", str(bert_dir), "--data", str(data["train"]), flag, "0.7",
                         "--output", str(tmp_path / "r"))
        assert "need --teacher" in err
    assert not (tmp_path / "r").exists()


def test_cli_names_flags_for_task_errors_that_name_qa_config_fields(qa_cli, bert_dir, data, tmp_path, capsys):
    """The task layer names QAConfig fields (build_model, windows); the CLI says them as its flags."""
    from lmforge.tasks.qa import build_model

    with pytest.raises(ConfigError, match=r"QAConfig\.max_length 4096 is above"):
        build_model(QAConfig(model=str(bert_dir), max_length=4096))
    err = _cli_error(capsys, qa_cli, "train", "--model", str(bert_dir), "--data", str(data["train"]),
                     "--eval-data", str(data["eval"]), "--max-length", "4096", "--output", str(tmp_path / "r"))
    assert "--max-length 4096 is above" in err and "QAConfig" not in err
    err = _cli_error(capsys, qa_cli, "train", "--model", str(bert_dir), "--data", str(data["train"]),
                     "--eval-data", str(data["eval"]), "--max-length", "24", "--doc-stride", "20",
                     "--max-question-length", "8", "--output", str(tmp_path / "r"))
    assert "--doc-stride 20 must be below" in err and "--max-question-length 8" in err


def test_cli_eval_predict(qa_cli, run, data, tmp_path, capsys):
    out = run["run_dir"]
    pred = tmp_path / "preds" / "p.jsonl"
    assert qa_cli(["qa", "eval", "--model", out, "--data", str(data["eval"]), "--limit", "30", "--json",
                   "--predictions", str(pred)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["total"] == 30 and rep["f1"] >= 80 and rep["predictions"] == str(pred)
    rows = [json.loads(x) for x in pred.read_text().splitlines()]
    assert len(rows) == 30 and {"id", "question", "answers", "prediction", "exact_match", "f1"} <= set(rows[0])
    assert json.loads((pred.parent / "summary.json").read_text())["f1"] == rep["f1"]
    assert qa_cli(["qa", "eval", "--model", out, "--data", str(data["eval"]), "--limit", "30", "--json",
                   "--predictions", str(pred), "--answer-selection", "expected-f1"]) == 0
    f1 = json.loads(capsys.readouterr().out)["f1"]
    assert f1 >= 80
    assert qa_cli(["qa", "eval", "--model", out, out, "--data", str(data["eval"]), "--limit", "30", "--json",
                   "--predictions", str(pred), "--answer-selection", "expected-f1"]) == 0
    rep = json.loads(capsys.readouterr().out)  # a run ensembled with itself answers as the run alone
    assert rep["f1"] == f1 and rep["model"] == [out, out]
    assert qa_cli(["qa", "eval", "--model", out, "--data", str(data["eval"]), "--limit", "5"]) == 0
    assert "exact match" in capsys.readouterr().out
    default = Path(out) / "eval-eval" / "predictions.jsonl"
    assert len(default.read_text().splitlines()) == 5 and (default.parent / "summary.json").exists()
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("a big dog ran under the car is grace near the house")
    assert qa_cli(["qa", "predict", "--model", out, "--context", str(ctx), "who is it ?", "what is it ?"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["answer"] for x in lines] == ["grace", "grace"]
    assert set(lines[0]) == {"question", "answer", "score", "start", "end"}


def test_an_interrupted_qa_eval_keeps_its_answers_and_continues(qa_cli, run, data, tmp_path, capsys,
                                                                monkeypatch):
    """Ctrl-C during `qa eval` keeps each finished chunk of answers; the same command answers only the rest
    and writes what an uninterrupted run writes. `eval --task qa` shares the mechanism (evaluate.qa_answers)."""
    from lmforge.tasks.qa import inference as qa_mod  # where predict_examples looks these up

    monkeypatch.setattr(qa_mod, "PREDICT_CHUNK", 10)
    out, f = run["run_dir"], str(data["eval"])
    argv = ["qa", "eval", "--model", out, "--data", f, "--limit", "30", "--json"]
    full = tmp_path / "full" / "p.jsonl"
    assert qa_cli([*argv, "--predictions", str(full)]) == 0
    ref = json.loads(capsys.readouterr().out)
    real, calls, die = qa_mod.ensemble_logits, [], [True]

    def dies_in_the_second_chunk(*a, **k):
        calls.append(len(a[1]))
        if len(calls) == 2 and die[0]:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(qa_mod, "ensemble_logits", dies_in_the_second_chunk)
    cut = tmp_path / "cut" / "p.jsonl"
    assert qa_cli([*argv, "--predictions", str(cut)]) == 130
    err = capsys.readouterr().err
    assert "10 of 30 outputs kept" in err and f"--predictions {cut} to continue" in err
    assert not cut.exists()
    calls.clear()
    die[0] = False
    assert qa_cli([*argv, "--predictions", str(cut)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert len(calls) == 2  # the two chunks the interrupted run had not finished
    assert (rep["exact_match"], rep["f1"]) == (ref["exact_match"], ref["f1"])
    assert cut.read_text() == full.read_text() and not cut.with_name("p.jsonl.partial").exists()
    calls.clear()  # another answer selection is another run: nothing reused
    assert qa_cli([*argv, "--predictions", str(cut), "--answer-selection", "max"]) == 0
    assert len(calls) == 3


def test_generic_eval_scores_as_qa_eval_and_takes_an_ensemble(qa_cli, run, data, tmp_path, capsys):
    """`lmforge eval --task qa` on extractive run dirs answers through the same windows and selection as `qa
    eval` (one model, or several averaged); several models for a generative task are refused in one line."""
    out, f = run["run_dir"], str(data["eval"])
    assert qa_cli(["qa", "eval", "--model", out, "--data", f, "--json", "--predictions",
                   str(tmp_path / "a" / "p.jsonl")]) == 0
    ref = json.loads(capsys.readouterr().out)
    for models in ([out], [out, out]):  # a run ensembled with itself answers as the run alone
        assert qa_cli(["eval", "--task", "qa", "--model", *models, "--data", f, "--json", "--predictions",
                       str(tmp_path / "b" / "p.jsonl")]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert (rep["exact_match"], rep["f1"], rep["examples"]) == (ref["exact_match"], ref["f1"], ref["total"])
        assert rep["model"] == (models if len(models) > 1 else out)
    ctx = tmp_path / "d.jsonl"
    ctx.write_text(json.dumps({"document": "a b c.", "summary": "a."}) + "\n")
    assert qa_cli(["eval", "--task", "summarize", "--model", out, out, "--data", str(ctx)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: --model: several models") and err.count("\n") == 1, err


def test_malformed_squad_names_the_json_path(qa_cli, capsys, tmp_path):
    bad = squad_json([make_example(random.Random(0), "a", "t"), make_example(random.Random(1), "b", "t")])
    del bad["data"][0]["paragraphs"][1]["qas"][0]["answers"][0]["answer_start"]
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(bad))
    err = _cli_error(capsys, qa_cli, "train", "--data", str(f))
    assert str(f) in err and "data[0].paragraphs[1].qas[0].answers[0].answer_start: missing" in err
    err = _cli_error(capsys, qa_cli, "eval", "--model", str(tmp_path), "--data", str(f))
    assert "answer_start" in err
    (tmp_path / "broken.json").write_text('{"data": [')
    assert "broken.json" in _cli_error(capsys, qa_cli, "train", "--data", str(tmp_path / "broken.json"))


def test_missing_context_file_exits_2(qa_cli, capsys, tmp_path):
    err = _cli_error(capsys, qa_cli, "predict", "--model", str(tmp_path), "--context", str(tmp_path / "no.txt"),
                     "who?")
    assert str(tmp_path / "no.txt") in err


def test_not_a_qa_model(qa_cli, capsys, bert_dir, tmp_path):
    ctx = tmp_path / "c.txt"
    ctx.write_text("some text")
    err = _cli_error(capsys, qa_cli, "predict", "--model", str(bert_dir), "--context", str(ctx), "who?")
    assert "qa_outputs" in err
