"""The cost model: dollars from the price table's own numbers, usage from a round's figures,
the table's integrity, and the ``sfl cost`` command."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sfl.cli.main import main
from sfl.core import cost, lambda_shapes
from sfl.core.prices import PRICES, US_EAST_1

REPO = Path(__file__).resolve().parents[1]
P = {name: price.unit_price for name, price in US_EAST_1.items()}
SHAPE = cost.StackShape()


# --- the price table ----------------------------------------------------------------------


def test_every_price_has_a_source_a_date_a_basis_and_a_sane_value() -> None:
    for region, table in PRICES.items():
        assert set(table) == set(US_EAST_1), f"{region} prices other items than us-east-1"
        for name, price in table.items():
            assert math.isfinite(price.usd) and price.usd >= 0, name
            assert price.per > 0 and price.unit, name
            assert price.source.startswith("https://"), name
            assert price.basis in ("quoted", "commonly published"), name
            datetime.date.fromisoformat(price.read_on)


def test_every_region_prices_every_line_the_estimate_has() -> None:
    for region, table in PRICES.items():
        assert cost.estimate(cost.RoundUsage(), table, region).total == 0.0


def test_a_region_without_prices_is_refused_by_name() -> None:
    with pytest.raises(cost.NoPricesError, match=r"no prices for region 'mars-1'.*us-east-1"):
        cost.prices_for("mars-1")


# --- estimate: usage x the table's unit prices ---------------------------------------------


def test_estimate_prices_each_line_from_the_table() -> None:
    usage = cost.RoundUsage(
        lambdas=(
            cost.LambdaUsage("initiator", "arm64", 256, 2, 4.0),  # 1 GB-s
            cost.LambdaUsage("averager", "x86_64", 2048, 3, 1.5),  # 3 GB-s
        ),
        s3_put_requests=10,
        s3_get_requests=1_000,
        s3_gb_months=2.0,
        dynamodb_rru=8.0,
        dynamodb_wru=6.0,
        log_bytes=cost.GB // 2,
        bytes_out_internet=3 * cost.GB,
        bytes_in_internet=5 * cost.GB,
    )
    items = cost.estimate(usage, US_EAST_1).items
    assert items["lambda_requests"] == pytest.approx(5 * P["lambda_request"])
    assert items["lambda_compute_initiator"] == pytest.approx(1.0 * P["lambda_gb_second_arm64"])
    assert items["lambda_compute_averager"] == pytest.approx(3.0 * P["lambda_gb_second_x86_64"])
    assert items["s3_put_requests"] == pytest.approx(10 * P["s3_put_copy_post_list"])
    assert items["s3_get_requests"] == pytest.approx(1_000 * P["s3_get_select"])
    assert items["s3_storage"] == pytest.approx(2 * P["s3_storage_gb_month"])
    assert items["dynamodb_reads"] == pytest.approx(8 * P["dynamodb_read_request_unit"])
    assert items["dynamodb_writes"] == pytest.approx(6 * P["dynamodb_write_request_unit"])
    assert items["cloudwatch_logs"] == pytest.approx(0.5 * P["cloudwatch_logs_ingestion_gb"])
    assert items["data_transfer_out"] == pytest.approx(3 * P["data_transfer_out_internet_gb"])
    assert items["data_transfer_in"] == 0.0  # uploads from devices are free
    assert cost.estimate(usage, US_EAST_1).total == pytest.approx(sum(items.values()))


# --- usage from a round's figures ------------------------------------------------------------


def test_a_round_counts_each_request_the_protocol_makes() -> None:
    figures = cost.RoundFigures(selected=3, accepted=2, rejected=1, model_bytes=1_000)
    a = cost.CostAssumptions()
    usage = cost.usage_for_round(figures, SHAPE, a)
    # Initiator HEAD; 3 devices x (assignment + model); 3 judged updates; the container's base
    # header (2 ranges) + base model; 2 accepted re-read; evaluation HEAD + GET.
    assert usage.s3_get_requests == 1 + 3 * 2 + 3 + 3 + 2 + 2
    # Assignment; 3 uploads; model version + lineage.
    assert usage.s3_put_requests == 1 + 3 + 2
    assert [f.invocations for f in usage.lambdas] == [1, 3 + 1]
    assert usage.bytes_out_internet == 3 * 1_000 + 3 * a.assignment_bytes
    assert usage.bytes_in_internet == 3 * 1_000


def test_measured_durations_and_memory_make_the_gb_seconds() -> None:
    a = cost.CostAssumptions()
    figures = cost.RoundFigures(
        selected=2,
        accepted=2,
        model_bytes=1,
        aggregate_seconds=1.25,
        update_handling_seconds=0.75,
        initiator_seconds=0.5,
    )
    initiator, averager = cost.usage_for_round(figures, SHAPE, a).lambdas
    assert averager.gb_seconds == pytest.approx(
        SHAPE.averager.memory_mb / 1024 * (0.75 + 1.25 + a.averager_init_seconds)
    )
    assert initiator.gb_seconds == pytest.approx(
        SHAPE.initiator.memory_mb / 1024 * (0.5 + a.initiator_init_seconds)
    )


def _wru(selected: int, assumptions: cost.CostAssumptions) -> float:
    figures = cost.RoundFigures(selected=selected, accepted=selected, model_bytes=1)
    return cost.usage_for_round(figures, SHAPE, assumptions).dynamodb_wru


def test_answers_in_the_round_item_make_writes_grow_faster_than_the_round() -> None:
    table = cost.CostAssumptions()  # this protocol: slot items
    in_item = dataclasses.replace(table, answers_in_round_item=True, selected_in_round_item=True)
    # Each answer rewrites the whole (growing) item: doubling the round more than doubles.
    assert _wru(2_000, in_item) > 3 * _wru(1_000, in_item)
    # In their own items, every answer costs the same transaction: growth is linear.
    assert _wru(3_000, table) - _wru(2_000, table) == _wru(2_000, table) - _wru(1_000, table)


def test_a_round_record_becomes_figures() -> None:
    summary = {"model_bytes": 500, "bytes_up": 1_400, "bytes_down": 1_500, "aggregate_seconds": 2}
    figures = cost.figures_from_round(
        selected=3,
        accepted=2,
        rejected=1,
        other_rejections=4,
        candidates=9,
        summary=summary,
        select_seconds=0.1,
    )
    assert figures == cost.RoundFigures(
        selected=3,
        accepted=2,
        rejected=1,
        other_rejections=4,
        candidates=9,
        model_bytes=500,
        update_bytes=1_400,
        bytes_to_devices=1_500,
        aggregate_seconds=2.0,
        select_seconds=0.1,
    )


def test_the_round_summary_is_the_estimate_and_never_fails_a_round() -> None:
    figures = cost.RoundFigures(selected=4, accepted=4, model_bytes=10_000)
    summary = cost.round_cost_summary(figures, SHAPE)
    expected = cost.estimate(cost.usage_for_round(figures, SHAPE), US_EAST_1)
    assert summary["usd"] == pytest.approx(expected.total)
    assert summary["usage"]["lambda_invocations"] == {"initiator": 1, "averager": 5}
    json.dumps(summary)  # storable in the round record and history.json

    elsewhere = cost.round_cost_summary(figures, dataclasses.replace(SHAPE, region="mars-1"))
    assert elsewhere["usd"] is None and "mars-1" in elsewhere["unpriced"]


# --- usage from a buffered version's figures --------------------------------------------------

#: One version, by hand: since the version before it, two ticketing runs issued 3 tickets
#: (reading 10 registry items, 0.2 s up to their issue), 3 answers came (2 accepted, 1
#: refused; 2,500 bytes; 0.6 s of judging) and 1 ticket expired; its step read 2 updates
#: (1,800 bytes) trained from one version, in 0.4 s, and wrote a 1,000-byte model.
VERSION = cost.VersionFigures(
    model_bytes=1_000,
    counts=cost.PoolCounts(
        issue_runs=2,
        issued=3,
        candidates=10,
        select_seconds=0.2,
        answered=3,
        accepted=2,
        rejected=1,
        expired=1,
        answer_bytes=2_500,
        handling_seconds=0.6,
    ),
    members=2,
    member_bytes=1_800,
    base_versions=1,
    aggregate_seconds=0.4,
)


def test_a_version_counts_each_request_the_buffered_protocol_makes() -> None:
    """Hand-counted with the default item sizes (a pool item 1 KB, a buffer 1.5 KB, tickets,
    places and members 500 B, registry items 300 B: one read unit each; transactional
    writes 2 units per KB)."""
    a = cost.CostAssumptions()
    usage = cost.usage_for_version(VERSION, SHAPE, a)
    # Runs: assignment x 2. Answers: 3 uploads. Step: the version and its lineage.
    assert usage.s3_put_requests == 2 + 3 + 2
    # 3 devices x (assignment + model); 3 answers judged; the container's base header
    # (2 ranges) + base model; the current model, 1 base version, 2 updates; evaluation x 2.
    assert usage.s3_get_requests == 3 * 2 + 3 + 3 + (1 + 1 + 2) + 2
    # Runs: (pool x 2, configuration, places x 2, registry 5 x 300 B) x 2 = 12; answers:
    # (ticket, pool, next buffer) x 3 + (pool, newest buffer) x 2 = 13; registry for 4 ended
    # tickets = 4; step: buffer x 4, pool, members query = 6.
    assert usage.dynamodb_rru == 12 + 13 + 4 + 6
    # Issue: pool 2 x 2 runs + (ticket + place) 2 x 2 x 3 tickets = 16; ends: (ticket,
    # place, pool) 6 x 4 = 24; accepted: (buffer 4 + member 2) x 2 = 12; registry 4; step:
    # lease + close (pool 2 + buffer 4) x 2 = 12.
    assert usage.dynamodb_wru == 16 + 24 + 12 + 4 + 12
    initiator, averager = usage.lambdas
    assert (initiator.invocations, averager.invocations) == (2, 3)
    assert initiator.gb_seconds == pytest.approx(
        SHAPE.initiator.memory_mb / 1024 * (0.2 + 2 * 0.5 + a.initiator_init_seconds)
    )
    assert averager.gb_seconds == pytest.approx(
        SHAPE.averager.memory_mb / 1024 * (0.6 + 0.4 + a.averager_init_seconds)
    )
    assert usage.bytes_out_internet == 3 * (1_000 + a.assignment_bytes)
    assert usage.bytes_in_internet == 2_500
    # Judging reads every answer; the step the base (container), current, 1 base and members.
    assert usage.bytes_s3_to_lambda == 2_500 + 1_000 + 2 * 1_000 + 1_800
    assert usage.log_bytes == 2 * 2_000 + 3 * 1_500 + 4_000
    assert usage.s3_gb_months == pytest.approx(2_500 / cost.GB * 30 / cost.DAYS_PER_MONTH)


def test_a_version_summary_has_a_rounds_shape_and_what_it_was_charged_with() -> None:
    figures = cost.RoundFigures(selected=4, accepted=4, model_bytes=10_000)
    round_summary = cost.round_cost_summary(figures, SHAPE)
    summary = cost.version_cost_summary(VERSION, SHAPE)
    assert set(round_summary) <= set(summary)
    assert set(round_summary["usage"]) == set(summary["usage"])
    expected = cost.estimate(cost.usage_for_version(VERSION, SHAPE), US_EAST_1)
    assert summary["usd"] == pytest.approx(expected.total) and summary["usd"] > 0
    assert summary["counted"]["issued"] == 3 and summary["counted"]["members"] == 2
    json.dumps(summary)

    elsewhere = cost.version_cost_summary(VERSION, dataclasses.replace(SHAPE, region="mars-1"))
    assert elsewhere["usd"] is None and "mars-1" in elsewhere["unpriced"]
    assert elsewhere["usage"] == summary["usage"]  # the units are counted without prices


def test_a_buffer_summary_and_the_pool_counts_become_a_versions_figures() -> None:
    before = cost.PoolCounts(issue_runs=4, issued=9, answered=6, accepted=5, answer_bytes=600)
    now = dataclasses.replace(
        before, issue_runs=5, issued=11, answered=9, accepted=7, rejected=1, answer_bytes=950
    )
    summary = {
        "model_bytes": 500,
        "participants": 2,
        "excluded": {"d3#12": "unreadable"},
        "bytes_up": 300,
        "staleness": {"0": 1, "2": 1},
        "aggregate_seconds": 0.25,
        "stateful_rule": True,
    }
    figures = cost.figures_from_version(counts=now, previous=before, summary=summary)
    assert figures == cost.VersionFigures(
        model_bytes=500,
        counts=cost.PoolCounts(
            issue_runs=1, issued=2, answered=3, accepted=2, rejected=1, answer_bytes=350
        ),
        members=3,
        member_bytes=300,
        base_versions=2,
        aggregate_seconds=0.25,
        stateful_rule=True,
    )
    # What the summary stores reads back as it was (a missing counter is 0).
    assert cost.PoolCounts.from_dict(now.to_dict()) == now
    assert cost.PoolCounts.from_dict({"issued": 3}) == cost.PoolCounts(issued=3)


def test_a_function_reads_its_region_and_memory_from_lambdas_environment() -> None:
    shape = cost.StackShape.from_environment(
        {"AWS_REGION": "us-east-1", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "4096"}
    )
    assert shape.region == "us-east-1"
    assert shape.averager.memory_mb == 4096
    assert shape.initiator == lambda_shapes.INITIATOR


def test_idle_day_counts_the_schedule_alarms_dashboard_and_storage() -> None:
    idle = cost.idle_usage_per_day(SHAPE, model_versions=10, model_bytes=cost.GB // 10)
    ticks = 24 * 60 / SHAPE.schedule_minutes
    assert [f.invocations for f in idle.lambdas] == [ticks, ticks]
    assert idle.s3_gb_months == pytest.approx(1.0 / cost.DAYS_PER_MONTH)
    items = cost.estimate(idle, US_EAST_1).items
    assert items["cloudwatch_alarms"] == pytest.approx(
        6 * P["cloudwatch_alarm_month"] / cost.DAYS_PER_MONTH
    )
    assert items["cloudwatch_dashboards"] == pytest.approx(
        P["cloudwatch_dashboard_month"] / cost.DAYS_PER_MONTH
    )


# --- sfl cost --------------------------------------------------------------------------------


def _cost_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["cost", "--model-bytes", "438040", "--json", *args]) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


def test_cost_json_adds_up(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = _cost_json(capsys, "--region", "us-east-1", "--cdk-json", str(tmp_path / "none"))
    per_round = out["per_round"]
    assert per_round["usd"] == pytest.approx(sum(per_round["items"].values()))
    assert out["per_day"] == pytest.approx(
        out["idle_per_day"]["usd"] + out["fleet_per_day"]["usd"] + 24 * per_round["usd"]
    )
    assert out["clients"] == 40 and out["model_bytes"] == 438040
    assert out["round_item_fits"] is True


def test_cost_says_when_a_round_cannot_fit_its_item(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["cost", "--model-bytes", "1", "--clients", "10000", "--region", "us-east-1"]
    assert main([*args, "--answers-in-round-item"]) == 0
    assert "over DynamoDB's 409,600-byte item limit" in capsys.readouterr().out
    assert main(args) == 0  # the slot protocol keeps the round item small
    assert "item limit" not in capsys.readouterr().out


def test_cost_reads_memory_from_cdk_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    base = _cost_json(capsys, "--region", "us-east-1", "--cdk-json", str(tmp_path / "none"))
    cdk = json.loads((REPO / "cdk.json").read_text())
    cdk["context"]["sfl_infra"]["averager_memory_mb"] = 2 * lambda_shapes.AVERAGER.memory_mb
    (tmp_path / "cdk.json").write_text(json.dumps(cdk))
    doubled = _cost_json(capsys, "--region", "us-east-1", "--cdk-json", str(tmp_path / "cdk.json"))
    line = "lambda_compute_averager"
    assert doubled["per_round"]["items"][line] == pytest.approx(
        2 * base["per_round"]["items"][line]
    )


def test_cost_checks_cdk_json_as_synth_does(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cdk = json.loads((REPO / "cdk.json").read_text())
    cdk["context"]["sfl_infra"]["schedule_minutes"] = 0
    (tmp_path / "cdk.json").write_text(json.dumps(cdk))
    args = ["cost", "--model-bytes", "1", "--region", "us-east-1"]
    assert main([*args, "--cdk-json", str(tmp_path / "cdk.json")]) == 2
    assert (
        "sfl cost: config key sfl_infra.schedule_minutes: 0 is not allowed; "
        "allowed: an integer from 1 to 1440" in capsys.readouterr().err
    )


def test_the_installed_command_reads_the_repository_cdk_json(tmp_path: Path) -> None:
    """``sfl`` as installed (infra/ is not a package of it), run outside the repository."""
    sfl = Path(sys.executable).parent / "sfl"
    args = ["cost", "--json", "--model-bytes", "1000", "--region", "us-east-1"]
    done = subprocess.run(
        [str(sfl), *args, "--cdk-json", str(REPO / "cdk.json")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["per_round"]["usd"] > 0
    assert "not read" not in done.stderr


def test_cost_refuses_a_region_without_prices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cost", "--model-bytes", "1", "--region", "mars-1"]) == 2
    assert "no prices for region 'mars-1'" in capsys.readouterr().err


# --- the docs state what the model computes ------------------------------------------------


def test_docs_list_every_price_and_state_the_idle_day() -> None:
    guide = (REPO / "docs" / "cost.md").read_text()
    for name in US_EAST_1:
        assert f"`{name}`" in guide, name
    idle = cost.estimate(
        cost.idle_usage_per_day(SHAPE, model_versions=100, model_bytes=438_040), US_EAST_1
    )
    stated = f"**${idle.total:.3f} a day"
    assert stated in guide
    assert stated in (REPO / "docs" / "deploy.md").read_text()


def test_push_prices_the_fleet_by_its_slow_polls_heartbeats_and_notices() -> None:
    devices, rounds = 10_000, 24
    polling = cost.fleet_usage_per_day(cost.StackShape(push=False), devices, rounds_per_day=rounds)
    pushed = cost.fleet_usage_per_day(cost.StackShape(), devices, rounds_per_day=rounds)
    assert polling.s3_get_requests == devices * 86_400 // 10
    assert pushed.s3_get_requests == devices * 86_400 // 300
    # A heartbeat writes the item and the active index's entry.
    assert pushed.dynamodb_wru == devices * 86_400 / 600 * 2
    # Each round: a delivery and its PUBACK per device, and the initiator's publish.
    assert pushed.iot_messages == rounds * (devices * 2 + 1) and polling.iot_messages == 0
    assert pushed.iot_connection_minutes == polling.iot_connection_minutes == devices * 1_440

    def beyond_greengrass(usage: cost.RoundUsage) -> float:
        items = cost.estimate(usage, US_EAST_1).items
        return sum(v for k, v in items.items() if k != "greengrass_devices")

    # The goal (issue 23): a connected fleet of 10,000 at most $5 a day beyond Greengrass.
    assert beyond_greengrass(pushed) <= 5.0 < beyond_greengrass(polling)
