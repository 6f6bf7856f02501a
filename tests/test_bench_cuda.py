"""benchmarks/cuda_bench.py, run on the CPU at its --small size: every part runs, both sides compute the same
outputs and losses, and the JSON holds the device's peaks beside the rows. (The timings mean nothing here; the
script is meant for a GPU, through benchmarks/device_check.sh.)"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
from benchmarks.cuda_bench import main  # noqa: E402


def test_cuda_bench_runs_small_on_cpu(tmp_path, capsys):
    out = tmp_path / "cuda.json"
    assert main(["--device", "cpu", "--small", "--new-tokens", "4", "--batches", "1", "--train-batch", "1x16",
                 "--no-compile", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {"matmul_fp32_tflops", "matmul_bf16_tflops", "copy_gb_s", "device"} <= res["machine"].keys()
    rows = res["rows"]
    fwd = [r for r in rows if r["workload"].startswith("forward")]
    assert len(fwd) == 4 and all(float(r["max_diff"]) < 1e-4 for r in fwd)  # the same model on both sides
    gen = [r for r in rows if r["workload"].startswith("generate") and "tokens_s" in r]
    assert {r["impl"] for r in gen} >= {"lmforge eager", "transformers"}
    assert all(r["same_tokens"] == "1.000" for r in gen)  # greedy, float32 on the CPU: the same tokens
    train = [r for r in rows if r["workload"].startswith("train")]
    assert len(train) == 2 and train[0]["note"] == train[1]["note"]  # same first and last losses
    assert "x transformers" in capsys.readouterr().out
