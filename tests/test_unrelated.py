"""Unrelated models are refused, real fine-tunes never: every merge function, every CLI command, ``inspect``.

Models are tiny and trained here (a GPT-2 from a transformers config, an MLP), so the fine-tunes are real ones:
a fine-tune of the base on another task, one that trained a freshly initialised head, and one run's checkpoints
from scratch at a high learning rate. "Unrelated" is an independent initialisation of the same architecture.
The figures in the messages are checked against a float64 computation made here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_soup import SoupError, merge
from lightning_soup.cli import main

transformers = pytest.importorskip("transformers")

# ------------------------------------------------------------------------------------------------ models


def _gpt2(seed: int, vocab: int = 128) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_positions=16, n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=False
    )
    return transformers.GPT2LMHeadModel(cfg)


def _tokens(task: int, steps: int, vocab: int = 128) -> list[Tensor]:
    """Batches of a fixed random Markov chain per task (next-token prediction has something to learn)."""
    g = torch.Generator().manual_seed(task)
    trans = torch.randn(vocab, vocab, generator=g).mul(3).softmax(-1)
    out = []
    for _ in range(steps):
        x = torch.empty(8, 16, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (8,), generator=g)
        for t in range(1, 16):
            x[:, t] = torch.multinomial(trans[x[:, t - 1]], 1, generator=g).squeeze(1)
        out.append(x)
    return out


def _train_lm(model: nn.Module, task: int, steps: int, lr: float) -> dict[str, Tensor]:
    opt = torch.optim.Adam(model.parameters(), lr)
    for x in _tokens(task, steps):
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    return _state(model)


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def lm() -> dict[str, dict[str, Tensor]]:
    """``base`` (pretrained on task 0), fine-tunes on task 1 (``ft``, ``fresh``: new lm_head), ``other``."""
    torch.set_num_threads(1)
    base_model = _gpt2(0)
    base = _train_lm(base_model, 0, 30, 1e-3)
    ft_model = _gpt2(0)
    ft_model.load_state_dict(base)
    ft = _train_lm(ft_model, 1, 30, 1e-3)
    fresh_model = _gpt2(0)
    fresh_model.load_state_dict(base)
    torch.manual_seed(7)
    nn.init.normal_(fresh_model.lm_head.weight, std=0.02)  # a head trained from scratch
    fresh = _train_lm(fresh_model, 1, 30, 1e-3)
    return {"base": base, "ft": ft, "fresh": fresh, "other": _state(_gpt2(1))}


@pytest.fixture(scope="module")
def run_checkpoints() -> list[dict[str, Tensor]]:
    """One from-scratch MLP run at a high learning rate: a checkpoint every 10 steps."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)
    )
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 8, generator=g)
    snaps = []
    for step in range(1, 61):
        x = torch.randn(32, 16, generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), (x @ teacher).argmax(1)).backward()
        opt.step()
        if step % 10 == 0:
            snaps.append(_state(model))
    return snaps


def ref_worst_tensor(ref: dict[str, Tensor], model: dict[str, Tensor]) -> str:
    """The tensor a message names: the largest (centered energy in `ref`) whose own cosine is below the limit."""
    ranked = []
    for k, r in ref.items():
        if r.is_floating_point() and r.numel() > 1:
            y, x = r.double().flatten(), model[k].double().flatten()
            y, x = y - y.mean(), x - x.mean()
            if float(y.norm()) > 0:
                denominator = float(x.norm() * y.norm())
                ranked.append((float(y @ y), float(x @ y) / denominator if denominator else math.nan, k))
    low = [item for item in ranked if not item[1] >= merge._related.MIN_COSINE]
    return max(low or ranked)[2]


