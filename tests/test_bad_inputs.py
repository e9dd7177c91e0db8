"""Bad inputs, across the three callbacks and the CLI: each is refused (or skipped) early, with a message that names
the argument, metric, key or file and says what to do, and without touching the user's files or weights."""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from lightning_soup import SoupError
from lightning_soup.cli import main as cli
from tests._models import make_data, make_model, tiny_classifier_class, trainer_kwargs

STEPS_PER_EPOCH = 6  # 96 training samples, batch 16


def weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------- constructor arguments

CONSTRUCTOR_CASES = [
    ("CheckpointAveraging", {"window": 0}, ["`window`", "an int >= 1", "got 0"]),
    ("CheckpointAveraging", {"window": 2.5}, ["`window`", "got 2.5"]),
    ("CheckpointAveraging", {"every_n_train_steps": 0}, ["`every_n_train_steps`", ">= 1 or None"]),
    ("CheckpointAveraging", {"snapshots": "gpu"}, ["`snapshots`", "'disk' or 'cpu'", "'gpu'"]),
    ("GreedySoup", {"monitor": "val/acc", "mode": "best"}, ["`mode`", "'min' or 'max'", "'best'"]),
    ("GreedySoup", {"monitor": ""}, ["`monitor`", "name of a logged metric"]),
    ("GreedySoup", {"monitor": "val/acc", "max_ingredients": 0}, ["`max_ingredients`", "got 0"]),
    ("TaskArithmeticBlend", {"mode": "up"}, ["`mode`", "'min' or 'max'", "'up'"]),
    ("TaskArithmeticBlend", {"ratio": []}, ["`ratio`", "non-empty list"]),
    ("TaskArithmeticBlend", {"ratio": float("nan")}, ["`ratio`", "finite"]),
    ("TaskArithmeticBlend", {"ratio": [0.25, 0.5]}, ["`ratio` lists 2 values", "`monitor` must name"]),
    (
        "TaskArithmeticBlend",
        {"ratio": [0.25, 0.5], "monitor": "val/acc", "constraint": "val/acc => 0.9"},
        ["val/acc => 0.9", "metric>=x"],
    ),
    ("TaskArithmeticBlend", {"constraint": "val/acc>=high"}, ["val/acc>=high", "metric>=x"]),
    ("TaskArithmeticBlend", {"layer_ratios": {"net.*": "half"}}, ["`layer_ratios`", "net.*"]),
    ("TaskArithmeticBlend", {"anchor": ""}, ["`anchor`", '"initial" or a path']),
]


@pytest.mark.parametrize(("name", "kwargs", "fragments"), CONSTRUCTOR_CASES)
def test_invalid_constructor_argument_is_named(
    flavour: SimpleNamespace, name: str, kwargs: dict, fragments: list
) -> None:
    with pytest.raises(SoupError) as info:
        getattr(flavour.soup, name)(**kwargs)
    message = str(info.value)
    assert message.startswith(f"Invalid {name} arguments"), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(
    ("name", "kwargs", "arguments"),
    [
        (
            "CheckpointAveraging",
            {"window": 0, "every_n_epochs": -1, "snapshots": "x"},
            ["window", "every_n_epochs", "snapshots"],
        ),
        ("GreedySoup", {"monitor": "", "mode": "x", "every_n_epochs": 0}, ["monitor", "mode", "every_n_epochs"]),
        ("TaskArithmeticBlend", {"ratio": [], "mode": "x", "constraint": "a ~ 1"}, ["ratio", "mode", "a ~ 1"]),
    ],
)
def test_every_invalid_argument_is_reported_at_once(name: str, kwargs: dict, arguments: list) -> None:
    import lightning_soup

    with pytest.raises(SoupError) as info:
        getattr(lightning_soup, name)(**kwargs)
    assert all(a in str(info.value) for a in arguments), str(info.value)


# ------------------------------------------------------------------------------------------ monitored metrics


