"""Turning a round's accepted updates into the next model version with the configured rule.

Called by ``sfl.server.transitions`` for the one invocation that holds the round's
aggregation lease; it writes the model (and a stateful rule's state) once and returns the
round's figures. Closing the round, and what listens for that (its cost, the new model's
evaluation), is the caller's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sfl.core.privacy_ledger import PrivacyRecord
from sfl.learning.codec import decode, encode, encode_model
from sfl.learning.rules.aggregation import Aggregate, AggregationRule, build_rule
from sfl.learning.rules.bounds import bounded_weights, clip_scale, model_norm, norm_bound
from sfl.server import private_release, shards
from sfl.server.base_model import base_model
from sfl.server.context import Aggregated
from sfl.server.round_updates import Entry, RoundUpdates
from sfl.state.model_store import ModelStore
from sfl.state.rounds import Answer, Outcome, Round

if TYPE_CHECKING:
    import torch

    from sfl.server.context import AveragerContext

logger = logging.getLogger(__name__)


def aggregate(ctx: AveragerContext, round_: Round) -> Aggregated | str | None:
    """Write the next model version from the round's accepted updates; None if not one of
    them could be read back, or why DP refuses the step (``sfl.server.private_release``):
    the round is then abandoned by the caller.

    Every update is weighed and moved within the round's bounds (``sfl.learning.rules.bounds``):
    its weight at most ``max_weight_ratio`` times the median example count, its change
    from the base model clipped to the round's norm bound. One update that cannot be read
    back is left out (``excluded``), never the round. A stateful rule's server state is
    written once beside the new version, before it; a retry that finds it written makes
    the model from that state, so model and state always agree. With DP on, each update
    weighs 1 and is clipped to the DP clip, and the rule receives the noised sum instead.
    """
    started = ctx.clock()
    config = ctx.round_config(round_)
    rule = build_rule(config.aggregation, config.aggregation_params)
    accepted = accepted_answers(ctx, round_)
    version = round_.base_version + 1
    private = private_release.plan(ctx, round_, config, rule, version) if config.private else None
    if isinstance(private, str):
        return private
    base = base_model(ctx.models, round_.base_version)
    if private is not None:  # DP: weight 1 each, every change clipped to the DP clip
        weights = dict.fromkeys(accepted, 1.0)
        bound = private.clip
    else:
        weights = dict(
            zip(
                accepted,
                bounded_weights(
                    [a.num_examples for a in accepted.values()], config.max_weight_ratio
                ),
                strict=True,
            )
        )
        bound = norm_bound(
            [a.delta_norm for a in accepted.values() if a.delta_norm > 0],
            factor=config.norm_bound_factor,
            absolute=config.max_update_norm,
            fallback=round_.norm_bound_hint,
            base_norm=model_norm(base),
        )
    entries = [
        Entry(client, a.key, a.etag, weights[client], clip_scale(a.delta_norm, bound))
        for client, a in accepted.items()
    ]
    previous = previous_state(ctx, rule, config.aggregation, round_.base_version)
    record: PrivacyRecord | None = None
    # --- sharded aggregation (sfl.server.shards): above aggregation_shard_above updates, shard
    # invocations sum them in parallel and this one reduces; else they are read here.
    sharded = shards.sharded_updates(
        ctx.s3, ctx.names, round_, rule, entries, config, ctx.invoke_shard
    )
    # ------------------------------------------------------------------------------------
    with sharded or RoundUpdates(
        ctx.s3,
        ctx.names.updates_bucket,
        entries,
        base,
        ctx.models.header(round_.base_version),
        in_flight=config.aggregation_in_flight,
    ) as updates:
        if private is None:
            result = rule.aggregate(base, updates, previous)
        else:
            released = private.release(ctx, base, updates, accepted)
            result = None if released is None else rule.aggregate(base, released[0], previous)
            record = None if released is None else released[1]
        read = list(updates.read)
        excluded = dict(updates.excluded)
    if result is None:
        return None
    used = [(client, accepted[client]) for client in read]
    body, rewritten = write_version(
        ctx,
        rule,
        config.aggregation,
        base,
        result,
        version,
        round=round_.round,
        participants=len(used),
    )
    finished = ctx.clock()
    total_examples = sum(a.num_examples for _, a in used)
    details = dict(result.details or {})  # the rule's own report, clients named by id
    summary = {
        "participants": len(used),
        "num_examples": total_examples,
        "weight": sum(weights[c] for c, _ in used),
        "client_loss": _weighted(used, weights, "loss", 0.0, 1e6),
        "client_accuracy": _weighted(used, weights, "accuracy", 0.0, 1.0),
        "aggregation": config.aggregation,
        "aggregate_seconds": finished - started,
        "model_bytes": len(body),
        "bytes_up": round_.bytes_up,
        "bytes_down": round_.bytes_down,
        "norm_bound": bound if math.isfinite(bound) else None,
        "clipped": [e.client for e in entries if e.scale < 1.0 and e.client in read],
        "excluded": excluded,
        "model_already_written": rewritten,
        **details,
    }
    if record is not None:
        summary["privacy"] = record.summary()
        private_release.after_version(ctx, config, record)
    return Aggregated(version, summary, finished, stateful_rule=rule.stateful)


def write_version(
    ctx: AveragerContext,
    rule: AggregationRule,
    rule_name: str,
    base: Mapping[str, torch.Tensor],
    result: Aggregate,
    version: int,
    **metadata: Any,
) -> tuple[bytes, bool]:
    """Write a rule's result as model ``version`` once: a stateful rule's state first, beside
    it (a retry that finds the state written makes the model from that state, so model and
    state always agree), then the model with ``If-None-Match``. Returns the body and whether
    the version was there already (a retry: kept, not overwritten)."""
    model = result.model
    if result.state is not None and not ctx.models.put_state(
        version, encode(result.state, ModelStore.state_metadata(version, rule_name))
    ):
        stored = _state(ctx, version, rule_name)
        if stored is None:
            raise RuntimeError(f"server state of version {version} exists for another rule")
        model = rule.model_from_state(base, stored)
    body = encode_model(model, version=version, **metadata)
    rewritten = not ctx.models.put_model(version, body)
    if rewritten:
        logger.warning("model version already written; keeping it", extra={"version": version})
    return body, rewritten


def previous_state(
    ctx: AveragerContext, rule: AggregationRule, rule_name: str, version: int
) -> dict[str, torch.Tensor] | None:
    """The server state a stateful rule left beside ``version`` (None: stateless or none)."""
    return _state(ctx, version, rule_name) if rule.stateful else None


def accepted_answers(ctx: AveragerContext, round_: Round) -> dict[str, Answer]:
    """The round's accepted answers, by client id: from the loaded round, or one
    paginated query of its slots."""
    if round_.slots_loaded:
        return dict(sorted(round_.accepted.items()))
    slots = ctx.rounds.slots(round_.experiment, round_.round, only="accepted")
    found = {s.client_id: s.answer for s in slots if s.answer is not None}
    return {c: a for c, a in sorted(found.items()) if a.outcome is Outcome.ACCEPTED}


def _state(ctx: AveragerContext, version: int, rule: str) -> dict[str, torch.Tensor] | None:
    body = ctx.models.state_bytes(version, rule)
    return None if body is None else decode(body)


def _weighted(
    used: list[tuple[str, Answer]], weights: dict[str, float], metric: str, lo: float, hi: float
) -> float | None:
    """A client-reported metric averaged with the clients' bounded weights, each value
    clamped to its plausible range, so no single device sets the round's figure."""
    pairs = [
        (weights[c], min(max(a.metrics[metric], lo), hi)) for c, a in used if metric in a.metrics
    ]
    total = sum(w for w, _ in pairs)
    return sum(w * v for w, v in pairs) / total if total else None
