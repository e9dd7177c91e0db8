"""``lightning-soup``: merge and inspect checkpoints offline, streaming one tensor at a time.

Every merge command computes each output tensor by calling the :mod:`lightning_soup.merge` function on
single-key state dicts, so the CLI and the functional core cannot disagree; inputs are read lazily
(:func:`lightning_soup.storage.open_state_dict`) and the output is written tensor by tensor, so memory stays at a
few tensors whatever the model size. Inputs may be ``.safetensors`` files, sharded folders and Lightning ``.ckpt``
files, mixed freely.

This module imports only the standard library: ``--help`` answers at once, and torch is imported when a command
runs. Lightning is never imported.

Exit status: 0 on success, 1 when the inputs cannot be merged (one line on stderr naming the file or key; ``--debug``
adds the traceback), 2 for a usage error, 130 when interrupted. A failed run leaves no output behind.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import traceback
import warnings
from collections.abc import Sequence

from lightning_soup.errors import SoupError

PROG = "lightning-soup"

DTYPES = {
    "keep": "keep",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
    "double": "float64",
}

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")

_EPILOG = """\
inputs are .safetensors files, sharded folders (*.safetensors + model.safetensors.index.json) or Lightning .ckpt
files, in any mix. Examples:
  lightning-soup average A.safetensors B.ckpt C/ -o soup.safetensors --weights 1 1 2
  lightning-soup blend --anchor base.safetensors --model ft.ckpt --ratio 0.3 -o out.safetensors --prefix model.
  lightning-soup task-arithmetic --base BASE FT1 FT2 --scales 0.5 -0.3 -o out.safetensors
  lightning-soup ties --base BASE FT1 FT2 --density 0.2 -o out/ --shard-size 2GB
  lightning-soup dare --base BASE FT1 FT2 --density 0.1 --seed 0 -o out.safetensors
  lightning-soup slerp A B --t 0.5 -o out.safetensors --dtype bfloat16
  lightning-soup tsv --base BASE FT1 FT2 FT3 --alpha 1.0 -o out.safetensors
  lightning-soup iso-cts --base BASE FT1 FT2 FT3 --alpha 1.5 --common-fraction 0.8 -o out.safetensors
  lightning-soup model-stock --base BASE FT1 FT2 -o out.safetensors
  lightning-soup inspect FT1 FT2 --base BASE [--json]
"""


def parse_size(text: str) -> int:
    """Bytes in a size such as ``2GB`` (10⁹), ``500MiB`` (2²⁰) or ``1000000``.

    Example:
        >>> parse_size("2GB"), parse_size("1.5 GiB"), parse_size("4096")
        (2000000000, 1610612736, 4096)
    """
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB, 500MB or 1GiB, got {text!r}")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"the size must be positive, got {text!r}")
    return size


def _dtype(text: str) -> str:
    try:
        return DTYPES[text.lower().removeprefix("torch.")]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"expected one of keep, float32, float16, bfloat16, float64, got {text!r}"
        ) from None


def _layer_ratio(text: str) -> tuple[str, float]:
    pattern, sep, value = text.rpartition("=")
    try:
        if not sep or not pattern:
            raise ValueError
        return pattern, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PATTERN=RATIO such as 'encoder.*=0.2', got {text!r}") from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


class _Formatter(argparse.HelpFormatter):
    """Wraps descriptions to the terminal; keeps the line breaks of multi-line texts (the examples)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=min(110, _terminal_width()))

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size((110, 24)).columns - 2


def _task_vector_inputs(p: argparse.ArgumentParser) -> None:
    """``--base BASE FT [FT ...]``: the inputs of the task-vector commands."""
    p.add_argument("--base", required=True, metavar="BASE", help="the model the fine-tunes started from")
    p.add_argument("finetuned", nargs="+", metavar="FT", help="fine-tuned checkpoints")


def _density_and_scale(p: argparse.ArgumentParser, *, density_help: str, scale_help: str) -> None:
    """``--density`` and ``--scale``, shared by TIES and DARE."""
    p.add_argument("--density", required=True, type=_fraction, metavar="D", help=density_help)
    p.add_argument("--scale", type=float, default=1.0, metavar="λ", help=scale_help)


