"""`lmforge info MODEL` and `lmforge embed MODEL TEXT...`."""

from __future__ import annotations

import argparse
import json

from lmforge.cli.common import DEVICE_HELP, EPILOG, positive_int, read_texts


def print_families() -> int:
    """`lmforge info --families`: the families lmforge loads, the model_type values they read, and what they add."""
    from lmforge.checkpoints.gguf import GGUF_FAMILIES
    from lmforge.families import SPECS

    rows = [("family", "model_type", "kind", "formats", "notes")]
    rows += [(s.name, ", ".join(s.hf_types), s.kind, "HF dir" + (", GGUF" if s.name in GGUF_FAMILIES else ""),
              s.note) for s in SPECS]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    if a.families:
        return print_families()
    if a.model is None:
        from lmforge.errors import ConfigError

        raise ConfigError("info: give a MODEL (a built-in name, a directory or a .gguf file), or --families")
    from lmforge.checkpoints import load_full
    from lmforge.device import resolve_device

    dev = resolve_device(a.device, "--device")
    ck = load_full(a.model)
    if ck.tokenizer is None and ck.format == "hf":  # a broken tokenizer file is an error (exit 2), not "no tokenizer"
        from lmforge.tokenizer import Tokenizer

        Tokenizer.from_dir_if_present(ck.path)
    cfg, model = ck.cfg, ck.model
    path = decode_path(ck, dev)
    info = {
        "model": a.model,
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
        "device": str(dev),
        "decode_path": path,
        "decode_kernels": decode_kernels(path, dev),
        "decode_step": decode_step(model),
        "host": host(dev),
        "format": ck.format,
        "file_size": ck.file_size,
        "path": str(ck.path),
        "source": ck.source,
        "tokenizer": ck.tokenizer is not None,
    }
    if cfg.id2label:
        info["labels"] = [cfg.id2label[i] for i in sorted(cfg.id2label)]
    if a.json:
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


def decode_path(ck, device=None) -> str:
    """The matmul path generate/chat/serve run by default (`--quantize auto`) on `device` (default: the CPU): a
    quantized GGUF's int path, else the float dtype the weights load in (quant.decode_plan, as Generator.load)."""
    import torch

    from lmforge.decoding.step import decode_plan

    dev = torch.device(device or "cpu")
    mode, dtype = decode_plan("auto", None, dev)
    if mode == "auto" and ck.format == "gguf" and ck.cfg.causal:
        from lmforge.checkpoints.gguf import decode_path as gguf_decode_path

        return gguf_decode_path(ck.path)
    quantized = ck.quantization and ck.quantization.upper() not in ("F32", "F16", "BF16")
    return str(dtype).removeprefix("torch.") + (
        f" (the file's {ck.quantization} blocks dequantized: the int kernels are CPU code)"
        if quantized and dev.type != "cpu" else "")


def decode_kernels(path: str, device=None) -> str:
    """Which matmul kernels an int path runs on this machine (lmforge's AVX2 ones, or torch's packed ones)."""
    if not path.startswith("int"):
        on_gpu = device is not None and str(device) != "cpu"
        return f"torch's {path.split()[0]} matmul" + (f" on {device}" if on_gpu else "")
    from lmforge.quant import kernel_backend

    return kernel_backend()


def host(device=None) -> str:
    """The CPU (or GPU) the paths above were chosen for: a CPU's name alone can cover CPUs 2.4x apart
    (docs/benchmarks.md)."""
    import torch

    from lmforge.device import cpu_identity

    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    c = cpu_identity()
    fam = f" (family {c['cpu_family']} model {c['cpu_model']})" if "cpu_family" in c and "cpu_model" in c else ""
    simd = " ".join(c["simd"]) or "no AVX2"  # type: ignore[arg-type]
    return f"{c.get('cpu', 'unknown CPU')}{fam}, {simd}, {torch.get_num_threads()} threads"


def decode_step(model) -> str:
    """The per-token step `generate` runs with the default --compile-decode auto (eager, traced or compiled)."""
    if not model.cfg.causal:
        return "none (an encoder does not decode)"
    from lmforge.decoding import describe_decode_step

    return describe_decode_step(model)


def cmd_embed(a: argparse.Namespace) -> int:
    import sys

    from lmforge.checkpoints import load
    from lmforge.device import resolve_device
    from lmforge.model.heads import embed_texts

    texts = read_texts(a.text, "embed")
    model, tok = load(a.model, device=str(resolve_device(a.device, "--device")))
    vecs = embed_texts(model, tok, texts, batch_size=a.batch_size, normalize=a.normalize)
    for v in vecs.tolist():
        sys.stdout.write(json.dumps([round(x, 7) for x in v]) + "\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("info", help="describe a model: family, size, shapes, where it was loaded from",
                       epilog=EPILOG)
    s.add_argument("model", metavar="MODEL", nargs="?")
    s.add_argument("--families", action="store_true",
                   help="list the model families lmforge loads (HF model_type, formats) and exit")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--device", default="auto", help=DEVICE_HELP + "; the paths shown are the ones it would run")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("embed", help="sentence embeddings (mean pooling), one JSON array per line", epilog=EPILOG)
    s.add_argument("model", metavar="MODEL")
    s.add_argument("text", nargs="*", metavar="TEXT", help="texts to embed (default: stdin, one per line)")
    s.add_argument("--batch-size", type=positive_int, default=32)
    s.add_argument("--normalize", action="store_true", help="L2-normalise each vector")
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.set_defaults(func=cmd_embed)
