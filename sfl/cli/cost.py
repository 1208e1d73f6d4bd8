"""``sfl cost``: the estimated AWS cost per round, of the idle stack and of the fleet, from
the stack's shape in ``cdk.json`` (docs/cost.md). The cost model is :mod:`sfl.core.cost`,
imported when the command runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfl.cli.args import number, whole

if TYPE_CHECKING:
    from sfl.core.cost import StackShape


def _stack_shape(args: argparse.Namespace) -> StackShape:
    """The stack's shape from cdk.json (both context keys, checked as 'cdk synth' checks
    them), or the stack's defaults when there is no cdk.json."""
    from sfl.core import cost
    from sfl.core.cost import StackShape
    from sfl.core.deployment import StackConfig
    from sfl.core.lambda_shapes import FunctionShape

    region = args.region or cost.stack_region()
    push = not args.polling
    if args.cdk_json is None or not args.cdk_json.exists():
        return StackShape(region=region, push=push)
    config = StackConfig.from_cdk_json(args.cdk_json)
    infra, federation = config.infra, config.federation
    return StackShape(
        region=region,
        initiator=FunctionShape(infra.initiator_memory_mb, StackShape.initiator.architecture),
        averager=FunctionShape(config.averager.memory_mb, StackShape.averager.architecture),
        schedule_minutes=infra.schedule_minutes,
        log_retention_days=infra.log_retention_days,
        update_expiry_days=infra.update_expiry_days,
        poll_seconds=federation.poll_seconds,
        heartbeat_seconds=federation.heartbeat_seconds,
        push=push,
        push_poll_seconds=federation.push_poll_seconds,
        push_heartbeat_seconds=federation.push_heartbeat_seconds,
    )


def _model_bytes(args: argparse.Namespace) -> int:
    if args.model_bytes is not None:
        return int(args.model_bytes)
    from sfl.learning import codec
    from sfl.learning.tasks import load_task

    model = load_task(args.task, args.task_params).build_model(seed=0)
    return len(codec.encode_model(model.state_dict(), version=0, seed=0))


def _cost(args: argparse.Namespace) -> int:
    from sfl.core import cost

    accepted = args.clients if args.accepted is None else args.accepted
    if accepted > args.clients:
        raise ValueError(f"--accepted {accepted} is more than --clients {args.clients}")
    shape = _stack_shape(args)
    prices = cost.prices_for(shape.region)  # NoPricesError is a ValueError: exit 2, message
    model_bytes = _model_bytes(args)
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
    devices = args.clients if args.devices is None else args.devices
    fleet = cost.estimate(
        cost.fleet_usage_per_day(shape, devices, assumptions, rounds_per_day=args.rounds_per_day),
        prices,
    )
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
        "devices": devices,
        "push": shape.push,
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
        (
            f"{devices} connected devices per day "
            f"({'round notices pushed' if shape.push else 'polling only'})",
            fleet,
        ),
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


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "cost",
        help="estimated AWS cost per round, of the idle stack and of the fleet (docs/cost.md)",
    )
    p.add_argument("--clients", type=whole(1), default=40, help="clients selected per round")
    p.add_argument("--accepted", type=whole(0), default=None, help="accepted answers (all)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--model-bytes", type=whole(1), default=None, help="the model file's bytes")
    size.add_argument(
        "--task", default="mnist", help="take the model's size from this task's model (torch)"
    )
    p.add_argument(
        "--task-params", default="{}", metavar="JSON", help="the task's parameters (a JSON object)"
    )
    p.add_argument(
        "--update-bytes", type=whole(0), default=0, help="per update (0: the model's size)"
    )
    p.add_argument(
        "--rounds-per-day", type=number(0, above=True), default=24.0, help="rounds a day"
    )
    p.add_argument("--aggregate-seconds", type=number(0), default=0.5, help="measured aggregation")
    p.add_argument(
        "--update-seconds", type=number(0), default=0.3, help="averager seconds per update event"
    )
    p.add_argument("--model-versions", type=whole(1), default=100, help="model versions stored")
    p.add_argument(
        "--answers-in-round-item",
        action="store_true",
        help="price the older protocol (answers inside the round item) instead of the slot "
        "items (one transaction per answer)",
    )
    p.add_argument(
        "--devices",
        type=whole(1),
        default=None,
        help="connected devices in the fleet, picked or not (default: --clients)",
    )
    p.add_argument(
        "--polling",
        action="store_true",
        help="price the fleet without round notices: every device polls every poll_seconds "
        "and heartbeats every heartbeat_seconds",
    )
    p.add_argument("--region", default=None, help="default: AWS_REGION, AWS_DEFAULT_REGION")
    p.add_argument(
        "--cdk-json",
        type=Path,
        default=Path("cdk.json"),
        help="read memory sizes, schedule, retention, poll period from this cdk.json",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cost)