def ref_figures(ref: dict[str, Tensor], model: dict[str, Tensor]) -> tuple[float, float]:
    """Centered whole-model cosine and ‖θ − ref‖/‖ref‖ in float64, over the tensors not constant in `ref`."""
    xy = xx = yy = dd = 0.0
    for k, r in ref.items():
        if not r.is_floating_point() or r.numel() < 2:
            continue
        y = r.double().flatten()
        y = y - y.mean()
        if float(y.norm()) == 0.0:
            continue
        x = model[k].double().flatten()
        x = x - x.mean()
        xy += float(x @ y)
        xx += float(x @ x)
        yy += float(y @ y)
        dd += float((x - y) @ (x - y))
    return xy / math.sqrt(xx * yy), math.sqrt(dd / yy)


# ------------------------------------------------------------------------------------------------ the core

#: every merge function: (name, call on (base or first input, [the others]))
CALLS = {
    "uniform_soup": lambda b, fts, **kw: merge.uniform_soup([b, *fts], **kw),
    "weighted_average": lambda b, fts, **kw: merge.weighted_average([b, *fts], [1.0] * (1 + len(fts)), **kw),
    "slerp": lambda b, fts, **kw: merge.slerp(b, fts[-1], 0.5, **kw),
    "interpolate": lambda b, fts, **kw: merge.interpolate(b, fts[-1], 0.5, **kw),
    "task_vector": lambda b, fts, **kw: merge.task_vector(fts[-1], b, **kw),
    "task_arithmetic": lambda b, fts, **kw: merge.task_arithmetic(
        b, [merge.task_vector(f, b, allow_unrelated=True) for f in fts], 0.5, **kw
    ),
    "ties": lambda b, fts, **kw: merge.ties(b, fts, 0.5, **kw),
    "dare": lambda b, fts, **kw: merge.dare(b, fts, 0.5, **kw),
    "tsv_merge": lambda b, fts, **kw: merge.tsv_merge(b, fts, **kw),
    "iso_c": lambda b, fts, **kw: merge.iso_c(b, fts, **kw),
    "iso_cts": lambda b, fts, **kw: merge.iso_cts(b, fts, **kw),
    "model_stock": lambda b, fts, **kw: merge.model_stock(b, fts, **kw),
}
#: how each function calls the unrelated input in its message
UNRELATED_NAME = {
    "uniform_soup": "state_dicts[2]",
    "weighted_average": "state_dicts[2]",
    "slerp": "b",
    "interpolate": "model",
    "task_vector": "finetuned",
    "task_arithmetic": "base + task_vectors[1]",
}


@pytest.mark.parametrize("function", list(CALLS))
def test_every_function_refuses_an_independent_init_and_names_it(lm: dict, function: str) -> None:
    base, ft, other = lm["base"], lm["ft"], lm["other"]
    with pytest.raises(SoupError) as info:
        CALLS[function](base, [ft, other])
    message = str(info.value)
    name = UNRELATED_NAME.get(function, "finetuned[1]")
    cosine, distance = ref_figures(base, other)
    assert abs(cosine) < 0.05 and distance > 1  # what independent inits look like
    assert f"`{name}`" in message
    assert f"cosine similarity to it is {cosine:.4f}" in message
    assert f"‖θ − ref‖ / ‖ref‖ is {distance:.2f}" in message
    assert f"largest such tensor: {ref_worst_tensor(base, other)!r}" in message
    assert "allow_unrelated=True" in message
    # the override merges them anyway
    CALLS[function](base, [ft, other], allow_unrelated=True)


@pytest.mark.parametrize("function", list(CALLS))
def test_real_fine_tunes_are_never_refused(lm: dict, function: str) -> None:
    base, ft, fresh = lm["base"], lm["ft"], lm["fresh"]
    cosine, _ = ref_figures(base, fresh)
    # a fresh head is one unrelated tensor among related ones: it lowers the figure, the model is still related
    assert cosine < ref_figures(base, ft)[0]
    assert cosine > merge._related.MIN_COSINE
    CALLS[function](base, [ft, fresh])


