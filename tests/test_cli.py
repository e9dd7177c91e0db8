"""The offline CLI: every command against float64 references written here, every input format, every error.

Most tests call ``main(argv)`` in-process (fast); a few run the real console script and ``python -m``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_soup import storage
from lightning_soup._storage import _atomic
from lightning_soup.cli import main

PYTHON = sys.executable
SCRIPT = Path(sys.executable).with_name("lightning-soup")


class Inner(nn.Module):
    """The network inside a LightningModule (``self.model``): what a ``--prefix model.`` output must load into."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)
        self.register_buffer("temperature", torch.tensor(1.5))  # a 0-dim floating tensor


def make_models(n: int = 3, dtype: torch.dtype = torch.float32) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """A base state dict and ``n`` fine-tunes of it (each with its own integer buffer value)."""
    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in Inner().state_dict().items()}
    base["bn.running_mean"] = torch.randn(8)
    base["bn.num_batches_tracked"] = torch.tensor(100)
    fts = []
    for i in range(n):
        ft = {}
        for k, v in base.items():
            if v.is_floating_point():
                ft[k] = (v + 0.1 * torch.randn_like(v)).to(dtype)
            else:
                ft[k] = v + 10 * (i + 1)
        fts.append(ft)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in base.items()}, fts


def write(sd: dict[str, Tensor], stem: Path, fmt: str) -> str:
    """Save ``sd`` as a ``.safetensors`` file, a two-shard folder or a Lightning-style ``.ckpt`` (keys under model.)."""
    sd = {k: v.contiguous().clone() for k, v in sd.items()}
    if fmt == "safetensors":
        path = stem.with_suffix(".safetensors")
        save_file(sd, path)
    elif fmt == "sharded":
        path = stem
        path.mkdir()
        keys = list(sd)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, shard_keys in shards.items():
            save_file({k: sd[k] for k in shard_keys}, path / name)
        index = {
            "metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
            "weight_map": {k: name for name, ks in shards.items() for k in ks},
        }
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    elif fmt == "ckpt":
        path = stem.with_suffix(".ckpt")
        checkpoint = {
            "epoch": 3,
            "global_step": 120,
            "pytorch-lightning_version": "2.6.6",
            "state_dict": {f"model.{k}": v for k, v in sd.items()} | {"loss_fn.pos_weight": torch.ones(3)},
            "optimizer_states": [],
            "lr_schedulers": [],
        }
        torch.save(checkpoint, path)
    else:
        raise ValueError(fmt)
    return str(path)


FORMATS = ["safetensors", "sharded", "ckpt", "mixed"]
MIXED = ["sharded", "ckpt", "safetensors"]  # ft0, used by every command, is a .ckpt


def write_all(tmp_path: Path, sds: dict[str, dict[str, Tensor]], fmt: str) -> tuple[dict[str, str], list[str]]:
    """Write every named state dict in ``fmt`` (``mixed``: a different format per input); returns paths and the
    ``--prefix`` option needed for .ckpt inputs."""
    paths = {}
    for i, (name, sd) in enumerate(sds.items()):
        f = MIXED[i % len(MIXED)] if fmt == "mixed" else fmt
        paths[name] = write(sd, tmp_path / name, f)
    prefix = ["--prefix", "model."] if fmt in ("ckpt", "mixed") else []
    return paths, prefix


