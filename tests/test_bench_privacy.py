"""benchmarks/privacy.py end to end at its smallest: digits, 50 clients, 8 versions."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "privacy.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_privacy", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("privacy") / "privacy.json"
    bench = _load()
    quick = ["--quick", "--datasets", "digits", "--epsilons", "2", "inf", "--workers", "1"]
    bench.main([*quick, "--out", str(out)])
    assert out.with_suffix(".png").stat().st_size > 0  # the plot is drawn
    written: dict[str, Any] = json.loads(out.read_text())
    return written


def test_every_epsilon_and_clipping_has_a_run_with_its_record(report: dict[str, Any]) -> None:
    runs = {(r["dataset"], r["target_epsilon"], r["clipping"]): r for r in report["runs"]}
    assert set(runs) == {("digits", e, c) for e in (2.0, "inf") for c in ("fixed", "adaptive")}
    setting = report["settings"]["digits"]
    for run in runs.values():
        assert run["sampling_rate"] == setting["sampling_rate"]
        assert run["versions"] == setting["versions"] == len(run["accuracy_per_version"])
        assert run["delta"] == pytest.approx(setting["clients"] ** -1.1)
        assert all(0.0 <= a <= 1.0 for a in run["accuracy_per_version"])
        assert run["final_accuracy"] == run["accuracy_per_version"][-1]
        assert run["best_accuracy"] == max(run["accuracy_per_version"])
        assert "versions_to_0.90" in run
    assert len(report["summary"]) == len(runs)


def test_the_noise_is_calibrated_to_the_target_epsilon(report: dict[str, Any]) -> None:
    for run in report["runs"]:
        if run["target_epsilon"] == "inf":
            assert run["noise_multiplier"] == 0.0 and run["epsilon_reported"] is None
            continue
        assert run["noise_multiplier"] > 0
        assert run["epsilon_reported"] == pytest.approx(run["target_epsilon"], rel=0.01)
        assert run["epsilon_reported"] <= run["target_epsilon"]


def test_the_reported_epsilon_agrees_with_the_pld_accountant(report: dict[str, Any]) -> None:
    # RDP is an upper bound, looser than PLD's near-exact figure, but not by much.
    private = [r for r in report["runs"] if r["target_epsilon"] != "inf"]
    assert private
    for run in private:
        rdp, pld = run["epsilon_reported"], run["epsilon_pld_check"]
        assert math.isfinite(pld) and pld <= rdp <= 1.5 * pld


def test_adaptive_clipping_moves_the_clip_and_fixed_keeps_it(report: dict[str, Any]) -> None:
    setting = report["settings"]["digits"]
    for run in report["runs"]:
        clips = run["clip_per_version"]
        assert clips[0] == setting["clip"]
        if run["clipping"] == "fixed":
            assert set(clips) == {setting["clip"]}
        else:
            assert len(set(clips)) > 1
