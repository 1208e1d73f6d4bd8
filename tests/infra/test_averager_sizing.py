"""cdk synth sizes the averager for the model and the rule (sfl.core.sizing): a robust rule
gets the ephemeral storage to spool a round's updates, and what no Lambda can hold is refused
before anything is built, with the numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
from aws_cdk import App, assertions
from stack_template import REPO_ROOT, cdk_context, synthesize

from infra.stack import build_app
from sfl.core.config import ConfigError

RESNET18_BYTES = 46_796_608  # resnet18's state dict as stored: 11.7 M float32 parameters


def context_with(sfl: dict[str, object], sfl_infra: dict[str, object]) -> dict[str, object]:
    context = cdk_context()
    context["sfl"] = {**context["sfl"], **sfl}
    context["sfl_infra"] = {**context["sfl_infra"], **sfl_infra}
    return context


def test_a_robust_rule_with_a_45_mb_model_and_100_clients_gets_the_tmp_to_spool_them(
    tmp_path: Path,
):
    context = context_with(
        {"aggregation": "median", "clients_per_round": 100, "aggregation_lease_seconds": 900},
        {"model_bytes": RESNET18_BYTES},
    )
    stack, _ = synthesize(tmp_path, context)
    template = assertions.Template.from_stack(stack)
    averager = template.find_resources(
        "AWS::Lambda::Function",
        {"Properties": {"Description": assertions.Match.string_like_regexp("^Accepts client")}},
    )
    (properties,) = [r["Properties"] for r in averager.values()]
    assert properties["EphemeralStorage"]["Size"] * 1024**2 >= 100 * RESNET18_BYTES
    assert properties["EphemeralStorage"]["Size"] <= 10_240
    assert properties["MemorySize"] >= 2048
    assert properties["Timeout"] <= 900


def test_a_round_no_lambda_can_hold_is_refused_at_synth_with_the_numbers():
    context = context_with(
        {"aggregation": "krum", "clients_per_round": 400},
        {"model_bytes": RESNET18_BYTES},
    )
    app = App(context=context, outdir=None)
    with pytest.raises(ConfigError) as refused:
        build_app(app, source_root=REPO_ROOT)
    message = str(refused.value)
    assert "a 44.6 MiB model, 400 updates a round, rule 'krum'" in message
    assert "Lambda's most: 10240 MiB" in message