def read(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    return load_file(path) if path.is_file() else storage.load_state_dict(path)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------------ float64 references


def f64(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.double() for k, v in sd.items() if v.is_floating_point()}


def ref_weighted(sds: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    total = sum(weights)
    return {k: sum(w * f64(sd)[k] for w, sd in zip(weights, sds)) / total for k in f64(sds[0])}


def ref_blend(
    anchor: dict[str, Tensor], model: dict[str, Tensor], ratio: float, head_ratio: float
) -> dict[str, Tensor]:
    a, m = f64(anchor), f64(model)
    return {k: a[k] + (head_ratio if k.startswith("head.") else ratio) * (m[k] - a[k]) for k in a}


def ref_task_arithmetic(
    base: dict[str, Tensor], fts: list[dict[str, Tensor]], scales: list[float]
) -> dict[str, Tensor]:
    b = f64(base)
    return {k: b[k] + sum(s * (f64(ft)[k] - b[k]) for s, ft in zip(scales, fts)) for k in b}


def ref_ties(base: dict[str, Tensor], fts: list[dict[str, Tensor]], density: float, scale: float) -> dict[str, Tensor]:
    out = {}
    for k, b in f64(base).items():
        flat_b = b.reshape(-1)
        deltas = []
        for ft in fts:
            d = f64(ft)[k].reshape(-1) - flat_b
            keep = max(1, math.floor(density * d.numel()))
            threshold = d.abs().sort(descending=True).values[keep - 1]
            deltas.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
        merged = torch.zeros_like(flat_b)
        total = sum(deltas)
        for j in range(flat_b.numel()):
            sign = 1.0 if total[j] >= 0 else -1.0
            agreeing = [float(d[j]) for d in deltas if d[j] != 0 and math.copysign(1.0, float(d[j])) == sign]
            merged[j] = sum(agreeing) / len(agreeing) if agreeing else 0.0
        out[k] = (flat_b + scale * merged).reshape(b.shape)
    return out


def ref_slerp(a: dict[str, Tensor], b: dict[str, Tensor], t: float) -> dict[str, Tensor]:
    out = {}
    for k, x in f64(a).items():
        y = f64(b)[k]
        u, v = x.reshape(-1), y.reshape(-1)
        cos = float(u @ v / (u.norm() * v.norm()))
        if abs(cos) > 0.9995:
            out[k] = (1 - t) * x + t * y
        else:
            theta = math.acos(cos)
            out[k] = (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)
    return out


def assert_close(out: dict[str, Tensor], ref: dict[str, Tensor], *, atol: float = 2e-6) -> None:
    for k, r in ref.items():
        assert out[k].shape == r.shape, k
        err = (out[k].double() - r).abs().max().item() if r.numel() else 0.0
        assert err <= atol + 1e-5 * r.abs().max().item(), f"{k}: max error {err}"


# (argv after the command, float64 reference, where the integer buffer comes from)
Case = tuple[Callable[[dict[str, str]], list[str]], Callable[[dict, list], dict], Callable[[dict, list], dict]]
CASES: dict[str, Case] = {
    "average": (
        lambda p: [p["ft0"], p["ft1"], p["ft2"], "--weights", "1", "1", "2"],
        lambda base, fts: ref_weighted(fts, [1, 1, 2]),
        lambda base, fts: fts[0],
    ),
    "blend": (
        lambda p: ["--anchor", p["base"], "--model", p["ft0"], "--ratio", "0.3", "--layer-ratio", "head.*=0.9"],
        lambda base, fts: ref_blend(base, fts[0], 0.3, 0.9),
        lambda base, fts: fts[0],
    ),
    "task-arithmetic": (
        lambda p: ["--base", p["base"], p["ft0"], p["ft1"], "--scales", "0.5", "-0.3"],
        lambda base, fts: ref_task_arithmetic(base, fts[:2], [0.5, -0.3]),
        lambda base, fts: base,
    ),
    "ties": (
        lambda p: ["--base", p["base"], p["ft0"], p["ft1"], p["ft2"], "--density", "0.4", "--scale", "0.8"],
        lambda base, fts: ref_ties(base, fts, 0.4, 0.8),
        lambda base, fts: fts[0],
    ),
    "dare": (  # density 1 keeps every entry: base + scale·Σ τᵢ (the random mask is tested separately)
        lambda p: ["--base", p["base"], p["ft0"], p["ft1"], "--density", "1", "--scale", "0.7", "--seed", "3"],
        lambda base, fts: ref_task_arithmetic(base, fts[:2], [0.7, 0.7]),
        lambda base, fts: fts[0],
    ),
    "slerp": (
        lambda p: [p["ft0"], p["ft1"], "--t", "0.3"],
        lambda base, fts: ref_slerp(fts[0], fts[1], 0.3),
        lambda base, fts: fts[1],
    ),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("command", list(CASES))
def test_command_matches_float64_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, fmt: str
) -> None:
    base, fts = make_models()
    paths, prefix = write_all(tmp_path, {"base": base, "ft0": fts[0], "ft1": fts[1], "ft2": fts[2]}, fmt)
    argv_of, reference, int_source = CASES[command]
    out_path = tmp_path / "out.safetensors"

    rc, out, err = run([command, *argv_of(paths), "-o", out_path, *prefix], capsys)

    assert rc == 0, err
    merged = load_file(out_path)
    assert sorted(merged) == sorted(base)  # prefix stripped, nothing else (no loss_fn.*)
    assert_close(merged, reference(base, fts))
    assert all(merged[k].dtype == torch.float32 for k in base if base[k].is_floating_point())
    assert torch.equal(merged["bn.num_batches_tracked"], int_source(base, fts)["bn.num_batches_tracked"])
    digest = hashlib.sha256(out_path.read_bytes()).hexdigest()
    assert out == f"{digest}  {out_path}\n"
    Inner().load_state_dict(merged)  # straight into the inner network


def test_average_uniform_and_key_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, fts = make_models()
    paths, _ = write_all(tmp_path, {"a": fts[0], "b": fts[1], "c": fts[2]}, "safetensors")
    rc, _, err = run(["average", paths["a"], paths["b"], paths["c"], "-o", tmp_path / "soup.safetensors"], capsys)
    assert rc == 0, err
    assert_close(load_file(tmp_path / "soup.safetensors"), ref_weighted(fts, [1, 1, 1]))


def test_dare_drops_and_rescales_reproducibly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, fts = make_models(1)
    base["big.weight"], fts[0]["big.weight"] = torch.zeros(64, 64), torch.randn(64, 64)
    paths, _ = write_all(tmp_path, {"base": base, "ft": fts[0]}, "safetensors")

    def dare(seed: int, name: str) -> dict[str, Tensor]:
        out = tmp_path / f"{name}.safetensors"
        rc, _, err = run(
            ["dare", "--base", paths["base"], paths["ft"], "--density", "0.25", "--seed", seed, "-o", out], capsys
        )
        assert rc == 0, err
        return load_file(out)

    first, again, other = dare(7, "first"), dare(7, "again"), dare(8, "other")
    tau = fts[0]["big.weight"].double() - base["big.weight"].double()
    delta = first["big.weight"].double() - base["big.weight"].double()
    kept = delta != 0
    # every entry is either dropped or rescaled by 1/density, and about a quarter survive
    assert torch.allclose(delta[kept], tau[kept] / 0.25, atol=1e-5)
    assert 0.18 < kept.double().mean().item() < 0.32
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["big.weight"], other["big.weight"])


def test_dare_streamed_equals_whole_state_dict_merge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Streaming key by key through the core gives the core's own whole-dict result, bit for bit."""
    from lightning_soup import merge

    base, fts = make_models(2)
    paths, _ = write_all(tmp_path, {"base": base, "ft0": fts[0], "ft1": fts[1]}, "safetensors")
    out = tmp_path / "dare.safetensors"
    argv = ["dare", "--base", paths["base"], paths["ft0"], paths["ft1"], "--density", "0.5", "--seed", "11", "-o", out]
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    whole = merge.dare(base, fts, 0.5, seed=11)
    assert all(torch.equal(load_file(out)[k], whole[k]) for k in whole)


# ------------------------------------------------------------------------------------------ options


def test_prefix_selects_and_strips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, fts = make_models(2)
    paths, _ = write_all(tmp_path, {"a": fts[0], "b": fts[1]}, "ckpt")
    out = tmp_path / "inner.safetensors"
    rc, _, err = run(["average", paths["a"], paths["b"], "-o", out, "--prefix", "model"], capsys)  # "." implied
    assert rc == 0, err
    merged = load_file(out)
    assert sorted(merged) == sorted(base)  # loss_fn.pos_weight is not under model.
    Inner().load_state_dict(merged, strict=True)
    assert [i["prefix"] for i in storage.read_recipe(out)["inputs"]] == ["model.", "model."]

    # without --prefix the keys stay as in the checkpoint
    rc, _, err = run(["average", paths["a"], paths["b"], "-o", tmp_path / "full.safetensors"], capsys)
    assert rc == 0, err
    assert "model.enc.weight" in load_file(tmp_path / "full.safetensors")


def test_prefix_matching_no_input_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, fts = make_models(2)
    paths, _ = write_all(tmp_path, {"a": fts[0], "b": fts[1]}, "safetensors")
    rc, _, err = run(["average", paths["a"], paths["b"], "-o", tmp_path / "o.safetensors", "--prefix", "net."], capsys)
    assert rc == 1
    assert err.count("\n") == 1 and "'net.'" in err and "'enc.'" in err


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_dtype_casts_floating_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str], dtype: str) -> None:
    _, fts = make_models()
    paths, _ = write_all(tmp_path, {"a": fts[0], "b": fts[1]}, "safetensors")
    out = tmp_path / "out.safetensors"
    rc, _, err = run(["average", paths["a"], paths["b"], "-o", out, "--dtype", dtype], capsys)
    assert rc == 0, err
    merged, ref = load_file(out), ref_weighted(fts[:2], [1, 1])
    target = getattr(torch, dtype)
    for k, r in ref.items():
        assert merged[k].dtype == target
        eps = torch.finfo(target).eps if dtype != "float64" else 1e-7
        assert torch.allclose(merged[k].double(), r, rtol=eps, atol=eps), k
    assert merged["bn.num_batches_tracked"].dtype == torch.int64  # integer buffers keep their dtype
    assert storage.read_recipe(out)["dtype"] == dtype