def test_unknown_soup_monitor_lists_the_logged_metrics_at_the_first_validation(
    flavour: SimpleNamespace, tmp_path: Path
) -> None:
    model = make_model(flavour.pl)
    cb = flavour.soup.GreedySoup(monitor="val/accuracy")
    with pytest.raises(SoupError) as info:
        flavour.pl.Trainer(callbacks=[cb], **trainer_kwargs(tmp_path)).fit(model)
    message = str(info.value)
    assert "'val/accuracy'" in message and "'val/acc'" in message and "'val/loss'" in message
    assert "self.log('val/accuracy'" in message  # what to do
    assert model.training_steps == STEPS_PER_EPOCH  # the first validation, not the end of fit


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ratio": [0.5, 1.0], "monitor": "val/accuracy"},
        {"ratio": [0.5, 1.0], "monitor": "val/acc", "constraint": "val/safety_acc>=0.9"},
    ],
)
def test_unknown_blend_metric_fails_in_the_sanity_check(flavour: SimpleNamespace, tmp_path: Path, kwargs: dict) -> None:
    model = make_model(flavour.pl)
    cb = flavour.soup.TaskArithmeticBlend(**kwargs)
    trainer = flavour.pl.Trainer(callbacks=[cb], **trainer_kwargs(tmp_path, num_sanity_val_steps=1))
    with pytest.raises(SoupError, match=r"not found among the validation metrics: \['val/acc', 'val/loss'\]"):
        trainer.fit(model)
    assert model.training_steps == 0


def scored_class(pl: Any) -> type:
    """TinyClassifier that logs ``val/score`` (its accuracy), replaced by ``bad_score`` in epoch ``bad_epoch``."""

    class Scored(tiny_classifier_class(pl)):  # type: ignore[misc]
        bad_epoch = -1
        bad_score = float("nan")

        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            super().validation_step(batch, batch_idx, dataloader_idx)
            x, y = batch
            score = (self(x).argmax(1) == y).float().mean()
            if self.trainer.current_epoch == self.bad_epoch and not self.trainer.sanity_checking:
                score = torch.full_like(score, self.bad_score)
            self.log("val/score", score)

    return Scored


