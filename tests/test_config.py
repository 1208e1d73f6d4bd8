"""One config definition: typed defaults, clear errors, the same values through every sink."""

from __future__ import annotations

import pytest

from sfl.core.config import DEPLOY_TIME_KEYS, ConfigError, FederationConfig, describe


def test_defaults_round_trip_through_lambda_environment() -> None:
    config = FederationConfig(local_epochs=3, lr=0.01, quorum="min_fraction")
    assert FederationConfig.from_env(config.to_env()) == config


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"quorum": "most"},
            "config key 'quorum': 'most' is not allowed; "
            "allowed: one of all_answered, min_fraction",
        ),
        (
            {"fraction": 1.5},
            "config key 'fraction': 1.5 is not allowed; allowed: a number from 0.01 to 1",
        ),
        ({"local_epochs": "two"}, "config key 'local_epochs': 'two' is not a int"),
        ({"experiment": "a/b"}, "config key 'experiment'"),
        ({"local_epoch": 2}, "unknown config key(s) 'local_epoch'"),
    ],
)
def test_bad_values_name_the_key_value_and_what_is_allowed(
    values: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        FederationConfig.from_mapping(values, source="cdk.json context 'sfl'")
    assert message in str(caught.value)


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="SFL_LR"):
        FederationConfig.from_env({"SFL_LR": "fast"})


def test_custom_strategy_import_path_is_allowed() -> None:
    assert FederationConfig(selection="my_pkg.select:pick").selection == "my_pkg.select:pick"


def test_every_key_is_described() -> None:
    keys = [row[0] for row in describe()]
    assert "local_epochs" in keys and "quorum" in keys
    assert all(row[2] and row[3] for row in describe())


# --- one machinery for the federation's keys and the stack's ---------------------------------


def test_the_stack_and_the_federation_refuse_an_unknown_key_in_one_wording() -> None:
    from sfl.core.deployment import InfraConfig

    for settings in (FederationConfig, InfraConfig):
        with pytest.raises(ConfigError) as caught:
            settings.from_mapping({"memory": 1}, source="cdk.json context")
        assert str(caught.value).startswith(
            "cdk.json context: unknown config key(s) 'memory'; known keys: "
        )


def test_a_mistyped_key_gets_a_suggestion() -> None:
    with pytest.raises(ConfigError) as caught:
        FederationConfig().with_overrides({"local_epoch": "2"})
    assert str(caught.value) == (
        "--set: unknown config key(s) 'local_epoch'; did you mean 'local_epochs' for 'local_epoch'?"
    )


def test_a_key_given_as_text_names_the_flag_it_came_from() -> None:
    with pytest.raises(ConfigError) as caught:
        FederationConfig().with_overrides({"local_epochs": "two"}, source="--set")
    assert str(caught.value) == (
        "config key 'local_epochs' (--set): 'two' is not a int; allowed: an integer from 1 to 1000"
    )


def test_a_range_reads_as_integers_for_an_integer_key_and_as_numbers_otherwise() -> None:
    allowed = {key: allowed for key, _, allowed, _ in describe()}
    assert allowed["local_epochs"] == "an integer from 1 to 1000"
    assert allowed["max_num_examples"] == "an integer from 1 to 1000000000000"
    assert allowed["lr"] == "a number from 1e-07 to 10"


def test_rule_parameters_are_kept_as_one_text_however_they_are_written() -> None:
    as_text = FederationConfig(
        aggregation="fedadam", aggregation_params='{"tau": 1e-3, "eta": 3e-2}'
    )
    as_object = FederationConfig.from_mapping(
        {"aggregation": "fedadam", "aggregation_params": {"eta": 0.03, "tau": 0.001}}
    )
    assert as_text.aggregation_params == as_object.aggregation_params == '{"eta":0.03,"tau":0.001}'