def test_dtype_float32_from_bfloat16_inputs_is_not_rounded_to_bfloat16(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, fts = make_models(2, dtype=torch.bfloat16)
    paths, _ = write_all(tmp_path, {"a": fts[0], "b": fts[1]}, "safetensors")
    out = tmp_path / "out.safetensors"
    assert run(["average", paths["a"], paths["b"], "-o", out, "--dtype", "float32"], capsys)[0] == 0
    merged, ref = load_file(out), ref_weighted(fts, [1, 1])
    assert merged["enc.weight"].dtype == torch.float32
    assert_close(merged, ref, atol=1e-7)  # a bfloat16 rounding would be ~4e-3 off

    keep = tmp_path / "keep.safetensors"
    assert run(["average", paths["a"], paths["b"], "-o", keep], capsys)[0] == 0
    assert load_file(keep)["enc.weight"].dtype == torch.bfloat16


def test_mixed_input_dtypes_keep_the_core_dtype(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_soup import merge

    _, fts = make_models(2)
    half = {k: v.half() if v.is_floating_point() else v for k, v in fts[1].items()}
    paths, _ = write_all(tmp_path, {"a": fts[0], "b": half}, "safetensors")
    out = tmp_path / "out.safetensors"
    assert run(["slerp", paths["a"], paths["b"], "--t", "0.5", "-o", out], capsys)[0] == 0
    core = merge.slerp(fts[0], half, 0.5)
    merged = load_file(out)
    assert all(merged[k].dtype == core[k].dtype and torch.equal(merged[k], core[k]) for k in core)


def test_sharded_output_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, fts = make_models()
    paths, _ = write_all(tmp_path, {"a": fts[0], "b": fts[1], "c": fts[2]}, "safetensors")
    inputs = [paths["a"], paths["b"], paths["c"]]
    single, sharded = tmp_path / "single.safetensors", tmp_path / "sharded"
    assert run(["ties", "--base", *inputs, "--density", "0.5", "-o", single], capsys)[0] == 0
    rc, out, err = run(["ties", "--base", *inputs, "--density", "0.5", "-o", sharded, "--shard-size", "200B"], capsys)
    assert rc == 0, err

    files = sorted(p.name for p in sharded.iterdir())
    assert "model.safetensors.index.json" in files and len(files) >= 3
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(fts[0])
    one, many = load_file(single), storage.load_state_dict(sharded)
    assert sorted(many) == sorted(one) and all(torch.equal(one[k], many[k]) for k in one)
    assert storage.read_recipe(sharded)["method"] == "ties"
    assert out == f"{storage.sha256_file(sharded)}  {sharded}\n"


def test_recipe_records_command_inputs_sha256_and_parameters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, fts = make_models(2)
    paths, prefix = write_all(tmp_path, {"base": base, "ft0": fts[0], "ft1": fts[1]}, "mixed")
    out = tmp_path / "out.safetensors"
    argv = [
        "task-arithmetic",
        "--base",
        paths["base"],
        paths["ft0"],
        paths["ft1"],
        "--scales",
        "0.5",
        "-0.25",
        "-o",
        out,
        *prefix,
    ]
    assert run(argv, capsys)[0] == 0

    recipe = storage.read_recipe(out)
    assert recipe["method"] == "task-arithmetic"
    assert recipe["function"] == "lightning_soup.merge.task_arithmetic"
    assert recipe["parameters"] == {"scales": [0.5, -0.25]}
    assert recipe["command"].startswith("lightning-soup task-arithmetic --base ")
    assert [(i["role"], i["path"]) for i in recipe["inputs"]] == [
        ("base", paths["base"]),
        ("finetuned", paths["ft0"]),
        ("finetuned", paths["ft1"]),
    ]

    def sha(path: str) -> str:
        p = Path(path)
        if p.is_file():
            return hashlib.sha256(p.read_bytes()).hexdigest()
        manifest = "".join(
            f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n"
            for f in sorted(p.iterdir(), key=lambda f: f.name)
        )
        return hashlib.sha256(manifest.encode()).hexdigest()

    assert [i["sha256"] for i in recipe["inputs"]] == [sha(paths[n]) for n in ("base", "ft0", "ft1")]
    # safetensors loaders see it as plain metadata
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["lightning_soup"]) == recipe


# ------------------------------------------------------------------------------------------ errors


def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) - 40])