def _common(p: argparse.ArgumentParser, *, writes: bool) -> None:
    """Options every command shares; ``writes`` adds the output options of the merge commands."""
    if writes:
        out = p.add_argument_group("output")
        out.add_argument(
            "-o",
            "--output",
            required=True,
            metavar="PATH",
            help="the .safetensors file to write; a folder with --shard-size, or when the inputs are Hugging Face "
            "model folders (a model folder that from_pretrained loads: weights, config, tokenizer, README.md)",
        )
        out.add_argument("--force", action="store_true", help="overwrite the output if it exists")
        out.add_argument(
            "--allow-unrelated",
            action="store_true",
            help="merge even inputs whose weights do not look fine-tuned from one base (by default they are refused: "
            "their whole-model cosine similarity to the base, or to the first input, is below 0.15)",
        )
        out.add_argument(
            "--dtype",
            type=_dtype,
            default="keep",
            metavar="DTYPE",
            help="dtype of the output's floating tensors: float32, float16, bfloat16, float64 or keep (default: keep, "
            "the dtype of the tensor each result replaces)",
        )
        out.add_argument(
            "--merge-into",
            default=None,
            metavar="BASE",
            help="inputs that are PEFT LoRA adapter folders become dense weights BASE + scaling·B·A first (exact); "
            "without it, adapters are merged as adapters (average, blend, task-arithmetic) into an adapter folder",
        )
        out.add_argument(
            "--config-from",
            default=None,
            metavar="PATH",
            help="the Hugging Face model folder whose config.json, generation_config.json and tokenizer files the "
            "output folder gets (default: the base's, or the first input that is a model folder)",
        )
        out.add_argument(
            "--shard-size",
            type=parse_size,
            default=None,
            metavar="SIZE",
            help="write a sharded folder with shards of at most SIZE (2GB, 500MB, 1GiB) and "
            "model.safetensors.index.json",
        )
    p.add_argument(
        "--prefix",
        default=None,
        metavar="PREFIX",
        help="use only the keys that start with PREFIX, with PREFIX removed (e.g. 'model.' for a LightningModule "
        "whose network is self.model), so the output loads straight into the inner network; inputs without such "
        "keys (a .safetensors of the inner network next to a .ckpt) are used as they are",
    )
    p.add_argument(
        "--device", default="cpu", metavar="DEVICE", help="compute on this device, e.g. cuda or cuda:1 (default: cpu)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary on stderr")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-soup`` argument parser (no torch import)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Merge checkpoints offline: averages, task arithmetic, TIES, DARE, TSV, Iso-C, Iso-CTS, Model "
        "Stock, SLERP; inspect task vectors. "
        "Streams one tensor at a time, so memory stays at a few tensors whatever the model size.",
        epilog=_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description, formatter_class=_Formatter)
        p.set_defaults(_parser=p)  # for usage errors found after parsing
        return p

    p = command(
        "average",
        "(weighted) mean of the inputs",
        "The elementwise mean Σ wᵢθᵢ / Σ wᵢ of the inputs (uniform by default).",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="two or more checkpoints")
    p.add_argument(
        "--weights", nargs="+", type=float, metavar="W", help="one non-negative weight per input (default: equal)"
    )
    _common(p, writes=True)

    p = command(
        "blend",
        "anchor + ratio·(model − anchor) (WiSE-FT)",
        "Interpolate from ANCHOR (ratio 0) to MODEL (ratio 1): anchor + ratio·(model − anchor) (Wortsman et al. 2022).",
    )
    p.add_argument("--anchor", required=True, metavar="ANCHOR", help="the base / safety checkpoint")
    p.add_argument("--model", required=True, metavar="MODEL", help="the fine-tuned checkpoint")
    p.add_argument("--ratio", required=True, type=float, metavar="R", help="0 gives the anchor, 1 the model")
    p.add_argument(
        "--layer-ratio",
        action="append",
        type=_layer_ratio,
        default=[],
        metavar="PATTERN=R",
        help="a ratio for the keys matching an fnmatch pattern (repeatable, first match wins), e.g. 'head.*=1.0'",
    )
    _common(p, writes=True)

    p = command(
        "task-arithmetic",
        "base + Σ λᵢ (ftᵢ − base)",
        "Add scaled task vectors to the base: base + Σ λᵢ·(ftᵢ − base) (Ilharco et al. 2023); a negative λ removes "
        "a skill.",
    )
    _task_vector_inputs(p)
    p.add_argument(
        "--scales", required=True, nargs="+", type=float, metavar="λ", help="one scale, or one per fine-tune"
    )
    _common(p, writes=True)

    p = command(
        "ties",
        "TIES-merging of task vectors",
        "TIES-merging (Yadav et al. 2023): trim each task vector to its largest-magnitude entries, elect a sign per "
        "entry, average the agreeing deltas, add them to the base.",
    )
    _task_vector_inputs(p)
    _density_and_scale(p, density_help="fraction of each task vector kept, in (0, 1]", scale_help="scale of the merged task vector (default: 1.0)")
    _common(p, writes=True)

    p = command(
        "dare",
        "DARE: drop and rescale task vectors",
        "DARE (Yu et al. 2023): drop each task-vector entry with probability 1 − density, rescale the rest by "
        "1/density, add the sum to the base. Reproducible for a given seed.",
    )
    _task_vector_inputs(p)
    _density_and_scale(p, density_help="probability of keeping an entry, in (0, 1]", scale_help="scale of the summed task vectors (default: 1.0)")
    p.add_argument("--seed", type=_nonnegative_int, default=0, metavar="N", help="random seed (default: 0)")
    _common(p, writes=True)

    alpha_help = "multiplier of the merged update (default: 1.0; the papers tune it on validation, ~1.0-1.5)"
    p = command(
        "tsv",
        "TSV-Merge: task singular vectors",
        "TSV-Merge (Gargiulo et al., CVPR 2025): per 2-D weight, keep each task vector's top min(m, n)/T singular "
        "directions, orthogonalise them together and add base + alpha·Δ; other tensors get the mean task vector.",
    )
    _task_vector_inputs(p)
    p.add_argument("--alpha", type=_finite, default=1.0, metavar="α", help=alpha_help)
    _common(p, writes=True)

    p = command(
        "iso-c",
        "Iso-C: isotropic merge of the summed task vectors",
        "Iso-C (Marczak et al., 2025): per 2-D weight, the summed task vectors with every singular value set to "
        "their mean (a flat spectrum), base + alpha·Δ; other tensors get the mean task vector.",
    )
    _task_vector_inputs(p)
    p.add_argument("--alpha", type=_finite, default=1.0, metavar="α", help=alpha_help)
    _common(p, writes=True)

    p = command(
        "iso-cts",
        "Iso-CTS: isotropic merge, common + task-specific subspaces",
        "Iso-CTS (Marczak et al., 2025): per 2-D weight, the common subspace of the summed task vectors plus each "
        "task's own directions outside it, orthogonalised, with a flat spectrum, base + alpha·Δ; other tensors get "
        "the mean task vector.",
    )
    _task_vector_inputs(p)
    p.add_argument("--alpha", type=_finite, default=1.0, metavar="α", help=alpha_help)
    p.add_argument(
        "--common-fraction",
        type=_unit_interval,
        default=0.8,
        metavar="F",
        help="share of each matrix's rank given to the common subspace, in [0, 1] (default: 0.8)",
    )
    _common(p, writes=True)

    p = command(
        "model-stock",
        "Model Stock: interpolation ratio from the fine-tunes' angle",
        "Model Stock (Jang et al., ECCV 2024): per tensor, t = N·c / (1 + (N−1)·c) from the mean pairwise cosine c "
        "of the task vectors, result t·mean(fine-tunes) + (1 − t)·base. No coefficient; needs two or more "
        "fine-tunes.",
    )
    _task_vector_inputs(p)
    _common(p, writes=True)

    p = command(
        "slerp",
        "spherical interpolation of two models",
        "Per-tensor spherical interpolation from A (t=0) to B (t=1); plain lerp for nearly colinear tensors.",
    )
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--t", "-t", required=True, type=float, metavar="T", help="0 gives A, 1 gives B")
    _common(p, writes=True)

    p = command(
        "inspect",
        "compare checkpoints and their task vectors",
        "Report key/shape/dtype compatibility and parameter counts; with --base, each task vector's norm, their "
        "pairwise cosine similarity and how often their signs conflict (overall and for the worst tensors).",
    )
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--base", default=None, metavar="BASE", help="compute task vectors MODEL − BASE")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument(
        "--top",
        type=_nonnegative_int,
        default=10,
        metavar="N",
        help="list the N most-conflicting tensors (default: 10)",
    )
    _common(p, writes=False)
    return parser


