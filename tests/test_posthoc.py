"""soup() and compose(): finished fine-tunes merged and chosen with the user's validation.

The references are written here: scores from ``trainer.validate`` on a separate trainer, the greedy rule and the
candidate formulas in float64, the constraint choice as "best feasible, else closest".
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file, save_file

import lightning_soup as ls
from _launch import ROOT, launch
from _models import make_model, trainer_kwargs
from lightning_soup import storage
from lightning_soup._posthoc_report import compose_figure, pareto_front
from lightning_soup.errors import SoupError

LOSS0, LOSS1, ACC1 = "val/loss/dataloader_idx_0", "val/loss/dataloader_idx_1", "val/acc/dataloader_idx_1"


def _state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _perturbed(base: Mapping[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    """A stand-in fine-tune: parameters moved by seeded noise (buffers kept, so BatchNorm stays valid)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base.items():
        moved = v.is_floating_point() and "running" not in k
        out[k] = v + scale * torch.randn(v.shape, generator=g) if moved else v.clone()
    return out


def _save(sd: Mapping[str, torch.Tensor], folder: Path, name: str, kind: str) -> Path:
    """Write `sd` as a Lightning-style .ckpt, a .safetensors file or a sharded folder."""
    if kind == "ckpt":
        path = folder / f"{name}.ckpt"
        torch.save({"state_dict": dict(sd), "epoch": 1, "global_step": 10}, path)
        return path
    if kind == "safetensors":
        path = folder / f"{name}.safetensors"
        save_file(dict(sd), str(path))
        return path
    return storage.save_state_dict(dict(sd), folder / name, shard_size=600)


def _mean64(states: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        k: torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in states[0].items()
    }


