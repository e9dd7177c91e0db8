"""GreedySoup: the callback's soup against an independent greedy soup built here with `trainer.validate`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from _models import make_model, tiny_classifier_class, trainer_kwargs
from safetensors import safe_open
from safetensors.torch import load_file

from lightning_soup import SoupError
from lightning_soup.callbacks import _evaluate
from lightning_soup.callbacks.greedy_soup import _GreedySoup

# ------------------------------------------------------------------------------------------------ references


class Validator:
    """Scores weights with a fresh ``trainer.validate`` (one Trainer reused): the ground truth for every score."""

    def __init__(self, flavour: SimpleNamespace, root: Path, model_kwargs: dict[str, Any], **overrides: Any) -> None:
        self.pl = flavour.pl
        self.model = make_model(flavour.pl, **model_kwargs)
        self.trainer = flavour.pl.Trainer(**trainer_kwargs(root / "validator", **overrides))

    def __call__(self, state: dict[str, torch.Tensor], monitor: str) -> float:
        self.model.load_state_dict(state)
        merged: dict[str, float] = {}
        for result in self.trainer.validate(self.model, verbose=False):
            merged.update(result)
        return merged[monitor]


def mean64(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform mean in float64, cast back; integer buffers from the first state."""
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            out[k] = torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def reference_greedy(
    ingredients: list[dict[str, torch.Tensor]], scores: list[float], mode: str, score: Any
) -> tuple[dict[str, torch.Tensor], list[int], list[float]]:
    """Wortsman's greedy soup: best first, keep an ingredient when the soup's score does not get worse."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i] if mode == "max" else scores[i])
    members, soup_score, trace = [order[0]], scores[order[0]], [scores[order[0]]]
    for i in order[1:]:
        candidate = score(mean64([ingredients[j] for j in [*members, i]]))
        if (candidate >= soup_score) if mode == "max" else (candidate <= soup_score):
            members, soup_score = [*members, i], candidate
        trace.append(soup_score)
    return mean64([ingredients[j] for j in members]), members, trace


def assert_close_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


# ------------------------------------------------------------------------------------------------- fixtures


def _snapshot(module: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def capture_class(pl: Any, monitor: str) -> type:
    class Capture(pl.Callback):
        """Listed before GreedySoup: what the soup's ingredients should be, and the raw weights at the end."""

        def __init__(self) -> None:
            self.states: list[dict[str, torch.Tensor]] = []
            self.scores: list[float] = []
            self.steps: list[tuple[int, int]] = []
            self.final: dict[str, torch.Tensor] = {}

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.sanity_checking:
                self.states.append(_snapshot(pl_module))
                self.scores.append(float(trainer.callback_metrics[monitor]))
                self.steps.append((trainer.current_epoch, trainer.global_step))

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.final = _snapshot(pl_module)

    return Capture


def fit(
    flavour: SimpleNamespace,
    root: Path,
    monitor: str = "val/loss",
    model_kwargs: dict[str, Any] | None = None,
    soup_kwargs: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    model: Any = None,
    **overrides: Any,
) -> SimpleNamespace:
    capture = capture_class(flavour.pl, monitor)()
    soup = flavour.soup.GreedySoup(monitor=monitor, dirpath=str(root / "soup"), **(soup_kwargs or {}))
    model = model if model is not None else make_model(flavour.pl, **(model_kwargs or {}))
    trainer = flavour.pl.Trainer(
        **trainer_kwargs(root, **{"max_epochs": 4, **overrides}), callbacks=[capture, *(callbacks or []), soup]
    )
    trainer.fit(model)
    return SimpleNamespace(trainer=trainer, model=model, soup=soup, capture=capture, dir=root / "soup")


# -------------------------------------------------------------------------------------------------- the soup


