"""Our aggregation rules give Flower's results on identical inputs, round after round.

Flower runs in its own virtualenv (``scripts/flwr_oracle.sh``, made by ``make dev``), through
``tests/oracle/flwr_aggregate.py``; inputs and outputs cross as ``.npz`` files (no pickle).
Each case runs three rounds on one strategy object, so the server state carried between
rounds (momentum, moments) is compared too: ours goes through ``model_from_state`` and the
persisted-state path exactly as the averager uses it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sfl.core import params as rule_params
from sfl.learning.rules.aggregation import ListUpdates, build_rule

ROOT = Path(__file__).resolve().parents[1]
ORACLE_PYTHON = ROOT / ".venv-flwr" / "bin" / "python"
ORACLE = ROOT / "tests" / "oracle" / "flwr_aggregate.py"
SHAPES = [(6, 4), (4,), (3, 2, 2)]
ROUNDS = 3
CLIENTS = 7

CASES = [
    ("fedavg", {}),
    ("fedavgm", {"server_lr": 0.7, "server_momentum": 0.9}),
    ("fedadam", {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}),
    ("fedyogi", {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-3}),
    ("fedadagrad", {"eta": 0.1, "tau": 1e-2}),
    ("median", {}),
    ("trimmed_mean", {"trim_fraction": 0.3}),
    ("krum", {"byzantine_fraction": 0.3, "keep": 0}),
    ("krum", {"byzantine_fraction": 0.3, "keep": 1}),
]


def _flower_params(name: str, params: dict[str, float]) -> dict[str, float]:
    """Our parameters in Flower's terms (Krum takes counts, not a share)."""
    resolved = rule_params.check(name, params)
    assert resolved is not None
    if isinstance(resolved, rule_params.KrumParams):
        byzantine = math.floor(resolved.byzantine_fraction * CLIENTS)
        keep = resolved.keep or CLIENTS - byzantine
        return {"byzantine": byzantine, "keep": 0 if keep == 1 else keep}
    return dataclasses.asdict(resolved)


def _inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {f"base/{t}": rng.normal(size=s).astype(np.float32) for t, s in enumerate(SHAPES)}
    for r in range(1, ROUNDS + 1):
        arrays[f"round{r}/num_examples"] = rng.integers(5, 50, size=CLIENTS)
        for c in range(CLIENTS):
            spread = 5.0 if c == 0 else 0.3  # one client far off, as an attacker would be
            for t, s in enumerate(SHAPES):
                value = arrays[f"base/{t}"] + spread * rng.normal(size=s)
                arrays[f"round{r}/client{c}/{t}"] = value.astype(np.float32)
    return arrays


def _ours(name: str, params: dict[str, float], inputs: dict[str, np.ndarray]) -> list[list]:
    rule = build_rule(name, json.dumps(params))
    base = {str(t): torch.from_numpy(inputs[f"base/{t}"]) for t in range(len(SHAPES))}
    state = None
    models = []
    for r in range(1, ROUNDS + 1):
        updates = ListUpdates(
            [
                (
                    {str(t): torch.from_numpy(inputs[f"round{r}/client{c}/{t}"]) for t in base},
                    float(inputs[f"round{r}/num_examples"][c]),
                )
                for c in range(CLIENTS)
            ]
        )
        result = rule.aggregate(base, updates, state)
        assert result is not None
        if result.state is not None:  # what the averager does: the model from the state
            state = {k: v.clone() for k, v in result.state.items()}
            assert all(
                torch.equal(result.model[k], v)
                for k, v in rule.model_from_state(base, state).items()
            )
        base = result.model
        models.append([base[str(t)].numpy() for t in range(len(SHAPES))])
    return models


@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_our_rule_matches_flowers_over_three_rounds(
    name: str, params: dict[str, float], tmp_path: Path
) -> None:
    assert ORACLE_PYTHON.exists(), "Flower's oracle venv is missing: run `make dev`"
    inputs = _inputs(seed=len(name) + len(params))
    np.savez(tmp_path / "inputs.npz", **inputs)
    spec = {
        "strategy": name,
        "params": _flower_params(name, params),
        "rounds": ROUNDS,
        "clients": CLIENTS,
        "tensors": len(SHAPES),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))

    run = subprocess.run(
        [
            str(ORACLE_PYTHON),
            str(ORACLE),
            str(tmp_path / "spec.json"),
            str(tmp_path / "inputs.npz"),
            str(tmp_path / "outputs.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    flower = np.load(tmp_path / "outputs.npz", allow_pickle=False)
    ours = _ours(name, params, inputs)

    for r in range(1, ROUNDS + 1):
        for t in range(len(SHAPES)):
            np.testing.assert_allclose(
                ours[r - 1][t],
                flower[f"round{r}/{t}"],
                rtol=1e-4,
                atol=1e-5,
                err_msg=f"{name} round {r} tensor {t}",
            )
