"""The plain merges route PEFT LoRA pairs through ΔW = scaling·B·A; the others refuse them.

References are dense float64 updates and their Eckart–Young best rank-r approximations (numpy SVD), written here.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lightning_soup import SoupError, storage
from lightning_soup.merge import (
    dare,
    interpolate,
    iso_c,
    iso_cts,
    model_stock,
    slerp,
    task_arithmetic,
    task_vector,
    ties,
    tsv_merge,
    uniform_soup,
    weighted_average,
)

R, SCALING = 4, 2.0  # PEFT's lora_alpha / r: shared by every input, so it factors out of each merge
P = "base_model.model."
#: (module, A key, B key, B shape, A shape): a Linear pair, an Embedding pair, a pair of a saved adapter (no name)
PAIRS = [
    ("q", f"{P}q.lora_A.default.weight", f"{P}q.lora_B.default.weight", (12, R), (R, 10)),
    ("wte", f"{P}wte.lora_embedding_A.default", f"{P}wte.lora_embedding_B.default", (8, R), (R, 20)),
    ("fc", f"{P}fc.lora_A.weight", f"{P}fc.lora_B.weight", (6, R), (R, 9)),
]
FACTOR_KEYS = {k for _, a, b, _, _ in PAIRS for k in (a, b)}
# ordinary keys: a frozen base weight, a trained norm, a lone lora_A without its B and a LoRA bias (not factors),
# an integer buffer
BASE_W, NORM, ORPHAN, BIAS, STEPS = (f"{P}q.base_layer.weight", f"{P}norm.weight", f"{P}x.lora_A.default.weight",
                                     f"{P}q.lora_B.default.bias", f"{P}steps")


def adapter_sd(seed: int, fresh: bool = False) -> dict[str, torch.Tensor]:
    """A PeftModel-style state dict: independent random factors per seed (B = 0 when `fresh`), one shared base."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {BASE_W: torch.linspace(-1, 1, 120).reshape(12, 10)}
    for _, a_key, b_key, b_shape, a_shape in PAIRS:
        sd[a_key] = torch.randn(a_shape, generator=g)
        sd[b_key] = torch.zeros(b_shape) if fresh else torch.randn(b_shape, generator=g)
    sd[NORM] = 1 + 0.01 * torch.randn(5, generator=g)
    sd[ORPHAN] = torch.randn(3, 4, generator=g)
    sd[BIAS] = torch.randn(12, generator=g)
    sd[STEPS] = torch.tensor(seed)
    return sd


def dense(sd, a_key: str, b_key: str) -> np.ndarray:
    """ΔW = scaling·B@A in float64 (B@A in the factors' own layout; embeddings' transpose changes no norm)."""
    return SCALING * sd[b_key].double().numpy() @ sd[a_key].double().numpy()


def best_rank(m: np.ndarray, r: int = R) -> np.ndarray:
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def tail(m: np.ndarray, r: int = R) -> float:
    s = np.linalg.svd(m, compute_uv=False)
    return float(np.linalg.norm(s[r:]) / np.linalg.norm(s))


def assert_pairs_are_best_rank_r(out, exact_of, tol: float = 2e-5) -> dict[str, float]:
    """Every pair of `out` is the Eckart–Young optimum of its exact ΔW; returns each pair's optimal error."""
    errors = {}
    for module, a_key, b_key, b_shape, a_shape in PAIRS:
        assert out[b_key].shape == b_shape and out[a_key].shape == a_shape
        exact = exact_of(a_key, b_key)
        got = dense(out, a_key, b_key)
        assert np.linalg.norm(got - best_rank(exact)) / np.linalg.norm(exact) < tol, module
        errors[module] = tail(exact)
    return errors


def ordinary(sd):
    return {k: v for k, v in sd.items() if k not in FACTOR_KEYS}


def worst_module(errors: dict[str, float]) -> str:
    name = max(errors, key=errors.__getitem__)
    return f"{P}{name}" + ("" if name == "fc" else "[default]")


@pytest.mark.parametrize("n", [2, 3])
def test_uniform_soup_averages_delta_w_of_separate_runs(n):
    sds = [adapter_sd(seed) for seed in range(n)]
    with pytest.warns(UserWarning, match="lora_uniform_soup") as record:
        out = uniform_soup(sds)
    errors = assert_pairs_are_best_rank_r(out, lambda a, b: sum(dense(sd, a, b) for sd in sds) / n)
    assert min(errors.values()) > 0.05  # independent runs: the mean ΔW has rank n·r, so pairs cannot be exact
    assert worst_module(errors) in str(record[0].message)
    # factor by factor (the old behaviour) is a different model, further from the exact mean
    a, b = PAIRS[0][1], PAIRS[0][2]
    exact = sum(dense(sd, a, b) for sd in sds) / n
    mean_b, mean_a = (sum(sd[k].double() for sd in sds).numpy() / n for k in (b, a))
    factor_mean = SCALING * mean_b @ mean_a
    assert np.linalg.norm(dense(out, a, b) - exact) < np.linalg.norm(factor_mean - exact)
    # ordinary keys: the elementwise mean (the orphan lora_A and the LoRA bias included), buffers copied
    assert list(out) == list(sds[0])
    for k in (BASE_W, NORM, ORPHAN, BIAS):
        ref = sum(sd[k].double() for sd in sds) / n
        torch.testing.assert_close(out[k].double(), ref, rtol=0, atol=1e-6)
    assert torch.equal(out[STEPS], sds[0][STEPS])
    # exactly what the plain function gives without any pair
    plain = uniform_soup([ordinary(sd) for sd in sds])
    assert all(torch.equal(out[k], v) for k, v in plain.items())