def test_the_override_gives_the_plain_formula(lm: dict) -> None:
    base, other = lm["base"], lm["other"]
    out = merge.interpolate(base, other, 0.3, allow_unrelated=True)
    for k, b in base.items():
        if b.is_floating_point():
            ref = b.double() + 0.3 * (other[k].double() - b.double())
            torch.testing.assert_close(out[k].double(), ref, rtol=0, atol=1e-6)


def test_one_runs_checkpoints_are_never_refused(run_checkpoints: list) -> None:
    first, last = run_checkpoints[0], run_checkpoints[-1]
    merge.uniform_soup(run_checkpoints)
    merge.weighted_average(run_checkpoints, list(range(1, len(run_checkpoints) + 1)))
    merge.slerp(first, last, 0.5)
    merge.interpolate(first, last, 0.5)
    assert ref_figures(last, first)[0] > merge._related.MIN_COSINE


def test_constant_tensors_do_not_make_independent_inits_look_related(lm: dict) -> None:
    # LayerNorm weights are ones and biases zeros in every init: uncentered, they make independent inits look
    # more similar to each other than a fine-tune with a fresh head is to its base
    def plain(a: dict, b: dict) -> float:
        keys = [k for k in a if a[k].is_floating_point()]
        dot = sum(float(a[k].double().flatten() @ b[k].double().flatten()) for k in keys)
        na = math.sqrt(sum(float(a[k].double().pow(2).sum()) for k in keys))
        nb = math.sqrt(sum(float(b[k].double().pow(2).sum()) for k in keys))
        return dot / (na * nb)

    init0 = _state(_gpt2(0))
    assert plain(init0, lm["other"]) > 0.5
    rel = merge._related.Relatedness(["other"], "init")
    for k, t in init0.items():
        rel.update(k, t, [lm["other"][k]])
    (r,) = rel.relations()
    assert abs(r.cosine) < 0.05 and r.judged and not r.related


