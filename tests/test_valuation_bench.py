"""The valuation benchmark's own statistics: the control variate behind its path-sum figure
and how many worlds each cell runs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_values",
                                                  ROOT / "scripts" / "bench_values.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_values"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_controlled_mean_removes_what_the_control_explains(bench: ModuleType) -> None:
    control = np.random.default_rng(0).lognormal(0.0, 0.5, 200)
    control = control / control.mean() * 1.05  # this sample's luck: 5% above its mean of 1
    x = 1.0 + 2.0 * (control - 1.0)
    plain, controlled = bench.plain_mean(x), bench.controlled_mean(x, control)
    assert plain.value == pytest.approx(1.10)  # twice the control's luck
    assert controlled.value == pytest.approx(1.0) and controlled.se == pytest.approx(0.0)
    assert plain.se > 0.05
    noise = np.random.default_rng(1).normal(0.0, 0.1, 200)
    assert bench.controlled_mean(x + noise, control).se == pytest.approx(0.1 / np.sqrt(200),
                                                                          rel=0.15)


@pytest.mark.parametrize("lag", ["none", "weibull_3d", "lognormal_20d"])
def test_the_control_variate_has_mean_one(bench: ModuleType, lag: str) -> None:
    cell = bench.Cell(lag, 100, 0.2)
    controls = [world.seen_value / world.expected_seen_value
                for world in (bench.simulate(cell, (7, r)) for r in range(200))]
    assert np.mean(controls) == pytest.approx(1.0, abs=0.012)  # about 3 standard errors


def test_cells_with_few_conversions_run_more_worlds(bench: ModuleType) -> None:
    assert bench.Cell("none", 10, 0.005).nominal_conversions == pytest.approx(2.0)
    assert bench.Cell("none", 10, 0.005).worlds(100) == 400  # capped at 4 x
    assert bench.Cell("lognormal_20d", 100, 0.005).worlds(100) == 200  # 30 / 18.7, rounded
    assert bench.Cell("weibull_3d", 10, 0.2).worlds(100) == 100
    assert bench.Cell("none", 1000, 0.2).worlds(12) == 12
