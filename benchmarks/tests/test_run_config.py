"""The options the five training jobs share (:mod:`coap_bench.config`) and the flags that set them
(:func:`coap_bench.arguments.add_run_flags`): one set of checks, defaults and recipe overrides for every job."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from coap_bench.arguments import add_optimizers_flag, add_run_flags
from coap_bench.config import RunConfig, check_choice, override_settings
from coap_bench.controlnet import ControlNetConfig
from coap_bench.ddpm import DdpmConfig
from coap_bench.finetune import FinetuneConfig
from coap_bench.llama import LlamaConfig
from coap_bench.optimizers import LowRankSettings
from coap_bench.sit import SitConfig

CONFIGS = [LlamaConfig, DdpmConfig, ControlNetConfig, SitConfig, FinetuneConfig]


@pytest.mark.parametrize("config_class", CONFIGS)
def test_every_job_extends_the_shared_options(config_class):
    assert issubclass(config_class, RunConfig)
    shared = {field.name for field in dataclasses.fields(RunConfig)}
    assert shared <= {field.name for field in dataclasses.fields(config_class)}


@pytest.mark.parametrize("config_class", CONFIGS)
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"optimizers": ("nope",)}, "unknown optimizer 'nope'; known: "),
        ({"optimizers": ()}, "no optimizer to run"),
        ({"rank_ratio": 0.5}, "rank_ratio must be >= 1, got 0.5"),
        ({"seeds": 0}, "seeds must be at least 1, got 0"),
        ({"steps": 0}, "steps must be positive, got 0"),
        ({"steps": 10, "warmup_steps": 10}, "warmup_steps (10) must be smaller than steps (10)"),
        ({"state_dtype": "x"}, "unknown state_dtype 'x'; choose from float32, bf16"),
        ({"recipe": "x"}, "unknown recipe 'x'; choose from "),
        ({"preset": "x"}, " preset 'x'; choose from "),
    ],
)
def test_every_job_checks_the_shared_options_alike(config_class, options, message):
    with pytest.raises(ValueError) as error:
        config_class(**options).resolved()
    assert message in str(error.value)


@pytest.mark.parametrize("config_class", CONFIGS)
def test_the_shared_defaults_resolve_alike(config_class):
    resolved = config_class(preset="micro", steps=30).resolved()
    assert (resolved.steps, resolved.warmup_steps, resolved.isolate) == (30, 3, True)
    assert isinstance(resolved.optimizers, tuple) and resolved.batch_size is not None
    assert config_class(preset="micro", device="cpu", isolate=False).resolved().isolate is False


def test_threads_and_projection_side_are_checked_where_a_job_has_them():
    with pytest.raises(ValueError, match="threads must be positive, got 0"):
        DdpmConfig(threads=0).resolved()
    with pytest.raises(ValueError, match="unknown projection_side 'x'"):
        LlamaConfig(projection_side="x").resolved()
    assert not hasattr(LlamaConfig(), "threads") and not hasattr(ControlNetConfig(), "projection_side")


def test_a_flag_left_unset_keeps_the_recipe_value_and_a_rank_ratio_drops_its_rank():
    base = LowRankSettings(rank=64, rank_ratio=None, update_interval=40, scale=0.25)
    assert override_settings(base, update_interval=None, scale=None, seed=3) == dataclasses.replace(base, seed=3)
    ratio = override_settings(base, rank_ratio=8.0)
    assert (ratio.rank, ratio.rank_ratio) == (None, 8.0)
    both = override_settings(base, rank=16, rank_ratio=8.0)
    assert (both.rank, both.rank_ratio) == (16, 8.0)
    assert override_settings(base, projection_side=None, state_dtype="bf16").state_dtype == "bf16"


def test_a_job_takes_its_settings_from_its_recipe_and_its_flags():
    settings = DdpmConfig(recipe="drop-in", update_interval=7, state_dtype="bf16", seed=2).settings()
    assert (settings.rank_ratio, settings.update_interval, settings.state_dtype, settings.seed) == (2.0, 7, "bf16", 2)
    assert FinetuneConfig(update_interval=8).settings().proj_gap == 8  # GaLore refreshes with COAP


def test_check_choice_names_what_is_unknown():
    check_choice("a", ("a", "b"), "thing")
    with pytest.raises(ValueError, match="unknown thing 'c'; choose from a, b"):
        check_choice("c", ("a", "b"), "thing")


def test_the_shared_flags_default_to_the_config_fields():
    parser = argparse.ArgumentParser()
    add_run_flags(parser, ControlNetConfig, {"--preset": "which", "--weight-decay": "wd", "--seed": "s"})
    add_optimizers_flag(parser, ControlNetConfig)
    args = parser.parse_args([])
    assert args.preset == ControlNetConfig.preset and args.weight_decay == ControlNetConfig.weight_decay
    assert args.optimizers == list(ControlNetConfig.optimizers) and args.seed == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--preset", "nope"])
