"""The benchmark's optimizer registry and recipes: every low-rank method gets the same projected set and rank."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from coap_bench.llama import PAPER_RANKS, recipe_settings
from coap_bench.optimizers import (
    DEFAULT_OPTIMIZERS,
    OPTIMIZERS,
    LowRankSettings,
    build_optimizer,
    low_rank_groups,
    parse_optimizer_names,
)


def _params() -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    gen = torch.Generator().manual_seed(0)
    projected = [
        nn.Parameter(torch.randn(48, 32, generator=gen)),
        nn.Parameter(torch.randn(16, 40, generator=gen)),
        nn.Parameter(torch.randn(6, 40, generator=gen)),
        nn.Parameter(torch.randn(32, generator=gen)),
        nn.Parameter(torch.randn(8, 4, 3, 3, generator=gen)),
    ]
    dense = [nn.Parameter(torch.randn(50, 32, generator=gen))]
    return projected, dense


def test_paper_recipe_follows_the_papers_scripts():
    tiny = recipe_settings("paper", "tiny")
    assert (tiny.rank, tiny.update_interval, tiny.reproject_factor, tiny.scale, tiny.proj_gap) == (64, 40, 5, 0.25, 200)
    assert recipe_settings("paper", "1b").rank == 512 and recipe_settings("paper", "60m").rank == 128
    seven = recipe_settings("paper", "7b")
    assert (seven.rank, seven.update_interval, seven.reproject_factor) == (1024, 100, 1)
    assert PAPER_RANKS["130m"] == 256
    # --rank-ratio replaces the recipe's rank for every low-rank optimizer; explicit options override the recipe.
    ratio = recipe_settings("paper", "tiny", rank_ratio=8, update_interval=10, scale=1.0)
    assert (ratio.rank, ratio.rank_ratio, ratio.update_interval, ratio.scale) == (None, 8, 10, 1.0)
    assert ratio.rank_of((256, 688)) == 32
    drop_in = recipe_settings("drop-in", "tiny")
    assert (drop_in.rank, drop_in.rank_ratio, drop_in.update_interval) == (
        None,
        2.0,
        32,
    )  # scale: the library's (below)
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        recipe_settings("nope", "tiny")


def test_galore_groups_project_what_coap_projects_at_the_same_rank():
    projected, dense = _params()
    settings = LowRankSettings(rank_ratio=4, update_interval=2, reproject_factor=2)
    coap = build_optimizer("coap_adamw", projected, dense, 1e-3, settings)
    for p in [*projected, *dense]:
        p.grad = torch.randn_like(p)
    coap.step()
    coap_ranks = {id(p): coap.state[p]["proj"].shape[-1] for p in projected if "proj" in coap.state[p]}
    groups = low_rank_groups(projected, dense, settings, update_proj_gap=200)
    galore_ranks = {id(p): g["rank"] for g in groups if "rank" in g for p in g["params"]}
    assert galore_ranks == coap_ranks and sorted(coap_ranks.values()) == [1, 4, 8]  # (6, 40), (16, 40), (48, 32)
    # The conv kernel (neither peer projects kernels), the bias and the dense group stay dense.
    rest = next(g for g in groups if "rank" not in g)["params"]
    assert {id(p) for p in rest} == {id(p) for p in [*projected, *dense]} - set(galore_ranks)


def test_projection_side_reaches_coap_only_when_set():
    assert "projection_side" not in LowRankSettings().coap_options()  # the library's default
    assert LowRankSettings(projection_side="larger").coap_options()["projection_side"] == "larger"
    assert recipe_settings("paper", "tiny", projection_side="input").projection_side == "input"
    projected, dense = _params()
    coap = build_optimizer(
        "coap_adamw", projected, dense, 1e-3, LowRankSettings(rank_ratio=4, projection_side="larger")
    )
    for p in [*projected, *dense]:
        p.grad = torch.randn_like(p)
    coap.step()
    # P on the larger side of (48, 32) and (16, 40); the moments on the smaller one.
    assert [tuple(coap.state[p]["proj"].shape) for p in projected[:2]] == [(48, 8), (40, 4)]
    assert [tuple(coap.state[p]["exp_avg"].shape) for p in projected[:2]] == [(32, 8), (16, 4)]


@pytest.mark.parametrize("name", [n for n, s in OPTIMIZERS.items() if s.family in ("dense", "coap")])
def test_every_builtin_and_torch_optimizer_builds_and_steps(name):
    projected, dense = _params()
    optimizer = build_optimizer(name, projected, dense, 1e-3, LowRankSettings())
    before = [p.detach().clone() for p in [*projected, *dense]]
    for p in [*projected, *dense]:
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, [*projected, *dense]))
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in [*projected, *dense]}


@pytest.mark.skipif(importlib.util.find_spec("galore_torch") is None, reason="galore-torch not installed")
@pytest.mark.parametrize("name", ["galore_adamw", "galore_adafactor"])
def test_galore_peers_build_and_step_on_cpu(name):
    projected, dense = _params()
    optimizer = build_optimizer(name, projected, dense, 1e-3, LowRankSettings(rank_ratio=4))
    for p in [*projected, *dense]:
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert OPTIMIZERS[name].safe_globals()  # its projector class, allowlisted for weights_only checkpoints


def test_refresh_schedules():
    settings = LowRankSettings(update_interval=4, proj_gap=5)
    coap, galore, dense = OPTIMIZERS["coap_adamw"], OPTIMIZERS["galore_adamw"], OPTIMIZERS["adamw"]
    assert [s for s in range(1, 13) if coap.refreshes_at(s, settings)] == [1, 4, 8, 12]
    assert [s for s in range(1, 13) if galore.refreshes_at(s, settings)] == [1, 6, 11]
    assert not any(dense.refreshes_at(s, settings) for s in range(1, 13))


def test_names():
    assert set(DEFAULT_OPTIMIZERS) <= set(OPTIMIZERS)
    assert parse_optimizer_names(" adamw, coap_adamw,adamw ") == ["adamw", "coap_adamw"]
    with pytest.raises(ValueError, match="unknown optimizer 'nope'"):
        parse_optimizer_names("adamw,nope")
    with pytest.raises(ValueError, match="unknown optimizer 'nope'"):
        build_optimizer("nope", [], [], 1e-3, LowRankSettings())


def test_conv_projection_reaches_coap_only_when_set():
    from coap_bench.ddpm.presets import recipe_settings as ddpm_settings

    assert "conv_projection" not in LowRankSettings().coap_options()
    settings = ddpm_settings("paper", conv_projection="input")
    assert settings.coap_options()["conv_projection"] == "input"
    conv = torch.nn.Conv2d(32, 48, 3)
    coap = build_optimizer("coap_adamw", [conv.weight], [conv.bias], 1e-3, settings)
    conv(torch.randn(2, 32, 5, 5)).square().mean().backward()
    coap.step()
    assert set(coap.state[conv.weight]) == {"step", "proj_in", "exp_avg", "exp_avg_sq"}  # no P_O


def test_auto_scale_gives_peers_the_norm_matched_factor_per_matrix():
    # COAP gets "auto" itself; GaLore / APOLLO get the same factor as a number, sqrt(min side / r),
    # in one group per (rank, factor).
    projected, dense = _params()
    settings = LowRankSettings(rank_ratio=4, scale="auto")
    assert settings.coap_options()["scale"] == "auto"
    assert settings.scale_of((48, 32)) == pytest.approx((32 / 8) ** 0.5)
    assert settings.scale_of((16, 40)) == pytest.approx((16 / 4) ** 0.5)
    assert LowRankSettings(rank=5, scale="auto").scale_of((6, 40)) == pytest.approx((6 / 5) ** 0.5)
    assert LowRankSettings(rank_ratio=4, scale=0.25).scale_of((48, 32)) == 0.25
    groups = low_rank_groups(projected, dense, settings)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(projected[0])]["scale"] == settings.scale_of((48, 32))
    assert by_param[id(projected[1])]["scale"] == settings.scale_of((16, 40))
    assert all("scale" not in g for g in groups if "rank" not in g)


def test_drop_in_recipes_follow_the_library_default_scale_and_paper_recipes_keep_theirs():
    from coap_bench.ddpm import recipe_settings as ddpm_recipe
    from coap_torch.optim import COAP_DEFAULTS

    assert recipe_settings("drop-in", "tiny").scale == COAP_DEFAULTS["scale"]
    assert ddpm_recipe("drop-in").scale == COAP_DEFAULTS["scale"]
    assert recipe_settings("paper", "tiny").scale == 0.25 and ddpm_recipe("paper").scale == 1.0
    assert recipe_settings("drop-in", "tiny", scale="auto").scale == "auto"


@pytest.mark.parametrize("command", ["llama", "ddpm"])
def test_scale_flag_takes_auto_or_a_positive_number(command, capsys):
    from coap_bench.cli import build_parser, main

    assert build_parser().parse_args([command, "--scale", "auto"]).scale == "auto"
    assert build_parser().parse_args([command, "--scale", "0.5"]).scale == 0.5
    for bad, message in (("Auto", "'auto' or a number > 0"), ("0", "a number > 0"), ("-1", "a number > 0")):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--scale", bad])
        assert exit_info.value.code == 2
        assert f"argument --scale: expected {message}, got {bad!r}" in capsys.readouterr().err
