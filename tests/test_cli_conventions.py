"""Both CLIs: one spelling of the output flag (the old one still parses), and defaults stated once."""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from sharding.build.driver import BuildArgs
from sharding.build.fasttom import FastTomRules
from sharding.cli import main as shard_main
from sharding.phileo_bench.driver import PhilEOBenchArgs
from training.cli import main as train_main
from training.config import (
    BenchConfig,
    DataConfig,
    FinetuneDataConfig,
    FinetuneOptimConfig,
    FinetuneRunConfig,
    OptimConfig,
    RunConfig,
)

COMMANDS = [(shard_main, "build"), (shard_main, "coverage"), (train_main, "pretrain"), (train_main, "finetune"),
            (train_main, "nshot-sweep")]


@pytest.mark.parametrize(("group", "name"), COMMANDS)
def test_help_shows_output_and_hides_the_old_spelling(group, name):
    result = CliRunner().invoke(group, [name, "--help"])
    assert result.exit_code == 0
    assert "--output" in result.output and "--out " not in result.output and "--out," not in result.output


@pytest.mark.parametrize("flag", ["--output", "--out"])
def test_both_spellings_reach_the_same_parameter(flag):
    command = train_main.commands["pretrain"]
    context = command.make_context("pretrain", ["--shards", "x", flag, "runs/a"])
    assert context.params["out"] == "runs/a"
    coverage = shard_main.commands["coverage"].make_context("coverage", ["ds", flag, "map.png"])
    assert coverage.params["out"] == "map.png"


def _defaults(command: click.Command) -> dict:
    """The options that state a default value (flags without one, like --lr, fall back to the config)."""
    return {param.name: param.default for param in command.params
            if isinstance(param, click.Option) and not param.is_flag and isinstance(param.default, (int, float, str))}


def _field_defaults(*configs) -> dict:
    return {f.name: f.default for config in configs for f in dataclasses.fields(config)
            if f.default is not dataclasses.MISSING}


@pytest.mark.parametrize(("command", "configs"), [
    ("pretrain", (RunConfig, DataConfig, OptimConfig)),
    ("finetune", (FinetuneRunConfig, FinetuneDataConfig, FinetuneOptimConfig)),
    ("bench-data", (DataConfig, BenchConfig)),
])
def test_training_flag_defaults_are_the_config_defaults(command, configs):
    flags, fields = _defaults(train_main.commands[command]), _field_defaults(*configs)
    shared = sorted(set(flags) & set(fields))
    assert len(shared) >= 7 and set(flags) <= set(fields), set(flags) - set(fields)
    assert {name: flags[name] for name in shared} == {name: fields[name] for name in shared}


def test_build_flag_defaults_are_the_build_defaults():
    flags = _defaults(shard_main.commands["build"])
    assert flags["mix_files"] == BuildArgs.mix_groups and flags["clevel"] == BuildArgs.clevel == PhilEOBenchArgs.clevel
    assert flags["shard_size"] == "1GB" and BuildArgs.shard_size == PhilEOBenchArgs.shard_size == 10**9
    assert (flags["min_clear"], flags["max_water"]) == (FastTomRules.min_clear, FastTomRules.max_water)
    bench = PhilEOBenchArgs
    assert (flags["indices_name"], flags["density_scale"]) == (bench.indices_name, bench.density_scale)
