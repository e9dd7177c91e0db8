"""``lightning-soup`` against mergekit: the same linear and TIES merges, time and peak memory side by side.

mergekit is not a dependency (and its code is LGPL; nothing of it is used here): this script installs it into its
own virtualenv (``--venv``, default ``/tmp/mergekit-venv``) with ``pip install mergekit torch==<our torch>`` so
that it runs on the same CPU build of torch. Where it cannot be installed (offline), it says "mergekit not
available" and still times our side.

The models are synthetic Hugging Face checkpoints written here (nothing is downloaded): a ``config.json`` of a
small ``LlamaForCausalLM`` and a ``model.safetensors`` with its weight names, a base and fine-tunes of it (base +
noise). Both tools compute in float32 and write bfloat16 (mergekit: ``dtype: float32``, ``out_dtype: bfloat16``);
the script also reports the largest difference between their outputs.

Each tool runs as a fresh process (``--repeat`` times, alternating; the fastest run is reported), measured from
outside like benchmarks/bench_cli_memory.py: wall time, peak RssAnon (sampled) and peak RSS (``ru_maxrss``).
"startup" is the wall time of a process that only imports what the tool imports ("extra MB": peak RssAnon above
that process's).
Our wall time includes hashing every input and the output (SHA-256 in the recipe); mergekit hashes nothing.

Usage:
    python benchmarks/bench_mergekit.py                          # ~270 MB bfloat16 models, 2 repeats
    python benchmarks/bench_mergekit.py --layers 16 --repeat 3   # bigger
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_cli_memory import measure  # noqa: E402

OURS_IMPORTS = (
    "import torch, rich.progress, lightning_soup.cli, lightning_soup.cli.merge, lightning_soup.merge, "
    "lightning_soup.storage"
)
MERGEKIT_IMPORTS = "import torch, transformers, mergekit.merge, mergekit.config, mergekit.options"


def ensure_mergekit(venv: Path, install: bool) -> Path | None:
    """The venv's ``mergekit-yaml``, installing mergekit there if needed; None when it is not available."""
    script = venv / "bin" / "mergekit-yaml"
    if script.exists():
        return script
    if not install:
        return None
    import importlib.metadata

    torch_version = importlib.metadata.version("torch").split("+")[0]
    try:
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "mergekit", f"torch=={torch_version}"],
            check=True,
            timeout=1800,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        print(f"could not install mergekit into {venv}: {e}", file=sys.stderr)
        return None
    return script if script.exists() else None


