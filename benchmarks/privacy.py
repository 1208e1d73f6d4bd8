"""Benchmark: test accuracy against epsilon under user-level DP-FedAvg (issue 24).

    .venv/bin/python benchmarks/privacy.py          # the sweep (~30 min on 2 cores)
    .venv/bin/python benchmarks/privacy.py --quick  # a smoke run (seconds)
        # writes benchmarks/results/privacy.json and privacy.png
    .venv/bin/python benchmarks/privacy.py --datasets digits --merge  # one dataset again

For each dataset (MNIST IID, 1,000 virtual clients of 60 examples, Poisson sampling q = 0.05;
digits, 100 clients, q = 0.2; the models, training and server rule in ``SETTINGS``), each
target epsilon in {1, 2, 3, 4, 8, inf} at delta = 1/N**1.1 and each clipping (fixed, or
adaptive to the median as Andrew et al., starting at the fixed clip), one federated run in
memory, built from the pieces the averager uses: every version, each device joins with
probability q (Poisson sampling, what the accountant assumes); each joined device trains the
base model with the task's own training code; its change is clipped (``clip_scale``) and
summed with weight 1 (FedAvg's running sum); ``private_step`` adds the noise once and divides
by the expected number of devices; the server rule (FedAvg or FedAvgM) takes the released sum
as its ``PartialSums``. The noise multiplier is calibrated so that the RDP accountant's
epsilon over the run's versions is the target; infinity is the same clipping without noise.

Each run records z, q, versions, delta, the epsilon the run reports (``epsilon`` over the
releases it made) and an independent check of it: the same library's PLD accountant from the
recorded z, q and count. Accuracy on the held-out test set after every version. The noise
comes from a seeded generator so that a run can be repeated (the averager's comes from
``secret_generator``). Measured and written down, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dp_accounting.pld import pld_privacy_accountant
from torch import nn

from sfl.core.privacy import PrivacySettings, default_bits_stddev, default_delta, next_clip
from sfl.learning.accountant import Release, dp_event, epsilon
from sfl.learning.rules.aggregation import (
    FedAvg,
    PartialSum,
    build_rule,
)
from sfl.learning.rules.bounds import clip_scale, clip_to_bound, model_norm
from sfl.learning.rules.privacy import OneRelease, private_step, private_sum
from sfl.learning.tasks import load_task
from sfl.learning.tasks.base import ArrayDataset, TrainConfig
from sfl.learning.tasks.classification import ClassificationTask
from sfl.learning.tasks.digits import DigitsTask
from sfl.learning.tasks.mnist import IMAGE_SIDE, MnistTask

RESULTS = Path(__file__).parent / "results"
TARGET = 0.90
GOAL_EPSILON = 3.0
# The sweep, and 3: the goal's budget.
EPSILONS = (1.0, 2.0, 3.0, 4.0, 8.0, math.inf)
CLIPPINGS = ("fixed", "adaptive")
# Bisection on the noise multiplier stops within this relative width.
CALIBRATION_TOLERANCE = 1e-4


class PooledMnistTask(MnistTask):
    """MNIST through a 2x2 average pool (14x14), then a 196-32-10 tanh MLP: 6,634
    coordinates where the shipped MLP has 109,386, for the same noise per coordinate."""

    name = "mnist_pooled"
    hidden = 32

    def new_model(self) -> nn.Module:
        side = IMAGE_SIDE // 2
        return nn.Sequential(
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(side * side, self.hidden),
            nn.Tanh(),
            nn.Linear(self.hidden, self.num_classes),
        )


class DigitsLinearTask(DigitsTask):
    """Digits with a linear (softmax) model: 650 coordinates for 100 devices' noise."""

    name = "digits_linear"

    def new_model(self) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(8 * 8, self.num_classes))


BENCHMARK_TASKS: dict[str, type[ClassificationTask]] = {
    task.name: task for task in (PooledMnistTask, DigitsLinearTask)
}


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One dataset's federation, local training, clip and server rule."""

    dataset: str
    task: str  # a registered task, or one of ``BENCHMARK_TASKS``
    clients: int
    examples_per_client: int  # 0: the training pool dealt out evenly
    sampling_rate: float
    versions: int
    local_epochs: int
    batch_size: int
    lr: float
    clip: float  # the fixed clip, and the adaptive clip's start
    server: str  # an aggregation rule that sums in shards
    server_params: str  # its aggregation_params (JSON)
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2


