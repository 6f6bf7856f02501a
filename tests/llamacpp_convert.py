"""Run llama.cpp's convert_hf_to_gguf.py on several model directories in one process (for test_gguf_families.py).

usage: python llamacpp_convert.py CONVERT_HF_TO_GGUF.py JOBS.json RESULTS.json

Each job is {"model": dir, "outfile": path, "outtype": "f32" | "q8_0", "pre": name}. The converter runs as
shipped, its own gguf-py first on the path, with one exception: a byte-level BPE tokenizer whose pre-tokenizer
it does not recognise (it hashes the token ids of a test string, and a tiny test vocabulary is none of the
models it knows) is written with the job's `pre` name instead of stopping the conversion. The tokenizer is not
what the tests compare; the weights and the model metadata are converted untouched. RESULTS.json gets, per job,
"ok" or the error that stopped it (its last logged error when the converter exits).
"""

from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path


class _LastError(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage().strip().splitlines()[-1] if record.getMessage().strip() else ""


def main() -> None:
    script, jobs_file, results_file = sys.argv[1:4]
    root = Path(script).resolve().parent
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    import conversion.base as base

    pinned = {"pre": "gpt-2"}
    detect = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return detect(self, tokenizer)
        except NotImplementedError:  # an unknown tokenizer hash: the tiny test vocabulary
            return pinned["pre"]

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    last = _LastError()
    logging.getLogger().addHandler(last)
    results = []
    for job in json.loads(Path(jobs_file).read_text()):
        pinned["pre"] = job["pre"]
        last.message = ""
        sys.argv = [script, "--outtype", job["outtype"], "--outfile", job["outfile"], job["model"]]
        try:
            runpy.run_path(script, run_name="__main__")
            results.append("ok")
        except SystemExit as e:
            results.append("ok" if not e.code else last.message or f"exit status {e.code}")
        except Exception as e:  # noqa: BLE001 -- reported per job, the others still run
            results.append(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
    Path(results_file).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
