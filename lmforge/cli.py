"""`lmforge VERB ...`: parses flags and calls one function per verb; user errors exit 2 with one line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from lmforge.errors import LmforgeError

EPILOG = """models: a built-in name (minilm-l6, smollm2-135m-instruct, gemma3-270m), a Hugging Face
directory (config.json + safetensors), a .gguf file, or a hub id (fetched when the network allows)."""


# ---- info ------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from lmforge.api import load_full

    ck = load_full(args.model)
    cfg, model = ck.cfg, ck.model
    info = {
        "model": args.model,
        "family": cfg.family,
        "parameters": model.num_parameters(),
        "layers": cfg.n_layers,
        "width": cfg.d_model,
        "heads": cfg.n_heads,
        "kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "mlp": f"{cfg.mlp} ({cfg.d_ff})",
        "vocab": cfg.vocab_size,
        "context_length": cfg.context_length,
        "attention": "causal" if cfg.causal else "bidirectional",
        "position": cfg.position + (f" (theta {cfg.rope_theta:g})" if cfg.position == "rotary" else ""),
        "stored_dtype": ck.quantization or cfg.dtype,
        "loaded_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "format": ck.format,
        "file_size": ck.file_size,
        "path": str(ck.path),
        "source": ck.source,
        "tokenizer": ck.tokenizer is not None,
    }
    if cfg.id2label:
        info["labels"] = [cfg.id2label[i] for i in sorted(cfg.id2label)]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        if k == "parameters":
            v = f"{v:,} ({v / 1e6:.1f}M)"
        elif k == "file_size":
            v = f"{v:,} bytes ({v / 2**20:.1f} MiB)"
        print(f"{k:<{width}}  {v}")
    return 0


# ---- embed -----------------------------------------------------------------------------------------
def cmd_embed(args: argparse.Namespace) -> int:
    from lmforge.api import embed_texts, load

    texts = args.text or [line.rstrip("\n") for line in sys.stdin]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LmforgeError("embed: no text given (pass TEXT arguments or lines on stdin)")
    model, tok = load(args.model)
    vecs = embed_texts(model, tok, texts, batch_size=args.batch_size, normalize=args.normalize)
    out = sys.stdout
    for v in vecs.tolist():
        out.write(json.dumps([round(x, 7) for x in v]) + "\n")
    return 0


# ---- parser ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmforge", description="Build language-understanding systems on pretrained Transformers.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from lmforge import __version__

    p.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    s = sub.add_parser("info", help="describe a model: family, size, shapes, where it was loaded from",
                       epilog=EPILOG)
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("embed", help="sentence embeddings (mean pooling), one JSON array per line",
                       epilog=EPILOG)
    s.add_argument("model", metavar="MODEL")
    s.add_argument("text", nargs="*", metavar="TEXT", help="texts to embed (default: stdin, one per line)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--normalize", action="store_true", help="L2-normalise each vector")
    s.set_defaults(func=cmd_embed)

    for register in _EXTRA_VERBS:
        register(sub)
    return p


# Other modules add verbs here (classify, generate, ...) so this file stays a thin map.
_EXTRA_VERBS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