SETTINGS = {
    "mnist": Setting(
        dataset="mnist",
        task="mnist_pooled",
        clients=1000,
        examples_per_client=60,
        sampling_rate=0.05,
        versions=100,
        local_epochs=1,
        batch_size=10,
        lr=0.1,
        clip=1.0,
        server="fedavgm",
        server_params='{"server_lr": 0.2, "server_momentum": 0.9}',
    ),
    "digits": Setting(
        dataset="digits",
        task="digits_linear",
        clients=100,
        examples_per_client=0,
        sampling_rate=0.2,
        versions=50,
        local_epochs=1,
        batch_size=5,
        lr=0.1,
        clip=0.5,
        server="fedavgm",
        server_params='{"server_lr": 0.5, "server_momentum": 0.9}',
    ),
}
# A smoke run: a few clients and versions, the same code.
QUICK = {
    name: replace(s, clients=50, examples_per_client=20, sampling_rate=0.2, versions=8)
    for name, s in SETTINGS.items()
}


def calibrate_noise(target: float, sampling_rate: float, versions: int, delta: float) -> float:
    """The smallest noise multiplier whose ``versions`` releases cost at most ``target``
    epsilon at ``delta`` (the accountant's own ``epsilon``, by bisection)."""

    def cost(z: float) -> float:
        return epsilon([Release(sampling_rate, z)] * versions, delta)

    high = 1.0
    while cost(high) > target:
        high *= 2
    low = high / 2
    while cost(low) <= target:
        low, high = low / 2, low
    while high - low > CALIBRATION_TOLERANCE * high:
        middle = (low + high) / 2
        if cost(middle) > target:
            low = middle
        else:
            high = middle
    return high


def pld_epsilon(
    noise_multiplier: float, sampling_rate: float, versions: int, delta: float
) -> float:
    """The same releases' epsilon by dp-accounting's PLD accountant: the independent check."""
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_event([Release(sampling_rate, noise_multiplier)] * versions))
    return float(accountant.get_epsilon(delta))


def noiseless_step(
    clipped: PartialSum,
    base: Mapping[str, torch.Tensor],
    norms: Sequence[float],
    setting: Setting,
    clipping: str,
    clip: float,
    expected: float,
) -> tuple[PartialSum, float]:
    """Epsilon infinity: the same clipped sum over the expected devices, with no noise, and
    the adaptive clip moved by the exact count within it."""
    released = private_sum(
        clipped, base, expected_devices=expected, stddev=0.0, generator=torch.Generator()
    )
    if clipping == "fixed":
        return released, clip
    within = float(sum(1 for n in norms if n <= clip))
    following = next_clip(
        clip,
        within,
        expected,
        target_quantile=setting.target_quantile,
        learning_rate=setting.clip_learning_rate,
    )
    return released, following


def bits_stddev(noise_multiplier: float, expected: float) -> float:
    """The adaptive clip's bits noise: Andrew et al.'s expected/20, or ``noise_multiplier``
    if that is larger, so that the changes' noise is at most 1.16 x the total
    (``split_noise``: the default needs a total below expected/10)."""
    return max(default_bits_stddev(expected), noise_multiplier)


def make_task(name: str) -> ClassificationTask:
    """The benchmark's own tasks by name, else a registered one."""
    if name in BENCHMARK_TASKS:
        return BENCHMARK_TASKS[name]()
    task = load_task(name)
    assert isinstance(task, ClassificationTask)
    return task


def deal_iid(pool: ArrayDataset, setting: Setting, seed: int) -> list[ArrayDataset]:
    """``clients`` disjoint IID shares of the training pool (``examples_per_client`` each)."""
    order = np.random.default_rng(seed).permutation(len(pool))
    per = setting.examples_per_client or len(pool) // setting.clients
    if per * setting.clients > len(pool):
        raise ValueError(f"{setting.clients} clients x {per} examples > {len(pool)} in the pool")
    shares = (order[i * per : (i + 1) * per] for i in range(setting.clients))
    return [ArrayDataset(x=pool.x[share], y=pool.y[share]) for share in shares]


