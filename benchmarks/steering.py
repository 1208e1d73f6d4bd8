"""Benchmark: how far one device at both bounds steers a round, by the round's size.

    .venv/bin/python benchmarks/steering.py     # writes benchmarks/results/steering.json

Issue 20's measure. One device of n claims the most examples (10,000,000) and sends a change
of any norm in a chosen direction; the rest are honest. The "step" is the new model's move
along the honest direction, 1.00 being the all-honest round's (the same n devices, the
attacker honest, under the same rule), through the averager's own bounding
(``sfl.learning.rules.bounds``), for n = 3, 4, 5, 7, 10, 20 and two rules: FedAvg (the
default) and ``clamped_mean`` (each change's component against the others' removed):

- ``uniform``: honest devices with equal claims and the same unit change (the arithmetic
  model: under FedAvg the step is (n-1 - r f) / (n-1 + r) for weight cap r and clip f);
- ``digits``: real training deltas (digits, Dirichlet 0.5, 2 local epochs, the first round
  and the fourth, seeds 0 and 1), the worst case over which device attacks, in four
  directions: ``reversed_own`` (-10x its own change, as ``--attack steer``), ``worst``
  (against the all-honest step itself), ``orthogonal`` (against the all-honest step,
  orthogonal to the others' sum: what the clamp cannot see) and ``searched`` (the lowest
  of those and of a seeded random search with hill climbing over directions and norms in
  the span of the round's changes, from each named direction: an adaptive attacker who
  knows every honest update; a local search, so an upper bound on the true worst case),
  and ``mimic`` (a copy of another device's honest change, the worst such copy): that
  round could be an honest one, so no rule that averages honest rounds as FedAvg does can
  keep more of the step than it, whatever it does against the other attacks.

The rules' arithmetic runs on the changes flattened to vectors, with the library's own
functions (``bounded_weights``, ``norm_bound``, ``clip_scale``, ``clamp_against_others``).
Then ``--attack steer`` end to end (5 clients, 1 attacker, digits, 10 rounds, seed 0) under
FedAvg with the default bounds and the old ones (3x / 2x), under ``clamped_mean``, and
clean. Measured, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sfl.core.config import FederationConfig
from sfl.learning.rules.aggregation import fedavg
from sfl.learning.rules.bounds import bounded_round, bounded_weights, clip_scale, norm_bound
from sfl.learning.rules.robust import clamp_against_others
from sfl.learning.splits import write_client_splits
from sfl.learning.tasks import load_task
from sfl.learning.tasks.base import TrainConfig
from sfl.local.simulate import SimulationOptions, run_simulation

RESULTS = Path(__file__).parent / "results" / "steering.json"
SIZES = (3, 4, 5, 7, 10, 20)
CLAIM = 10_000_000
OLD_BOUNDS = (("max_weight_ratio", "3"), ("norm_bound_factor", "2"))
_DEFAULTS = FederationConfig()
# Each rule under the default bounds: (max_weight_ratio, norm_bound_factor).
BOUNDS = {
    rule: (_DEFAULTS.max_weight_ratio, _DEFAULTS.norm_bound_factor)
    for rule in ("fedavg", "clamped_mean")
}
Tensors = dict[str, torch.Tensor]
Round = tuple[Tensors, list[tuple[Tensors, int]]]
Bounded = tuple[torch.Tensor, torch.Tensor]


def flatten(base: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``model - base`` over float tensors, as one float64 vector."""
    return torch.cat(
        [
            (model[k].double() - base[k].double()).reshape(-1)
            for k in base
            if base[k].dtype.is_floating_point
        ]
    )


def bounded(sent: torch.Tensor, claims: Sequence[int], ratio: float, factor: float) -> Bounded:
    """The changes (rows) clipped and the claims capped as the averager bounds them."""
    norms = sent.norm(dim=1).tolist()
    bound = norm_bound([x for x in norms if x > 0], factor=factor, absolute=0.0)
    scales = torch.tensor([clip_scale(x, bound) for x in norms], dtype=torch.float64)
    weights = torch.tensor(bounded_weights(list(claims), ratio), dtype=torch.float64)
    return scales[:, None] * sent, weights