@pytest.mark.parametrize(
    ("monitor", "mode"),
    [("val/loss/dataloader_idx_1", "min"), pytest.param("val/tm_acc", "max", marks=pytest.mark.slow)],
)
def test_soup_equals_independent_greedy_soup(
    flavour: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, monitor: str, mode: str
) -> None:
    model_kwargs = {"two_val_loaders": True, "torchmetrics_acc": True, "lr": 0.5}
    candidates: list[tuple[dict[str, torch.Tensor], float]] = []
    real_evaluate = _evaluate.evaluate

    def recording_evaluate(trainer: Any, pl_module: Any) -> dict[str, float]:
        metrics = real_evaluate(trainer, pl_module)
        candidates.append((_snapshot(pl_module), metrics[monitor]))
        return metrics

    monkeypatch.setattr(_evaluate, "evaluate", recording_evaluate)
    logger = flavour.pl.loggers.CSVLogger(str(tmp_path / "logs"), name="", version="")
    run = fit(flavour, tmp_path, monitor, model_kwargs, {"mode": mode}, num_sanity_val_steps=2, logger=logger)
    cap = run.capture
    assert len(cap.states) == 4

    # Every candidate's score is exactly what trainer.validate reports for the same weights.
    validator = Validator(flavour, tmp_path, model_kwargs)
    assert len(candidates) == 3  # the single ingredients are not validated again
    for state, score in candidates:
        assert score == validator(state, monitor)

    # The soup is the independent float64 greedy soup over the captured ingredients.
    expected, members, trace = reference_greedy(cap.states, cap.scores, mode, lambda s: validator(s, monitor))
    soup_file = load_file(str(run.dir / "soup.safetensors"))
    assert_close_states(soup_file, expected)
    assert_equal_states(_snapshot(run.model), soup_file)  # the module holds the soup
    fresh = make_model(flavour.pl, **model_kwargs)
    fresh.load_state_dict(soup_file)  # the file loads into the user's model as documented

    recipe = json.loads((run.dir / "soup.json").read_text())
    tried = recipe["ingredients"]
    assert [(t["epoch"], t["step"]) for t in tried if t["accepted"]] == [cap.steps[i] for i in members]
    assert [t["score"] for t in tried] == sorted(cap.scores, reverse=mode == "max")
    assert [t["soup_score"] for t in tried] == pytest.approx(trace, abs=1e-6)
    assert recipe["soup_score"] == pytest.approx(trace[-1], abs=1e-6)
    assert float(run.trainer.callback_metrics[f"greedy_soup/{monitor}"]) == pytest.approx(recipe["soup_score"])
    logged = [row for row in (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[1:] if row.strip(",")]
    header = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    column = header.index(f"greedy_soup/{monitor}")
    values = [float(r.split(",")[column]) for r in logged if r.split(",")[column]]
    assert values == [pytest.approx(recipe["soup_score"])]  # logged once, to the trainer's logger
    with safe_open(str(run.dir / "soup.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["lightning_soup"])["ingredients"] == tried

    # Ingredients on disk are the weights at each validation; final.safetensors the raw trained weights.
    for (epoch, step), state in zip(cap.steps, cap.states):
        assert_equal_states(load_file(str(run.dir / f"ingredients/epoch={epoch}-step={step}.safetensors")), state)
    assert_equal_states(load_file(str(run.dir / "final.safetensors")), cap.final)


def test_sanity_check_ignored_and_every_n_epochs(flavour: SimpleNamespace, tmp_path: Path) -> None:
    run = fit(flavour, tmp_path, soup_kwargs={"every_n_epochs": 2, "verbose": False}, num_sanity_val_steps=2)
    assert [s[0] for s in run.capture.steps] == [0, 1, 2, 3]  # the sanity check is not a validation run
    recipe = json.loads((run.dir / "soup.json").read_text())
    assert sorted(i["epoch"] for i in recipe["ingredients"]) == [1, 3]
    assert sorted(p.name for p in (run.dir / "ingredients").iterdir()) == [
        f"epoch={e}-step={s}.safetensors" for e, s in sorted(run.capture.steps) if e in (1, 3)
    ]


def _nan_at_epoch_model(pl: Any, epoch: int) -> Any:
    class NaNScore(tiny_classifier_class(pl)):  # type: ignore[misc]
        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            super().validation_step(batch, batch_idx)
            if self.current_epoch == epoch and self.trainer.state.fn == "fit":
                self.log("val/loss", torch.tensor(float("nan")))

    torch.manual_seed(0)
    return NaNScore()


def test_nan_score_is_skipped_with_a_warning(flavour: SimpleNamespace, tmp_path: Path) -> None:
    model = _nan_at_epoch_model(flavour.pl, epoch=1)
    with pytest.warns(UserWarning, match=r"skips the weights of epoch 1 .*val/loss is nan"):
        run = fit(flavour, tmp_path, soup_kwargs={"mode": "min", "verbose": False}, model=model)
    cap = run.capture
    assert math.isnan(cap.scores[1])
    good = [i for i in range(4) if i != 1]
    validator = Validator(flavour, tmp_path, {})
    expected, _, _ = reference_greedy(
        [cap.states[i] for i in good], [cap.scores[i] for i in good], "min", lambda s: validator(s, "val/loss")
    )
    assert_close_states(load_file(str(run.dir / "soup.safetensors")), expected)
    recipe = json.loads((run.dir / "soup.json").read_text())
    skipped = [i for i in recipe["ingredients"] if i["status"] == "skipped"]
    assert [(i["epoch"], i["file"], i["accepted"]) for i in skipped] == [(1, None, False)]
    assert "non-finite" in skipped[0]["reason"]
    assert len(list((run.dir / "ingredients").iterdir())) == 3


def test_nan_weights_are_skipped_with_a_warning(flavour: SimpleNamespace, tmp_path: Path) -> None:
    pl = flavour.pl

    class Poison(pl.Callback):
        """Puts a NaN into a weight for GreedySoup to see at epoch 2's validation, then takes it out again."""

        def __init__(self, restore: bool) -> None:
            self.restore = restore
            self.saved: torch.Tensor | None = None

        @torch.no_grad()
        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch != 2:
                return
            weight = pl_module.net[0].weight
            if self.restore:
                weight[0, 0] = poison.saved
            else:
                poison.saved = weight[0, 0].clone()
                weight[0, 0] = float("nan")

    poison = Poison(restore=False)
    capture = capture_class(pl, "val/loss")()
    soup = flavour.soup.GreedySoup(monitor="val/loss", mode="min", dirpath=str(tmp_path / "soup"), verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=4), callbacks=[capture, poison, soup, Poison(True)])
    with pytest.warns(UserWarning, match="epoch 2 .*NaN or inf"):
        trainer.fit(make_model(pl))
    recipe = json.loads((tmp_path / "soup" / "soup.json").read_text())
    status = {i["epoch"]: i["status"] for i in recipe["ingredients"]}
    assert status[2] == "skipped" and all(s != "skipped" for e, s in status.items() if e != 2)
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "soup" / "soup.safetensors")).values())


