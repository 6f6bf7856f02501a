"""--precision auto | fp32 | bf16: detection (mocked), the TrainConfig field and its --bf16 alias, the CLI flag on
every trainer verb, the line printed at the start, the record in trainer_config.json, and resuming in the
recorded precision."""

from __future__ import annotations

import json

import pytest
import torch
from test_trainer import cls_loss, tiny_model, toy_data

from lmforge.cli import build_parser
from lmforge.cli.common import train_config
from lmforge.errors import LmforgeError, TrainingError
from lmforge.train import TrainConfig, Trainer
from lmforge.train import precision as P

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fake_cpu(monkeypatch, flag: str | None) -> None:
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: flag)


# ---- detection ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, found", [
    ("fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni", "avx512_bf16"),
    ("fpu avx2 avx512_bf16 amx_bf16 amx_tile", "amx_bf16"),
    ("fpu sse2 avx2 fma avx512f avx512bw", None),  # AVX-512 without bf16: emulated, fp32 is faster
    ("fpu sse2 avx2 fma", None),
])
def test_cpu_flags_from_proc_cpuinfo(tmp_path, monkeypatch, flags, found):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
                    f"flags\t\t: {flags}\n")
    monkeypatch.setattr(P, "CPUINFO", info)
    assert P.cpu_has_native_bf16() == found


def test_cpu_flags_fall_back_to_torch_capabilities(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "CPUINFO", tmp_path / "missing")  # not Linux
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_bf16": True}, raising=False)
    assert P.cpu_has_native_bf16() == "avx512_bf16"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True}, raising=False)
    assert P.cpu_has_native_bf16() is None


def test_cpu_identity_tells_apart_cpus_of_one_name(tmp_path):
    from lmforge.device import cpu_identity

    info = tmp_path / "cpuinfo"
    block = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: {fam}\nmodel\t\t: {model}\n"
             "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma f16c\n\n")
    info.write_text(block.format(n=0, fam=23, model=1) + block.format(n=1, fam=25, model=17))
    assert cpu_identity(info) == {"cpu_family": 23, "cpu_model": 1, "cpu": "AMD EPYC",
                                  "simd": ["avx2", "fma", "f16c"]}  # the first processor's block
    other = cpu_identity(tmp_path / "missing")  # not Linux: no name or numbers, the flags torch reports
    assert "cpu" not in other and "cpu_family" not in other and isinstance(other["simd"], list)


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16", None])
def test_auto_picks_bf16_exactly_when_the_cpu_has_it(monkeypatch, flag):
    fake_cpu(monkeypatch, flag)
    p = P.resolve_precision("auto", CPU)
    assert p.name == ("bf16" if flag else "fp32") and p.bf16 == bool(flag)
    if flag:
        assert p.describe() == f"precision: bf16 (auto: CPU has {flag})"
    for asked in ("fp32", "bf16"):  # an explicit choice is kept whatever the CPU has
        assert P.resolve_precision(asked, CPU).name == asked


@pytest.mark.parametrize("supported", [True, False])
def test_auto_on_cuda_follows_bf16_support(monkeypatch, supported):
    monkeypatch.setattr(P, "cuda_has_bf16", lambda device: supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    fake_cpu(monkeypatch, "avx512_bf16")  # the CPU does not decide for a CUDA device
    p = P.resolve_precision("auto", torch.device("cuda", 0))
    assert p.name == ("bf16" if supported else "fp32") and "Fake GPU" in p.reason


def test_unknown_precision_is_refused():
    with pytest.raises(TrainingError, match="'precision'"):
        P.resolve_precision("fp16", CPU)
    with pytest.raises(TrainingError, match="'precision'"):
        TrainConfig(precision="fp16")  # type: ignore[arg-type]


# ---- TrainConfig and the CLI --------------------------------------------------------------------------------
def test_train_config_bf16_alias():
    assert TrainConfig().precision == "fp32" and not TrainConfig().bf16  # Python default: same numbers everywhere
    assert TrainConfig(bf16=True).precision == "bf16"
    assert TrainConfig(precision="auto", bf16=True).precision == "bf16"
    c = TrainConfig(precision="bf16")
    assert c.bf16 and TrainConfig.from_dict(c.to_dict()).precision == "bf16"
    assert TrainConfig.from_dict({"bf16": True}).precision == "bf16"  # a run recorded before the field
    with pytest.raises(TrainingError, match="conflicts"):
        TrainConfig(precision="fp32", bf16=True)


VERBS = [["classify", "train"], ["qa", "train"], ["finetune", "--data", "d.jsonl"], ["pretrain", "--data", "t.txt"]]


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: v[0])
def test_precision_flag_on_every_trainer_verb(verb):
    parse = build_parser().parse_args
    late = {"epochs": 1.0, "batch_size": 8, "lr": 1e-3}  # what the verbs fill in after parsing

    def tc(*flags: str) -> TrainConfig:
        return train_config(parse([*verb, *flags]), "out", late)

    assert tc().precision == "auto"
    assert tc("--precision", "fp32").precision == "fp32"
    assert tc("--precision", "bf16").precision == "bf16"
    assert tc("--bf16").precision == "bf16" and tc("--bf16").bf16
    with pytest.raises(LmforgeError, match="--bf16: an alias of precision 'bf16'; it conflicts with precision 'fp32'"):
        tc("--bf16", "--precision", "fp32")  # TrainConfig's check, said with the flag's name
    with pytest.raises(SystemExit):
        parse([*verb, "--precision", "fp16"])


