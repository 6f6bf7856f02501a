"""`lmforge VERB ...`: the parser, built from an explicit list of verb modules, and `main`.

Each verb module has `register(sub)`, which adds its verbs (each a plain function of the parsed flags).
Failures cross one boundary, common.run_verb: user errors exit 2 with one line, bugs show a traceback.
"""

from __future__ import annotations

import argparse
import sys

from lmforge.cli import classify, common, export, generate, info, pretrain, qa, seq2seq, serve, structured

# The verb groups, in --help order; each module's register(sub) adds its verbs.
VERBS = [info, generate, structured, classify, seq2seq, qa, pretrain, serve, export]


def build_parser() -> argparse.ArgumentParser:
    from lmforge import __version__

    p = common.Parser(prog="lmforge", description="Build language-understanding systems on pretrained "
                      "Transformers.", epilog=common.EPILOG)
    p.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in VERBS:
        verb.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse and run one verb -> exit status (0 ok, 2 bad input, 1 a bug in lmforge)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad flag (one line already printed, status 2)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    return common.run_verb(args)


if __name__ == "__main__":
    sys.exit(main())
