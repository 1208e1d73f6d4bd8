"""DP's settings and sampling: what DP cannot account is refused with its reason, Poisson
selection draws each device with probability q (from the operating system's randomness when DP
is on), and a device with local DP uploads only a clipped, noised change."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_client.client import EdgeClient
from edge_client.settings import parse_settings
from sfl.core.config import ConfigError, FederationConfig
from sfl.core.privacy_ledger import describe, over_budget, with_release
from sfl.core.selection import Candidate, SelectionPolicy, sampling_rate, select_poisson
from sfl.learning import codec
from sfl.learning.local_privacy import change_norm, device_epsilon, privatise
from sfl.learning.splits import write_client_splits
from sfl.learning.tasks import load_task
from sfl.server.averager import bootstrap_model
from sfl.server.initiator import selection_rng, start_round
from sfl.state.rounds import RoundStore
from tests.conftest import Stack

DP = {"dp_noise_multiplier": 1.0, "dp_clip": 1.0, "selection": "poisson"}


# --- what DP refuses, and why -------------------------------------------------------------


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "clamped_mean"])
def test_rules_that_read_single_updates_are_refused_with_dp(rule: str) -> None:
    with pytest.raises(ConfigError, match="sensitivity"):
        FederationConfig(**DP, aggregation=rule)


@pytest.mark.parametrize("selection", ["fast_clients", "utility", "random", "all"])
def test_selections_the_accountant_does_not_cover_are_refused_with_dp(selection: str) -> None:
    with pytest.raises(ConfigError, match="Poisson sampling") as refused:
        FederationConfig(**{**DP, "selection": selection})
    assert "allowed: poisson" in str(refused.value)


def test_dp_needs_a_clip_and_rounds_mode() -> None:
    with pytest.raises(ConfigError, match="dp_clip"):
        FederationConfig(**{**DP, "dp_clip": 0.0})
    with pytest.raises(ConfigError, match="buffered"):
        FederationConfig(**DP, mode="buffered")
    with pytest.raises(ConfigError, match="dp_clip_bits_stddev"):
        FederationConfig(**DP, dp_clipping="adaptive", dp_clip_bits_stddev=0.1)


@pytest.mark.parametrize("rule", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_rules_whose_input_is_the_mean_run_with_dp(rule: str) -> None:
    assert FederationConfig(**DP, aggregation=rule).private


def test_dp_is_off_by_default_and_refuses_nothing() -> None:
    config = FederationConfig(aggregation="krum", selection="utility")
    assert not config.private


def test_the_dp_keys_travel_through_the_lambdas_environment() -> None:
    config = FederationConfig(**DP, dp_clipping="adaptive", dp_epsilon_budget=3.0)
    assert FederationConfig.from_env(config.to_env()) == config


# --- poisson selection -------------------------------------------------------------------


def test_each_candidate_is_drawn_with_probability_q() -> None:
    candidates = [Candidate(f"c{i}") for i in range(200)]
    q = sampling_rate(len(candidates), fraction=1.0, clients_per_round=20)
    rng = random.Random(7)
    draws = 500
    counts = dict.fromkeys((c.client_id for c in candidates), 0)
    sizes = []
    for _ in range(draws):
        picked = select_poisson(candidates, 20, rng, SelectionPolicy(sampling_rate=q))
        sizes.append(len(picked))
        for client in picked:
            counts[client] += 1

    assert q == pytest.approx(0.1)
    # Each device's inclusion frequency is binomial(500, 0.1): mean 50, sd 6.7.
    assert all(20 <= n <= 85 for n in counts.values())
    assert sum(counts.values()) / (draws * len(candidates)) == pytest.approx(q, rel=0.05)
    assert len(set(sizes)) > 5  # the round's size varies


def test_sampling_rate_follows_clients_per_round_or_fraction() -> None:
    assert sampling_rate(40, fraction=0.5, clients_per_round=0) == 0.5
    assert sampling_rate(40, fraction=0.5, clients_per_round=10) == 0.25
    assert sampling_rate(5, fraction=0.5, clients_per_round=10) == 1.0
    assert sampling_rate(0, fraction=0.5, clients_per_round=10) == 0.0


def test_with_dp_the_draw_never_comes_from_the_seed() -> None:
    private = FederationConfig(**DP)
    assert isinstance(selection_rng(private, 1), random.SystemRandom)
    candidates = [Candidate(f"c{i}") for i in range(64)]
    policy = SelectionPolicy(sampling_rate=0.5)
    draws = {tuple(select_poisson(candidates, 32, selection_rng(private, 1), policy)) for _ in "ab"}
    assert len(draws) == 2  # the same seed, experiment and round: two different samples
    # Without DP the seed makes it reproducible, as every other rule's.
    public = FederationConfig(selection="poisson")
    again = {tuple(select_poisson(candidates, 32, selection_rng(public, 1), policy)) for _ in "ab"}
    assert len(again) == 1


def test_an_empty_draw_starts_no_round_and_says_why(stack: Stack) -> None:
    stack.config = stack.config.replace(selection="poisson", fraction=0.01)
    stack.put_model(0, {"w": torch.zeros(2)})
    stack.register("a")
    results = [start_round(stack.clients, stack.names, stack.config) for _ in range(30)]
    empty = [r for r in results if not r.started and "picked nobody" in r.reason]
    assert empty and "the next run draws again" in empty[0].reason
    assert all(r.started or r.reason == empty[0].reason or "is OPEN" in r.reason for r in results)


def test_the_round_records_the_sampling_it_really_did(stack: Stack) -> None:
    stack.config = stack.config.replace(**DP, clients_per_round=2)
    stack.put_model(0, {"w": torch.zeros(2)})
    stack.register("a", "b", "c", "d")
    started = start_round(stack.clients, stack.names, stack.config)
    while not started.started:  # q = 1/2 of 4: nobody is drawn 1 time in 16
        started = start_round(stack.clients, stack.names, stack.config)
    round_ = RoundStore(stack.clients.dynamodb, stack.names.rounds_table).get("test", 1)
    assert round_ is not None
    assert round_.sampling == {"rate": 0.5, "population": 4.0, "expected": 2.0}


# --- the ledger's arithmetic ---------------------------------------------------------------


def test_releases_are_counted_per_distinct_pair() -> None:
    releases = with_release((), 0.05, 1.0)
    releases = with_release(releases, 0.05, 1.0)
    releases = with_release(releases, 0.04, 1.0)
    assert releases == ((0.04, 1.0, 1), (0.05, 1.0, 2))


def test_the_status_line_and_the_budget_reason() -> None:
    line = describe({"epsilon": 2.31, "delta": 5e-4, "versions": 40}, 3.0)
    assert line == "epsilon 2.31 of 3 at delta 5.0e-04 after 40 versions"
    assert over_budget(2.9, 3.0, 1e-5) == "" and over_budget(9.0, 0.0, 1e-5) == ""
    assert over_budget(3.1, 3.0, 1e-5).startswith("privacy budget")
    assert over_budget(math.inf, 3.0, 1e-5)


# --- local DP on the device ----------------------------------------------------------------


def test_local_dp_clips_the_change_and_adds_noise_of_the_configured_size() -> None:
    base = {"w": torch.zeros(10_000), "n": torch.tensor(3)}
    trained = {"w": torch.full((10_000,), 0.1), "n": torch.tensor(4)}
    clipped = privatise(
        trained, base, clip=1.0, noise_multiplier=0.0, generator=torch.Generator().manual_seed(0)
    )
    assert change_norm(clipped, base) == pytest.approx(1.0, rel=1e-5)  # 10 clipped to 1
    noised = privatise(
        trained, base, clip=1.0, noise_multiplier=0.5, generator=torch.Generator().manual_seed(0)
    )
    noise = noised["w"].double() - clipped["w"].double()
    assert float(noise.std()) == pytest.approx(0.5, rel=0.05)
    assert int(noised["n"]) == 4  # counters are not noised (the server keeps the base's)


def test_a_devices_epsilon_grows_with_its_participations() -> None:
    first, tenth = device_epsilon(1, 2.0), device_epsilon(10, 2.0)
    assert first is not None and tenth is not None and 0 < first < tenth
    assert device_epsilon(0, 2.0) is None and device_epsilon(3, 0.0) is None


def test_local_dp_settings_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    env = {
        "SFL_CLIENT_ID": "c1",
        "SFL_MODELS_BUCKET": "m",
        "SFL_UPDATES_BUCKET": "u",
        "SFL_CLIENTS_TABLE": "t",
        "SFL_DATA_DIR": "/data",
    }
    settings = parse_settings(["--local-dp-clip", "2", "--local-dp-noise-multiplier", "1.5"], env)
    assert (settings.local_dp_clip, settings.local_dp_noise_multiplier) == (2.0, 1.5)
    assert parse_settings([], {**env, "SFL_LOCAL_DP_CLIP": "0.5"}).local_dp_clip == 0.5
    with pytest.raises(SystemExit):
        parse_settings(["--local-dp-noise-multiplier", "1"], env)
    assert "needs --local-dp-clip" in capsys.readouterr().err


def test_a_device_with_local_dp_uploads_a_clipped_noised_change(
    stack: Stack, tmp_path: Path
) -> None:
    task = load_task("digits")
    write_client_splits(task, tmp_path, 1, "iid", seed=0, client_ids=["c1"])
    env = {
        **stack.aws.env(),
        "SFL_CLIENT_ID": "c1",
        "SFL_MODELS_BUCKET": stack.names.models_bucket,
        "SFL_UPDATES_BUCKET": stack.names.updates_bucket,
        "SFL_CLIENTS_TABLE": stack.names.clients_table,
        "SFL_DATA_DIR": str(tmp_path / "c1"),
        "SFL_LOCAL_DP_CLIP": "0.01",
    }
    client = EdgeClient(parse_settings([], env), stack.clients, task)
    base = task.build_model(seed=0).state_dict()
    bootstrap_model(stack.clients, stack.names, base, seed=0)
    client.heartbeat()
    assert start_round(stack.clients, stack.names, stack.config).started
    assignment = client.poll()
    assert assignment is not None

    client.answer(assignment)

    body = stack.clients.s3.get_object(
        Bucket=stack.names.updates_bucket, Key="updates/c1/round-000001.safetensors"
    )["Body"].read()
    uploaded = codec.decode(body)
    # Training moves digits' CNN by far more than 0.01; the device clipped it to 0.01.
    assert change_norm(uploaded, base) == pytest.approx(0.01, rel=1e-3)
    assert client.local_dp_participations == 1


@given(
    values=st.lists(
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=40
    ),
    clip=st.floats(min_value=1e-3, max_value=1e3),
)
@settings(max_examples=60, deadline=None)
def test_a_clipped_change_is_never_longer_than_the_clip(values: list[float], clip: float) -> None:
    base = {"w": torch.zeros(len(values), dtype=torch.float64)}
    trained = {"w": torch.tensor(values, dtype=torch.float64)}
    out = privatise(trained, base, clip=clip, noise_multiplier=0.0, generator=torch.Generator())
    assert change_norm(out, base) <= clip * (1 + 1e-9)


@given(pairs=st.lists(st.sampled_from([(0.05, 1.0), (0.04, 1.0), (0.05, 1.2)]), max_size=30))
def test_the_ledger_counts_every_release_once(pairs: list[tuple[float, float]]) -> None:
    releases: tuple[tuple[float, float, int], ...] = ()
    for q, z in pairs:
        releases = with_release(releases, q, z)
    assert sum(n for *_, n in releases) == len(pairs)
    assert {(q, z) for q, z, _ in releases} == set(pairs)