def _garbage(path: str) -> None:
    Path(path).write_bytes(os.urandom(300))


ERRORS: dict[str, tuple[Callable[[dict[str, Tensor], Path], str], list[str]]] = {
    # name: (make input B from a compatible state dict, what the one-line message must contain besides B's name)
    "shape": (
        lambda sd, p: write(sd | {"enc.weight": torch.zeros(8, 5)}, p, "safetensors"),
        ["'enc.weight'", "(8, 5)", "(8, 6)"],
    ),
    "missing key": (
        lambda sd, p: write({k: v for k, v in sd.items() if k != "head.bias"}, p, "safetensors"),
        ["'head.bias'"],
    ),
    "extra key": (lambda sd, p: write(sd | {"extra.weight": torch.zeros(2)}, p, "safetensors"), ["'extra.weight'"]),
    "dtype kind": (
        lambda sd, p: write(sd | {"bn.num_batches_tracked": torch.tensor(1.0)}, p, "safetensors"),
        ["'bn.num_batches_tracked'", "int64"],
    ),
    "truncated": (lambda sd, p: (path := write(sd, p, "safetensors"), _truncate(path))[0], ["truncated"]),
    "corrupt": (
        lambda sd, p: (path := write(sd, p, "safetensors"), _garbage(path))[0],
        ["not a readable safetensors file"],
    ),
    "ckpt without state_dict": (
        lambda sd, p: (
            torch.save({"epoch": 1, "optimizer_states": []}, p.with_suffix(".ckpt")),
            str(p.with_suffix(".ckpt")),
        )[1],
        ["state_dict"],
    ),
    "truncated ckpt": (lambda sd, p: (path := write(sd, p, "ckpt"), _truncate(path))[0], []),
    "missing file": (lambda sd, p: str(p.with_suffix(".safetensors")), ["does not exist"]),
    "unknown extension": (
        lambda sd, p: (p.with_suffix(".txt").write_text("hi"), str(p.with_suffix(".txt")))[1],
        [".txt"],
    ),
    "missing shard": (
        lambda sd, p: (write(sd, p, "sharded"), (p / "model-00002-of-00002.safetensors").unlink())[0],
        ["model-00002-of-00002.safetensors"],
    ),
}