def test_weighted_average_weights_delta_w():
    sds = [adapter_sd(seed) for seed in (3, 4, 5)]
    weights = [1.0, 0.0, 3.0]
    with pytest.warns(UserWarning, match="lora_weighted_average"):
        out = weighted_average(sds, weights)
    assert_pairs_are_best_rank_r(out, lambda a, b: (dense(sds[0], a, b) + 3 * dense(sds[2], a, b)) / 4)
    torch.testing.assert_close(out[NORM].double(), (sds[0][NORM].double() + 3 * sds[2][NORM].double()) / 4,
                               rtol=0, atol=1e-6)
    plain = weighted_average([ordinary(sd) for sd in sds], weights)
    assert all(torch.equal(out[k], v) for k, v in plain.items())


def test_interpolate_blends_delta_w_between_trained_adapters():
    anchor, model = adapter_sd(6), adapter_sd(7)
    with pytest.warns(UserWarning, match="lora_interpolate"):
        out = interpolate(anchor, model, 0.3)
    assert_pairs_are_best_rank_r(out, lambda a, b: 0.7 * dense(anchor, a, b) + 0.3 * dense(model, a, b))
    torch.testing.assert_close(out[NORM].double(), 0.7 * anchor[NORM].double() + 0.3 * model[NORM].double(),
                               rtol=0, atol=1e-6)
    assert torch.equal(out[STEPS], model[STEPS])
    plain = interpolate(ordinary(anchor), ordinary(model), 0.3)
    assert all(torch.equal(out[k], v) for k, v in plain.items())


def test_interpolate_layer_ratios_apply_to_the_pair_of_a_key():
    anchor, model = adapter_sd(6), adapter_sd(7)
    with pytest.warns(UserWarning, match="lora_interpolate"):  # the other pairs are blended at 0.5
        out = interpolate(anchor, model, 0.5, layer_ratios={f"{P}q.*": 0.0})
    assert torch.equal(out[PAIRS[0][1]], anchor[PAIRS[0][1]]) and torch.equal(out[PAIRS[0][2]], anchor[PAIRS[0][2]])
    assert torch.equal(out[BASE_W], anchor[BASE_W])  # the pattern covers the base weight too
    a, b = PAIRS[2][1], PAIRS[2][2]
    exact = 0.5 * dense(anchor, a, b) + 0.5 * dense(model, a, b)
    assert np.linalg.norm(dense(out, a, b) - best_rank(exact)) / np.linalg.norm(exact) < 2e-5


def test_task_arithmetic_adds_delta_w_of_the_fine_tunes():
    base = adapter_sd(10, fresh=True)
    fts = [adapter_sd(11), adapter_sd(12)]
    # factor differences made by hand (task_vector refuses them): τᵢ is read as θᵢ − base
    taus = [{k: ft[k] - base[k] for k in base if base[k].is_floating_point()} for ft in fts]
    scales = [0.5, -0.7]
    with pytest.warns(UserWarning, match="lora_task_arithmetic"):
        out = task_arithmetic(base, taus, scales)
    # ΔW_base = 0 (fresh B): the result is Σ λᵢ ΔWᵢ
    assert_pairs_are_best_rank_r(out, lambda a, b: 0.5 * dense(fts[0], a, b) - 0.7 * dense(fts[1], a, b))
    for k in (BASE_W, NORM, ORPHAN, BIAS):
        ref = base[k].double() + 0.5 * taus[0][k].double() - 0.7 * taus[1][k].double()
        torch.testing.assert_close(out[k].double(), ref, rtol=0, atol=1e-6)
    assert torch.equal(out[STEPS], base[STEPS])
    plain = task_arithmetic(ordinary(base), [ordinary(t) for t in taus], scales)
    assert all(torch.equal(out[k], v) for k, v in plain.items())


def test_task_arithmetic_from_a_trained_base_subtracts_its_delta_w():
    base, ft = adapter_sd(13), adapter_sd(14)
    tau = {k: ft[k] - base[k] for k in base if base[k].is_floating_point()}
    with pytest.warns(UserWarning, match="lora_task_arithmetic"):
        out = task_arithmetic(base, [tau], 0.4)
    assert_pairs_are_best_rank_r(out, lambda a, b: dense(base, a, b) + 0.4 * (dense(ft, a, b) - dense(base, a, b)))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 1.0])