def test_rule_parameters_are_read_once_where_the_config_enters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sfl.core import params
    from sfl.state.control import effective_config

    reads: list[str] = []
    parse = params.parse

    def counted(text: str) -> dict[str, object]:
        reads.append(text)
        return parse(text)

    monkeypatch.setattr(params, "parse", counted)
    given = {"aggregation": "fedadam", "aggregation_params": {"eta": 0.03}}
    deployed = FederationConfig.from_mapping(given, source="cdk.json")
    assert reads == ['{"eta":0.03}']
    assert effective_config(deployed, {}) is deployed  # no runtime change: nothing read again
    assert len(reads) == 1
    assert effective_config(deployed, {"lr": 0.1}).lr == 0.1  # a runtime record enters
    assert len(reads) == 2


# --- configuration keys on the command line ---------------------------------------------------


@pytest.fixture
def simulated(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """``sfl simulate`` up to the point it would start: the options it would run with."""
    from sfl.local import simulate

    seen: list[object] = []

    def stop(options: object, progress: object = None, activity: object = None) -> None:
        seen.append(options)
        raise simulate.SimulationError("stopped by the test")

    monkeypatch.setattr(simulate, "run_simulation", stop)
    return seen


def test_simulate_takes_config_keys_through_set_and_its_few_flags_as_aliases(
    simulated: list[object],
) -> None:
    from sfl.cli.main import main

    argv = ["simulate", "--deadline", "6", "--seed", "1", "--set", "seed=3"]
    assert main([*argv, "--set", "lr=0.1", "--set", "selection=utility"]) == 1
    (options,) = simulated
    config = options.federation_config()  # type: ignore[attr-defined]
    assert options.round_timeout_seconds == 6 and options.seed == 3  # type: ignore[attr-defined]
    assert config.round_deadline_seconds == config.round_soft_deadline_seconds == 6
    assert (config.seed, config.lr, config.selection, config.task) == (3, 0.1, "utility", "digits")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "local_epoch=2"], "sfl simulate: --set: unknown config key(s) 'local_epoch'"),
        (
            ["--deadline", "soon"],
            "config key 'round_deadline_seconds' (--deadline): 'soon' is not a int; "
            "allowed: an integer from 1 to 86400",
        ),
        (["--set", "lr"], "--set 'lr': expected KEY=VALUE"),
    ],
)
def test_simulate_refuses_a_bad_key_before_it_starts(
    simulated: list[object], capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    from sfl.cli.main import main

    assert main(["simulate", *argv]) == 2
    assert message in capsys.readouterr().err
    assert simulated == []


def test_buffered_mode_keys_have_defaults_and_rounds_stays_the_default() -> None:
    config = FederationConfig()
    assert config.mode == "rounds"
    buffered = FederationConfig(mode="buffered", buffer_size=3, concurrency=2)
    assert (buffered.buffer_size, buffered.concurrency) == (3, 2)  # K > concurrency is legal
    assert FederationConfig(mode="buffered", buffer_size=2, concurrency=8).buffer_size == 2
    assert "mode" in DEPLOY_TIME_KEYS


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum"])
def test_buffered_mode_refuses_rules_that_read_every_update_at_once(rule: str) -> None:
    with pytest.raises(ConfigError, match=f"'{rule}' is not allowed with mode=buffered"):
        FederationConfig(mode="buffered", aggregation=rule)
    assert FederationConfig(aggregation=rule).aggregation == rule  # rounds mode keeps them


def test_buffered_mode_refuses_shards_and_unknown_weightings() -> None:
    with pytest.raises(ConfigError, match="aggregation_shard_above"):
        FederationConfig(mode="buffered", aggregation_shard_above=10)
    with pytest.raises(ConfigError, match="staleness_weighting"):
        FederationConfig(mode="buffered", staleness_weighting="exponential")
    with pytest.raises(ConfigError, match="'mode'"):
        FederationConfig(mode="async")
    for rule in ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        assert FederationConfig(mode="buffered", aggregation=rule).aggregation == rule
