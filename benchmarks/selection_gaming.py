"""Benchmark: can a device earn its way into every round by answering at once with nothing?

    .venv/bin/python benchmarks/selection_gaming.py   # results/selection_gaming.json

Issue 20's "earn a place in every round": one device of 20 answers each pick at once (the
1 s turnaround floor) with the base model plus a trace (a change of 1e-4 against honest
changes near 1), claiming the largest loss and example count. Replayed with the production
pieces over 500 rounds, 1 and 5 clients picked a round, for ``fast_clients`` and
``utility``: ``cooled_down`` with the liveness window, ``clients_to_pick``, the rule with the
initiator's per-round seed and policy, ``ClientRecord.after_round`` for every pick, and the
round's credit as the averager gives it (``sfl.core.credit``: the typical change of recent
rounds and this one; a negligible change is a miss). ``credit="at_answer"`` replays the old
crediting (every accepted answer credited), for comparison. Time is modelled, not slept: an
honest client's turnaround is its own log-normal speed times a per-round jitter, a miss
counts as the whole round (the hard deadline), as the averager counts it.

The share of rounds the device is picked in, against the fair share k / 20, is written down
here; ``tests/test_selection_gaming.py`` asserts the bound (within 2x fair) on a replay of
the same model.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
from pathlib import Path
from typing import Any

from sfl.core.config import FederationConfig
from sfl.core.credit import grown_pool, is_negligible, typical_change
from sfl.core.selection import (
    SelectionPolicy,
    clients_to_pick,
    cooled_down,
    get_selection_strategy,
    select_clients,
)
from sfl.state.registry import MAX_REPORTED_LOSS, ClientRecord, statistical_utility

RESULTS = Path(__file__).parent / "results"
RULES = ("fast_clients", "utility")
PICKS = (1, 5)
CLIENTS = 20
ROUNDS = 500
GAMER = "gamer"
# An honest client's typical turnaround (s) and the spread of client speeds (log-normal).
HONEST_TURNAROUND_SECONDS = 60.0
SPEED_SIGMA = 0.5
JITTER_SIGMA = 0.1
# Honest changes from the base model: near 1, log-normal spread; the gamer's trace.
HONEST_CHANGE_SIGMA = 0.2
GAMER_CHANGE = 1e-4
GAMER_TURNAROUND_SECONDS = 1.0


def replay(
    rule: str, k: int, *, rounds: int = ROUNDS, seed: int = 0, credit: str = "at_finish"
) -> dict[str, Any]:
    """One federation with the gamer, round by round; the gamer's picks and the rounds."""
    config = FederationConfig(selection=rule, clients_per_round=k, seed=seed)
    strategy = get_selection_strategy(rule)
    rand = random.Random(seed)
    honest = [f"c{i:02d}" for i in range(CLIENTS - 1)]
    speed = {c: HONEST_TURNAROUND_SECONDS * math.exp(rand.gauss(0, SPEED_SIGMA)) for c in honest}
    examples = {c: rand.randint(40, 160) for c in honest}
    records = {c: ClientRecord(c, last_seen=0.0, registered_at=0.0) for c in [*honest, GAMER]}
    whole_round = float(config.round_deadline_seconds)
    pool: tuple[float, ...] = ()
    gamer_picks = 0
    honest_uncredited = 0  # honest answers judged negligible: should stay 0
    for number in range(1, rounds + 1):
        candidates = cooled_down(
            [r.candidate() for r in records.values()], number, config.liveness_window
        )
        picks = clients_to_pick(
            len(candidates), fraction=config.fraction, clients_per_round=config.clients_per_round
        )
        rng = random.Random(f"{config.seed}/{config.experiment}/{number}")
        policy = SelectionPolicy.from_config(config, number)
        selected = select_clients(strategy, candidates, picks, rng, policy)
        answers: dict[str, tuple[float, float, float]] = {}  # turnaround, change, utility
        loss = 0.1 + 2.2 * 0.99**number  # honest losses fall as the model trains
        for client in selected:
            if client == GAMER:
                gamer_picks += 1
                utility = statistical_utility(
                    {"train_loss": MAX_REPORTED_LOSS},
                    config.max_num_examples,
                    config.max_num_examples,
                )
                answers[client] = (GAMER_TURNAROUND_SECONDS, GAMER_CHANGE, utility or 0.0)
            else:
                turnaround = speed[client] * math.exp(rand.gauss(0, JITTER_SIGMA))
                change = math.exp(rand.gauss(0, HONEST_CHANGE_SIGMA))
                utility = statistical_utility(
                    {"train_loss": loss}, examples[client], config.max_num_examples
                )
                answers[client] = (turnaround, change, utility or 0.0)
        typical = typical_change(pool, [change for _, change, _ in answers.values()])
        credited = []
        for client, (turnaround, change, utility) in answers.items():
            earned = credit == "at_answer" or not is_negligible(change, typical)
            if earned:
                credited.append(change)
            elif client != GAMER:
                honest_uncredited += 1
            records[client] = records[client].after_round(
                number,
                answered=earned,
                turnaround=turnaround if earned else whole_round,
                b=config.ewma_b,
                utility=utility if earned else None,
                pick_window=config.selection_window,
            )
        pool = grown_pool(pool, credited)
    return {
        "gamer_picks": gamer_picks,
        "rounds": rounds,
        "share": gamer_picks / rounds,
        "honest_uncredited": honest_uncredited,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "selection_gaming.json")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for rule in RULES:
        for k in PICKS:
            for credit in ("at_answer", "at_finish"):
                runs = [
                    replay(rule, k, rounds=args.rounds, seed=seed, credit=credit)
                    for seed in range(args.seeds)
                ]
                shares = [run["share"] for run in runs]
                row = {
                    "rule": rule,
                    "picked_per_round": k,
                    "clients": CLIENTS,
                    "credit": credit,
                    "fair_share": k / CLIENTS,
                    "gamer_share": round(statistics.mean(shares), 4),
                    "gamer_share_per_seed": [round(s, 4) for s in shares],
                    "times_fair": round(statistics.mean(shares) / (k / CLIENTS), 2),
                    "honest_answers_uncredited": sum(run["honest_uncredited"] for run in runs),
                }
                rows.append(row)
                print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "selection_gaming",
                "rounds": args.rounds,
                "seeds": args.seeds,
                "python": platform.python_version(),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
