"""What the verbs share: the parser class, flag types, flags derived from config dataclasses, run directories,
--resume, --output checks, input reading and the error boundary that turns failures into one line."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError, LmforgeError

EPILOG = """models: a built-in name (minilm-l6, smollm2-135m-instruct, gemma3-270m), a Hugging Face
directory (config.json + safetensors), a .gguf file, or a hub id (fetched when the network allows)."""
DEFAULT_LM = "smollm2-135m-instruct"
RUN_STAMP = "%Y%m%d-%H%M%S"  # the one clock format of run directory names: runs/<task>-<model>-<stamp>
STAMP_HELP = "YYYYmmdd-HHMMSS"
DEVICE_HELP = "auto | cpu | cuda | cuda:N (auto: the first CUDA GPU when torch sees one, else the CPU)"


# ---- parser ---------------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default, except where there is none to show (None, off switches) or the
    help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if switch or action.default is None or action.default in (argparse.SUPPRESS, []) or "default" in h:
            return h
        return super()._get_help_string(action) or h


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose sub-parsers show defaults and whose errors are one line (exit 2)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kw)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


Register = Callable[[argparse._SubParsersAction], None]


# ---- flag types: bad values fail at parsing, naming the flag ----------------------------------------------
def _number(kind: type, value: str, ok: Callable[[Any], bool], what: str) -> Any:
    try:
        n = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
    if (kind is float and not math.isfinite(n)) or not ok(n):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    return n


def positive_int(value: str) -> int:
    return _number(int, value, lambda n: n >= 1, "an integer >= 1")


def non_negative_int(value: str) -> int:
    return _number(int, value, lambda n: n >= 0, "an integer >= 0")


def positive_float(value: str) -> float:
    return _number(float, value, lambda n: n > 0, "a finite number > 0")


def non_negative_float(value: str) -> float:
    return _number(float, value, lambda n: n >= 0, "a finite number >= 0")


# ---- flags derived from dataclass fields ------------------------------------------------------------------
def _base_type(hint: Any) -> Any:
    """int | None -> int; the other types as they are."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [t for t in typing.get_args(hint) if t is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def add_fields(g: argparse._ActionsContainer, cls: type, spec: Mapping[str, Mapping[str, Any]],
               defaults: Mapping[str, Any] | None = None, helps: Mapping[str, str] | None = None) -> None:
    """One flag per field named in `spec`: --field-name (or spec's `flag`, plus `aliases`), dest = the field
    name, type and default read from the dataclass unless spec or `defaults` set them (`helps` replaces help
    texts). A new config field becomes a flag by adding one line to a spec."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, opts in spec.items():
        f, kw = fields[name], dict(opts)
        if helps and name in helps:
            kw["help"] = helps[name]
        flags = [kw.pop("flag", "--" + name.replace("_", "-")), *kw.pop("aliases", ())]
        if defaults and name in defaults:
            kw["default"] = defaults[name]
        elif "default" not in kw:
            kw["default"] = (f.default_factory() if f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
                             else None if f.default is dataclasses.MISSING else f.default)
        base = _base_type(hints[name])
        if "action" not in kw:
            if base is bool:
                kw["action"] = argparse.BooleanOptionalAction if kw["default"] else "store_true"
            else:
                if typing.get_origin(base) is typing.Literal:
                    kw.setdefault("choices", typing.get_args(base))
                    base = type(typing.get_args(base)[0])
                if typing.get_origin(base) is list:
                    kw.setdefault("nargs", "+")
                    base = typing.get_args(base)[0]
                kw.setdefault("type", base)
        g.add_argument(*flags, dest=name, **kw)


def pick(a: argparse.Namespace, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The parsed values of the fields in `spec`, by field name: `Config(**pick(a, SPEC))`."""
    return {name: getattr(a, name) for name in spec}


