"""torchrun on CPU (gloo): 2-process DDP follows the 1-process loss curve at the same global batch; FSDP
runs, resumes bit-exactly and exports a loadable model; a bad input stops every rank with one line.

Each test launches `torchrun --standalone --nproc-per-node 2 -m lmforge.cli pretrain ...` on a
tiny model and a generated corpus (see test_pretrain.py), one thread per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.train import read_metrics
from lmforge.train.strategy import DistInfo, init_distributed, leader_first

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pretrain import make_corpus, pretrain_args, tiny_config  # noqa: E402

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _run(argv: list[str], nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "lmforge.cli", *argv]
    else:
        cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), "-m", "lmforge.cli", *argv]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _val(run: Path) -> list[float]:
    return [r["eval_val_loss"] for r in read_metrics(run / "metrics.jsonl") if "eval_val_loss" in r]


@pytest.fixture
def setup(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", files=2, paragraphs=60)
    cfg = tiny_config(tmp_path / "tiny.json")
    return corpus, cfg, tmp_path / "cache"


def test_two_process_ddp_follows_one_process_loss_curve(tmp_path, setup):
    corpus, cfg, cache = setup
    one = _run(pretrain_args(corpus, cfg, tmp_path / "one", cache, "--batch-size", "8", steps=12))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(pretrain_args(corpus, cfg, tmp_path / "two", cache, "--batch-size", "4", steps=12), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    # rank 0 alone logs: one summary line, one progress stream
    assert two.stdout.count("run: ") == 1 and two.stderr.count("token cache: reused") == 1
    assert "over 2 process(es)" in two.stderr

    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 12
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    assert a[-1] < a[0]
    torch.testing.assert_close(torch.tensor(_val(tmp_path / "two")), torch.tensor(_val(tmp_path / "one")),
                               rtol=1e-4, atol=1e-5)
    wa = load_file(str(tmp_path / "one" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_fsdp_two_processes_matches_ddp_resumes_and_exports(tmp_path, setup):
    transformers = pytest.importorskip("transformers")
    corpus, cfg, cache = setup
    ddp = _run(pretrain_args(corpus, cfg, tmp_path / "ddp", cache, "--batch-size", "4", steps=12), nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = _run(pretrain_args(corpus, cfg, tmp_path / "fsdp", cache, "--batch-size", "4", "--fsdp",
                              "--max-time", "0.01", steps=12), nproc=2)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert "stopped at step" in fsdp.stderr  # the time budget ended the first session early
    resumed = _run(["pretrain", "--resume", str(tmp_path / "fsdp"), "--max-time", "1000", "--no-progress"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step-" in resumed.stderr

    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "fsdp")), torch.tensor(_losses(tmp_path / "ddp")),
                               rtol=1e-4, atol=1e-5)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "fsdp").eval()
    ref = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    got = load_file(str(tmp_path / "fsdp" / "model.safetensors"))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-3, atol=1e-4)
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(hf(x).logits).all()


def test_bad_input_stops_every_rank_with_one_line(tmp_path, setup):
    corpus, cfg, cache = setup
    (corpus / "zz.bin").write_bytes(b"text\n\0\1\2")  # found by rank 0 alone, while it trains the tokenizer
    p = _run(pretrain_args(corpus, cfg, tmp_path / "run", cache), nproc=2, timeout=120)
    assert p.returncode != 0
    # the ranks stop with the one-line error and exit code 2 (torchrun may stop rank 1 with SIGTERM as soon as
    # rank 0 exits, so rank 1's line is not always there; the ranks' lines may also interleave)
    assert p.stderr.count("lmforge: error:") >= 1, p.stderr[-3000:]
    assert p.stderr.count("lmforge: error:") == p.stderr.count("zz.bin: binary file, not text (NUL byte at offset 5)")
    assert "exitcode  : 2" in p.stderr
    assert "lmforge/tasks" not in p.stderr and "lmforge/train" not in p.stderr  # no traceback of ours


def test_init_distributed_is_a_noop_outside_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed()
    assert info == DistInfo() and info.is_main and not info.enabled
    assert leader_first(lambda: 42) == 42


def _leader_first_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from lmforge.errors import DataError

    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    calls = []

    def build() -> int:
        calls.append(rank)
        if rank == 0:
            raise DataError("corpus/x.bin: binary file")
        return 1

    try:
        leader_first(build)
        msg = "no error"
    except DataError as e:
        msg = f"DataError: {e}"
    ok = leader_first(lambda: rank * 10)  # the group still works afterwards
    Path(out_dir, f"rank{rank}.txt").write_text(f"{msg}|calls={calls}|ok={ok}")
    dist.destroy_process_group()


def test_leader_error_reaches_every_rank(tmp_path):
    """Rank 0 fails in one-time work: rank 1 (which never ran it) raises the same error instead of waiting."""
    import torch.multiprocessing as mp

    mp.spawn(_leader_first_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert r0 == "DataError: corpus/x.bin: binary file|calls=[0]|ok=0"
    assert r1 == "DataError: corpus/x.bin: binary file|calls=[]|ok=10"