@pytest.mark.parametrize("error", list(ERRORS))
def test_errors_are_one_line_naming_the_file_and_leave_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], error: str
) -> None:
    _, fts = make_models(2)
    a = write(fts[0], tmp_path / "A", "safetensors")
    make_b, expected = ERRORS[error]
    b = make_b(fts[1], tmp_path / "B")
    prefix = ["--prefix", "model."] if b.endswith(".ckpt") else []
    before = set(tmp_path.iterdir())

    rc, out, err = run(["average", a, b, "-o", tmp_path / "out.safetensors", *prefix], capsys)

    assert rc == 1
    assert out == ""
    assert err.startswith("lightning-soup: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert Path(b).name in err
    for text in expected:
        assert text in err
    assert set(tmp_path.iterdir()) == before  # no output, no temporary left behind


def test_a_wrapper_prefix_is_diagnosed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, fts = make_models(2)
    a, b = write(fts[0], tmp_path / "A", "safetensors"), write(fts[1], tmp_path / "B", "ckpt")
    rc, _, err = run(["average", a, b, "-o", tmp_path / "o.safetensors"], capsys)
    assert rc == 1 and err.count("\n") == 1
    assert "B.ckpt: it holds the keys of" in err and "under the prefix 'model.'; pass --prefix model." in err
    assert run(["average", a, b, "-o", tmp_path / "o.safetensors", "--prefix", "model."], capsys)[0] == 0


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, fts = make_models(2)
    a = write(fts[0], tmp_path / "A", "safetensors")
    b = write(fts[1] | {"enc.weight": torch.zeros(8, 5)}, tmp_path / "B", "safetensors")
    rc, _, err = run(["average", a, b, "-o", tmp_path / "out.safetensors", "--debug"], capsys)
    assert rc == 1
    assert "Traceback" in err and "SoupError" in err
    last = err.splitlines()[-1]
    assert last.startswith("lightning-soup: error: ") and "B.safetensors: key 'enc.weight'" in last


def test_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, fts = make_models(2)
    a, b = write(fts[0], tmp_path / "A", "safetensors"), write(fts[1], tmp_path / "B", "safetensors")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")

    rc, _, err = run(["average", a, b, "-o", out], capsys)
    assert rc == 1 and "--force" in err and err.count("\n") == 1
    assert out.read_bytes() == b"precious"

    rc, _, err = run(["average", a, b, "-o", out, "--force"], capsys)
    assert rc == 0, err
    assert_close(load_file(out), ref_weighted(fts, [1, 1]))


def test_refuses_to_write_over_an_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, fts = make_models(2)
    a, b = write(fts[0], tmp_path / "A", "safetensors"), write(fts[1], tmp_path / "B", "safetensors")
    before = Path(a).read_bytes()
    rc, _, err = run(["average", a, b, "-o", a, "--force"], capsys)
    assert rc == 1 and "A.safetensors" in err and err.count("\n") == 1
    assert Path(a).read_bytes() == before


def test_failure_while_streaming_leaves_no_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_soup import merge

    _, fts = make_models(2)
    a, b = write(fts[0], tmp_path / "A", "safetensors"), write(fts[1], tmp_path / "B", "safetensors")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous")
    real, calls = merge.uniform_soup, []

    def failing(sds: list, **kwargs: bool) -> dict:
        calls.append(next(iter(sds[0])))
        if len(calls) == 5:  # after the probe and a few tensors are written
            raise RuntimeError("boom")
        return real(sds, **kwargs)

    monkeypatch.setattr(merge, "uniform_soup", failing)
    before = set(tmp_path.iterdir())
    rc, _, err = run(["average", a, b, "-o", out, "--force"], capsys)
    assert rc == 1
    assert err == "lightning-soup: error: unexpected RuntimeError: boom (rerun with --debug for the traceback)\n"
    assert set(tmp_path.iterdir()) == before and out.read_bytes() == b"previous"


def test_cleans_up_what_a_killed_run_left_behind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, fts = make_models(2)
    a, b = write(fts[0], tmp_path / "A", "safetensors"), write(fts[1], tmp_path / "B", "safetensors")
    dead = subprocess.run(
        [PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = tmp_path / _atomic.temp_name("out.safetensors", pid=int(dead), suffix=".safetensors")
    stale.write_bytes(b"half a tensor")
    assert run(["average", a, b, "-o", tmp_path / "out.safetensors"], capsys)[0] == 0
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A.safetensors", "B.safetensors", "out.safetensors"]


@pytest.mark.parametrize(
    "argv",
    [
        ["average", "A.safetensors", "-o", "o.safetensors"],  # one input
        ["average", "A.safetensors", "B.safetensors", "--weights", "1", "-o", "o.safetensors"],
        ["average", "A.safetensors", "B.safetensors"],  # no -o
        ["average", "A.safetensors", "B.safetensors", "-o", "o.bin"],
        ["average", "A.safetensors", "B.safetensors", "-o", "o.safetensors", "--shard-size", "1GB"],
        ["average", "A.safetensors", "B.safetensors", "-o", "out", "--shard-size", "lots"],
        ["average", "A.safetensors", "B.safetensors", "-o", "o.safetensors", "--dtype", "int8"],
        ["ties", "--base", "A.safetensors", "B.safetensors", "--density", "0", "-o", "o.safetensors"],
        ["dare", "--base", "A.safetensors", "B.safetensors", "--density", "1.5", "-o", "o.safetensors"],
        ["dare", "--base", "A.safetensors", "B.safetensors", "--density", "0.5", "--seed", "-1", "-o", "o.safetensors"],
        [
            "task-arithmetic",
            "--base",
            "A.safetensors",
            "B.safetensors",
            "--scales",
            "1",
            "2",
            "3",
            "-o",
            "o.safetensors",
        ],
        [
            "blend",
            "--anchor",
            "A.safetensors",
            "--model",
            "B.safetensors",
            "--ratio",
            "0.5",
            "--layer-ratio",
            "x",
            "-o",
            "o.safetensors",
        ],
        ["slerp", "A.safetensors", "--t", "0.5", "-o", "o.safetensors"],
        ["frobnicate"],
        [],
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    rc, out, err = run(argv, capsys)
    assert rc == 2
    assert "error:" in err and "Traceback" not in err


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0
    for command in CASES:
        assert command in out
    assert "inspect" in out
    rc, out, _ = run(["--version"], capsys)
    assert rc == 0 and out.startswith("lightning-soup ")


def test_unavailable_device_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    _, fts = make_models(2)
    a, b = write(fts[0], tmp_path / "A", "safetensors"), write(fts[1], tmp_path / "B", "safetensors")
    rc, _, err = run(["average", a, b, "-o", tmp_path / "o.safetensors", "--device", "cuda"], capsys)
    assert rc == 1 and "CUDA is not available" in err and not (tmp_path / "o.safetensors").exists()
    for device in ("nonsense", "meta"):
        rc, _, err = run(["average", a, b, "-o", tmp_path / "o.safetensors", "--device", device], capsys)
        assert rc == 1 and f"--device {device}" in err and err.count("\n") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("command", ["average", "ties", "dare", "slerp"])
def test_cuda_matches_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    base, fts = make_models()
    paths, _ = write_all(tmp_path, {"base": base, "ft0": fts[0], "ft1": fts[1], "ft2": fts[2]}, "safetensors")
    argv = CASES[command][0](paths)
    if command == "dare":
        argv = [a if a != "1" else "0.5" for a in argv]
    assert run([command, *argv, "-o", tmp_path / "cpu.safetensors"], capsys)[0] == 0
    assert run([command, *argv, "-o", tmp_path / "gpu.safetensors", "--device", "cuda"], capsys)[0] == 0
    cpu, gpu = load_file(tmp_path / "cpu.safetensors"), load_file(tmp_path / "gpu.safetensors")
    assert all(torch.allclose(cpu[k].double(), gpu[k].double(), atol=1e-6) for k in cpu)


# ------------------------------------------------------------------------------------------ streaming, progress


def test_streams_each_tensor_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_soup.cli import io as _cli_io

    base, fts = make_models()
    paths, prefix = write_all(tmp_path, {"base": base, "ft0": fts[0], "ft1": fts[1]}, "mixed")
    reads: list[tuple[str, str]] = []
    real = _cli_io.Input.__getitem__

    def counting(self: _cli_io.Input, key: str) -> Tensor:
        reads.append((self.path, key))
        return real(self, key)

    monkeypatch.setattr(_cli_io.Input, "__getitem__", counting)
    argv = [
        "ties",
        "--base",
        paths["base"],
        paths["ft0"],
        paths["ft1"],
        "--density",
        "0.5",
        "-o",
        tmp_path / "o.safetensors",
        *prefix,
    ]
    assert run(argv, capsys)[0] == 0
    assert sorted(reads) == sorted((paths[n], k) for n in ("base", "ft0", "ft1") for k in base)


def test_progress_bar_and_quiet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_soup.cli import merge as _cli_merge

    _, fts = make_models(2)
    a, b = write(fts[0], tmp_path / "A", "safetensors"), write(fts[1], tmp_path / "B", "safetensors")
    # piped (as under pytest): no progress bar, one summary line
    rc, out, err = run(["average", a, b, "-o", tmp_path / "1.safetensors"], capsys)
    assert rc == 0 and err.startswith("lightning-soup: wrote ") and err.count("\n") == 1
    rc, out, err = run(["average", a, b, "-o", tmp_path / "2.safetensors", "--quiet"], capsys)
    assert rc == 0 and err == "" and out.endswith("2.safetensors\n")
    # on a terminal: the rich progress display runs (forced here) and the result is the same
    monkeypatch.setattr(_cli_merge, "wants_progress", lambda quiet: True)
    rc, _, err = run(["average", a, b, "-o", tmp_path / "3.safetensors"], capsys)
    assert rc == 0, err
    first, third = load_file(tmp_path / "1.safetensors"), load_file(tmp_path / "3.safetensors")
    assert all(torch.equal(first[k], third[k]) for k in first)


# ------------------------------------------------------------------------------------------ inspect


def ref_inspect(base: dict[str, Tensor], fts: list[dict[str, Tensor]]) -> dict:
    keys = [k for k, v in base.items() if v.is_floating_point()]
    taus = [torch.cat([(ft[k].double() - base[k].double()).reshape(-1) for k in keys]) for ft in fts]
    n = len(fts)
    norms = [t.norm().item() for t in taus]
    cosine = [[(taus[i] @ taus[j]).item() / (norms[i] * norms[j]) for j in range(n)] for i in range(n)]
    stacked = torch.stack(taus)
    conflict = ((stacked > 0).any(0) & (stacked < 0).any(0)).double().mean().item()
    pairwise = [[((taus[i] * taus[j]) < 0).double().mean().item() for j in range(n)] for i in range(n)]
    per_key = {}
    for k in keys:
        d = torch.stack([(ft[k].double() - base[k].double()).reshape(-1) for ft in fts])
        per_key[k] = ((d > 0).any(0) & (d < 0).any(0)).double().mean().item()
    base_norm = torch.cat([base[k].double().reshape(-1) for k in keys]).norm().item()
    return dict(
        norms=norms,
        cosine=cosine,
        conflict=conflict,
        pairwise=pairwise,
        per_key=per_key,
        base_norm=base_norm,
        num_params=sum(base[k].numel() for k in keys),
    )


@pytest.mark.parametrize("fmt", ["safetensors", "mixed"])
def test_inspect_json_matches_float64_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    base, fts = make_models()
    fts[2]["head.bias"] = base["head.bias"].clone()  # a zero task-vector tensor: never conflicts
    paths, prefix = write_all(tmp_path, {"base": base, "ft0": fts[0], "ft1": fts[1], "ft2": fts[2]}, fmt)
    rc, out, err = run(
        ["inspect", paths["ft0"], paths["ft1"], paths["ft2"], "--base", paths["base"], "--json", "--top", "3", *prefix],
        capsys,
    )
    assert rc == 0, err
    doc = json.loads(out)
    ref = ref_inspect(base, fts)
    tv = doc["task_vectors"]
    assert doc["compatible"] is True
    assert tv["num_params"] == ref["num_params"]
    assert tv["norms"] == pytest.approx(ref["norms"], rel=1e-12)
    assert tv["base_norm"] == pytest.approx(ref["base_norm"], rel=1e-12)
    assert tv["relative_norms"] == pytest.approx([n / ref["base_norm"] for n in ref["norms"]], rel=1e-12)
    for row, ref_row in zip(tv["cosine"], ref["cosine"]):
        assert row == pytest.approx(ref_row, rel=1e-10)
    assert tv["conflict_fraction"] == pytest.approx(ref["conflict"], rel=1e-12)
    for row, ref_row in zip(tv["pairwise_conflicts"], ref["pairwise"]):
        assert row == pytest.approx(ref_row, rel=1e-12)
    top = sorted(ref["per_key"].items(), key=lambda kv: (-kv[1], -base[kv[0]].numel()))[:3]
    assert [(t["key"], t["fraction"]) for t in tv["top_conflicts"]] == [(k, pytest.approx(f)) for k, f in top]
    assert [m["num_params"] for m in doc["models"]] == [sum(v.numel() for v in base.values())] * 4


def test_inspect_statistics_are_exact_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large tensors are processed in chunks; the chunking must not change any statistic."""
    from lightning_soup.merge import diagnostics

    torch.manual_seed(1)
    base = {"w": torch.randn(37, 11), "b": torch.randn(5)}
    fts = [{k: v + torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    whole = diagnostics.task_vector_stats(base, fts, ["a", "b", "c"])
    monkeypatch.setattr(diagnostics, "_CHUNK", 7)
    chunked = diagnostics.task_vector_stats(base, fts, ["a", "b", "c"])
    ref = ref_inspect(base, fts)
    for r in (whole, chunked):
        assert r.norms == pytest.approx(ref["norms"], rel=1e-12)
        assert r.conflict_fraction == pytest.approx(ref["conflict"], rel=1e-12)
        assert r.pairwise_conflicts[0] == pytest.approx(ref["pairwise"][0], rel=1e-12)


def test_inspect_text_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, fts = make_models(2)
    paths, _ = write_all(tmp_path, {"base": base, "ft0": fts[0], "ft1": fts[1]}, "safetensors")
    rc, out, err = run(["inspect", paths["ft0"], paths["ft1"], "--base", paths["base"]], capsys)
    assert rc == 0, err
    ref = ref_inspect(base, fts)
    assert "compatible" in out and "Cosine similarity" in out and "Most-conflicting tensors" in out
    assert f"{100 * ref['conflict']:.2f}%" in out
    assert f"{ref['cosine'][0][1]:+.4f}" in out
    assert format(ref["norms"][0], ".4g") in out


def test_inspect_reports_what_differs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, fts = make_models(2)
    b = fts[1] | {"enc.weight": torch.zeros(8, 5), "head.bias": fts[1]["head.bias"].half()}
    del b["bn.bias"]
    paths, _ = write_all(tmp_path, {"base": base, "a": fts[0], "b": b}, "safetensors")
    rc, out, err = run(["inspect", paths["a"], paths["b"], "--base", paths["base"], "--json"], capsys)
    assert rc == 1, err  # not compatible: exit 1 (the report is still printed)
    doc = json.loads(out)
    assert doc["compatible"] is False
    assert doc["missing"] == {paths["b"]: ["bn.bias"]}
    assert [(m["key"], m["name"], m["value"]) for m in doc["shape_mismatches"]] == [
        ("enc.weight", paths["b"], "(8, 5)")
    ]
    assert [(m["key"], m["value"]) for m in doc["dtype_differences"]] == [("head.bias", "float16")]
    # statistics over the tensors every model shares with the same shape
    shared = {k for k in base if base[k].is_floating_point()} - {"enc.weight", "bn.bias"}
    assert doc["task_vectors"]["num_params"] == sum(base[k].numel() for k in shared)

    rc, out, _ = run(["inspect", paths["a"], paths["b"]], capsys)
    assert rc == 1 and "not compatible" in out and "'enc.weight'" in out


def test_inspect_without_base_reads_only_headers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_soup.cli import io as _cli_io

    _, fts = make_models(2)
    paths, _ = write_all(tmp_path, {"a": fts[0], "b": fts[1]}, "safetensors")
    monkeypatch.setattr(_cli_io.Input, "__getitem__", lambda self, key: pytest.fail("read tensor data"))
    rc, out, _ = run(["inspect", paths["a"], paths["b"], "--json"], capsys)
    assert rc == 0
    doc = json.loads(out)
    assert "task_vectors" not in doc and doc["compatible"] is True
    assert doc["models"][0]["num_floating"] == sum(v.numel() for v in fts[0].values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------ real processes


def test_help_is_fast_and_imports_neither_torch_nor_lightning() -> None:
    start = time.perf_counter()
    proc = subprocess.run(
        [PYTHON, "-X", "importtime", "-m", "lightning_soup", "--help"], capture_output=True, text=True, timeout=60
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0 and "task-arithmetic" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    heavy = {m for m in imported if m.split(".")[0] in {"torch", "lightning", "pytorch_lightning", "numpy", "rich"}}
    assert heavy == set()
    assert "lightning_soup.cli" in imported
    assert elapsed < 2.0, f"--help took {elapsed:.2f} s"


def test_console_script_and_python_m(tmp_path: Path) -> None:
    _, fts = make_models(2)
    a = write(fts[0], tmp_path / "A", "ckpt")
    b = write(fts[1], tmp_path / "B", "sharded")
    out = tmp_path / "soup.safetensors"
    assert SCRIPT.exists(), "the lightning-soup console script is not installed in this environment"
    proc = subprocess.run(
        [str(SCRIPT), "average", a, b, "-o", str(out), "--prefix", "model."],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{hashlib.sha256(out.read_bytes()).hexdigest()}  {out}\n"
    assert_close(load_file(out), ref_weighted(fts, [1, 1]))

    proc = subprocess.run(
        [PYTHON, "-m", "lightning_soup", "average", a, b, "-o", str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert proc.stderr == f"lightning-soup: error: {out} already exists; pass --force to overwrite it\n"


@pytest.mark.slow
def test_real_lightning_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Checkpoints written by Trainer.save_checkpoint (optimizer state, loops, hparams) average into the inner net."""
    import pytorch_lightning as pl

    from tests._models import make_model, trainer_kwargs

    paths, nets = [], []
    for seed in (0, 1):
        model = make_model(pl, seed=seed)
        trainer = pl.Trainer(
            **trainer_kwargs(tmp_path / f"run{seed}", max_epochs=1, limit_train_batches=2, limit_val_batches=1)
        )
        trainer.fit(model)
        path = tmp_path / f"seed{seed}.ckpt"
        trainer.save_checkpoint(path)
        paths.append(path)
        nets.append({k: v.detach().clone() for k, v in model.net.state_dict().items()})

    out = tmp_path / "net.safetensors"
    rc, _, err = run(["average", *paths, "-o", out, "--prefix", "net"], capsys)
    assert rc == 0, err
    merged = load_file(out)
    fresh = make_model(pl, seed=5)
    fresh.net.load_state_dict(merged, strict=True)
    assert_close(merged, ref_weighted(nets, [1, 1]))
    assert torch.equal(merged["1.num_batches_tracked"], nets[0]["1.num_batches_tracked"])
