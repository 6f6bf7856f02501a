"""`lmforge export MODEL_OR_RUN_DIR --output FILE [--format gguf|hf] [--type TYPE]`."""

from __future__ import annotations

import argparse

from lmforge.cli.common import EPILOG


def cmd_export(a: argparse.Namespace) -> int:
    from lmforge.tasks.export import export

    out = export(a.model, a.output, format=a.format, type=a.type or ("f16" if a.format == "gguf" else "f32"))
    size = sum(f.stat().st_size for f in out.iterdir()) if out.is_dir() else out.stat().st_size
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model or run dir to GGUF (llama.cpp) or a HF directory",
                       description="Write a fine-tuned model (LoRA merged) as one GGUF file that llama.cpp runs "
                       "the way lmforge does (weights, tokenizer, special tokens, chat template), or as a "
                       "transformers directory.", epilog=EPILOG)
    p.add_argument("model", help="run dir (its best/ or final/ model), HF dir, adapters dir, GGUF file or "
                   "built-in name")
    p.add_argument("--output", "-o", required=True,
                   help="output .gguf file (--format gguf) or directory (hf): a new path, or an existing regular "
                   "file (gguf) or directory (hf, other files in it are left alone). Devices, FIFOs and sockets are "
                   "refused. A symbolic link is followed: its target is written, and stderr says so. A full disk, "
                   "quota or read-only file system is one error line (exit 2) and leaves no partial output")
    p.add_argument("--format", default="gguf", help="gguf (default), hf, or gguf-lora: the LoRA adapters alone as a "
                   "GGUF adapter llama.cpp loads over the base file (--lora FILE); from an adapters-only run")
    # not argparse choices: a bad value is our one-line error (exit 2), like every other bad input
    p.add_argument("--type", default=None, help="f32 | f16 | bf16 | q8_0 | q4_0 (default f16 for gguf, "
                   "f32 for hf and gguf-lora; quantized types are gguf only; gguf-lora: f32 | f16)")
    p.set_defaults(func=cmd_export)