# ---- the Trainer: printed, recorded, applied, kept on resume ------------------------------------------------
def _train(run_dir, monkeypatch, flag, seen: list[bool], **kw):
    fake_cpu(monkeypatch, flag)

    def loss_fn(m, b):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return cls_loss(m, b)

    cfg = TrainConfig(output_dir=run_dir, batch_size=8, lr=1e-3, log_every=1, progress=False, plot=False,
                      **{"precision": "auto", "max_steps": 2, **kw})
    return Trainer(tiny_model(0), cfg, toy_data(32, 0), loss_fn).train(resume="auto")


@pytest.mark.parametrize("flag", ["avx512_bf16", None])
def test_trainer_prints_records_and_applies_the_choice(tmp_path, monkeypatch, capsys, flag):
    seen: list[bool] = []
    result = _train(tmp_path / "run", monkeypatch, flag, seen)
    want = "bf16" if flag else "fp32"
    assert result.precision == want and seen == [bool(flag)] * 2
    err = capsys.readouterr().err
    line = "precision: bf16 (auto: CPU has avx512_bf16)" if flag else "precision: fp32 (auto: CPU has no"
    assert line in err
    rec = json.loads((tmp_path / "run" / "trainer_config.json").read_text())
    assert rec["precision"] == want and rec["bf16"] == bool(flag) and rec["precision_reason"].startswith("auto")
    assert rec["host"]["threads"] == 1 and rec["host"]["world_size"] == 1 and isinstance(rec["host"]["simd"], list)


def test_resume_with_auto_keeps_the_recorded_precision(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    seen: list[bool] = []
    assert _train(run, monkeypatch, "avx512_bf16", seen).precision == "bf16"
    capsys.readouterr()
    seen.clear()  # the same run continued on a machine without native bf16: it must not flip to fp32
    result = _train(run, monkeypatch, None, seen, max_steps=4)
    assert result.step == 4 and result.precision == "bf16" and seen == [True, True]
    err = capsys.readouterr().err
    assert "precision: bf16 (auto: recorded by the run being resumed" in err
    assert "changed trainer config" not in err
    assert json.loads((run / "trainer_config.json").read_text())["precision"] == "bf16"
    # the CLI resumes from trainer_config.json: the recorded value comes back as an explicit choice
    rec = json.loads((run / "trainer_config.json").read_text())
    names = {f for f in TrainConfig.__dataclass_fields__}
    assert TrainConfig.from_dict({k: v for k, v in rec.items() if k in names}).precision == "bf16"


@pytest.mark.parametrize("wrap", ["causal_lm", "backbone"])
def test_lm_loss_under_bf16_autocast_is_close_to_fp32(wrap):
    """What --precision bf16 (or auto on a bf16 CPU) runs for finetune and pretrain: lm_loss and its backward
    under CPU autocast, close to the float32 path, with float32 gradients on the float32 weights."""
    from lmforge.config import ModelConfig
    from lmforge.model.heads import IGNORE, CausalLM, lm_loss
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=96, d_model=32, n_layers=2, n_heads=4, d_ff=64, context_length=64)
    bb = Transformer(cfg)
    model = CausalLM(bb) if wrap == "causal_lm" else bb
    x = torch.randint(3, 96, (3, 12))
    mask = torch.ones_like(x)
    mask[2, 8:] = 0
    labels = torch.full_like(x, IGNORE)
    labels[:, 4:-1] = x[:, 5:]  # targets after a 4-token prompt
    labels[mask == 0] = IGNORE
    batch = {"input_ids": x, "attention_mask": mask, "labels": labels}

    def run(bf16: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, n = lm_loss(model, batch)
        (loss.float() * n).backward()
        return float(loss.detach()), {k: p.grad for k, p in bb.named_parameters()}

    ref, g_ref = run(False)
    got, g_got = run(True)
    assert abs(got - ref) < 0.02 * abs(ref)
    for k, g in g_got.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        assert (g - g_ref[k]).norm() <= 0.05 * g_ref[k].norm() + 1e-6, k