def test_streaming_key_by_key_and_chunked_equals_the_whole(lm: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    base, ft, other = lm["base"], lm["ft"], lm["other"]
    whole = merge._related.Relatedness(["ft", "other"], "base")
    for k in base:
        whole.update(k, base[k], [ft[k], other[k]])
    monkeypatch.setattr(merge._related, "_CHUNK", 97)  # many chunks per tensor (float32 sums), reversed key order
    monkeypatch.setattr(merge._related, "_RUNS", 10**9)  # every chunk measured (no sampling of large tensors)
    streamed = merge._related.Relatedness(["ft", "other"], "base")
    for k in reversed(list(base)):
        if base[k].is_floating_point():
            streamed.update_deltas(k, base[k], [ft[k] - base[k], other[k] - base[k]])
    for a, b, sd in zip(whole.relations(), streamed.relations(), (ft, other)):
        cosine, distance = ref_figures(base, sd)
        assert a.cosine == pytest.approx(cosine, abs=1e-6) and b.cosine == pytest.approx(cosine, abs=1e-6)
        assert a.distance == pytest.approx(distance, abs=1e-6) and b.distance == pytest.approx(distance, abs=1e-6)


def test_toy_state_dicts_are_not_judged() -> None:
    # a few dozen entries cannot tell related from unrelated: neither refused nor vouched for
    a, b = {"w": torch.randn(6, 4)}, {"w": torch.randn(6, 4)}
    merge.uniform_soup([a, b])
    rel = merge._related.Relatedness(["b"], "a")
    rel.update("w", a["w"], [b["w"]])
    assert not rel.relations()[0].judged


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def files(lm: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for name, sd in lm.items():
        paths[name] = str(folder / f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, paths[name])
    wide = _state(_gpt2(0, vocab=130))
    paths["vocab130"] = str(folder / "vocab130.safetensors")
    save_file(wide, paths["vocab130"])
    return paths


def _argv(command: str, p: dict[str, str], second: str) -> list[str]:
    if command == "average":
        return ["average", p["ft"], p[second]]
    if command == "blend":
        return ["blend", "--anchor", p["base"], "--model", p[second], "--ratio", "0.5"]
    if command == "slerp":
        return ["slerp", p["ft"], p[second], "--t", "0.5"]
    extra = {
        "task-arithmetic": ["--scales", "0.5"],
        "ties": ["--density", "0.5"],
        "dare": ["--density", "0.5"],
    }.get(command, [])
    return [command, "--base", p["base"], p["ft"], p[second], *extra]


COMMANDS = ["average", "blend", "slerp", "task-arithmetic", "ties", "dare", "tsv", "iso-c", "iso-cts", "model-stock"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_unrelated_inputs_and_writes_nothing(
    files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    out = tmp_path / "out.safetensors"
    rc = main([*_argv(command, files, "other"), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"`{files['other']}`" in err and "cosine similarity" in err and "--allow-unrelated" in err
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left

    rc = main([*_argv(command, files, "other"), "-o", str(out), "-q", "--allow-unrelated"])
    assert rc == 0, capsys.readouterr().err
    with safe_open(str(out), "pt") as f:
        recipe = json.loads(f.metadata()["lightning_soup"])
    assert recipe["allow_unrelated"] is True


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_merges_real_fine_tunes(
    files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    rc = main([*_argv(command, files, "fresh"), "-o", str(tmp_path / "out.safetensors"), "-q"])
    assert rc == 0, capsys.readouterr().err


def test_inspect_exit_codes(files: dict, lm: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", files["ft"], files["fresh"], "--base", files["base"]]) == 0
    out = capsys.readouterr().out
    assert "✓ shares the base" in out and "does not share" not in out

    assert main(["inspect", files["ft"], files["other"], "--base", files["base"]]) == 1
    out = capsys.readouterr().out
    assert "✗ does not share the base" in out and repr(ref_worst_tensor(lm["base"], lm["other"])) in out

    assert main(["inspect", files["ft"], files["other"], "--base", files["base"], "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    cosine, distance = ref_figures(_load(files["base"]), _load(files["other"]))
    assert doc["unrelated"] == [files["other"]] and doc["compatible"] is True
    other = next(r for r in doc["related"] if r["model"] == files["other"])
    assert other["cosine"] == pytest.approx(cosine, abs=1e-6)
    assert other["distance"] == pytest.approx(distance, abs=1e-6)

    # different vocabulary sizes: reported as not compatible, and the exit status says so
    assert main(["inspect", files["base"], files["vocab130"]]) == 1
    assert "not compatible" in capsys.readouterr().out
    assert main(["inspect", files["base"], files["ft"]]) == 0


def _load(path: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def test_large_tensors_are_judged_on_evenly_spaced_samples() -> None:
    """A tensor of more than 2 Mi entries is measured on 8 evenly spaced runs, not read whole: the figures stay those
    of the whole tensor to within their noise, so an independent init is still refused and a fine-tune (the base
    plus a small update, one run of rows moved a lot) still passes, while the check reads about a third of it."""
    from lightning_soup.merge import _related

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6000, 1000, generator=g)}  # 6 Mi entries
    tuned = {"w": base["w"] + 0.3 * torch.randn(6000, 1000, generator=g)}
    tuned["w"][:500] = torch.randn(500, 1000, generator=g)  # a freshly initialised block
    other = {"w": torch.randn(6000, 1000, generator=g)}
    ranges = _related._measured_ranges(base["w"].numel())
    assert sum(b - a for a, b in ranges) <= base["w"].numel() / 2
    for model, related in ((tuned, True), (other, False)):
        cosine, _ = ref_figures(base, model)
        stats = _related.Relatedness(["model"], "base")
        stats.update("w", base["w"], [model["w"]])
        (relation,) = stats.relations()
        assert relation.related is related
        # the whole tensor's figure, measured in float64; the fresh block is 1/12 of the tensor but 1/8 of the runs
        assert relation.cosine == pytest.approx(cosine, abs=0.05)
    with pytest.raises(SoupError, match="does not look fine-tuned"):
        merge.interpolate(base, other, 0.5)
    merge.interpolate(base, tuned, 0.5)