def run(
    setting: Setting,
    target: float,
    clipping: str,
    seed: int = 0,
    noise_multiplier: float | None = None,
) -> dict[str, Any]:
    """One federated run at ``target`` epsilon (inf: no noise) with ``clipping``; the noise
    multiplier is calibrated to ``target`` unless given (calibrated already)."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    task = make_task(setting.task)
    central = task.load_central_data()
    clients = deal_iid(central.train, setting, seed)
    q, versions = setting.sampling_rate, setting.versions
    expected = q * setting.clients
    delta = default_delta(setting.clients)
    private = math.isfinite(target)
    z = 0.0
    if private:
        z = noise_multiplier or calibrate_noise(target, q, versions, delta)
    settings = (
        PrivacySettings(
            noise_multiplier=z,
            clip=setting.clip,
            clipping=clipping,
            target_quantile=setting.target_quantile,
            clip_learning_rate=setting.clip_learning_rate,
            bits_stddev=bits_stddev(z, expected),
        )
        if private
        else None
    )
    rule = build_rule(setting.server, setting.server_params)
    model = task.build_model(seed)
    sampler = np.random.default_rng(seed + 1)
    noise = torch.Generator().manual_seed(seed + 2)
    clip = setting.clip
    state = None
    releases: list[Release] = []
    accuracies: list[float] = []
    clips: list[float] = []
    sampled: list[int] = []
    clipped_fraction: list[float] = []
    median_norms: list[float] = []
    for version in range(1, versions + 1):
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        chosen = np.flatnonzero(sampler.random(setting.clients) < q)
        summed = FedAvg()
        norms: list[float] = []
        config = TrainConfig(
            local_epochs=setting.local_epochs,
            lr=setting.lr,
            batch_size=setting.batch_size,
            seed=seed * 1_000_003 + version,
        )
        for index in chosen:
            model.load_state_dict(base)
            task.train(model, clients[int(index)], config)
            trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
            change = {
                k: t.to(torch.float64) - base[k].to(torch.float64)
                for k, t in trained.items()
                if t.dtype.is_floating_point
            }
            norm = model_norm(change)
            norms.append(norm)
            summed.add(clip_to_bound(trained, base, clip_scale(norm, clip)), 1.0)
        clips.append(clip)
        sampled.append(len(chosen))
        clipped_fraction.append(sum(n > clip for n in norms) / len(norms) if norms else 0.0)
        median_norms.append(float(np.median(norms)) if norms else 0.0)
        if settings is not None:
            step = private_step(
                summed.partial(),
                base,
                norms,
                settings=settings,
                clip=clip,
                expected_devices=expected,
                generator=noise,
            )
            released, clip = step.released, step.next_clip
            releases.append(Release(q, z))
        else:
            released, clip = noiseless_step(
                summed.partial(), base, norms, setting, clipping, clip, expected
            )
        result = rule.aggregate(base, OneRelease(released), state)
        assert result is not None
        state = result.state
        model.load_state_dict(result.model)
        accuracies.append(task.evaluate(model, central.test).accuracy)
    # No noise, no guarantee: None stands for infinity (JSON has no number for it).
    reported = epsilon(releases, delta) if releases else None
    checked = pld_epsilon(z, q, len(releases), delta) if releases else None
    split = settings.split(expected) if settings is not None else None
    row = {
        "dataset": setting.dataset,
        "clipping": clipping,
        "target_epsilon": target if private else "inf",
        "noise_multiplier": z,
        "noise_on_changes": split.changes if split else 0.0,
        "noise_on_clip_bits": split.bits if split else 0.0,
        "sampling_rate": q,
        "expected_devices": expected,
        "versions": len(releases) if private else versions,
        "delta": delta,
        "epsilon_reported": reported,
        "epsilon_pld_check": checked,
        "final_accuracy": round(accuracies[-1], 4),
        "best_accuracy": round(max(accuracies), 4),
        f"versions_to_{TARGET:.2f}": first_version_at(accuracies, TARGET),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "mean_devices_per_version": round(float(np.mean(sampled)), 2),
        "accuracy_per_version": [round(a, 4) for a in accuracies],
        "clip_per_version": [round(c, 4) for c in clips],
        "clipped_fraction_per_version": [round(f, 3) for f in clipped_fraction],
        "median_change_norm_per_version": [round(n, 4) for n in median_norms],
    }
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("per_version")}), flush=True)
    return row


def first_version_at(accuracies: Sequence[float], target: float) -> int | None:
    for number, accuracy in enumerate(accuracies, start=1):
        if accuracy >= target:
            return number
    return None


Job = tuple[Setting, float, str, int, float | None]


def _run_one(job: Job) -> dict[str, Any]:
    return run(*job)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [e for e in EPSILONS if math.isfinite(e)]
    ticks = [*finite, 2 * finite[-1]]  # infinity drawn one step past the largest epsilon
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in report["runs"]:
        x = ticks[-1] if row["target_epsilon"] == "inf" else row["target_epsilon"]
        lines.setdefault((row["dataset"], row["clipping"]), []).append((x, row["final_accuracy"]))
    for (dataset, clipping), points in sorted(lines.items()):
        points.sort()
        style = "-" if clipping == "fixed" else "--"
        ax.plot(*zip(*points, strict=True), style, marker="o", label=f"{dataset}, {clipping}")
    ax.axhline(TARGET, color="grey", linewidth=0.8)
    ax.axvline(GOAL_EPSILON, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{e:g}" for e in finite] + ["inf"])
    ax.set_xlabel("epsilon (delta = 1/N^1.1)")
    ax.set_ylabel("final test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("user-level DP-FedAvg: accuracy against epsilon")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few clients, versions")
    parser.add_argument("--datasets", nargs="+", default=list(SETTINGS))
    parser.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS))
    parser.add_argument("--clippings", nargs="+", default=list(CLIPPINGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes (1 torch thread each)")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="override a setting of every dataset, e.g. lr=0.1 clip=0.5 task=mnist_small",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other datasets' runs already in --out (one dataset at a time)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "privacy.json")
    args = parser.parse_args(argv)
    chosen = {name: (QUICK if args.quick else SETTINGS)[name] for name in args.datasets}
    for item in args.set:
        field, _, value = item.partition("=")
        chosen = {n: _override(s, field, value) for n, s in chosen.items()}
    noise: dict[tuple[str, float], float] = {}  # one calibration serves both clippings
    for name, s in chosen.items():
        for target in filter(math.isfinite, args.epsilons):
            noise[name, target] = calibrate_noise(
                target, s.sampling_rate, s.versions, default_delta(s.clients)
            )
    jobs: list[Job] = [
        (setting, target, clipping, args.seed, noise.get((name, target)))
        for name, setting in chosen.items()
        for target in args.epsilons
        for clipping in args.clippings
    ]
    started = time.perf_counter()
    if args.workers > 1:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            runs = pool.map(_run_one, jobs, chunksize=1)
    else:
        runs = [_run_one(job) for job in jobs]
    settings = {name: asdict(s) for name, s in chosen.items()}
    wall = {name: round(time.perf_counter() - started, 1) for name in chosen}
    if args.merge and args.out.exists():
        kept = json.loads(args.out.read_text())
        runs = [r for r in kept["runs"] if r["dataset"] not in chosen] + runs
        settings = {**kept["settings"], **settings}
        wall = {**kept["wall_seconds"], **wall}
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick,
        "settings": settings,
        "goal": {"accuracy": TARGET, "epsilon": GOAL_EPSILON, "dataset": "mnist"},
        "summary": summarize(runs),
        "wall_seconds": wall,  # per dataset's sweep, with --workers processes
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One line per run: the table benchmarks/README.md shows."""
    return [
        {
            "dataset": r["dataset"],
            "clipping": r["clipping"],
            "epsilon": r["epsilon_reported"],
            "noise_multiplier": round(r["noise_multiplier"], 4),
            "final_accuracy": r["final_accuracy"],
            "best_accuracy": r["best_accuracy"],
            f"versions_to_{TARGET:.2f}": r[f"versions_to_{TARGET:.2f}"],
        }
        for r in runs
    ]


def _override(setting: Setting, field: str, value: str) -> Setting:
    current = getattr(setting, field)
    return replace(setting, **{field: type(current)(value)})


if __name__ == "__main__":
    main()
