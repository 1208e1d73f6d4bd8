"""The ``sfl`` command: local simulation, dataset splitting, configuration reference."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sfl.core import params as rule_params
from sfl.core import plugins
from sfl.core.config import ConfigError, describe
from sfl.local.attacks import ATTACKS


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE (keys: see 'sfl config')")
    return key.strip(), value.strip()


def _simulate(args: argparse.Namespace) -> int:
    from sfl.local.simulate import SimulationError, SimulationOptions, run_simulation

    options = SimulationOptions(
        out=args.out,
        clients=args.clients,
        rounds=args.rounds,
        task=args.task,
        partition=args.partition,
        alpha=args.alpha,
        labels_per_client=args.labels_per_client,
        fraction=args.fraction,
        selection=args.selection,
        local_epochs=args.local_epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        duplicate_deliveries=args.duplicate_deliveries,
        drop_events=args.drop_events,
        crash_rate=args.crash_rate,
        straggler_rate=args.straggler_rate,
        slow_clients=args.slow_clients,
        averager_crash=args.averager_crash,
        attackers=args.attackers,
        attack=args.attack,
        config_overrides=tuple(_key_value(item) for item in args.set),
        soft_deadline_seconds=args.soft_deadline,
        round_timeout_seconds=args.deadline,
    )
    print(
        f"sfl simulate: {options.clients} clients, {options.rounds} rounds, task {options.task}, "
        f"{options.partition} partition, local AWS endpoint (moto) on 127.0.0.1",
        flush=True,
    )
    print(
        f"{'round':>5} {'status':>9} {'clients':>8} {'accuracy':>9} {'loss':>7} "
        f"{'client acc':>10} {'time s':>7} {'overhead s':>10}",
        flush=True,
    )

    def show(row: dict[str, Any]) -> None:
        def fmt(value: float | None, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        clients = f"{len(row['accepted'])}/{len(row['selected'])}"
        print(
            f"{row['round']:>5} {row['status']:>9} {clients:>8} {fmt(row['accuracy'], '.4f'):>9} "
            f"{fmt(row['loss'], '.4f'):>7} {fmt(row['client_accuracy'], '.4f'):>10} "
            f"{fmt(row['timings']['total'], '.2f'):>7} {fmt(row['overhead_seconds'], '.2f'):>10}",
            flush=True,
        )

    try:
        result = run_simulation(options, progress=show)
    except SimulationError as e:
        print(f"sfl simulate: {e}", file=sys.stderr)
        return 1
    print(
        f"initial accuracy {result.initial_accuracy:.4f} -> final {result.final_accuracy or 0:.4f} "
        f"in {result.wall_seconds:.1f} s; history: {result.history_path}; plot: {result.plot_path}",
        flush=True,
    )
    return 0


def _loadtest(args: argparse.Namespace) -> int:
    from sfl.local.loadtest import LoadTestError, LoadTestOptions, run_loadtest

    options = LoadTestOptions(
        out=args.out,
        clients=args.clients,
        task=args.task,
        payloads=args.payloads,
        workers=args.workers,
        averager_concurrency=args.averager_concurrency,
        seed=args.seed,
        deadline_seconds=args.deadline,
        config_overrides=tuple(_key_value(item) for item in args.set),
    )
    print(
        f"sfl loadtest: one round, {options.clients} virtual clients, task {options.task}, "
        f"{options.workers} upload threads, local AWS endpoint (moto) on 127.0.0.1",
        flush=True,
    )
    try:
        result = run_loadtest(options, progress=lambda line: print(f"  {line}", flush=True))
    except LoadTestError as e:
        print(f"sfl loadtest: {e}", file=sys.stderr)
        return 1
    r = result.report
    for phase, seconds in r["phases"].items():
        print(f"  {phase:<14} {'-' if seconds is None else f'{seconds:.2f} s'}")
    print(
        f"round {r['round']} {r['status']}: {r['participants']} of {r['selected']} selected "
        f"aggregated into version {r['model_version']}; {r['averager_invocations']} averager "
        f"invocations; round item {r['round_item_bytes']:,} bytes; peak RSS "
        f"{r['peak_rss_bytes'] / 2**20:.0f} MiB; report: {result.path}",
        flush=True,
    )
    return 0 if r["status"] == "CLOSED" else 1


def _split_dataset(args: argparse.Namespace) -> int:
    from sfl.learning.splits import write_client_splits
    from sfl.learning.tasks import load_task

    summaries = write_client_splits(
        load_task(args.task),
        args.out,
        args.clients,
        args.partition,
        args.seed,
        alpha=args.alpha,
        labels_per_client=args.labels_per_client,
        eval_fraction=args.eval_fraction,
    )
    for s in summaries:
        print(f"{s.client_id}: {s.num_train} train, {s.num_eval} eval -> {args.out / s.client_id}")
    return 0


def _config(args: argparse.Namespace) -> int:
    rows = describe()
    if args.json:
        print(
            json.dumps(
                [dict(zip(("key", "default", "allowed", "meaning"), r, strict=True)) for r in rows],
                indent=2,
            )
        )
        return 0
    for key, default, allowed, meaning in rows:
        print(f"{key:<26} {default:<14} {meaning}\n{'':<26} allowed: {allowed}")
    print("\naggregation_params, per rule (a JSON object; unknown names are refused):")
    for rule, name, default, meaning in rule_params.describe():
        print(f"  {rule:<13} {name:<19} {default:<8} {meaning}")
    return 0


def _initial_model(args: argparse.Namespace) -> int:
    from sfl.learning import codec
    from sfl.learning.tasks import load_task

    model = load_task(args.task).build_model(seed=args.seed)
    args.out.write_bytes(codec.encode_model(model.state_dict(), version=0, seed=args.seed))
    print(f"wrote model version 0 of task {args.task} (seed {args.seed}) to {args.out}")
    return 0


# --- sfl cost (owned by the cost model, sfl.core.cost) ------------------------------------------


def _stack_shape(args: argparse.Namespace) -> Any:
    """The stack's shape from cdk.json (both context keys, validated as 'cdk synth' does),
    or the stack's defaults when there is no cdk.json."""
    from sfl.core.cost import StackShape, stack_region
    from sfl.core.lambda_shapes import FunctionShape

    region = args.region or stack_region()
    if args.cdk_json is None or not args.cdk_json.exists():
        return StackShape(region=region)
    # The CDK app's config is read by its own code (infra/, beside cdk.json; not installed).
    root = str(args.cdk_json.resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        from infra.config import StackConfig
    except ImportError as e:
        print(f"sfl cost: {args.cdk_json} not read ({e}); the stack's defaults", file=sys.stderr)
        return StackShape(region=region)

    context = json.loads(args.cdk_json.read_text()).get("context", {})
    config = StackConfig.from_context(context.get)
    infra, federation = config.infra, config.federation
    return StackShape(
        region=region,
        initiator=FunctionShape(infra.initiator_memory_mb, StackShape.initiator.architecture),
        averager=FunctionShape(infra.averager_memory_mb, StackShape.averager.architecture),
        schedule_minutes=infra.schedule_minutes,
        log_retention_days=infra.log_retention_days,
        update_expiry_days=infra.update_expiry_days,
        poll_seconds=federation.poll_seconds,
        heartbeat_seconds=federation.heartbeat_seconds,
    )


def _model_bytes(args: argparse.Namespace) -> int:
    if args.model_bytes is not None:
        return int(args.model_bytes)
    from sfl.learning import codec
    from sfl.learning.tasks import load_task

    model = load_task(args.task).build_model(seed=0)
    return len(codec.encode_model(model.state_dict(), version=0, seed=0))


def _cost(args: argparse.Namespace) -> int:
    from sfl.core import cost

    shape = _stack_shape(args)
    prices = cost.prices_for(shape.region)  # NoPricesError is a ValueError: exit 2, message
    model_bytes = _model_bytes(args)
    accepted = args.clients if args.accepted is None else args.accepted
    assumptions = cost.CostAssumptions(
        update_handling_seconds=args.update_seconds,
        answers_in_round_item=args.answers_in_round_item,
        selected_in_round_item=args.answers_in_round_item,
    )
    figures = cost.RoundFigures(
        selected=args.clients,
        accepted=accepted,
        model_bytes=model_bytes,
        update_bytes=accepted * (args.update_bytes or model_bytes),
        aggregate_seconds=args.aggregate_seconds,
    )
    per_round = cost.estimate(cost.usage_for_round(figures, shape, assumptions), prices)
    idle = cost.estimate(
        cost.idle_usage_per_day(shape, model_versions=args.model_versions, model_bytes=model_bytes),
        prices,
    )
    fleet = cost.estimate(cost.fleet_usage_per_day(shape, args.clients, assumptions), prices)
    day = idle.total + fleet.total + args.rounds_per_day * per_round.total
    item_bytes = cost.round_item_bytes(args.clients, args.clients, assumptions)
    result = {
        "region": shape.region,
        "clients": args.clients,
        "accepted": accepted,
        "model_bytes": model_bytes,
        "rounds_per_day": args.rounds_per_day,
        "protocol": "answers_in_round_item" if args.answers_in_round_item else "slots",
        "round_item_bytes": item_bytes,
        "round_item_fits": item_bytes <= cost.DYNAMODB_ITEM_LIMIT,
        "per_round": per_round.to_dict(),
        "idle_per_day": idle.to_dict(),
        "fleet_per_day": fleet.to_dict(),
        "per_day": day,
        "per_month": day * cost.DAYS_PER_MONTH,
        "prices_read_on": sorted({p.read_on for p in prices.values()}),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"sfl cost: {shape.region}, {args.clients} clients ({accepted} accepted), model "
        f"{model_bytes:,} bytes, {args.rounds_per_day:g} rounds/day, list prices read on "
        f"{', '.join(result['prices_read_on'])} (sfl/core/prices.py), no free tiers"
    )
    for title, part in (
        ("per round", per_round),
        ("idle stack per day", idle),
        (f"{args.clients} connected devices per day", fleet),
    ):
        print(f"\n{title}: ${part.total:.6f}")
        for name, usd in part.items.items():
            if usd:
                print(f"  {name:<28} ${usd:.6f}")
    print(f"\nper day: ${day:.4f}   per month: ${result['per_month']:.2f}")
    if not result["round_item_fits"]:
        print(
            f"note: the round item would hold {item_bytes:,} bytes, over DynamoDB's "
            f"{cost.DYNAMODB_ITEM_LIMIT:,}-byte item limit: this protocol cannot run this round "
            "(the slot protocol, without --answers-in-round-item, can)"
        )
    return 0


def _add_cost_parser(sub: Any) -> None:
    p = sub.add_parser(
        "cost",
        help="estimated AWS cost per round, of the idle stack and of the fleet (docs/cost.md)",
    )
    p.add_argument("--clients", type=int, default=40, help="clients selected per round")
    p.add_argument("--accepted", type=int, default=None, help="accepted answers (all)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--model-bytes", type=int, default=None, help="the model file's bytes")
    size.add_argument(
        "--task", default="mnist", help="take the model's size from this task's model (torch)"
    )
    p.add_argument("--update-bytes", type=int, default=0, help="per update (model's size)")
    p.add_argument("--rounds-per-day", type=float, default=24.0)
    p.add_argument("--aggregate-seconds", type=float, default=0.5, help="measured aggregation")
    p.add_argument(
        "--update-seconds", type=float, default=0.3, help="averager seconds per update event"
    )
    p.add_argument("--model-versions", type=int, default=100, help="model versions stored")
    p.add_argument(
        "--answers-in-round-item",
        action="store_true",
        help="price the protocol before issue #11 (answers inside the round item) instead of "
        "the slot items (one transaction per answer)",
    )
    p.add_argument("--region", default=None, help="default: AWS_REGION, AWS_DEFAULT_REGION")
    p.add_argument(
        "--cdk-json",
        type=Path,
        default=Path("cdk.json"),
        help="read memory sizes, schedule, retention, poll period from this cdk.json",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cost)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def data_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--task", default="digits", help=f"one of {plugins.allowed('task')}")
        p.add_argument("--clients", type=int, default=10)
        p.add_argument("--partition", default="dirichlet", choices=("iid", "dirichlet", "shards"))
        p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
        p.add_argument(
            "--labels-per-client", type=int, default=2, help="labels per client for 'shards'"
        )
        p.add_argument("--seed", type=int, default=0)

    sim = sub.add_parser("simulate", help="run the whole system locally against moto's server")
    data_flags(sim)
    sim.add_argument("--rounds", type=int, default=15)
    sim.add_argument("--fraction", type=float, default=1.0, help="share of clients per round")
    sim.add_argument(
        "--selection", default="fast_clients", help=f"one of {plugins.allowed('selection')}"
    )
    sim.add_argument("--local-epochs", type=int, default=2)
    sim.add_argument("--lr", type=float, default=0.05)
    sim.add_argument("--batch-size", type=int, default=16)
    sim.add_argument("--soft-deadline", type=int, default=60, help="seconds (quorum relaxes)")
    sim.add_argument("--deadline", type=int, default=120, help="hard deadline, seconds")
    faults = sim.add_argument_group("fault injection")
    faults.add_argument(
        "--duplicate-deliveries", type=int, default=0, help="extra copies of each S3 event"
    )
    faults.add_argument("--drop-events", type=float, default=0.0, help="share of S3 events lost")
    faults.add_argument(
        "--crash-rate", type=float, default=0.0, help="chance a picked client dies mid-round"
    )
    faults.add_argument(
        "--straggler-rate",
        type=float,
        default=0.0,
        help="chance a client answers after the deadline",
    )
    faults.add_argument(
        "--slow-clients",
        type=float,
        default=0.0,
        metavar="SIGMA",
        help="heterogeneous speeds: per-client log-normal slowdown with this sigma",
    )
    faults.add_argument(
        "--averager-crash", action="store_true", help="the averager dies mid-aggregation once"
    )
    hostile = sim.add_argument_group("hostile devices")
    hostile.add_argument(
        "--attackers", type=int, default=0, help="how many clients are hostile (the first K)"
    )
    hostile.add_argument(
        "--attack", default="scale", choices=ATTACKS, help="what the hostile clients send"
    )
    sim.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a configuration key (see 'sfl config'), e.g. --set norm_bound_factor=0",
    )
    sim.add_argument("--out", type=Path, default=Path("runs/latest"))
    sim.set_defaults(func=_simulate)

    load = sub.add_parser(
        "loadtest",
        help="one round with N virtual clients (precomputed updates, no training) through "
        "the local deployment; per-phase timings as JSON",
    )
    load.add_argument("--clients", type=int, default=1000, help="virtual clients, all selected")
    load.add_argument(
        "--task",
        default="digits_mlp",
        help=f"the model's task: one of {plugins.allowed('task')}; "
        "sfl.local.loadtest:WideDigitsTask is a 25 MB model",
    )
    load.add_argument("--payloads", type=int, default=8, help="distinct precomputed updates")
    load.add_argument("--workers", type=int, default=16, help="concurrent virtual clients")
    load.add_argument("--averager-concurrency", type=int, default=4)
    load.add_argument("--deadline", type=int, default=900, help="the round's deadline, seconds")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    load.add_argument("--out", type=Path, default=Path("runs/loadtest.json"))
    load.set_defaults(func=_loadtest)

    split = sub.add_parser("split-dataset", help="write per-client data files for devices")
    data_flags(split)
    split.add_argument("--eval-fraction", type=float, default=0.2)
    split.add_argument("--out", type=Path, required=True)
    split.set_defaults(func=_split_dataset)

    cfg = sub.add_parser(
        "config",
        help="every configuration key, default and allowed values; show | set | unset | history "
        "change a federation's configuration between rounds",
    )
    cfg.add_argument("--json", action="store_true")
    cfg.set_defaults(func=_config)
    from sfl.cli.ops import add_config_actions, add_parsers

    add_config_actions(cfg, reference=_config)
    add_parsers(sub)  # the operator's commands: status, rounds, watch, models, ...

    init = sub.add_parser("initial-model", help="write global model version 0 to a file")
    init.add_argument("--task", default="digits")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--out", type=Path, required=True)
    init.set_defaults(func=_initial_model)

    from sfl.cli.recipes import add_parser as add_recipes_parser

    add_recipes_parser(sub)
    _add_cost_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as e:  # ConfigError, PartitionError, TaskError, ...: a clear message
        print(f"sfl {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