@pytest.mark.slow
def test_max_ingredients_keeps_the_best_on_disk(flavour: SimpleNamespace, tmp_path: Path) -> None:
    run = fit(flavour, tmp_path, soup_kwargs={"mode": "min", "max_ingredients": 2, "verbose": False}, max_epochs=5)
    cap = run.capture
    best = sorted(range(5), key=lambda i: cap.scores[i])[:2]
    on_disk = sorted(p.name for p in (run.dir / "ingredients").iterdir())
    assert on_disk == sorted(f"epoch={cap.steps[i][0]}-step={cap.steps[i][1]}.safetensors" for i in best)
    validator = Validator(flavour, tmp_path, {})
    expected, _, _ = reference_greedy(
        [cap.states[i] for i in best], [cap.scores[i] for i in best], "min", lambda s: validator(s, "val/loss")
    )
    assert_close_states(load_file(str(run.dir / "soup.safetensors")), expected)
    recipe = json.loads((run.dir / "soup.json").read_text())
    assert sum(i["status"] == "pruned" for i in recipe["ingredients"]) == 3
    assert len(recipe["ingredients"]) == 5


# ------------------------------------------------------------------------------------------------------ online


def reference_online(
    ingredients: list[dict[str, torch.Tensor]], scores: list[float], score: Any
) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """The online rule (max mode), in arrival order: join when the candidate beats both the soup and the newcomer
    alone, restart from the newcomer when it alone beats the soup, else reject."""
    members, soup_score, statuses, validations = [0], scores[0], ["accepted"], 0
    for i in range(1, len(ingredients)):
        candidate = score(mean64([ingredients[j] for j in [*members, i]]))
        validations += 1
        if candidate >= soup_score and candidate >= scores[i]:
            members, soup_score = [*members, i], candidate
            statuses.append("accepted")
        elif scores[i] > soup_score:
            members, soup_score = [i], scores[i]
            statuses.append("restarted")
        else:
            statuses.append("rejected")
    return mean64([ingredients[j] for j in members]), statuses, validations


