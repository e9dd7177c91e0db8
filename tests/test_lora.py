"""LoRA-aware merging (merge/lora.py) against float64 references computed on dense ΔW = B @ A."""

from __future__ import annotations

import pytest
import torch

from lightning_soup import SoupError
from lightning_soup.merge import (
    combine_factors,
    delta_weight,
    lora_interpolate,
    lora_keys,
    lora_pairs,
    lora_task_arithmetic,
    lora_uniform_soup,
    lora_weighted_average,
)


def best_rank(m: torch.Tensor, r: int) -> torch.Tensor:
    """Eckart–Young reference: the best rank-r approximation of `m`, from a dense float64 SVD."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def tail_error(m: torch.Tensor, r: int) -> float:
    s = torch.linalg.svdvals(m.double())
    return float(s[r:].norm() / s.norm())


def factors(n: int, out: int = 24, inp: int = 16, r: int = 4, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(out, r, generator=g, dtype=dtype), torch.randn(r, inp, generator=g, dtype=dtype))
            for _ in range(n)]


def adapter(b: torch.Tensor, a: torch.Tensor, extra: float = 0.0) -> dict[str, torch.Tensor]:
    return {
        "base_model.model.q.base_layer.weight": torch.full((b.shape[0], a.shape[1]), 1.0),
        "base_model.model.q.lora_A.default.weight": a,
        "base_model.model.q.lora_B.default.weight": b,
        "base_model.model.norm.weight": torch.full((3,), extra),
        "base_model.model.steps": torch.tensor(int(extra)),
    }


A_KEY, B_KEY = "base_model.model.q.lora_A.default.weight", "base_model.model.q.lora_B.default.weight"


def test_pairs_found_in_peft_module_and_saved_adapter_keys():
    keys = [
        "base_model.model.h.0.attn.c_attn.base_layer.weight",
        "base_model.model.h.0.attn.c_attn.lora_A.default.weight",
        "base_model.model.h.0.attn.c_attn.lora_B.default.weight",
        "base_model.model.h.0.attn.c_attn.lora_B.default.bias",
        "base_model.model.wte.lora_embedding_A.default",
        "base_model.model.wte.lora_embedding_B.default",
        "base_model.model.h.1.mlp.lora_A.weight",  # saved adapter files drop the adapter name
        "base_model.model.h.1.mlp.lora_B.weight",
        "base_model.model.emb.lora_embedding_A",
        "base_model.model.emb.lora_embedding_B",
        "base_model.model.orphan.lora_A.default.weight",  # no B: not a pair
    ]
    pairs = lora_pairs(keys)
    assert [(p.module.removeprefix("base_model.model."), p.adapter, p.embedding) for p in pairs] == [
        ("h.0.attn.c_attn", "default", False), ("wte", "default", True), ("h.1.mlp", None, False), ("emb", None, True),
    ]
    assert "base_model.model.h.0.attn.c_attn.lora_B.default.bias" not in lora_keys(keys)
    assert len(lora_keys(keys)) == 8


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-11)])
def test_combination_is_the_best_rank_r_approximation_of_the_exact_delta(dtype, tol):
    fs = factors(3, dtype=dtype)
    coeffs = [0.5, 0.3, 0.2]
    exact = sum(c * b.double() @ a.double() for c, (b, a) in zip(coeffs, fs))
    b, a, err = combine_factors(fs, coeffs)
    assert b.shape == (24, 4) and a.shape == (4, 16) and b.dtype == a.dtype == dtype
    best = best_rank(exact, 4)
    assert (b.double() @ a.double() - best).norm() / exact.norm() <= tol
    assert err == pytest.approx(tail_error(exact, 4), rel=1e-4)
    assert err > 0.05  # three random rank-4 updates do not fit rank 4: the error is real and reported
    naive = sum(c * b for c, (b, _) in zip(coeffs, fs)) @ sum(c * a for c, (_, a) in zip(coeffs, fs))
    assert (b.double() @ a.double() - exact).norm() < (naive.double() - exact).norm()


def test_blend_toward_a_fresh_adapter_is_exact_and_scales_b():
    (b, a), (_, a0) = factors(2)
    fresh, tuned = adapter(torch.zeros_like(b), a0), adapter(b, a, extra=2.0)
    for r in (0.0, 0.25, 0.5, 1.0):
        out, report = lora_interpolate(fresh, tuned, r)
        assert report.exact and report.relative_error == 0.0
        if r == 0.0:
            assert torch.equal(out[A_KEY], a0) and not out[B_KEY].any()  # the anchor itself
        else:
            assert torch.equal(out[A_KEY], a) and torch.allclose(out[B_KEY], r * b, rtol=0, atol=1e-6)
        assert torch.allclose(out["base_model.model.norm.weight"], torch.full((3,), 2.0 * r))
        assert out["base_model.model.steps"].item() == 2  # integer buffers from `model`


def test_blend_between_two_trained_adapters_is_on_delta_w():
    (b0, a0), (b1, a1) = factors(2, seed=3)
    out, report = lora_interpolate(adapter(b0, a0), adapter(b1, a1), 0.3)
    exact = 0.7 * b0.double() @ a0.double() + 0.3 * b1.double() @ a1.double()
    got = out[B_KEY].double() @ out[A_KEY].double()
    assert (got - best_rank(exact, 4)).norm() / exact.norm() < 2e-5
    assert report.relative_error == pytest.approx(tail_error(exact, 4), rel=1e-4)
    assert report.to_recipe()["lora_worst_module"] == "base_model.model.q[default]"


def test_weighted_average_of_separate_runs_and_other_keys():
    fs = factors(3, seed=5)
    sds = [adapter(b, a, extra=float(i)) for i, (b, a) in enumerate(fs)]
    out, report = lora_weighted_average(sds, [1, 0, 3])
    exact = (fs[0][0].double() @ fs[0][1].double() + 3 * fs[2][0].double() @ fs[2][1].double()) / 4
    assert ((out[B_KEY].double() @ out[A_KEY].double()) - best_rank(exact, 4)).norm() / exact.norm() < 2e-5
    assert torch.allclose(out["base_model.model.norm.weight"], torch.full((3,), 1.5))
    assert list(out) == list(sds[0])
    assert report.max_relative_error == pytest.approx(tail_error(exact, 4), rel=1e-4)
    # averaging factor by factor would multiply averaged factors: a different (wrong) model
    plain = {k: sum(sd[k] for sd in sds) / 3 for k in (A_KEY, B_KEY)}
    soup, _ = lora_uniform_soup(sds)
    exact3 = sum(b.double() @ a.double() for b, a in fs) / 3
    assert (soup[B_KEY].double() @ soup[A_KEY].double() - exact3).norm() < (
        plain[B_KEY].double() @ plain[A_KEY].double() - exact3).norm()


def test_inputs_sharing_a_are_averaged_exactly():
    (b0, a), (b1, _) = factors(2, seed=7)
    out, report = lora_uniform_soup([adapter(b0, a), adapter(b1, a)])
    assert report.exact
    assert torch.allclose(out[B_KEY] @ out[A_KEY], (b0 + b1) / 2 @ a, atol=1e-5)


def test_task_arithmetic_on_delta_w():
    (b1, a1), (b2, a2), (_, a0) = factors(3, seed=11)
    base = adapter(torch.zeros_like(b1), a0)
    out, report = lora_task_arithmetic(base, [adapter(b1, a1, 1.0), adapter(b2, a2, 3.0)], [0.5, -0.25])
    exact = 0.5 * b1.double() @ a1.double() - 0.25 * b2.double() @ a2.double()
    got = out[B_KEY].double() @ out[A_KEY].double()
    assert (got - best_rank(exact, 4)).norm() / exact.norm() < 2e-5
    assert report.relative_error > 0
    assert torch.allclose(out["base_model.model.norm.weight"], torch.full((3,), 0.5 - 0.75))
    one, rep1 = lora_task_arithmetic(base, [adapter(b1, a1)], 0.4)  # one fine-tune off a fresh adapter: exact
    assert rep1.exact and torch.allclose(one[B_KEY], 0.4 * b1) and torch.equal(one[A_KEY], a1)


def test_bf16_factors_come_back_in_bf16_and_conv_shapes_are_kept():
    g = torch.Generator().manual_seed(0)
    conv = [(torch.randn(8, 2, 1, 1, generator=g), torch.randn(2, 3, 3, 3, generator=g)) for _ in range(2)]
    b, a, err = combine_factors([(x.bfloat16(), y.bfloat16()) for x, y in conv], [0.5, 0.5])
    assert b.shape == (8, 2, 1, 1) and a.shape == (2, 3, 3, 3) and b.dtype == a.dtype == torch.bfloat16
    exact = sum(0.5 * x.bfloat16().double().flatten(1) @ y.bfloat16().double().flatten(1) for x, y in conv)
    assert (b.double().flatten(1) @ a.double().flatten(1) - best_rank(exact, 2)).norm() / exact.norm() < 2e-2
    assert err == pytest.approx(tail_error(exact, 2), rel=1e-3)


def test_mismatched_ranks_are_refused():
    (b, a), = factors(1)
    with pytest.raises(SoupError, match="different ranks"):
        combine_factors([(b, a), (b[:, :2], a[:2])], [0.5, 0.5])
    with pytest.raises(SoupError, match="one coefficient per"):
        combine_factors([(b, a)], [0.5, 0.5])


def test_delta_weight_matches_peft_merge():
    peft = pytest.importorskip("peft")
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.lin = nn.Linear(6, 5)
            self.conv = nn.Conv2d(3, 4, 3)

    torch.manual_seed(0)
    net = Net()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=6, target_modules=["emb", "lin", "conv"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()
    sd = model.state_dict()
    expected = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    for p in lora_pairs(sd):
        name = p.module.removeprefix("base_model.model.") + ".weight"
        got = base[name] + delta_weight(sd, p, scaling=6 / 2)
        assert torch.allclose(got, expected[name], atol=1e-5), name