# ---- training flags ---------------------------------------------------------------------------------------
TRAIN_FLAGS: dict[str, dict[str, Any]] = {
    "output_dir": dict(flag="--output", aliases=("-o",), metavar="RUN_DIR",
                       help=f"run directory (default: runs/<task>-<model>-{STAMP_HELP})"),
    "epochs": dict(type=positive_float, help="passes over the training data (fractions allowed)"),
    "max_steps": dict(type=positive_int, help="optimizer steps (overrides --epochs)"),
    "batch_size": dict(type=positive_int, help="examples per device per micro-batch"),
    "grad_accum": dict(type=positive_int, help="micro-batches per optimizer step"),
    "lr": dict(type=positive_float, help="peak learning rate"),
    "weight_decay": dict(type=non_negative_float, help="AdamW decoupled weight decay"),
    "layer_lr_decay": dict(type=positive_float, metavar="FACTOR",
                           help="layer-wise lr decay in (0, 1]: block i of n trains at lr * FACTOR**(n - i), the "
                           "embeddings at lr * FACTOR**(n + 1), heads at lr (1: one lr for all)"),
    "schedule": dict(choices=["linear", "cosine", "constant"], help="learning-rate decay after warmup"),
    "warmup": dict(type=non_negative_float, help="< 1: fraction of steps; >= 1: steps"),
    "max_grad_norm": dict(type=non_negative_float, help="gradient clipping (0: off)"),
    "eval_every": dict(type=non_negative_int, help="steps between evaluations (0: at the end)"),
    "save_every": dict(type=non_negative_int, help="steps between checkpoints (0: at the end)"),
    "keep_best": dict(metavar="METRIC", help="keep the best model by this eval metric (checked before training)"),
    "early_stopping_patience": dict(flag="--early-stopping", type=positive_int, metavar="N",
                                    help="stop after N evaluations without improvement of --keep-best"),
    "seed": dict(help="seeds data order, init and dropout"),
    "precision": dict(default="auto", help="auto: bf16 autocast on CUDA with bf16 and on CPUs with avx512_bf16 or "
                      "AMX, else fp32 (weights stay float32); the run records its choice and resumes in it"),
    "bf16": dict(help="alias of --precision bf16"),
    "compile": dict(help="torch.compile the model"),
    "device": dict(help=DEVICE_HELP),
    "max_time_s": dict(flag="--max-time", type=positive_float, metavar="SECONDS",
                       help="stop cleanly after this long (checkpoint saved; --resume RUN_DIR continues)"),
    "overwrite": dict(help="start over in a run dir that has checkpoints (they are deleted)"),
    "log_every": dict(type=positive_int, help="steps between log lines"),
    "progress": dict(flag="--no-progress", action="store_false", help="no progress bar"),
}


def add_train_flags(s: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None,
                    helps: Mapping[str, str] | None = None) -> None:
    """The Trainer's flags, with the verb's own defaults (None where the verb decides later, said in `helps`)."""
    from lmforge.train import TrainConfig

    g = s.add_argument_group("training")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR (where it "
                   "is now, even if moved) from its latest checkpoint, with the settings it was started with")
    add_fields(g, TrainConfig, TRAIN_FLAGS, defaults, helps)


LORA_FLAGS: dict[str, dict[str, Any]] = {
    "lora": dict(help="train low-rank adapters (and the task head) on a frozen model"),
    "lora_rank": dict(type=positive_int),
    "lora_alpha": dict(type=positive_float),
    "lora_dropout": dict(type=non_negative_float),
    "lora_targets": dict(help="comma list of q,k,v,o,gate,up,down,fc1,fc2, or all-linear"),
    "save_adapters_only": dict(help="LoRA: save adapters (PEFT format), not a merged model"),
}
QUANTIZE_BASE_FLAG: dict[str, Any] = dict(
    choices=["none", "auto", "8", "4"], help="LoRA: hold the frozen base in integers (QLoRA): auto keeps a "
    "quantized GGUF's own int4/int8 blocks, 8|4 quantize float weights at load; the run saves the adapters alone "
    "(default none: a float base)")


