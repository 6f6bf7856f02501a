"""Export's --output (issue 36, item 6): only a regular file or a new path is written; a symbolic link is
followed (said on stderr); a full disk, a quota or a read-only file system is one line, exit 2, and leaves
nothing behind. Disk failures are simulated by making the writers raise; no real device is written."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import gguf
import pytest
from conftest import make_hf_model

import lmforge
from lmforge.checkpoints import load_checkpoint
from lmforge.cli import common
from lmforge.cli import export as cli_export
from lmforge.errors import LmforgeError
from lmforge.tasks.export import ExportWriteError

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from test_export import byte_level_tokenizer

    tok = byte_level_tokenizer()
    d = tmp_path_factory.mktemp("export-paths")
    make_hf_model("llama", vocab=tok.vocab_size).save_pretrained(d)
    tok.save(d)
    return d


def run_export(*argv: str) -> int:
    p = common.Parser(prog="lmforge")
    cli_export.register(p.add_subparsers(dest="verb"))
    return common.run_verb(p.parse_args(["export", *argv]))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: error: "), err
    return err


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ---- what --output may be ------------------------------------------------------------------------------------
def test_fifo_as_output_is_refused(model_dir, tmp_path, capsys):
    fifo = tmp_path / "m.gguf"
    os.mkfifo(fifo)
    assert run_export(str(model_dir), "--output", str(fifo)) == 2
    err = one_error_line(capsys)
    assert f"{fifo}: is a FIFO" in err and "regular file or a new path" in err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and leftovers(tmp_path) == ["m.gguf"]  # untouched


def test_symlink_to_dev_null_is_refused(model_dir, tmp_path, capsys):
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # only read: nothing is written to a device here
    link = tmp_path / "m.gguf"
    link.symlink_to("/dev/null")
    for fmt in ("gguf", "hf"):
        assert run_export(str(model_dir), "--output", str(link), "--format", fmt) == 2
        err = one_error_line(capsys)
        assert f"{link}: a symbolic link to /dev/null, which is a character device" in err
    assert link.is_symlink() and os.readlink(link) == "/dev/null" and leftovers(tmp_path) == ["m.gguf"]
    with pytest.raises(LmforgeError, match="character device"):
        lmforge.export(model_dir, link)


def test_symlink_to_a_file_writes_its_target_and_says_so(model_dir, tmp_path, capsys):
    target = tmp_path / "models" / "v2.gguf"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "latest.gguf"
    link.symlink_to(target)
    assert run_export(str(model_dir), "--output", str(link), "--type", "f32") == 0
    err = capsys.readouterr().err
    assert f"{link} is a symbolic link: writing its target {target}" in err
    assert link.is_symlink() and load_checkpoint(target).cfg.family == "llama"
    assert help_text().count("symbolic link is followed") == 1  # the choice is in --help


def help_text() -> str:
    p = common.Parser(prog="lmforge")
    cli_export.register(p.add_subparsers(dest="verb"))
    sub = next(a for a in p._actions if a.dest == "verb")
    return " ".join(sub.choices["export"].format_help().split())


def test_directory_as_gguf_output_names_the_given_path(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert run_export(str(model_dir), "--output", str(out)) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"lmforge: error: {out}: is a directory; --format gguf writes one file")
    assert ".tmp" not in err and leftovers(out) == [] and leftovers(tmp_path) == ["out"]
    f = tmp_path / "file"
    f.write_text("x")
    assert run_export(str(model_dir), "--output", str(f), "--format", "hf") == 2
    assert f"{f}: is a file; --format hf writes a directory" in one_error_line(capsys)


# ---- a full disk while writing -------------------------------------------------------------------------------
DISK = [(errno.ENOSPC, "no space left on the device"), (errno.EDQUOT, "disk quota exceeded"),
        (errno.EROFS, "read-only file system")]


@pytest.mark.parametrize("code,cause", DISK)
def test_disk_full_writing_gguf_is_one_line_and_leaves_nothing(model_dir, tmp_path, capsys, monkeypatch, code,
                                                               cause):
    def half_then_fail(self, **kw):
        for f in self.fout:
            f.write(b"\0" * 4096)  # part of the file is on disk when the device fills up
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", half_then_fail)
    out = tmp_path / "out"
    out.mkdir()
    assert run_export(str(model_dir), "--output", str(out / "m.gguf")) == 2
    err = one_error_line(capsys)
    assert err == f"lmforge: error: {out / 'm.gguf'}: cannot write the export: {cause}; nothing was left behind\n"
    assert leftovers(out) == []
    with pytest.raises(ExportWriteError, match=cause):
        lmforge.export(model_dir, out / "m.gguf")
    assert leftovers(out) == []


def test_short_write_on_a_full_disk_without_errno(model_dir, tmp_path, capsys, monkeypatch):
    """numpy's tofile reports a full disk as OSError('N requested and M written') with no errno: the free space
    left beside the file tells it apart from a bug."""
    def short(self, **kw):
        raise OSError("19200 requested and 14616 written")

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", short)
    monkeypatch.setattr(os, "statvfs", lambda p: Full())
    out = tmp_path / "out"
    out.mkdir()
    assert run_export(str(model_dir), "--output", str(out / "m.gguf")) == 2
    assert "no space left on the device" in one_error_line(capsys) and leftovers(out) == []


def _safetensors_full(tensors, filename, metadata=None):
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"\0" * 4096)
    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                          'left on device" })')


def _oserror_full(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\0" * 4096)
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("writer", [_oserror_full, _safetensors_full], ids=["oserror", "safetensors"])
def test_disk_full_writing_hf_removes_the_directory_it_created(model_dir, tmp_path, capsys, monkeypatch, writer):
    monkeypatch.setattr("lmforge.checkpoints.hf.save_file", writer)
    out = tmp_path / "hf"
    assert run_export(str(model_dir), "--output", str(out), "--format", "hf") == 2
    err = one_error_line(capsys)
    assert err.startswith(f"lmforge: error: {out}: cannot write the export: no space left on the device")
    assert leftovers(tmp_path) == []  # no empty hf/, no .tmp-* directory
    existing = tmp_path / "kept"  # an existing directory: its files stay, nothing is added
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(ExportWriteError, match="no space left on the device"):
        lmforge.export(model_dir, existing, format="hf", type="f32")
    assert leftovers(existing) == ["notes.txt"] and leftovers(tmp_path) == ["kept"]


def test_hf_into_an_existing_directory_still_works(model_dir, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    lmforge.export(model_dir, out, format="hf", type="f32")
    assert {"config.json", "model.safetensors", "notes.txt", "tokenizer.json"} <= set(leftovers(out))
    assert not [n for n in leftovers(out) if n.startswith(".tmp")] and load_checkpoint(out).cfg.family == "llama"