def shares(rule: str, changes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each bounded change's coefficient in the rule's step (the step is ``shares @ changes``)."""
    if rule == "fedavg":
        return weights / weights.sum()
    coefficients, _ = clamp_against_others(changes @ changes.T, weights)
    return coefficients


def step_of(rule: str, sent: torch.Tensor, claims: Sequence[int], direction: torch.Tensor) -> float:
    changes, weights = bounded(sent, claims, *BOUNDS[rule])
    along = float(shares(rule, changes, weights) @ changes @ direction)
    return along / float(direction @ direction)


def honest_step(rule: str, honest: torch.Tensor, claims: Sequence[int]) -> torch.Tensor:
    changes, weights = bounded(honest, claims, *BOUNDS[rule])
    result: torch.Tensor = shares(rule, changes, weights) @ changes
    return result


def attacked(honest: torch.Tensor, attacker: int, change: torch.Tensor) -> torch.Tensor:
    sent = honest.clone()
    sent[attacker] = change
    return sent


def worst_steps(
    rule: str, honest: torch.Tensor, claims: list[int], search: int, seed: int
) -> dict[str, float]:
    """Per attack, the lowest step over which device attacks."""
    d = honest_step(rule, honest, claims)
    hostile = list(claims)
    worst: dict[str, float] = {}
    generator = torch.Generator().manual_seed(seed)
    typical = float(honest.norm(dim=1).median())
    for a in range(len(honest)):
        hostile = list(claims)
        hostile[a] = CLAIM
        others = honest.sum(0) - honest[a]
        across = d - (d @ others) / (others @ others) * others
        sent = {
            "reversed_own": -10.0 * honest[a],
            "worst": -1000.0 * d,
            "orthogonal": -1000.0 * across / across.norm(),
        }
        steps = {k: step_of(rule, attacked(honest, a, v), hostile, d) for k, v in sent.items()}
        # A copy of another device's change: a round no rule can tell from an honest one.
        steps["mimic"] = min(
            step_of(rule, attacked(honest, a, honest[b]), hostile, d)
            for b in range(len(honest))
            if b != a
        )
        lowest = min(steps.values())
        for start in sent.values():  # a hill climb from each named direction
            current, local = start / start.norm(), math.inf
            for trial in range(search):
                spread = 0.5 if trial < search // 2 else 0.15
                mix = torch.randn(len(honest), generator=generator, dtype=torch.float64)
                candidate = current + spread * (mix @ honest) / typical
                candidate = candidate / candidate.norm()
                for norm in (1000.0 * typical, 0.5 * typical):
                    value = step_of(rule, attacked(honest, a, norm * candidate), hostile, d)
                    if value < local:
                        current, local = candidate, value
            lowest = min(lowest, local)
        steps["searched"] = lowest
        for k, v in steps.items():
            worst[k] = min(worst.get(k, math.inf), v)
    return {k: round(v, 3) for k, v in worst.items()}


def uniform_round(n: int) -> tuple[torch.Tensor, list[int]]:
    change = torch.zeros(8, dtype=torch.float64)
    change[0] = 1.0
    return change.repeat(n, 1), [100] * n


def digits_round(n: int, seed: int, rounds_before: int) -> Round:
    """Real first-round (or later) updates of n digits clients, trained as devices train."""
    task = load_task("digits")
    with tempfile.TemporaryDirectory() as d:
        ids = [f"client-{i:03d}" for i in range(n)]
        write_client_splits(task, Path(d), n, "dirichlet", seed, alpha=0.5, client_ids=ids)
        data = [task.load_client_data(Path(d) / c) for c in ids]
    model = task.build_model(seed)
    for number in range(rounds_before + 1):
        base = {k: v.clone() for k, v in model.state_dict().items()}
        config = TrainConfig(local_epochs=2, lr=0.05, batch_size=16, seed=seed + number + 1)
        trained = []
        for client in data:
            model.load_state_dict(base)
            metrics = task.train(model, client.train, config)
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            trained.append((state, metrics.num_examples))
        result = fedavg(bounded_round(trained, base, max_ratio=1e6, factor=0.0))
        assert result is not None
        model.load_state_dict(result)
    return base, trained


def step_table(
    sizes: Sequence[int], seeds: Sequence[int], stages: Sequence[int], search: int
) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        honest, claims = uniform_round(n)
        row: dict[str, Any] = {"clients": n, "updates": "uniform"}
        for rule in BOUNDS:
            row[rule] = worst_steps(rule, honest, claims, 0, 0)["worst"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        for seed in seeds:
            for before in stages:
                base, trained = digits_round(n, seed, before)
                changes = torch.stack([flatten(base, u) for u, _ in trained])
                counts = [c for _, c in trained]
                row = {"clients": n, "updates": f"digits seed {seed} round {before + 1}"}
                for rule in BOUNDS:
                    steps = worst_steps(rule, changes, counts, search, seed)
                    row.update({f"{rule} {k}": v for k, v in steps.items()})
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def end_to_end(label: str, **options: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = run_simulation(SimulationOptions(out=Path(out), **options))
        wall = time.perf_counter() - started
    accuracies = [r["accuracy"] for r in result.rounds if r["accuracy"] is not None]
    row = {
        "run": label,
        "final_accuracy": round(accuracies[-1], 4) if accuracies else None,
        "closed_rounds": sum(r["status"] == "CLOSED" for r in result.rounds),
        "wall_seconds": round(wall, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--rounds-before",
        type=int,
        nargs="+",
        default=[0, 3],
        help="FedAvg rounds trained before the measured one (0: the first round)",
    )
    parser.add_argument(
        "--search", type=int, default=30, help="hill-climb trials per device and start"
    )
    parser.add_argument("--skip-runs", action="store_true", help="the step table only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bounds": {
            rule: {"max_weight_ratio": r, "norm_bound_factor": f} for rule, (r, f) in BOUNDS.items()
        },
        "search_trials_per_device": args.search,
        "steps": step_table(args.sizes, args.seeds, args.rounds_before, args.search),
    }
    if not args.skip_runs:
        five = {"clients": 5, "rounds": 10, "seed": 0}
        clamped = (("aggregation", "clamped_mean"),)
        report["runs"] = [
            end_to_end("steer, fedavg, default bounds", attackers=1, attack="steer", **five),
            end_to_end(
                "steer, fedavg, old bounds 3x/2x",
                attackers=1,
                attack="steer",
                config_overrides=OLD_BOUNDS,
                **five,
            ),
            end_to_end(
                "steer, clamped_mean", attackers=1, attack="steer", config_overrides=clamped, **five
            ),
            end_to_end("clean, fedavg, default bounds", **five),
            end_to_end("clean, clamped_mean", config_overrides=clamped, **five),
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