def train_flag(name: str) -> str:
    """The flag of a TrainConfig field: --max-time for max_time_s, --batch-size for batch_size."""
    return str(TRAIN_FLAGS.get(name, {}).get("flag", "--" + name.replace("_", "-")))


def flag_error(e: LmforgeError) -> ConfigError:
    """A TrainConfig error as the CLI says it: "train config field 'bf16': ..." -> "--bf16: ..."."""
    from lmforge.train.config import FIELD

    return ConfigError(re.sub(rf"{FIELD} '(\w+)'", lambda m: train_flag(m.group(1)), str(e)))


def as_flags(e: LmforgeError, config: str) -> LmforgeError:
    """A task error naming `config`'s fields as the CLI says it: "QAConfig.doc_stride 20 ..." -> "--doc-stride 20
    ..." (the task layer names fields; the flags are --field-name)."""
    msg = re.sub(rf"\b{config}\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e))
    return type(e)(msg)


def train_config(a: argparse.Namespace, output_dir: str, late: Mapping[str, Any] | None = None):
    """TrainConfig from the flags; `late` fills the flags left at None by defaults that depend on others.
    TrainConfig validates (and folds --bf16 into --precision); its errors name the flags here."""
    from lmforge.train import TrainConfig

    kw = pick(a, TRAIN_FLAGS)
    for k, v in (late or {}).items():
        if kw.get(k) is None:
            kw[k] = v
    kw["output_dir"] = output_dir
    try:
        tc = TrainConfig(**kw)
        tc.resolved_device()  # a device this machine lacks: refused before any load
    except LmforgeError as e:
        raise flag_error(e) from None
    return tc


def check_keep_best(name: str | None, metrics: Sequence[str], verb: str) -> None:
    """--keep-best must name a metric the task's eval returns (TrainConfig.best_metric decides): fail before any
    data or model is loaded."""
    from lmforge.train import TrainConfig

    try:
        TrainConfig(keep_best=name).best_metric(metrics, verb)
    except LmforgeError:
        raise ConfigError(f"--keep-best {name}: {verb} evaluates {', '.join(metrics)}; pick one of those") from None


def run_dir(a: argparse.Namespace, task: str, model: str) -> str:
    """--output, or runs/<task>-<model>-<YYYYmmdd-HHMMSS> (rank 0's clock under torchrun)."""
    if a.output_dir:
        return str(a.output_dir)
    from lmforge.train.strategy import broadcast_from_leader

    slug = Path(model).name.replace("/", "_") or "model"
    return broadcast_from_leader(str(Path("runs") / f"{task}-{slug}-{time.strftime(RUN_STAMP)}"))


def check_output(path: str | Path, flag: str = "--output", fresh: bool = False) -> Path:
    """Fail early (before models load or training starts) on an --output that cannot be a directory of ours:
    an existing file, a path under a file, or a place we cannot write (read-only fs, /proc, permissions).
    fresh=True: the directory must not exist yet (nothing in it would be replaced)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise LmforgeError(f"{p}: {flag} is an existing file, expected a directory")
    if fresh and p.exists():
        raise LmforgeError(f"{p}: {flag} already exists; choose a new directory")
    anc = p
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise LmforgeError(f"{p}: {flag} lies under {anc}, which is a file")
    try:  # the real test: create something there (catches read-only filesystems and /proc even as root)
        os.rmdir(tempfile.mkdtemp(prefix=".lmforge-probe-", dir=anc))
    except OSError as e:
        raise LmforgeError(f"{p}: {flag}: cannot create a directory in {anc} ({os_cause(e)})") from None
    return p


def prepare_run(a: argparse.Namespace, out: str) -> None:
    """A new run's directory: writable, and not one that holds checkpoints unless --overwrite."""
    p = check_output(out)
    if not a.overwrite and (p / "checkpoints").is_dir() and any((p / "checkpoints").glob("step-*")):
        raise LmforgeError(f"{p}: already holds checkpoints; continue it with --resume {p}, "
                           "or pass --overwrite to start over")


def load_resume(a: argparse.Namespace, config_name: str) -> tuple[dict[str, Any], Any]:
    """For --resume RUN_DIR: the task config and TrainConfig the run was started with, pointed at RUN_DIR as
    it is now (a moved or copied run dir continues in place, never in the directory it was started in)."""
    from lmforge.train import TrainConfig, list_checkpoints

    run = Path(a.resume)
    if not run.is_dir():
        raise LmforgeError(f"{run}: --resume: no such run directory")
    if not list_checkpoints(run):
        raise LmforgeError(f"{run}: --resume: no checkpoint to resume from (expected {run}/checkpoints/step-N)")
    try:
        task = json.loads((run / config_name).read_text())
        tc = json.loads((run / "trainer_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{run}: --resume: cannot read the run's saved configs ({e})") from None
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    tcfg = TrainConfig.from_dict({k: v for k, v in tc.items() if k in names})
    tcfg.output_dir = str(run)
    if a.max_time_s is not None:
        tcfg.max_time_s = a.max_time_s
    tcfg.progress = a.progress
    check_output(run, "--resume")
    return task, tcfg


def join_workers(a: argparse.Namespace) -> tuple[bool, Callable[[str], None]]:
    """Join torchrun's process group when launched by it (a no-op otherwise) -> (is_main, log to stderr on
    rank 0 only)."""
    from lmforge.train.strategy import init_distributed

    main_rank = init_distributed(a.device).is_main
    return main_rank, ((lambda m: print(m, file=sys.stderr)) if main_rank else (lambda m: None))


# ---- input ------------------------------------------------------------------------------------------------
def read_input(path: str | None, what: str) -> str:
    """A UTF-8 text file, or stdin for None / '-'; empty input is an error."""
    if path in (None, "-"):
        text = sys.stdin.read()
    else:
        p = Path(path)
        if not p.is_file():
            raise LmforgeError(f"{p}: {what} file not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LmforgeError(f"{p}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise LmforgeError(f"{path or 'stdin'}: empty {what}")
    return text


def read_texts(texts: list[str], verb: str) -> list[str]:
    """TEXT arguments, or stdin lines; blank ones dropped."""
    texts = [t for t in (texts or [line.rstrip("\n") for line in sys.stdin]) if t.strip()]
    if not texts:
        raise LmforgeError(f"{verb}: no text given (pass TEXT arguments or lines on stdin)")
    return texts


# ---- the error boundary -----------------------------------------------------------------------------------
OS_CAUSES = {
    errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted",
    errno.EEXIST: "already exists", errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "is a directory", errno.ENOENT: "no such file or directory", errno.ENAMETOOLONG: "name too long",
    errno.EFBIG: "file too large", errno.EIO: "input/output error", errno.ENOTEMPTY: "directory not empty",
    errno.EXDEV: "cannot move across file systems",
}


def os_cause(e: OSError) -> str:
    return OS_CAUSES.get(e.errno, e.strerror or str(e)) if e.errno is not None else str(e)


def run_verb(args: argparse.Namespace) -> int:
    """Run a parsed verb. User errors (LmforgeError) and expected OS failures (disk full, read-only, a file in
    the way) print one line and exit 2; anything else is a bug: its traceback, then a line saying so, exit 1."""
    try:
        return int(args.func(args) or 0)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except OSError as e:
        if e.errno not in OS_CAUSES:
            return _bug(e)
        where = e.filename or getattr(args, "output_dir", None) or getattr(args, "resume", None) or "output"
        hint = ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT) and getattr(args, "func", None) and hasattr(args, "resume"):
            hint = "; the last complete checkpoint is kept: free space, then continue with --resume RUN_DIR"
        print(f"lmforge: error: {where}: {os_cause(e)}{hint}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the boundary: a bug still shows its traceback
        return _bug(e)


def _bug(e: BaseException) -> int:
    traceback.print_exception(e)
    print(f"lmforge: internal error ({type(e).__name__}): this is a bug in lmforge; please report it with the "
          "traceback above", file=sys.stderr)
    return 1


# ---- generation flags -------------------------------------------------------------------------------------
GEN_FLAGS: dict[str, dict[str, Any]] = {
    "max_new_tokens": dict(type=positive_int, help="tokens to generate at most"),
    "temperature": dict(type=non_negative_float, help="0 = greedy; > 0 samples"),
    "top_k": dict(type=non_negative_int, help="sample from the k most likely tokens (0: off)"),
    "top_p": dict(type=positive_float, help="nucleus sampling (1: off)"),
    "min_p": dict(type=non_negative_float, help="keep tokens with p >= min_p * p_max (0: off)"),
    "repetition_penalty": dict(type=positive_float, help="> 1 discourages tokens already in the prompt or output"),
    "no_repeat_ngram_size": dict(type=non_negative_int, metavar="N",
                                 help="never repeat an N-gram of the output; the prompt may be quoted (0: off)"),
    "num_beams": dict(type=positive_int, help="beam search when > 1 (no streaming)"),
    "length_penalty": dict(type=float, help="beam search: score / length ** this"),
    "stop_strings": dict(flag="--stop", action="append", metavar="TEXT", help="stop string (repeatable)"),
    "seed": dict(help="sampling seed (default: random)"),
}


def add_gen_flags(s: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None,
                  helps: Mapping[str, str] | None = None) -> None:
    """Model and decoding flags; `defaults` are the verb's own (chosen so that the output does not loop),
    `helps` replaces a flag's help text where the verb gives it another meaning."""
    from lmforge.decoding import GenerationConfig

    s.add_argument("--model", default=DEFAULT_LM, help="decoder model to generate with")
    g = s.add_argument_group("decoding")
    add_fields(g, GenerationConfig, GEN_FLAGS, defaults, helps)
    g.add_argument("--quantize", choices=["auto", "none", "8", "4"], default="auto",
                   help="auto: a quantized GGUF decodes on its matching int4/int8 path (exact for Q4_0/Q4_1/Q4_K), "
                        "other models in float; none: full precision; 8|4: int8/int4 weights from the floats")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="load the weights in this float dtype, unquantized (unless --quantize 8|4); default: "
                        "float32 on the CPU, bfloat16 on a GPU that has it")
    g.add_argument("--device", default="auto", help=DEVICE_HELP + "; on a GPU, quantized GGUF weights are "
                   "dequantized (the int4/int8 kernels are CPU code)")
    g.add_argument("--truncate", action="store_true",
                   help="keep the last tokens of a prompt that is too long instead of failing")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print each piece as it is decoded, also into a pipe")
    g.add_argument("--verbose", "-v", action="store_true",
                   help="on stderr: prompt tokens, generated tokens, time to first token, tokens/s")


def gen_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """GenerationConfig fields from the flags (bad combinations fail here, before a model loads)."""
    from lmforge.decoding import GenerationConfig

    kw = pick(a, GEN_FLAGS)
    GenerationConfig(**kw).validate()
    return kw


def load_generator(model: str, quantize: int | str | None = "auto", dtype: str | None = None,
                   device: str = "auto"):
    """A Generator for a decoder; an encoder (e.g. minilm-l6) is refused in one line. quantize None (a flag
    not given) is "auto": quantized GGUF files decode quantized; `--dtype` or `--quantize none` forces float.
    device "auto": the GPU when torch sees one (bf16 weights there), else the CPU."""
    from lmforge.generator import Generator

    gen = Generator.load(model, dtype=dtype, quantize="auto" if quantize is None else quantize, device=device)
    cfg = gen.model.cfg
    if not cfg.causal:
        raise LmforgeError(f"{model}: a {cfg.family} encoder (bidirectional attention) cannot generate text; use "
                           f"a decoder such as {DEFAULT_LM} (encoders serve embed, classify and qa)")
    return gen
