"""The CLI's `tsv`, `iso-c`, `iso-cts` and `model-stock`: float64 references, streamed == whole dict, recipe, errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from _spectral import ref_iso_c, ref_iso_cts, ref_model_stock, ref_tsv
from safetensors.torch import load_file

from lightning_soup import merge, storage
from tests.test_cli import Inner, make_models, run, write, write_all

#: command -> (extra argv, float64 result of one key from base and fine-tunes, the Python call on whole dicts)
CASES = {
    "tsv": (
        ["--alpha", "0.8"],
        lambda b, fts: b + 0.8 * ref_tsv([ft - b for ft in fts]),
        lambda base, fts: merge.tsv_merge(base, fts, alpha=0.8),
    ),
    "iso-c": (
        ["--alpha", "1.3"],
        lambda b, fts: b + 1.3 * ref_iso_c([ft - b for ft in fts]),
        lambda base, fts: merge.iso_c(base, fts, alpha=1.3),
    ),
    "iso-cts": (
        ["--alpha", "1.3", "--common-fraction", "0.5"],
        lambda b, fts: b + 1.3 * ref_iso_cts([ft - b for ft in fts], 0.5),
        lambda base, fts: merge.iso_cts(base, fts, alpha=1.3, common_fraction=0.5),
    ),
    "model-stock": ([], ref_model_stock, merge.model_stock),
}
PARAMETERS = {
    "tsv": {"alpha": 0.8},
    "iso-c": {"alpha": 1.3},
    "iso-cts": {"alpha": 1.3, "common_fraction": 0.5},
    "model-stock": {},
}
FUNCTIONS = {"tsv": "tsv_merge", "iso-c": "iso_c", "iso-cts": "iso_cts", "model-stock": "model_stock"}


@pytest.mark.parametrize("fmt", ["safetensors", "mixed"])
@pytest.mark.parametrize("command", list(CASES))
def test_command_matches_reference_and_the_python_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, fmt: str
) -> None:
    base, fts = make_models(3)
    paths, prefix = write_all(tmp_path, {"base": base, "ft0": fts[0], "ft1": fts[1], "ft2": fts[2]}, fmt)
    extra, reference, python_call = CASES[command]
    out_path = tmp_path / "out.safetensors"
    argv = [command, "--base", paths["base"], paths["ft0"], paths["ft1"], paths["ft2"], *extra, "-o", out_path]

    rc, out, err = run([*argv, *prefix], capsys)

    assert rc == 0, err
    merged = load_file(out_path)
    assert sorted(merged) == sorted(base)
    whole = python_call(base, fts)  # streaming one key at a time changes nothing
    for k, b in base.items():
        assert torch.equal(merged[k], whole[k]), k
        if b.is_floating_point():
            ref = reference(b.double().numpy(), [ft[k].double().numpy() for ft in fts])
            np.testing.assert_allclose(merged[k].double().numpy(), ref, rtol=0, atol=2e-5 * (1 + np.abs(ref).max()))
    assert torch.equal(merged["bn.num_batches_tracked"], base["bn.num_batches_tracked"])  # from base
    digest = hashlib.sha256(out_path.read_bytes()).hexdigest()
    assert out == f"{digest}  {out_path}\n"
    recipe = storage.read_recipe(out_path)
    assert recipe["method"] == command and recipe["function"] == f"lightning_soup.merge.{FUNCTIONS[command]}"
    assert recipe["parameters"] == PARAMETERS[command]
    assert [i["role"] for i in recipe["inputs"]] == ["base", "finetuned", "finetuned", "finetuned"]
    if fmt == "safetensors":
        assert [i["sha256"] for i in recipe["inputs"]] == [
            hashlib.sha256(Path(paths[n]).read_bytes()).hexdigest() for n in ("base", "ft0", "ft1", "ft2")
        ]
    Inner().load_state_dict(merged)


@pytest.mark.parametrize(
    "argv",
    [
        ["model-stock", "--base", "A.safetensors", "B.safetensors"],
        ["iso-cts", "--base", "A.safetensors", "B.safetensors", "--common-fraction", "1.5"],
        ["iso-cts", "--base", "A.safetensors", "B.safetensors", "--common-fraction", "x"],
        ["tsv", "--base", "A.safetensors", "B.safetensors", "--alpha", "nan"],
        ["iso-c", "--base", "A.safetensors", "B.safetensors", "--alpha", "inf"],
        ["tsv", "A.safetensors", "B.safetensors"],
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    rc, _, err = run([*argv, "-o", tmp_path / "o.safetensors"], capsys)
    assert rc == 2 and "error:" in err and "Traceback" not in err
    assert not (tmp_path / "o.safetensors").exists()


def test_incompatible_input_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, fts = make_models(2)
    fts[1]["enc.weight"] = torch.zeros(8, 5)
    a, b, c = (write(sd, tmp_path / n, "safetensors") for sd, n in ((base, "base"), (fts[0], "a"), (fts[1], "b")))
    rc, _, err = run(["tsv", "--base", a, b, c, "-o", tmp_path / "o.safetensors"], capsys)
    assert rc == 1 and err.count("\n") == 1 and "enc.weight" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0 and all(c in out for c in CASES)
    rc, out, _ = run(["iso-cts", "--help"], capsys)
    assert rc == 0 and "--common-fraction" in out and "--alpha" in out