def test_blend_toward_a_fresh_adapter_scales_b_exactly(ratio):
    fresh, tuned = adapter_sd(20, fresh=True), adapter_sd(21)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact: nothing to warn about
        out = interpolate(fresh, tuned, ratio)
    for _, a_key, b_key, _, _ in PAIRS:
        assert torch.equal(out[a_key], tuned[a_key])
        torch.testing.assert_close(out[b_key].double(), ratio * tuned[b_key].double(), rtol=2**-24, atol=0)
        exact = ratio * dense(tuned, a_key, b_key)
        assert np.abs(dense(out, a_key, b_key) - exact).max() <= 1e-6 * np.abs(exact).max()


def test_ratio_zero_returns_the_anchor_and_one_input_returns_itself():
    tuned, other = adapter_sd(22), adapter_sd(23)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for out in (uniform_soup([tuned]), weighted_average([tuned], [2.0]), interpolate(other, tuned, 1.0)):
            assert list(out) == list(tuned) and all(torch.equal(out[k], tuned[k]) for k in tuned)
        out = interpolate(tuned, other, 0.0)
    assert all(torch.equal(out[k], tuned[k]) for k in FACTOR_KEYS)


def test_checkpoints_of_one_run_sharing_a_average_exactly_without_a_warning():
    sds = [adapter_sd(30) for _ in range(3)]
    for i, sd in enumerate(sds):  # A frozen (LoRA-FA) or not yet moved: only B differs
        for _, _, b_key, _, _ in PAIRS:
            sd[b_key] = sd[b_key] * (1 + i)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = uniform_soup(sds)
    for _, a_key, b_key, _, _ in PAIRS:
        exact = sum(dense(sd, a_key, b_key) for sd in sds) / 3
        assert np.linalg.norm(dense(out, a_key, b_key) - exact) / np.linalg.norm(exact) < 1e-6


def test_lazy_inputs_are_routed(tmp_path):
    sds = [adapter_sd(seed) for seed in (40, 41)]
    for i, sd in enumerate(sds):
        storage.save_state_dict(sd, tmp_path / f"{i}.safetensors")
    with storage.open_state_dict(tmp_path / "0.safetensors") as a, \
            storage.open_state_dict(tmp_path / "1.safetensors") as b, \
            pytest.warns(UserWarning, match="lora_uniform_soup"):
        out = uniform_soup([a, b])
    assert_pairs_are_best_rank_r(out, lambda ak, bk: (dense(sds[0], ak, bk) + dense(sds[1], ak, bk)) / 2)


def test_task_vector_of_lora_factors_is_refused():
    with pytest.raises(SoupError, match=r"`task_vector`.*lora_task_arithmetic.*--merge-into BASE"):
        task_vector(adapter_sd(50), adapter_sd(50, fresh=True))


REFUSING = {
    "ties": lambda base, fts: ties(base, fts, 0.5),
    "dare": lambda base, fts: dare(base, fts, 0.5),
    "slerp": lambda base, fts: slerp(base, fts[0], 0.5),
    "tsv_merge": lambda base, fts: tsv_merge(base, fts),
    "iso_c": lambda base, fts: iso_c(base, fts),
    "iso_cts": lambda base, fts: iso_cts(base, fts),
    "model_stock": lambda base, fts: model_stock(base, fts),
}


@pytest.mark.parametrize("method", sorted(REFUSING))
def test_methods_not_defined_on_factors_refuse_them_and_say_what_to_do(method):
    base, fts = adapter_sd(60, fresh=True), [adapter_sd(61), adapter_sd(62)]
    argument = "a" if method == "slerp" else "base"
    with pytest.raises(SoupError) as info:
        REFUSING[method](base, fts)
    message = str(info.value)
    assert f"`{method}` is not defined on LoRA factors: `{argument}` holds 3 PEFT LoRA pair(s)" in message
    assert "--merge-into BASE" in message and "merge.delta_weight" in message
    # the same method on the dense weights (no factor keys) is not refused
    REFUSING[method](ordinary(base), [ordinary(ft) for ft in fts])


@pytest.mark.parametrize("command", ["average", "blend", "ties"])
def test_cli_refuses_plain_files_with_lora_factors_instead_of_merging_them_factor_by_factor(tmp_path, capsys, command):
    from lightning_soup.cli import main

    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for seed, path in enumerate(paths):
        storage.save_state_dict(adapter_sd(70 + seed), path)
    out = tmp_path / "out.safetensors"
    args = {"average": [*paths], "blend": ["--anchor", paths[0], "--model", paths[1], "--ratio", "0.5"],
            "ties": ["--base", paths[0], paths[1], "--density", "0.5"]}[command]
    assert main([command, *map(str, args), "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "holds 3 PEFT LoRA pair(s)" in err and "adapter folders" in err and "--merge-into BASE" in err
    assert not out.exists()