def llama_config(hidden: int, layers: int, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": hidden * 11 // 4,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def write_models(folder: Path, names: list[str], hidden: int, layers: int, vocab: int) -> None:
    """Run in a child process (keeps this one small, see bench_cli_memory): base + noise fine-tunes."""
    import torch
    from safetensors.torch import save_file

    config = llama_config(hidden, layers, vocab)
    inter = config["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    g = torch.Generator().manual_seed(0)
    base = {k: (0.02 * torch.randn(s, generator=g)).to(torch.bfloat16) for k, s in shapes.items()}
    for n, name in enumerate(names):
        out = folder / name
        out.mkdir()
        (out / "config.json").write_text(json.dumps(config, indent=2))
        if n == 0:
            sd = base
        else:
            sd = {
                k: (v.float() + 0.002 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()
            }
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
        del sd


def mergekit_config(method: str, models: list[Path], density: float) -> str:
    if method == "linear":
        entries = "".join(f"  - model: {m}\n    parameters:\n      weight: 1.0\n" for m in models)
        return f"models:\n{entries}merge_method: linear\ndtype: float32\nout_dtype: bfloat16\n"
    base, fts = models[0], models[1:]
    entries = f"  - model: {base}\n" + "".join(
        f"  - model: {m}\n    parameters:\n      weight: 1.0\n      density: {density}\n" for m in fts
    )
    return textwrap.dedent(
        f"models:\n{entries}merge_method: ties\nbase_model: {base}\nparameters:\n  normalize: true\n"
        "  int8_mask: false\ndtype: float32\nout_dtype: bfloat16\n"
    )


def ours_argv(method: str, models: list[Path], out: Path, density: float) -> list[str]:
    cli = [sys.executable, "-m", "lightning_soup"]
    if method == "linear":
        return [*cli, "average", *map(str, models), "-o", str(out), "--quiet", "--force"]
    return [
        *cli,
        "ties",
        "--base",
        str(models[0]),
        *map(str, models[1:]),
        "--density",
        str(density),
        "-o",
        str(out),
        "--quiet",
        "--force",
    ]


def compare_outputs(ours: Path, theirs: Path) -> tuple[float, float]:
    """The largest absolute difference between the two outputs and the fraction of elements that differ at all
    (run in a child: loads both)."""
    code = textwrap.dedent(
        f"""
        import torch
        from lightning_soup.storage import load_state_dict
        a, b = load_state_dict({str(ours)!r}), load_state_dict({str(theirs)!r})
        assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        differ = sum(int((a[k] != b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
        print(worst, differ)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    worst, differ = proc.stdout.split()
    return float(worst), float(differ)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=Path("/tmp/mergekit-venv"))
    parser.add_argument("--no-install", action="store_true", help="do not try to install mergekit")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["linear", "ties"], choices=["linear", "ties"])
    parser.add_argument("--dir", type=Path, default=None, help="where to write the models (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    mergekit = ensure_mergekit(args.venv, install=not args.no_install)
    if mergekit is None:
        print("mergekit not available: timing lightning-soup only", file=sys.stderr)
    results: dict = {"mergekit": mergekit is not None, "methods": {}}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        names = ["base", "ft1", "ft2"]
        code = (
            f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_mergekit as b; "
            f"from pathlib import Path; "
            f"b.write_models(Path({str(folder)!r}), {names!r}, {args.hidden}, {args.layers}, {args.vocab})"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
        models = [folder / n for n in names]
        model_mb = (models[0] / "model.safetensors").stat().st_size / 2**20
        results["model_mb"] = model_mb
        imports = {"ours": [sys.executable, "-c", OURS_IMPORTS]}
        if mergekit is not None:
            imports["mergekit"] = [str(mergekit.parent / "python"), "-c", MERGEKIT_IMPORTS]
            version = subprocess.run(
                [str(mergekit.parent / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            results["mergekit_version"] = version
        startup = {}
        for tool, argv in imports.items():
            measure(argv)  # warm the bytecode caches
            startup[tool] = min((measure(argv) for _ in range(2)), key=lambda r: r["seconds"])
        results["startup_s"] = {k: v["seconds"] for k, v in startup.items()}
        results["baseline_rss_anon_mb"] = {k: v["peak_rss_anon_mb"] for k, v in startup.items()}
        for method in args.methods:
            ours_out = folder / f"ours-{method}.safetensors"
            theirs_out = folder / f"mergekit-{method}"
            config = folder / f"{method}.yml"
            config.write_text(mergekit_config(method, models, args.density))
            runs: dict[str, list[dict]] = {"ours": [], "mergekit": []}
            for _ in range(args.repeat):
                runs["ours"].append(measure(ours_argv(method, models, ours_out, args.density)))
                if mergekit is not None:
                    argv = [
                        str(mergekit),
                        str(config),
                        str(theirs_out),
                        "--no-copy-tokenizer",
                        "--quiet",
                        "--no-write-model-card",
                        "--allow-crimes",
                    ]
                    runs["mergekit"].append(measure(argv))
            entry = {}
            for tool, rs in runs.items():
                if not rs:
                    continue
                best = min(rs, key=lambda r: r["seconds"])
                entry[tool] = {
                    "seconds": best["seconds"],
                    "all_seconds": [r["seconds"] for r in rs],
                    "peak_rss_anon_mb": max(r["peak_rss_anon_mb"] for r in rs),
                    "extra_rss_anon_mb": max(r["peak_rss_anon_mb"] for r in rs) - results["baseline_rss_anon_mb"][tool],
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                }
            if mergekit is not None:
                entry["max_abs_diff"], entry["fraction_differing"] = compare_outputs(ours_out, theirs_out)
            results["methods"][method] = entry

    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"3 synthetic LlamaForCausalLM checkpoints (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}), "
        f"{results['model_mb']:.0f} MB each in bfloat16; float32 compute, bfloat16 output; best of {args.repeat}"
    )
    if mergekit is None:
        print("mergekit not available")
    startup = ", ".join(f"{k} {v:.2f} s" for k, v in results["startup_s"].items())
    print(f"startup (imports only): {startup}")
    header = (
        f"{'method':8} {'tool':15} {'wall s':>8} {'peak RssAnon MB':>16} {'extra MB':>9} {'peak RSS MB':>12}  "
        "all runs (s)"
    )
    print(header)
    for method, entry in results["methods"].items():
        for tool in ("ours", "mergekit"):
            if tool not in entry:
                continue
            r = entry[tool]
            label = "lightning-soup" if tool == "ours" else f"mergekit {results.get('mergekit_version', '')}"
            print(
                f"{method:8} {label:15} {r['seconds']:8.2f} {r['peak_rss_anon_mb']:16.0f} "
                f"{r['extra_rss_anon_mb']:9.0f} {r['peak_rss_mb']:12.0f}  "
                + ", ".join(f"{x:.1f}" for x in r["all_seconds"])
            )
        if "max_abs_diff" in entry:
            print(
                f"{'':8} max |ours − mergekit| = {entry['max_abs_diff']:.3g}; "
                f"{100 * entry['fraction_differing']:.4f}% of the elements differ"
            )


if __name__ == "__main__":
    main()