def _version() -> str:
    from lightning_soup import __version__

    return __version__


def _check_usage(args: argparse.Namespace) -> None:
    """Usage errors argparse cannot express (exit status 2)."""
    sub: argparse.ArgumentParser = args._parser
    output = getattr(args, "output", None)
    if output is not None:
        model_folders = (
            args.config_from is not None
            or args.merge_into is not None
            or any(_is_model_folder(p) or _is_adapter_folder(p) for p in input_paths(args))
        )
        if args.shard_size is None and not output.endswith(".safetensors") and not model_folders:
            sub.error(
                f"-o {output}: the output file must end in .safetensors (or pass --shard-size for a folder; Hugging "
                "Face model folders as inputs give a model folder)"
            )
        if args.config_from is not None and output.rstrip("/").endswith(".safetensors"):
            sub.error(f"-o {output}: --config-from writes a model folder; drop the .safetensors suffix")
        if args.shard_size is not None and output.rstrip("/").endswith(".safetensors"):
            sub.error(f"-o {output}: with --shard-size the output is a folder; drop the .safetensors suffix")
    if args.command == "average":
        if len(args.inputs) < 2:
            sub.error("average needs at least two inputs")
        if args.weights is not None and len(args.weights) != len(args.inputs):
            sub.error(f"--weights: got {len(args.weights)} weights for {len(args.inputs)} inputs")
    if args.command == "model-stock" and len(args.finetuned) < 2:
        sub.error("model-stock needs at least two fine-tuned models (its ratio comes from the angle between them)")
    if args.command == "task-arithmetic" and len(args.scales) not in (1, len(args.finetuned)):
        sub.error(
            f"--scales: got {len(args.scales)} scales for {len(args.finetuned)} fine-tuned models; give one or one "
            "per model"
        )


