"""ModelConfig validation: every field's type (Literal variants included) and range is checked when the config
is made, and a bad HF config.json fails as one ConfigError line naming the file and the field, through
lmforge.load and through `lmforge info` (exit 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import lmforge
from lmforge.cli import main
from lmforge.config import PRESETS, ModelConfig, preset
from lmforge.errors import ConfigError

LLAMA = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
         "max_position_embeddings": 128}


@pytest.mark.parametrize("field, value, message", [
    ("n_heads", 0, "config field 'n_heads': must be >= 1, got 0"),
    ("vocab_size", -5, "config field 'vocab_size': must be >= 1, got -5"),
    ("context_length", 0, "config field 'context_length': must be >= 1, got 0"),
    ("d_ff", 2.5, "config field 'd_ff': expected an integer, got 2.5"),
    ("n_layers", True, "config field 'n_layers': expected an integer, got True"),
    ("d_model", "512", "config field 'd_model': expected an integer, got '512'"),
    ("norm", "batchnorm", "config field 'norm': expected one of layernorm | rmsnorm, got 'batchnorm'"),
    ("mlp", "moe", "config field 'mlp': expected one of gelu | swiglu | geglu"),
    ("activation", "tanh", "config field 'activation': expected one of gelu | gelu_tanh | silu | relu"),
    ("position", "alibi", "config field 'position': expected one of learned | sinusoidal | rotary | none"),
    ("norm_placement", "middle", "config field 'norm_placement': expected one of pre | post | sandwich"),
    ("family", "mamba", "config field 'family': expected one of gpt2 | llama | mistral | mixtral | qwen2 | qwen3 "),
    ("norm_eps", 0.0, "config field 'norm_eps': must be > 0, got 0.0"),
    ("norm_eps", float("nan"), "config field 'norm_eps': expected a finite number, got nan"),
    ("rope_theta", float("inf"), "config field 'rope_theta': expected a finite number, got inf"),
    ("rotary_fraction", 1.5, "config field 'rotary_fraction': must be in (0, 1], got 1.5"),
    ("dropout", 1.0, "config field 'dropout': must be in [0, 1), got 1.0"),
    ("tie_embeddings", 1, "config field 'tie_embeddings': expected true or false, got 1"),
    ("sliding_window", 0, "config field 'sliding_window': must be >= 1, got 0"),
    ("attn_softcap", -1.0, "config field 'attn_softcap': must be > 0, got -1.0"),
    ("eos_token_id", -1, "config field 'eos_token_id': must be >= 0, got -1"),
    ("eos_token_id", [2, "x"], "config field 'eos_token_id': expected an integer or a list, got [2, 'x']"),
    ("layer_types", ["full", "local"], "config field 'layer_types': expected one of full | sliding, got 'local'"),
    ("rope_scaling", "linear", "config field 'rope_scaling': expected an object, got 'linear'"),
])
def test_bad_field_is_named(field, value, message):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**{"n_layers": 2, field: value})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_variant_fields_are_literals_and_good_values_pass():
    hints = typing.get_type_hints(ModelConfig)
    for name in ("family", "norm", "norm_placement", "mlp", "activation", "position"):
        assert typing.get_origin(hints[name]) is typing.Literal, name
    for name in PRESETS:
        preset(name)
    c = ModelConfig(rope_theta=500000, n_kv_heads=None, eos_token_id=[1, 2])
    assert c.rope_theta == 500000.0 and isinstance(c.rope_theta, float) and c.n_kv_heads == c.n_heads
    assert "extra" not in ModelConfig.__dataclass_fields__
    assert ModelConfig.from_dict(c.to_dict()) == c


def _hf_dir(tmp_path: Path, content: bytes | str | dict | list) -> Path:
    d = tmp_path / "m"
    d.mkdir()
    raw = content if isinstance(content, bytes | str) else json.dumps(content)
    (d / "config.json").write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    return d


BAD_CONFIGS = {  # name -> (config.json content, what the message must say besides the file)
    "json-list": ([LLAMA], "expected a JSON object, got a JSON list"),
    "not-utf8": (b'{"model_type": "llama", "vocab_size": 96, "x": "\xff\xfe"}', "not UTF-8 text"),
    "zero-heads": ({**LLAMA, "num_attention_heads": 0}, "field 'num_attention_heads': must be >= 1, got 0"),
    "negative-hidden": ({**LLAMA, "hidden_size": -64}, "field 'hidden_size': must be >= 1, got -64"),
    "negative-positions": ({**LLAMA, "max_position_embeddings": -1},
                           "field 'max_position_embeddings': must be >= 1, got -1"),
    "string-number": ({**LLAMA, "num_hidden_layers": "two"},
                      "field 'num_hidden_layers': expected an integer, got 'two'"),
    "string-float": ({**LLAMA, "rms_norm_eps": "1e-5"}, "field 'rms_norm_eps': expected a finite number"),
    "string-gpt2": ({"model_type": "gpt2", "vocab_size": 96, "n_embd": "64", "n_layer": 2, "n_head": 4,
                     "n_positions": 128}, "field 'n_embd': expected an integer, got '64'"),
    "bad-activation": ({**LLAMA, "hidden_act": "tanh"}, "config field 'activation': expected one of"),
    "bad-eos": ({**LLAMA, "eos_token_id": "</s>"}, "config field 'eos_token_id'"),
    "bad-rope-scaling": ({**LLAMA, "rope_scaling": [2.0]}, "field 'rope_scaling': expected an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_hf_config_through_load(tmp_path, case):
    content, needle = BAD_CONFIGS[case]
    d = _hf_dir(tmp_path, content)
    with pytest.raises(ConfigError) as e:
        lmforge.load(d)
    msg = str(e.value)
    assert "\n" not in msg and str(d / "config.json") in msg and needle in msg, msg


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_hf_config_through_cli(tmp_path, capsys, case):
    content, needle = BAD_CONFIGS[case]
    d = _hf_dir(tmp_path, content)
    assert main(["info", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and err.count("\n") == 1 and needle in err, err
    assert "Traceback" not in err


def test_bad_hf_config_cli_subprocess(tmp_path):
    d = _hf_dir(tmp_path, {**LLAMA, "num_attention_heads": 0})
    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "info", str(d)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "config.json" in r.stderr and "num_attention_heads" in r.stderr


def test_good_hf_config_still_loads(tmp_path):
    c = ModelConfig.load(_hf_dir(tmp_path, LLAMA) / "config.json")
    assert (c.n_heads, c.n_kv_heads, c.head_dim, c.context_length) == (4, 2, 16, 128)