class Reference:
    """Scores from a trainer of its own: ``trainer.validate`` on a fresh model holding the weights."""

    def __init__(self, root: Path, **model_kwargs: Any) -> None:
        self.trainer = pl.Trainer(**trainer_kwargs(root / "ref"))
        self.model = make_model(pl, seed=7, **model_kwargs)

    def metrics(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        self.model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        out: dict[str, float] = {}
        for d in self.trainer.validate(self.model, verbose=False):
            out.update(d)
        return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A trained base, five stand-in fine-tunes of it (one bad) in mixed formats, and two capability fine-tunes."""
    root = tmp_path_factory.mktemp("sweep")
    base_model = make_model(pl, seed=0, two_val_loaders=True)
    pl.Trainer(**trainer_kwargs(root, max_epochs=2)).fit(base_model)
    base = _state(base_model)
    kinds = ["ckpt", "safetensors", "sharded", "ckpt", "safetensors"]
    scales = [0.04, 0.06, 0.9, 0.05, 0.08]  # the third is the bad one
    states = [_perturbed(base, s, seed=10 + i) for i, s in enumerate(scales)]
    paths = [_save(sd, root, f"ft{i}", kind) for i, (sd, kind) in enumerate(zip(states, kinds))]
    caps = [_perturbed(base, 0.15, seed=100), _perturbed(base, 0.15, seed=101)]
    return {
        "root": root,
        "base": base,
        "base_path": _save(base, root, "base", "ckpt"),
        "states": states,
        "paths": paths,
        "caps": caps,
        "cap_paths": [_save(caps[0], root, "cap_a", "safetensors"), _save(caps[1], root, "cap_b", "sharded")],
    }


def _trainer(tmp_path: Path, **kw: Any) -> pl.Trainer:
    return pl.Trainer(**trainer_kwargs(tmp_path, **kw))


# -------------------------------------------------------------------------------------------------------- soup


def test_greedy_soup_equals_reference(sweep: dict[str, Any], tmp_path: Path) -> None:
    """Greedy soup over 5 fine-tunes (.ckpt, .safetensors, sharded; one bad) = the greedy rule over trainer.validate."""
    ref = Reference(tmp_path, two_val_loaders=True)
    states = sweep["states"]
    scores = [ref.metrics(s)[LOSS0] for s in states]
    order = sorted(range(len(states)), key=lambda i: scores[i])  # mode="min", stable
    members, soup_score, trace = [order[0]], scores[order[0]], []
    for i in order[1:]:
        candidate = ref.metrics(_mean64([states[j] for j in [*members, i]]))[LOSS0]
        if candidate <= soup_score:
            members, soup_score = [*members, i], candidate
        trace.append((i, candidate <= soup_score, soup_score))
    assert 2 not in members and 1 < len(members) < 5, "the sweep should make the greedy rule matter"
    expected = _mean64([states[j] for j in members])

    model = make_model(pl, seed=3, two_val_loaders=True)
    result = ls.soup(_trainer(tmp_path), model, [str(p) for p in sweep["paths"]], monitor=LOSS0, mode="min")

    written = load_file(result.path)
    for k, v in expected.items():
        torch.testing.assert_close(written[k], v, rtol=0, atol=2e-7)
        torch.testing.assert_close(model.state_dict()[k], written[k], rtol=0, atol=0)
    rows = result.recipe["checkpoints"]
    assert [r["path"] for r in rows] == [str(sweep["paths"][i]) for i in order]
    assert [r["score"] for r in rows] == pytest.approx([scores[i] for i in order], rel=1e-6)
    assert [r["accepted"] for r in rows[1:]] == [t[1] for t in trace]
    assert [r["soup_score"] for r in rows[1:]] == pytest.approx([t[2] for t in trace], rel=1e-5)
    assert result.metrics[LOSS0] == pytest.approx(soup_score, rel=1e-5)
    assert result.metrics == pytest.approx(ref.metrics(written), rel=1e-6)  # what trainer.validate says for the file
    on_disk = json.loads((tmp_path / "soup" / "soup.json").read_text())
    assert on_disk["checkpoints"] == rows and on_disk["method"] == "greedy_soup"
    assert storage.read_recipe(result.path)["soup_score"] == pytest.approx(soup_score, rel=1e-5)


def test_uniform_soup_equals_reference(sweep: dict[str, Any], tmp_path: Path) -> None:
    """Uniform soup = float64 mean of every checkpoint (glob input), scored; every checkpoint scored and recorded."""
    ref = Reference(tmp_path, two_val_loaders=True)
    expected = _mean64(sweep["states"])
    model = make_model(pl, seed=3, two_val_loaders=True)
    root = sweep["root"]
    result = ls.soup(_trainer(tmp_path), model, [str(root / "ft*.ckpt"), str(root / "ft1.safetensors"),
                     str(root / "ft2"), str(root / "ft4.safetensors")], monitor=LOSS0, mode="min", method="uniform")
    written = load_file(result.path)
    for k, v in expected.items():
        torch.testing.assert_close(written[k], v, rtol=0, atol=2e-7)
    rows = result.recipe["checkpoints"]
    assert len(rows) == 5 and all(r["accepted"] for r in rows)
    by_path = {r["path"]: r["score"] for r in rows}
    for i, state in enumerate(sweep["states"]):
        path = next(p for p in by_path if Path(p).stem == f"ft{i}" or Path(p).name == f"ft{i}")
        assert by_path[path] == pytest.approx(ref.metrics(state)[LOSS0], rel=1e-6)
    assert result.metrics[LOSS0] == pytest.approx(ref.metrics(expected)[LOSS0], rel=1e-5)


class _LoraTiny(pl.LightningModule):
    """A frozen linear layer plus a LoRA pair ``q.lora_A``/``q.lora_B`` (rank 2); logs ``val/loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(8, 3)
        self.q = torch.nn.Module()
        self.q.lora_A = torch.nn.Linear(8, 2, bias=False)
        self.q.lora_B = torch.nn.Linear(2, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.q.lora_B(self.q.lora_A(x))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", torch.nn.functional.cross_entropy(self(x), y))

    def val_dataloader(self) -> Any:
        from _models import make_data

        return torch.utils.data.DataLoader(make_data(32, seed=1), batch_size=16)


def test_uniform_soup_of_lora_checkpoints_averages_delta_w(tmp_path: Path) -> None:
    """Two runs with the same ΔW = B·A in different factors (A·2, B/2): the soup keeps ΔW, not the factors' mean."""
    torch.manual_seed(0)
    model = _LoraTiny()
    one = _state(model)
    two = {**one, "q.lora_A.weight": 2 * one["q.lora_A.weight"], "q.lora_B.weight": one["q.lora_B.weight"] / 2}
    paths = [_save(one, tmp_path, "one", "safetensors"), _save(two, tmp_path, "two", "ckpt")]
    result = ls.soup(_trainer(tmp_path), _LoraTiny(), [str(p) for p in paths], monitor="val/loss", mode="min",
                     method="uniform")
    written = load_file(result.path)
    delta = (one["q.lora_B.weight"].double() @ one["q.lora_A.weight"].double())
    torch.testing.assert_close((written["q.lora_B.weight"].double() @ written["q.lora_A.weight"].double()), delta,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(written["base.weight"], one["base.weight"])


@pytest.mark.parametrize("allow_unrelated", [True, False])
def test_each_checkpoint_read_at_most_twice(sweep: dict[str, Any], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, allow_unrelated: bool) -> None:
    """Two reads (scores, greedy pass); the shared-base check before the first validation costs one more."""
    from lightning_soup._storage import _read

    reads: dict[str, int] = {}
    original = _read.LazyStateDict.__getitem__

    def counted(self: Any, key: str) -> torch.Tensor:
        reads[f"{Path(self.path).name}:{key}"] = reads.get(f"{Path(self.path).name}:{key}", 0) + 1
        return original(self, key)

    monkeypatch.setattr(_read.LazyStateDict, "__getitem__", counted)
    model = make_model(pl, seed=3, two_val_loaders=True)
    ls.soup(_trainer(tmp_path), model, [str(p) for p in sweep["paths"]], monitor=LOSS0, mode="min",
            allow_unrelated=allow_unrelated)
    assert reads and max(reads.values()) == (2 if allow_unrelated else 3)


def test_unrelated_inputs_refused_before_any_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint from another random initialisation is refused by name (soup and compose), unless allowed."""
    base = _state(make_model(pl, seed=0, hidden=128))
    related = _save(_perturbed(base, 0.02, seed=1), tmp_path, "related", "safetensors")
    stranger = _save(_state(make_model(pl, seed=99, hidden=128)), tmp_path, "stranger", "ckpt")
    base_path = _save(base, tmp_path, "base", "safetensors")
    trainer = _trainer(tmp_path)
    monkeypatch.setattr(trainer, "validate", lambda *a, **k: pytest.fail("validated before checking the input"))
    model = make_model(pl, seed=3, hidden=128)
    with pytest.raises(SoupError, match="stranger"):
        ls.soup(trainer, model, [str(related), str(stranger)], monitor="val/loss", mode="min")
    with pytest.raises(SoupError, match="stranger"):
        ls.compose(trainer, model, str(base_path), [str(related), str(stranger)], monitor="val/loss", mode="min")
    monkeypatch.undo()
    ls.soup(_trainer(tmp_path), model, [str(related), str(stranger)], monitor="val/loss", mode="min",
            method="uniform", allow_unrelated=True)


@pytest.mark.parametrize("which", ["soup", "compose"])
def test_failure_during_candidates_restores_the_original_weights(sweep: dict[str, Any], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    model = make_model(pl, seed=3, two_val_loaders=True)
    before = _state(model)
    trainer = _trainer(tmp_path)
    calls = {"n": 0}
    validate = trainer.validate

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == (7 if which == "soup" else 5):  # the second candidate
            raise KeyboardInterrupt
        return validate(*args, **kwargs)

    monkeypatch.setattr(trainer, "validate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        if which == "soup":
            ls.soup(trainer, model, [str(p) for p in sweep["paths"]], monitor=LOSS0, mode="min")
        else:
            ls.compose(trainer, model, str(sweep["base_path"]), [str(p) for p in sweep["cap_paths"]],
                       scales=[0.3, 0.6, 0.9], monitor=LOSS0, mode="min")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not list((tmp_path / "soup").glob("*.safetensors"))


def test_monitor_not_logged_fails_after_the_first_validation(sweep: dict[str, Any], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(pl, seed=3, two_val_loaders=True)
    before = _state(model)
    trainer = _trainer(tmp_path)
    calls = {"n": 0}
    validate = trainer.validate

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return validate(*args, **kwargs)

    monkeypatch.setattr(trainer, "validate", counted)
    with pytest.raises(SoupError, match=r"does not log 'val/acc'.*'val/acc/dataloader_idx_0'"):
        ls.soup(trainer, model, [str(p) for p in sweep["paths"]], monitor="val/acc")
    assert calls["n"] == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t, m, s: ls.soup(t, m, [], monitor=LOSS0), "`checkpoints` is empty"),
        (lambda t, m, s: ls.soup(t, m, str(s["root"] / "nope*.ckpt"), monitor=LOSS0), "matches nothing"),
        (lambda t, m, s: ls.soup(t, m, [str(s["paths"][0]), str(s["paths"][0])], monitor=LOSS0), "twice"),
        (lambda t, m, s: ls.soup(t, m, [str(s["paths"][0])], monitor=LOSS0, method="best"), "`method` must be"),
        (lambda t, m, s: ls.soup(t, m, [str(s["paths"][0])], monitor=LOSS0, mode="up"), "`mode` must be"),
        (lambda t, m, s: ls.soup(t, make_model(pl, hidden=8, two_val_loaders=True), [str(s["paths"][0])],
                                 monitor=LOSS0), "shape"),
        (lambda t, m, s: ls.compose(t, m, s["base_path"], s["cap_paths"], method="model_stock", scales=[0.5],
                                    monitor=LOSS0), "no scale"),
        (lambda t, m, s: ls.compose(t, m, s["base_path"], s["cap_paths"], scales=[(0.5, 0.5, 0.5)],
                                    monitor=LOSS0), "must hold 2 finite numbers"),
        (lambda t, m, s: ls.compose(t, m, s["base_path"], s["cap_paths"], scales=[0.5, (0.5, 0.5)],
                                    monitor=LOSS0), "not a mix"),
        (lambda t, m, s: ls.compose(t, m, s["base_path"], s["cap_paths"], method="ties", density=0.0,
                                    monitor=LOSS0), "density"),
        (lambda t, m, s: ls.compose(t, m, s["base_path"], s["cap_paths"], constraint="val/x >> 2",
                                    monitor=LOSS0), "could not be parsed"),
        (lambda t, m, s: ls.compose(t, m, s["base_path"], s["cap_paths"], method="magic", monitor=LOSS0),
         "`method` must be"),
        (lambda t, m, s: ls.compose(t, m, s["base_path"], [s["base_path"], s["cap_paths"][0]], monitor=LOSS0),
         "the base itself"),
    ],
)
def test_bad_input_fails_before_any_validation(sweep: dict[str, Any], tmp_path: Path, call: Any, message: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = _trainer(tmp_path)
    monkeypatch.setattr(trainer, "validate", lambda *a, **k: pytest.fail("validated before checking the input"))
    with pytest.raises(SoupError, match=message):
        call(trainer, make_model(pl, two_val_loaders=True), sweep)


class _Recorder(pl.loggers.Logger):
    """A logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[dict[str, float]] = []

    name, version = "recorder", 0

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.logged.append(dict(metrics))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


@pytest.mark.parametrize("log", [False, True])
def test_loggers_untouched_unless_asked(sweep: dict[str, Any], tmp_path: Path, log: bool) -> None:
    recorder = _Recorder()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, logger=recorder))
    result = ls.soup(trainer, make_model(pl, seed=3, two_val_loaders=True), [str(p) for p in sweep["paths"][:2]],
                     monitor=LOSS0, mode="min", log=log)
    assert trainer.loggers == [recorder]
    if not log:
        assert recorder.logged == []
    else:
        assert {f"soup/{LOSS0}": pytest.approx(result.metrics[LOSS0])}.items() <= recorder.logged[-1].items()
        assert sum(1 for m in recorder.logged if LOSS0 in m) == 3  # 2 checkpoints and 1 candidate validated


def test_constraint_on_a_metric_not_logged(sweep: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(SoupError, match=r"does not log 'val/nope'.*it logs: \['val/acc/dataloader_idx_0'"):
        ls.compose(_trainer(tmp_path), make_model(pl, two_val_loaders=True), sweep["base_path"], sweep["cap_paths"],
                   monitor=LOSS0, mode="min", constraint="val/nope>=0.5")


# ----------------------------------------------------------------------------------------------------- compose


def _ties64(base: torch.Tensor, deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES in float64: trim each delta to its top-k magnitudes, elect signs by the sum, disjoint mean."""
    k = max(1, math.floor(density * base.numel()))
    trimmed = []
    for d in deltas:
        flat = d.reshape(-1)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.abs().topk(k).indices] = True
        trimmed.append(torch.where(keep, flat, torch.zeros_like(flat)))
    stacked = torch.stack(trimmed)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (stacked != 0) & (torch.sign(stacked) == sign)
    count = agree.sum(0)
    merged = torch.where(count > 0, (stacked * agree).sum(0) / count.clamp(min=1), torch.zeros_like(sign))
    return merged.reshape(base.shape)


def _reference_candidate(method: str, base: Mapping[str, torch.Tensor], fts: list[Mapping[str, torch.Tensor]],
                         scale: float | tuple[float, ...], density: float) -> dict[str, torch.Tensor]:
    lambdas = scale if isinstance(scale, tuple) else (scale,) * len(fts)
    out = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = (fts[0] if method == "ties" else base)[k].clone()
            continue
        deltas = [f[k].double() - b.double() for f in fts]
        if method == "task_arithmetic":
            merged = sum(lam * d for lam, d in zip(lambdas, deltas))
        elif isinstance(scale, tuple):  # each τᵢ scaled first, TIES at scale 1
            merged = _ties64(b, [lam * d for lam, d in zip(lambdas, deltas)], density)
        else:
            merged = scale * _ties64(b, deltas, density)
        out[k] = (b.double() + merged).to(b.dtype)
    return out


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("scales", [[0.2, 0.6, 1.2], [(0.3, 0.9), (0.9, 0.3), (1.2, 0.2)]],
                         ids=["shared", "per-fine-tune"])
def test_compose_picks_the_reference_choice_under_a_binding_constraint(
    sweep: dict[str, Any], tmp_path: Path, method: str, scales: list[Any]
) -> None:
    ref = Reference(tmp_path, two_val_loaders=True)
    base, caps, density = sweep["base"], sweep["caps"], 0.3
    candidates = [_reference_candidate(method, base, caps, s, density) for s in scales]
    rows = [ref.metrics(c) for c in candidates]
    best = min(range(len(rows)), key=lambda i: rows[i][LOSS0])
    # a bound on the other capability that the unconstrained best just misses, on whichever side leaves some feasible
    for op in ("<=", ">="):
        threshold = rows[best][LOSS1] + (-1e-6 if op == "<=" else 1e-6)
        feasible = [i for i in range(len(rows)) if (rows[i][LOSS1] <= threshold if op == "<=" else
                                                   rows[i][LOSS1] >= threshold)]
        if feasible:
            break
    assert feasible and best not in feasible
    expected = min(feasible, key=lambda i: (rows[i][LOSS0], i))

    model = make_model(pl, seed=3, two_val_loaders=True)
    result = ls.compose(_trainer(tmp_path), model, str(sweep["base_path"]), [str(p) for p in sweep["cap_paths"]],
                        method=method, scales=scales, density=density, monitor=LOSS0, mode="min",
                        constraint=f"{LOSS1}{op}{threshold!r}")
    assert result.recipe["index"] == expected and result.recipe["constraint_met"] is True
    got = result.recipe["candidates"]
    assert [c["metrics"][LOSS0] for c in got] == pytest.approx([r[LOSS0] for r in rows], rel=1e-5)
    assert [c["meets_constraint"] for c in got] == [i in feasible for i in range(len(rows))]
    written = load_file(result.path)
    for k, v in candidates[expected].items():
        torch.testing.assert_close(written[k], v, rtol=0, atol=3e-7)
    assert result.metrics == pytest.approx(rows[expected], rel=1e-5)
    # the references: the base and each fine-tune alone
    refs = result.recipe["references"]
    assert [r["name"] for r in refs] == ["base", "finetuned[0]", "finetuned[1]"]
    for r, state in zip(refs, [base, *caps]):
        assert r["metrics"] == pytest.approx(ref.metrics(state), rel=1e-6)
    assert (tmp_path / "soup" / "compose.json").exists() and result.plot == tmp_path / "soup" / "compose.png"


@pytest.mark.slow
def test_compose_tuple_of_equal_scales_equals_the_shared_scale(sweep: dict[str, Any], tmp_path: Path) -> None:
    model = make_model(pl, seed=3, two_val_loaders=True)
    args = (str(sweep["base_path"]), [str(p) for p in sweep["cap_paths"]])
    shared = ls.compose(_trainer(tmp_path), model, *args, method="ties", scales=[0.7], monitor=LOSS0, mode="min",
                        dirpath=str(tmp_path / "a"))
    per = ls.compose(_trainer(tmp_path), model, *args, method="ties", scales=[(0.7, 0.7)], monitor=LOSS0, mode="min",
                     dirpath=str(tmp_path / "b"))
    a, b = load_file(shared.path), load_file(per.path)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["dare", "tsv", "iso_c", "iso_cts", "model_stock"])
def test_compose_dispatches_every_method(sweep: dict[str, Any], tmp_path: Path, method: str) -> None:
    """The other methods run through lightning_soup.merge by name; a tuple scales each τᵢ first, then scale 1."""
    from lightning_soup import merge

    base, caps = sweep["base"], sweep["caps"]
    scales = None if method == "model_stock" else [(0.5, 1.0)]
    result = ls.compose(_trainer(tmp_path), make_model(pl, seed=3, two_val_loaders=True), str(sweep["base_path"]),
                        [str(p) for p in sweep["cap_paths"]], method=method, scales=scales, density=0.5, seed=3,
                        monitor=LOSS0, mode="min")
    scaled = [{k: (b.double() + lam * (ft[k].double() - b.double())).float() if b.is_floating_point() else b
               for k, b in base.items()} for ft, lam in zip(caps, (0.5, 1.0))]
    expected = {
        "dare": lambda: merge.dare(base, scaled, 0.5, scale=1.0, seed=3),
        "tsv": lambda: merge.tsv_merge(base, scaled, alpha=1.0),
        "iso_c": lambda: merge.iso_c(base, scaled, alpha=1.0),
        "iso_cts": lambda: merge.iso_cts(base, scaled, alpha=1.0),
        "model_stock": lambda: merge.model_stock(base, caps),
    }[method]()
    written = load_file(result.path)
    for k, v in expected.items():
        torch.testing.assert_close(written[k], v, rtol=1e-5, atol=1e-6)
    assert len(result.recipe["candidates"]) == 1 and result.recipe["method"] == method


def test_compose_falls_back_to_the_closest_candidate(sweep: dict[str, Any], tmp_path: Path) -> None:
    model = make_model(pl, seed=3, two_val_loaders=True)
    with pytest.warns(UserWarning, match="no candidate satisfies"):
        result = ls.compose(_trainer(tmp_path), model, str(sweep["base_path"]), [str(p) for p in sweep["cap_paths"]],
                            scales=[0.2, 0.6, 1.0], monitor=LOSS0, mode="min", constraint=f"{LOSS1}<=0.0001")
    losses = [c["metrics"][LOSS1] for c in result.recipe["candidates"]]
    assert result.recipe["fallback"] is True and result.recipe["index"] == losses.index(min(losses))


def test_compose_figure_marks_the_pareto_front() -> None:
    assert pareto_front([(0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1)], (True, True)) == [0, 1, 3]
    assert pareto_front([(0.1, 0.9), (0.5, 0.5), (0.4, 0.4)], (False, True)) == [0]
    recipe = {"method": "ties", "monitor": "m", "constraint": ["a>=0.5", "b<=0.5"], "index": 1,
              "references": [{"name": "base", "metrics": {"m": 0.1, "a": 0.2, "b": 0.9}}],
              "candidates": [{"scales": s, "metrics": {"m": s, "a": s, "b": s / 2}} for s in (0.3, 0.6, 0.9)]}
    figure = compose_figure(recipe)
    trade_off = figure.axes[-1]
    assert trade_off.get_xlabel() == "a" and trade_off.get_ylabel() == "b"
    labels = [t.get_text() for t in trade_off.get_legend().get_texts()]
    assert {"Pareto front", "chosen", "base", "constraint met"} <= set(labels)


# ------------------------------------------------------------------------------------------ DDP and SoupCLI


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soup_and_compose_under_ddp(sweep: dict[str, Any], tmp_path: Path) -> None:
    """2 CPU processes: every rank validates, rank zero decides (broadcast), one file; = the rank-zero reference."""
    ranks = launch("posthoc_ddp.py", tmp_path, str(sweep["root"]), timeout=240)
    assert ranks[0]["soup_recipe"] == ranks[1]["soup_recipe"]
    assert ranks[0]["compose_recipe"] == ranks[1]["compose_recipe"]
    assert ranks[0]["members"] == ranks[0]["soup_members"]
    assert ranks[0]["soup_recipe"]["soup_score"] == pytest.approx(ranks[0]["reference_score"], rel=1e-5)
    written = load_file(tmp_path / "soup" / "soup.safetensors")
    reference = load_file(tmp_path / "reference.safetensors")
    for rank in range(2):
        module = load_file(tmp_path / f"module_rank{rank}.safetensors")
        for k in written:
            torch.testing.assert_close(module[k], written[k], rtol=0, atol=0)
    for k in written:
        torch.testing.assert_close(written[k], reference[k], rtol=0, atol=2e-7)
    assert ranks[0]["commits"] > 0 and ranks[1]["commits"] == 0  # one writer


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soup_cli_from_yaml(sweep: dict[str, Any], tmp_path: Path) -> None:
    """`soup_cli.py soup --config cfg.yaml` in a subprocess = the soup() call on the same inputs."""
    example = ROOT / "examples" / "soup_cli.py"
    sys.path.insert(0, str(example.parent))
    try:
        import soup_cli
    finally:
        sys.path.remove(str(example.parent))
    data = soup_cli.DigitsDataModule()
    torch.manual_seed(0)
    base = _state(soup_cli.DigitsClassifier(hidden=16))
    paths = [_save(_perturbed(base, 0.05, seed=i), tmp_path, f"run{i}", kind)
             for i, kind in enumerate(["ckpt", "safetensors", "sharded"])]
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"seed_everything: 0\ntrainer:\n  accelerator: cpu\n  devices: 1\n  logger: false\n"
        f"  enable_progress_bar: false\n  default_root_dir: {tmp_path / 'cli'}\n"
        f"model:\n  hidden: 16\ncheckpoints: ['{tmp_path}/run*']\nmonitor: val/new_acc\n"
    )
    run = subprocess.run([sys.executable, str(example), "soup", "--config", str(config), "--mode", "max"],
                         capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    written = load_file(tmp_path / "cli" / "soup" / "soup.safetensors")

    model = soup_cli.DigitsClassifier(hidden=16)
    expected = ls.soup(_trainer(tmp_path), model, [str(p) for p in paths], monitor="val/new_acc", datamodule=data,
                       dirpath=str(tmp_path / "direct"))
    reference = load_file(expected.path)
    assert written.keys() == reference.keys()
    for k in written:
        torch.testing.assert_close(written[k], reference[k], rtol=0, atol=0)
    recipe = json.loads((tmp_path / "cli" / "soup" / "soup.json").read_text())
    assert recipe["checkpoints"] == expected.recipe["checkpoints"]