def input_paths(args: argparse.Namespace) -> list[str]:
    """The input paths of a merge command, the base or anchor first."""
    firsts = [getattr(args, n, None) for n in ("base", "anchor", "a", "model", "b")]
    rest = [*(getattr(args, "inputs", None) or []), *(getattr(args, "finetuned", None) or [])]
    return [p for p in firsts if isinstance(p, str)] + list(rest)


def _is_adapter_folder(path: str) -> bool:
    from lightning_soup.cli.adapters import is_adapter_folder

    return is_adapter_folder(path)


def _is_model_folder(path: str) -> bool:
    from lightning_soup.cli.hf import is_model_folder

    return is_model_folder(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-soup`` with ``argv`` (default: ``sys.argv[1:]``); the console script's entry point.

    Args:
        argv: the command line after the program name.

    Returns:
        The exit status: 0 on success, 1 when the inputs cannot be merged (a :class:`SoupError` or an I/O error,
        reported as one line on stderr), 2 for a usage error, 130 when interrupted.

    Example:
        >>> main(["--version"])
        lightning-soup 0.1.0
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check_usage(args)
    except SystemExit as e:  # argparse already printed the usage error or the help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            if args.command == "inspect":
                from lightning_soup.cli.inspect import run_inspect

                return run_inspect(args)
            from lightning_soup.cli.merge import run_merge

            return run_merge(args, argv=list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        _error("interrupted; nothing was written")
        return 130
    except Exception as e:  # noqa: BLE001 - every failure becomes one line on stderr
        if args.debug:
            traceback.print_exc()
        _error(_describe(e, debug=args.debug))
        return 1


def _describe(e: BaseException, *, debug: bool) -> str:
    if isinstance(e, SoupError):
        return str(e)
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    if isinstance(e, MemoryError):
        return "out of memory"
    hint = "" if debug else " (rerun with --debug for the traceback)"
    return f"unexpected {type(e).__name__}: {e}{hint}"


def printable(message: object) -> str:
    """``message`` with control characters shown as escapes: keys and paths come from untrusted files, and an
    escape sequence in a tensor name must not reach the terminal (retitle it, hide text, fake output)."""
    return "".join(
        c if c.isprintable() or c == " " else (c.encode("unicode_escape").decode("ascii")) for c in str(message)
    )


def _show_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
    print(f"{PROG}: warning: {printable(message)}", file=sys.stderr, flush=True)


def _error(message: str) -> None:
    print(f"{PROG}: error: {printable(message)}", file=sys.stderr, flush=True)