@pytest.mark.parametrize("bad_score", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_validation_score_skips_the_ingredient_with_a_warning(tmp_path: Path, bad_score: float) -> None:
    import pytorch_lightning as pl

    import lightning_soup as soup

    torch.manual_seed(0)
    model = scored_class(pl)()
    model.bad_epoch, model.bad_score = 1, bad_score
    cb = soup.GreedySoup(monitor="val/score", verbose=False)
    with pytest.warns(UserWarning, match=r"GreedySoup skips the weights of epoch 1 \(step 12\): val/score is"):
        pl.Trainer(callbacks=[cb], **trainer_kwargs(tmp_path)).fit(model)
    recipe = json.loads((tmp_path / "soup" / "soup.json").read_text())
    rows = {r["epoch"]: r for r in recipe["ingredients"]}
    assert rows[1]["status"] == "skipped" and not rows[1]["accepted"]
    assert "non-finite val/score" in rows[1]["reason"]
    assert not (tmp_path / "soup" / "ingredients" / "epoch=1-step=12.safetensors").exists()
    assert {rows[0]["status"], rows[2]["status"]} <= {"accepted", "rejected"}
    assert math.isfinite(recipe["soup_score"])


def test_non_finite_weights_skip_the_ingredient_with_a_warning(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    import lightning_soup as soup

    class Poison(pl.Callback):
        """NaN in one weight during epoch 1's validation only (listed after GreedySoup, which sees it)."""

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == 1 and not trainer.sanity_checking:
                self.saved = pl_module.net[0].weight.detach().clone()
                with torch.no_grad():
                    pl_module.net[0].weight[0, 0] = float("nan")

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == 1 and not trainer.sanity_checking:
                with torch.no_grad():
                    pl_module.net[0].weight.copy_(self.saved)

    model = make_model(pl)
    cb = soup.GreedySoup(monitor="val/acc", verbose=False)
    with pytest.warns(UserWarning, match=r"skips the weights of epoch 1 \(step 12\): they contain NaN or inf"):
        pl.Trainer(callbacks=[cb, Poison()], **trainer_kwargs(tmp_path)).fit(model)
    rows = {r["epoch"]: r for r in json.loads((tmp_path / "soup" / "soup.json").read_text())["ingredients"]}
    assert rows[1]["status"] == "skipped" and rows[1]["reason"] == "non-finite weights"
    soup_weights = load_file(str(tmp_path / "soup" / "soup.safetensors"))
    assert all(bool(torch.isfinite(v).all()) for v in soup_weights.values() if v.is_floating_point())


# -------------------------------------------------------------------------------------------------- anchors


def anchor_file(kind: str, folder: Path, pl: Any) -> Path:
    """A bad anchor of the given kind."""
    good = weights(make_model(pl))
    path = folder / f"{kind}.safetensors"
    if kind == "missing":
        return path
    if kind == "corrupt":
        path.write_bytes(os.urandom(256))
    elif kind == "truncated":
        save_file(good, str(path))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "incompatible":
        save_file(weights(make_model(pl, hidden=8)), str(path))
    elif kind == "missing-keys":
        save_file({k: v for k, v in good.items() if not k.startswith("net.3.")}, str(path))
    elif kind in ("nan", "inf"):
        good["net.3.weight"][1, 2] = float(kind)
        save_file(good, str(path))
    elif kind == "ckpt-without-state_dict":
        path = path.with_suffix(".ckpt")
        torch.save({"epoch": 3, "global_step": 30}, path)
    elif kind == "index-outside-folder":  # a sharded anchor whose index names a file of someone else's
        save_file(good, str(folder / "other.safetensors"))
        path = folder / "anchor"
        path.mkdir()
        index = {"metadata": {}, "weight_map": dict.fromkeys(good, "../other.safetensors")}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


ANCHOR_CASES = {
    "missing": ["does not exist", "Pass a .safetensors file"],
    "corrupt": ["not a readable safetensors file", "re-create or re-download it"],
    "truncated": ["truncated", "re-create or re-download it"],
    "incompatible": ["'net.0.weight'", "(16, 8)", "(8, 8)", "HINT"],
    "missing-keys": ["net.3.weight", "net.3.bias"],
    "nan": ["NaN or infinite values in ['net.3.weight']", "Use a healthy checkpoint"],
    "inf": ["NaN or infinite values in ['net.3.weight']", "Use a healthy checkpoint"],
    "ckpt-without-state_dict": [
        "no `state_dict` entry",
        "`epoch`, `global_step`",
        "Pass a checkpoint written by Lightning",
    ],
    "index-outside-folder": ["'../other.safetensors'", "points outside that folder", "refusing to use it"],
}


@pytest.mark.parametrize("kind", list(ANCHOR_CASES))
def test_bad_anchor_fails_before_the_first_training_step(tmp_path: Path, kind: str) -> None:
    import pytorch_lightning as pl

    import lightning_soup as soup

    path = anchor_file(kind, tmp_path, pl)
    model = make_model(pl)
    before = weights(model)
    cb = soup.TaskArithmeticBlend(anchor=str(path), ratio=0.5)
    with pytest.raises(SoupError) as info:
        pl.Trainer(callbacks=[cb], **trainer_kwargs(tmp_path)).fit(model)
    message = str(info.value)
    assert message.startswith(f"TaskArithmeticBlend(anchor={str(path)!r})"), message
    for fragment in ANCHOR_CASES[kind]:
        assert fragment in message, (fragment, message)
    assert model.training_steps == 0
    assert all(torch.equal(v, before[k]) for k, v in weights(model).items())


# -------------------------------------------------------------------------------------------------- the CLI


def test_cli_incompatible_files_name_the_files_the_key_and_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pytorch_lightning as pl

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(weights(make_model(pl)), str(a))
    save_file(weights(make_model(pl, hidden=8)), str(b))
    out = tmp_path / "out.safetensors"
    assert cli(["average", str(a), str(b), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(a) in err and str(b) in err, err
    assert "'net.0.bias'" in err or "'net.0.weight'" in err
    assert "same model" in err and "lightning-soup inspect" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


@pytest.mark.parametrize("kind", ["ckpt-without-state_dict", "truncated", "missing-keys"])
def test_cli_bad_input_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    import pytorch_lightning as pl

    good = tmp_path / "good.safetensors"
    save_file(weights(make_model(pl)), str(good))
    bad = anchor_file(kind, tmp_path, pl)
    out = tmp_path / "out.safetensors"
    assert cli(["blend", "--anchor", str(good), "--model", str(bad), "--ratio", "0.5", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and err.startswith("lightning-soup: error: "), err
    assert not out.exists()


# ------------------------------------------------------------------- the CLI: values and dtypes it cannot merge


def _models(tmp_path: Path, edit: dict[int, dict[str, torch.Tensor]] | None = None) -> list[str]:
    """A base and two fine-tunes (2-D weights, a bias, an int64 counter) as safetensors; ``edit`` replaces
    tensors of model ``i`` (0 is the base)."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(6, generator=g), "steps": torch.tensor(10)}
    paths = []
    for i in range(3):
        sd = {
            k: v + 0.05 * i * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + i
            for k, v in base.items()
        }
        sd.update((edit or {}).get(i, {}))
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file(sd, paths[-1])
    return paths


def _argv(command: str, paths: list[str], out: Path) -> list[str]:
    """A working command line of ``command`` over the base ``paths[0]`` and the fine-tunes ``paths[1:]``."""
    base, ft1, ft2 = paths
    inputs = {
        "average": [ft1, ft2],
        "blend": ["--anchor", base, "--model", ft2, "--ratio", "0"],  # ratio 0: the anchor, whatever the model
        "task-arithmetic": ["--base", base, ft1, ft2, "--scales", "0.5"],
        "ties": ["--base", base, ft1, ft2, "--density", "0.5"],
        "dare": ["--base", base, ft1, ft2, "--density", "0.5"],
        "tsv": ["--base", base, ft1, ft2],
        "iso-c": ["--base", base, ft1, ft2],
        "iso-cts": ["--base", base, ft1, ft2],
        "model-stock": ["--base", base, ft1, ft2],
        "slerp": [ft1, ft2, "--t", "0.5"],
        "inspect": [ft1, ft2, "--base", base],
    }[command]
    return [command, *inputs] + ([] if command == "inspect" else ["-o", str(out)])


CLI_COMMANDS = [
    "average",
    "blend",
    "task-arithmetic",
    "ties",
    "dare",
    "tsv",
    "iso-c",
    "iso-cts",
    "model-stock",
    "slerp",
    "inspect",
]
MERGE_COMMANDS = [c for c in CLI_COMMANDS if c != "inspect"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("command", CLI_COMMANDS)
def test_cli_non_finite_input_is_an_error_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, value: float
) -> None:
    """In the last input every command reads (for blend --ratio 0, the model the result does not even use)."""
    bias = torch.zeros(6)
    bias[3] = value
    paths = _models(tmp_path, {2: {"b": bias}})
    out = tmp_path / "out.safetensors"
    assert cli(_argv(command, paths, out)) == 1
    err = capsys.readouterr().err
    assert err.startswith("lightning-soup: error: ") and err.count("\n") == 1, err
    assert f"{paths[2]}: tensor `b` holds 1 NaN or infinite value(s) out of 6" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0.safetensors", "m1.safetensors", "m2.safetensors"]


def test_cli_a_merged_value_that_overflows_the_output_dtype_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = _models(tmp_path)
    out = tmp_path / "out.safetensors"
    argv = ["task-arithmetic", "--base", paths[0], paths[1], "--scales", "1e7", "-o", str(out), "--dtype", "float16"]
    assert cli(argv) == 1
    err = capsys.readouterr().err
    assert "the merged `" in err and "float16 (an overflow)" in err and "nothing was written" in err, err
    assert not out.exists()


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("command", MERGE_COMMANDS)
def test_cli_quantised_and_float8_weights_are_refused_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, dtype: torch.dtype
) -> None:
    """In every input: a quantised checkpoint must not "merge" into a copy of one of them."""
    g = torch.Generator().manual_seed(1)
    edit = {i: {"w": (torch.randn(6, 4, generator=g) * 20).to(dtype)} for i in range(3)}
    paths = _models(tmp_path, edit)
    out = tmp_path / "out.safetensors"
    assert cli(_argv(command, paths, out)) == 1
    err = capsys.readouterr().err
    name = str(dtype).removeprefix("torch.")
    assert err.count("\n") == 1 and "unexpected" not in err, err
    assert f"tensor `w` is {name}" in err and ("Dequantise" in err or "Convert the checkpoints" in err), err
    assert not out.exists()


def test_cli_integer_and_bool_buffers_are_still_taken_from_the_first_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit = {
        i: {"idx": torch.tensor([i, 2 * i], dtype=torch.int32), "mask": torch.tensor([i == 1, True])} for i in range(3)
    }
    paths = _models(tmp_path, edit)
    out = tmp_path / "out.safetensors"
    assert cli(["average", paths[1], paths[2], "-o", str(out)]) == 0
    result = load_file(str(out))
    assert result["idx"].tolist() == [1, 2] and result["mask"].tolist() == [True, True]
    assert result["steps"].item() == 11


def test_cli_inspect_of_float8_checkpoints_is_no_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit = {i: {"w": torch.randn(6, 4).to(torch.float8_e4m3fn)} for i in range(3)}
    paths = _models(tmp_path, edit)
    assert cli(_argv("inspect", paths, tmp_path / "unused")) == 0
    assert "float8_e4m3fn" in capsys.readouterr().out


def _crafted(kind: str, folder: Path) -> str:
    """An input crafted to raise a raw exception somewhere below the CLI before these checks existed."""

    def raw(header: bytes, data: bytes = b"") -> str:
        header += b" " * (-len(header) % 8)
        path = folder / f"{kind}.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header + data)
        return str(path)

    if kind == "deep-header":
        return raw(b"[" * 50_000)
    if kind == "dims-2**63":
        return raw(b'{"w":{"dtype":"F32","shape":[9223372036854775808,0],"data_offsets":[0,0]}}')
    if kind == "duplicate-key":
        entry = b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
        return raw(b"{" + entry + b"," + entry.replace(b"[0,4]", b"[4,8]") + b"}", b"\0" * 8)
    if kind == "expand-bomb":
        path = folder / "bomb.ckpt"
        torch.save({"state_dict": {"w": torch.zeros(1).expand(2**40)}}, path)
        return str(path)
    raise ValueError(kind)


CRAFTED = {
    "deep-header": "its header is not valid JSON",
    "dims-2**63": "malformed",
    "duplicate-key": "lists `w` twice",
    "expand-bomb": "claims [1099511627776] = 1099511627776 elements (4398046511104 bytes) but its data holds only 4",
}


@pytest.mark.parametrize("command", ["inspect", "average"])
@pytest.mark.parametrize("kind", list(CRAFTED))
def test_cli_crafted_inputs_are_one_line_errors_not_tracebacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, command: str
) -> None:
    bad = _crafted(kind, tmp_path)
    good = _models(tmp_path)[0]
    out = tmp_path / "out.safetensors"
    argv = ["inspect", good, bad] if command == "inspect" else ["average", good, bad, "-o", str(out)]
    assert cli(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    assert "unexpected" not in captured.err and CRAFTED[kind] in captured.err and bad in captured.err, captured.err
    assert not out.exists()


@pytest.mark.parametrize("json_output", [False, True])
def test_cli_keys_and_paths_that_look_like_rich_markup_are_printed_as_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], json_output: bool
) -> None:
    folder = tmp_path / "run[" / "]x[bold]"  # the path reads .../run[/]x[bold]/...
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    base = {"enc[/].w": torch.randn(4, 4, generator=g), "[red]b": torch.randn(4, generator=g)}
    paths = []
    for i in range(3):
        paths.append(str(folder / f"m{i}.safetensors"))
        save_file({k: v + 0.1 * i * torch.randn(v.shape, generator=g) for k, v in base.items()}, paths[-1])
    assert cli(["inspect", paths[1], paths[2], "--base", paths[0], *(["--json"] if json_output else [])]) == 0
    out = capsys.readouterr().out
    assert "enc[/].w" in out and "[red]b" in out and "run[/]x[bold]" in out.replace("\n", ""), out
    out_file = folder / "avg.safetensors"
    assert cli(["average", paths[1], paths[2], "-o", str(out_file)]) == 0
    assert set(load_file(str(out_file))) == set(base)


# ---------------------------------------------------------------------------------------- validation disabled


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("GreedySoup", {"monitor": "val/acc"}),
        ("TaskArithmeticBlend", {"ratio": [0.5, 1.0], "monitor": "val/acc"}),
        ("TaskArithmeticBlend", {"constraint": "val/acc>=0.5"}),
        ("CheckpointAveraging", {"validate_average": True}),
    ],
)
def test_callbacks_that_validate_refuse_disabled_validation_before_training(
    flavour: SimpleNamespace, tmp_path: Path, name: str, kwargs: dict
) -> None:
    model = make_model(flavour.pl)
    cb = getattr(flavour.soup, name)(**kwargs)
    trainer = flavour.pl.Trainer(callbacks=[cb], **trainer_kwargs(tmp_path, limit_val_batches=0))
    with pytest.raises(SoupError, match=r"`Trainer\(limit_val_batches=0\)`") as info:
        trainer.fit(model)
    message = str(info.value)
    assert name in message and ("Enable validation" in message or "Set `limit_val_batches` > 0" in message), message
    assert model.training_steps == 0


def test_greedy_soup_without_a_validation_loop_fails_before_training(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    import lightning_soup as soup

    class NoValidation(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8, 3)
            self.training_steps = 0

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.training_steps += 1
            return torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(make_data(32), batch_size=16)

    model = NoValidation()
    with pytest.raises(SoupError, match="needs a validation loop to score ingredients.*define `validation_step`"):
        pl.Trainer(callbacks=[soup.GreedySoup(monitor="val/acc")], **trainer_kwargs(tmp_path)).fit(model)
    assert model.training_steps == 0


def test_greedy_soup_with_empty_validation_data_warns_and_keeps_the_weights(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    import lightning_soup as soup

    class EmptyValidation(tiny_classifier_class(pl)):  # type: ignore[misc]
        def val_dataloader(self) -> list:
            return []

    torch.manual_seed(0)
    model = EmptyValidation()
    with pytest.warns(UserWarning, match="GreedySoup has no ingredient to make a soup from"):
        pl.Trainer(callbacks=[soup.GreedySoup(monitor="val/acc")], **trainer_kwargs(tmp_path, max_epochs=1)).fit(model)
    assert not (tmp_path / "soup" / "soup.safetensors").exists()
    final = load_file(str(tmp_path / "soup" / "final.safetensors"))
    assert all(torch.equal(v, final[k]) for k, v in weights(model).items())


def test_blend_without_monitor_needs_no_validation(tmp_path: Path) -> None:
    """The documented fallback: a single ratio without `monitor`/`constraint` works with validation disabled."""
    import pytorch_lightning as pl

    import lightning_soup as soup

    model = make_model(pl)
    initial = weights(model)
    pl.Trainer(
        callbacks=[soup.TaskArithmeticBlend(ratio=0.5)], **trainer_kwargs(tmp_path, max_epochs=1, limit_val_batches=0)
    ).fit(model)
    final = load_file(str(tmp_path / "soup" / "final.safetensors"))
    for k, v in weights(model).items():
        if v.is_floating_point():
            want = initial[k].double() + 0.5 * (final[k].double() - initial[k].double())
            assert torch.allclose(v.double(), want, atol=1e-6), k


# ------------------------------------------------------------------------------------ validate, test, predict


def full_class(pl: Any) -> type:
    class Full(tiny_classifier_class(pl)):  # type: ignore[misc]
        def test_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("test/acc", (self(x).argmax(1) == y).float().mean())

        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self(batch[0])

        def test_dataloader(self) -> DataLoader:
            return DataLoader(make_data(40, seed=1), batch_size=16)

        def predict_dataloader(self) -> DataLoader:
            return DataLoader(make_data(40, seed=1), batch_size=16)

    return Full


def soup_callbacks(soup: Any, dirpath: Path) -> list:
    return [
        soup.CheckpointAveraging(window=2, dirpath=str(dirpath / "avg"), verbose=False),
        soup.GreedySoup(monitor="val/acc", dirpath=str(dirpath / "soup"), verbose=False),
        soup.TaskArithmeticBlend(ratio=[0.5, 1.0], monitor="val/loss", mode="min", dirpath=str(dirpath / "blend")),
    ]


def snapshot_tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and modification time."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("after_fit", [False, True])
def test_no_effect_in_validate_test_predict(flavour: SimpleNamespace, tmp_path: Path, after_fit: bool) -> None:
    """No error, no file, no change of weights; after a fit, the fit's files stay as they are."""
    pl = flavour.pl
    torch.manual_seed(0)
    model = full_class(pl)()
    out = tmp_path / "out"
    trainer = pl.Trainer(callbacks=soup_callbacks(flavour.soup, out), **trainer_kwargs(tmp_path, max_epochs=2))
    if after_fit:
        trainer.fit(model)
    files = snapshot_tree(out)
    before = weights(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(model)
        trainer.test(model)
        predictions = trainer.predict(model)
    ours = [str(w.message) for w in caught if any(n in str(w.message) for n in ("Soup", "Averaging", "Blend"))]
    assert ours == []
    assert len(predictions) == 3
    assert snapshot_tree(out) == files
    assert after_fit or not out.exists()
    assert all(torch.equal(v, before[k]) for k, v in weights(model).items())