@pytest.mark.slow
def test_online_soup(flavour: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    passes: list[int] = []
    real_evaluate = _evaluate.evaluate

    def counting_evaluate(trainer: Any, pl_module: Any) -> dict[str, float]:
        passes.append(trainer.current_epoch)
        return real_evaluate(trainer, pl_module)

    monkeypatch.setattr(_evaluate, "evaluate", counting_evaluate)
    run = fit(flavour, tmp_path / "online", "val/acc", soup_kwargs={"online": True, "verbose": False}, max_epochs=5)
    cap = run.capture
    validator = Validator(flavour, tmp_path, {})
    expected, statuses, validations = reference_online(cap.states, cap.scores, lambda s: validator(s, "val/acc"))
    assert len(passes) == validations == 4  # one extra validation per ingredient after the first
    assert_close_states(load_file(str(run.dir / "soup.safetensors")), expected)
    recipe = json.loads((run.dir / "soup.json").read_text())
    assert [i["status"] for i in recipe["ingredients"]] == statuses
    # Only the soup (and its running sum) is kept, no ingredient files.
    assert not (run.dir / "ingredients").exists()
    assert len(list((run.dir / "online").iterdir())) == 1

    # Training itself is untouched: the raw weights after fit are those of a run without the callback.
    plain = make_model(flavour.pl)
    flavour.pl.Trainer(**trainer_kwargs(tmp_path / "plain", max_epochs=5)).fit(plain)
    assert_equal_states(load_file(str(run.dir / "final.safetensors")), _snapshot(plain))


# ------------------------------------------------------------------------------------------------------ resume


class EpochShuffle(torch.utils.data.Sampler):
    """A shuffle that depends on the epoch alone (Lightning calls ``set_epoch``), so a resumed run sees the same
    batches as an uninterrupted one; the global RNG would not give that."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Any:
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(1000 + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


def resumable_model(pl: Any, seed: int = 0) -> Any:
    from _models import make_data

    class Resumable(tiny_classifier_class(pl)):  # type: ignore[misc]
        def train_dataloader(self) -> Any:
            data = make_data(self.hparams.n_train, seed=0)
            return torch.utils.data.DataLoader(data, batch_size=self.hparams.batch_size, sampler=EpochShuffle(len(data)))

    torch.manual_seed(seed)
    return Resumable()


@pytest.mark.slow
@pytest.mark.parametrize("online", [False, True], ids=["offline", "online"])
def test_resume_equals_uninterrupted_run(flavour: SimpleNamespace, tmp_path: Path, online: bool) -> None:
    pl = flavour.pl
    soup_kwargs: dict[str, Any] = {"mode": "min", "verbose": False}
    soup_kwargs.update({"online": True} if online else {"max_ingredients": 3})
    whole = fit(flavour, tmp_path / "whole", soup_kwargs=soup_kwargs, model=resumable_model(pl), max_epochs=4)

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, save_top_k=-1)
    first = fit(
        flavour, tmp_path / "parts", soup_kwargs=soup_kwargs, callbacks=[ckpt], model=resumable_model(pl),
        max_epochs=2, enable_checkpointing=True,
    )
    last = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=True)["callbacks"][first.soup.state_key]  # plain types only
    assert [e["epoch"] for e in state["entries"]] == [0, 1]

    soup = flavour.soup.GreedySoup(monitor="val/loss", dirpath=str(tmp_path / "parts" / "soup"), **soup_kwargs)
    capture = capture_class(pl, "val/loss")()
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path / "parts", max_epochs=4, enable_checkpointing=True),
        callbacks=[capture, pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt2")), soup],
    )
    model = resumable_model(pl, seed=123)  # different initial weights: everything must come from the checkpoint
    trainer.fit(model, ckpt_path=str(last))
    assert [s[0] for s in capture.steps] == [2, 3]  # no validation is repeated after the resume

    assert_equal_states(load_file(str(tmp_path / "parts/soup/soup.safetensors")), load_file(str(whole.dir / "soup.safetensors")))
    assert_equal_states(_snapshot(model), _snapshot(whole.model))
    resumed = json.loads((tmp_path / "parts/soup/soup.json").read_text())
    uninterrupted = json.loads((whole.dir / "soup.json").read_text())
    assert resumed == uninterrupted


def test_resume_with_missing_ingredient_file_is_a_clear_error(flavour: SimpleNamespace, tmp_path: Path) -> None:
    pl = flavour.pl
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    fit(flavour, tmp_path, soup_kwargs={"verbose": False}, callbacks=[ckpt], max_epochs=2, enable_checkpointing=True)
    victim = next((tmp_path / "soup" / "ingredients").glob("epoch=0-*.safetensors"))
    victim.unlink()
    soup = flavour.soup.GreedySoup(monitor="val/loss", dirpath=str(tmp_path / "soup"))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3), callbacks=[soup])
    with pytest.raises(SoupError, match=r"missing.*" + victim.name.replace("=", "=")):
        trainer.fit(make_model(pl), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))


# ---------------------------------------------------------------------------------------------- errors, no-ops


def test_no_effect_in_validate_test_predict(flavour: SimpleNamespace, tmp_path: Path) -> None:
    pl = flavour.pl

    class WithTest(tiny_classifier_class(pl)):  # type: ignore[misc]
        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.validation_step(batch, batch_idx)

    torch.manual_seed(0)
    model = WithTest()
    soup = flavour.soup.GreedySoup(monitor="does/not/exist", dirpath=str(tmp_path / "soup"))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=[soup])
    before = _snapshot(model)
    trainer.validate(model, verbose=False)
    trainer.test(model, dataloaders=model.val_dataloader(), verbose=False)
    trainer.predict(model, dataloaders=torch.utils.data.DataLoader(torch.randn(4, 8)))
    assert_equal_states(_snapshot(model), before)
    assert not (tmp_path / "soup").exists()


def test_missing_monitor_fails_at_first_validation(flavour: SimpleNamespace, tmp_path: Path) -> None:
    soup = flavour.soup.GreedySoup(monitor="val/accuracy", dirpath=str(tmp_path / "soup"))
    trainer = flavour.pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3), callbacks=[soup])
    with pytest.raises(SoupError, match=r"'val/accuracy' was not found .*'val/acc'.*HINT: Did you call"):
        trainer.fit(make_model(flavour.pl))
    assert trainer.current_epoch == 0


def test_validation_disabled_fails_before_training(flavour: SimpleNamespace, tmp_path: Path) -> None:
    model = make_model(flavour.pl)
    soup = flavour.soup.GreedySoup(monitor="val/acc", dirpath=str(tmp_path / "soup"))
    trainer = flavour.pl.Trainer(**trainer_kwargs(tmp_path, limit_val_batches=0), callbacks=[soup])
    with pytest.raises(SoupError, match="limit_val_batches"):
        trainer.fit(model)
    assert model.training_steps == 0


def test_two_soups_in_one_dirpath_is_an_error(flavour: SimpleNamespace, tmp_path: Path) -> None:
    soups = [flavour.soup.GreedySoup(monitor=m, dirpath=str(tmp_path / "soup")) for m in ("val/acc", "val/loss")]
    trainer = flavour.pl.Trainer(**trainer_kwargs(tmp_path), callbacks=soups)
    with pytest.raises(SoupError, match="same `dirpath`"):
        trainer.fit(make_model(flavour.pl))


def test_constructor_reports_every_problem() -> None:
    with pytest.raises(SoupError) as info:
        _GreedySoup(monitor="", mode="maximum", every_n_epochs=0, max_ingredients=-1, online="yes")  # type: ignore[arg-type]
    message = str(info.value)
    for piece in ("`monitor`", "`mode` can be 'min' or 'max', got 'maximum'", "`every_n_epochs`", "`max_ingredients`",
                  "`online` must be True or False"):
        assert piece in message
    with pytest.raises(SoupError, match="no effect with `online=True`"):
        _GreedySoup(monitor="val/acc", online=True, max_ingredients=3)
    a, b = _GreedySoup("val/acc"), _GreedySoup("val/acc", mode="min", dirpath="x")
    assert a.state_key != b.state_key and "val/acc" in a.state_key


def test_state_dict_loads_with_weights_only(tmp_path: Path) -> None:
    cb = _GreedySoup(monitor="val/acc")
    cb._entries = [{"epoch": 0, "step": 5, "score": float("nan"), "file": None, "status": "skipped", "reason": "x"}]
    cb._online = {"file": "online/a.safetensors", "count": 2, "score": 0.5, "first": 0}
    torch.save(cb.state_dict(), tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    other = _GreedySoup(monitor="val/acc")
    other.load_state_dict(loaded)
    assert other._online == cb._online and other._entries[0]["status"] == "skipped"


# ------------------------------------------------------------------------------------------------------- DDP


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", ["pytorch_lightning", "lightning"])
def test_ddp_soup_equals_reference_on_every_rank(tmp_path: Path, name: str) -> None:
    from _launch import launch

    ranks = launch("greedy_soup_ddp.py", tmp_path, name, nprocs=2, timeout=360)
    zero, one = ranks
    assert len(zero["scores"]) == 4 and zero["scores"] == one["scores"]
    assert zero["recipe"] == one["recipe"]  # the same decisions everywhere
    recipe = zero["recipe"]
    accepted = [i["epoch"] for i in recipe["ingredients"] if i["accepted"]]
    assert accepted == zero["members"]  # epoch i is ingredient i
    assert [i["soup_score"] for i in recipe["ingredients"]] == pytest.approx(zero["trace"], abs=1e-6)

    soup_file = load_file(str(tmp_path / "soup" / "soup.safetensors"))
    assert_close_states(soup_file, load_file(str(tmp_path / "reference.safetensors")))
    module0 = load_file(str(tmp_path / "module_rank0.safetensors"))
    assert_equal_states(module0, load_file(str(tmp_path / "module_rank1.safetensors")))  # both ranks hold the soup
    assert_equal_states(module0, soup_file)

    # Rank zero alone touches files: each ingredient written once and each of its tensors read once.
    assert one["opened"] == [] and one["reads"] == {} and one["commits"] == []
    ingredient_files = sorted(f"ingredients/epoch={i['epoch']}-step={i['step']}.safetensors" for i in recipe["ingredients"])
    assert sorted(c for c in zero["commits"] if c.startswith("ingredients/")) == ingredient_files
    assert sorted(c for c in zero["commits"] if not c.startswith("ingredients/")) == [
        "final.safetensors", "soup.json", "soup.safetensors"
    ]
    n_keys = len(soup_file)
    assert len(zero["reads"]) == 4 * n_keys and set(zero["reads"].values()) == {1}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ddp_online_soup_equals_reference_on_every_rank(tmp_path: Path) -> None:
    from _launch import launch

    zero, one = launch("greedy_soup_ddp.py", tmp_path, "pytorch_lightning", "online", nprocs=2, timeout=360)
    assert zero["recipe"] == one["recipe"]
    recipe = zero["recipe"]
    assert [i["soup_score"] for i in recipe["ingredients"]] == pytest.approx(zero["trace"], abs=1e-6)
    soup_file = load_file(str(tmp_path / "soup" / "soup.safetensors"))
    assert_close_states(soup_file, load_file(str(tmp_path / "reference.safetensors")))
    module0 = load_file(str(tmp_path / "module_rank0.safetensors"))
    assert_equal_states(module0, load_file(str(tmp_path / "module_rank1.safetensors")))
    assert_equal_states(module0, soup_file)
    assert one["opened"] == [] and one["commits"] == []  # rank zero alone keeps the running sum
    assert not (tmp_path / "soup" / "ingredients").exists()
