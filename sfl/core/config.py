"""The federation's configuration: every knob, its typed default and what values it allows.

One definition feeds the CDK stack (``cdk.json`` context key ``sfl``), the Lambdas'
environment (``SFL_*`` variables), the Greengrass component's default configuration and the
local simulation. The keys are checked by the one settings machinery (:mod:`sfl.core.settings`):
a bad value fails early with the key, the value and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sfl.core import params as rule_params
from sfl.core import plugins
from sfl.core import task_params as task_params_
from sfl.core.compressed_layout import DEFAULT_TOPK_FRACTION, MIN_TOPK_FRACTION, UPDATE_CODECS
from sfl.core.liveness import DEFAULT_WINDOW, HISTORY_PICKS
from sfl.core.privacy import CLIPPINGS, split_noise
from sfl.core.settings import Allowed, OneOf, Range, Settings, setting
from sfl.core.settings import ConfigError as ConfigError
from sfl.core.sizing import READS_ALL_AT_ONCE
from sfl.core.staleness import WEIGHTINGS

CONTEXT_KEY = "sfl"
ENV_PREFIX = "SFL_"

EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

#: Keys fixed at deploy time: the experiment names every record, the task fixes the model's
#: shape, and devices read heartbeat and poll periods from their component configuration.
#: Every other key may change between rounds (``sfl config set``, ``sfl.state.control``).
DEPLOY_TIME_KEYS = frozenset(
    {
        "experiment",
        "task",
        "task_params",
        "heartbeat_seconds",
        "poll_seconds",
        "mode",
        "push_poll_seconds",
        "push_heartbeat_seconds",
    }
)

#: How the federation turns updates into versions (docs/buffered.md): ``rounds`` waits for
#: each round's picked devices; ``buffered`` takes a step every ``buffer_size`` updates.
MODES = ("rounds", "buffered")

#: The one selection DP's accountant covers: every candidate drawn independently
#: (``sfl.core.selection.select_poisson``, docs/privacy.md).
DP_SELECTION = "poisson"


def _plugin(kind: str) -> Allowed:
    """A registered name of this kind, or an import path (local mode)."""
    return Allowed(lambda v: plugins.is_valid(kind, v), f"one of {plugins.allowed(kind)}")


@dataclass(frozen=True)
class FederationConfig(Settings):
    """How rounds run. Each field's ``setting`` holds its check, allowed values and meaning."""

    experiment: str = setting(
        "default",
        allowed=Allowed(
            lambda v: bool(EXPERIMENT_NAME.match(v)), "1-64 letters, digits, '_' or '-'"
        ),
        doc="name of the training run; rounds are numbered per experiment",
    )
    task: str = setting(
        "digits",
        allowed=_plugin("task"),
        doc="training task (model, data, train, evaluate)",
    )
    task_params: str = setting(
        "{}",
        allowed=Allowed(lambda v: True, "a JSON object of the task's parameters (docs/tasks.md)"),
        doc='parameters of the task, e.g. {"architecture": "resnet18", "num_classes": 5} '
        "for image_folder",
    )
    selection: str = setting(
        "fast_clients",
        allowed=_plugin("selection"),
        doc="how the initiator picks clients",
    )
    aggregation: str = setting(
        "fedavg",
        allowed=_plugin("aggregation"),
        doc="how updates become the next model",
    )
    aggregation_params: str = setting(
        "{}",
        allowed=Allowed(
            lambda v: True, "a JSON object of the rule's parameters (see docs/strategies.md)"
        ),
        doc='parameters of the aggregation rule, e.g. {"eta": 0.01} for fedadam',
    )
    quorum: str = setting(
        "min_fraction",
        allowed=_plugin("quorum"),
        doc="when a round may aggregate",
    )
    fraction: float = setting(
        1.0,
        allowed=Range(0.01, 1.0),
        doc="share of active clients picked per round",
    )
    clients_per_round: int = setting(
        0,
        allowed=Range(0, 10_000),
        doc="clients picked per round; 0 means use 'fraction'",
    )
    min_clients: int = setting(
        1,
        allowed=Range(1, 10_000),
        doc="fewest active clients needed to start a round",
    )
    min_answered_fraction: float = setting(
        0.5,
        allowed=Range(0.0, 1.0),
        doc="'min_fraction' quorum: share of selected clients whose accepted updates suffice "
        "once the soft deadline has passed",
    )
    min_accepted: int = setting(
        1,
        allowed=Range(1, 10_000),
        doc="'min_fraction' quorum: fewest accepted updates",
    )
    ewma_b: float = setting(
        0.8,
        allowed=Range(0.0, 0.999),
        doc="weight of the past in each client's turnaround EWMA",
    )
    selection_exploration: float = setting(
        0.2,
        allowed=Range(0.0, 1.0),
        doc="'utility' and 'fast_clients': share of each round's picks reserved for clients "
        "not picked in the last selection_window rounds (or never)",
    )
    selection_max_share: float = setting(
        0.9,
        allowed=Range(0.05, 1.0),
        doc="'utility' and 'fast_clients': a client picked in more than this share of the "
        "last selection_window rounds sits the next one out, if others can take its "
        "place; 1 turns the cap off",
    )
    selection_window: int = setting(
        10,
        allowed=Range(1, 1_000),
        doc="rounds over which recent picks are counted and staleness is judged",
    )
    liveness_window: int = setting(
        DEFAULT_WINDOW,
        allowed=Range(2, HISTORY_PICKS),
        doc="a client's misses are counted over its last this many picks: with m >= 2 of "
        "them missed it sits out 2 ** (m - 1) rounds after each pick, and with a third of "
        "them missed a round waits for it only until the soft deadline",
    )
    selection_speed_exponent: float = setting(
        4.0,
        allowed=Range(0.0, 10.0),
        doc="'utility': a client slower than the round's preferred turnaround weighs "
        "(preferred / its turnaround) ** this; 0 ignores speed",
    )
    round_soft_deadline_seconds: int = setting(
        600,
        allowed=Range(1, 86_400),
        doc="seconds after which a round may aggregate without every selected client",
    )
    round_deadline_seconds: int = setting(
        900,
        allowed=Range(1, 86_400),
        doc="hard deadline: a round still without quorum is abandoned",
    )
    aggregation_lease_seconds: int = setting(
        300,
        allowed=Range(5, 3_600),
        doc="seconds an aggregation may run before others retry it",
    )
    aggregation_in_flight: int = setting(
        4,
        allowed=Range(1, 64),
        doc="updates the averager downloads and decodes ahead of the one it is summing "
        "(memory: this many plus one updates)",
    )
    aggregation_shard_above: int = setting(
        0,
        allowed=Range(0, 1_000_000),
        doc="with more accepted updates than this, FedAvg and the FedOpt rules sum shards "
        "in parallel Lambda invocations, then reduce; 0 never shards",
    )
    aggregation_shard_size: int = setting(
        250,
        allowed=Range(2, 100_000),
        doc="updates summed by one shard invocation",
    )
    active_window_seconds: int = setting(
        1_800,
        allowed=Range(5, 604_800),
        doc="a client is active if it heartbeated this recently",
    )
    heartbeat_seconds: int = setting(
        60,
        allowed=Range(1, 86_400),
        doc="how often an edge client heartbeats",
    )
    poll_seconds: float = setting(
        10.0,
        allowed=Range(0.05, 3_600),
        doc="how often an idle edge client polls for a round",
    )
    push_poll_seconds: float = setting(
        300.0,
        allowed=Range(1, 86_400),
        doc="how often an idle edge client polls while it is subscribed to round notices "
        "(push): the fallback for a missed notice; poll_seconds while it is not",
    )
    push_heartbeat_seconds: int = setting(
        600,
        allowed=Range(1, 86_400),
        doc="how often an edge client heartbeats while it is subscribed to round notices; "
        "keep it below active_window_seconds",
    )
    local_epochs: int = setting(
        2,
        allowed=Range(1, 1_000),
        doc="epochs each client trains per round",
    )
    lr: float = setting(
        0.05,
        allowed=Range(1e-7, 10.0),
        doc="clients' learning rate",
    )
    proximal_mu: float = setting(
        0.0,
        allowed=Range(0.0, 1_000.0),
        doc="FedProx: clients add mu/2 * ||w - w_base||^2 to their loss; 0 is plain local SGD",
    )
    batch_size: int = setting(
        16,
        allowed=Range(1, 65_536),
        doc="clients' minibatch size",
    )
    update_codec: str = setting(
        "none",
        allowed=OneOf(tuple(UPDATE_CODECS)),
        doc="how clients encode their update: the trained tensors (none), or their change "
        "from the base model in float16, int8 with a per-tensor scale, or its top-k "
        "entries (docs/compression.md)",
    )
    topk_fraction: float = setting(
        DEFAULT_TOPK_FRACTION,
        allowed=Range(MIN_TOPK_FRACTION, 1.0),
        doc="'topk' codec: share of each tensor's entries an update keeps (the largest changes)",
    )
    max_update_bytes: int = setting(
        64 * 1024 * 1024,
        allowed=Range(1_024, 5 * 1024**3),
        doc="largest update object accepted",
    )
    max_num_examples: int = setting(
        10_000_000,
        allowed=Range(1, 10**12),
        doc="largest num_examples a client may claim",
    )
    min_examples: int = setting(
        1,
        allowed=Range(1, 10**9),
        doc="fewest training examples a picked device must hold; with fewer it declines the "
        "round (too_few_examples) instead of training",
    )
    max_weight_ratio: float = setting(
        1.0,
        allowed=Range(1.0, 1e6),
        doc="a client's aggregation weight is its num_examples, at most this many times the "
        "round's median num_examples (1: no client weighs more than the median one)",
    )
    norm_bound_factor: float = setting(
        1.0,
        allowed=Range(0.0, 1e6),
        doc="an update's change from the base model is clipped to this many times the round's "
        "median change; 0 turns the adaptive bound off",
    )
    max_update_norm: float = setting(
        0.0,
        allowed=Range(0.0, 1e12),
        doc="an update's change from the base model is clipped to this L2 norm; 0: no fixed bound",
    )
    seed: int = setting(
        0,
        allowed=Range(0, 2**31 - 1),
        doc="seed for the initial model and client selection",
    )
    mode: str = setting(
        "rounds",
        allowed=OneOf(MODES),
        doc="rounds: each round waits for its picked devices; buffered: devices train "
        "whenever a place is free and every buffer_size accepted updates make one version "
        "(docs/buffered.md); fixed at deploy time",
    )
    buffer_size: int = setting(
        5,
        allowed=Range(1, 1_000),
        doc="'buffered': accepted updates per version (K); half of concurrency reached "
        "accuracy soonest of 2, 3, 5 and 10 (docs/buffered.md)",
    )
    concurrency: int = setting(
        10,
        allowed=Range(1, 10_000),
        doc="'buffered': most devices training at once; each answer or expiry frees a place",
    )
    max_staleness: int = setting(
        10,
        allowed=Range(0, 1_000),
        doc="'buffered': an update more versions behind the step it would join is refused "
        "(too_stale)",
    )
    staleness_weighting: str = setting(
        "polynomial",
        allowed=OneOf(WEIGHTINGS),
        doc="'buffered': how an update's weight falls with its staleness tau: constant 1, "
        "polynomial 1/(1+tau)**staleness_exponent, or hinge",
    )
    staleness_exponent: float = setting(
        0.5,
        allowed=Range(0.0, 10.0),
        doc="'buffered': the polynomial weighting's exponent, the hinge weighting's slope",
    )
    staleness_hinge: int = setting(
        4,
        allowed=Range(0, 1_000),
        doc="'buffered': the hinge weighting keeps full weight up to this many versions behind",
    )

    dp_noise_multiplier: float = setting(
        0.0,
        allowed=Range(0.0, 1_000.0),
        doc="user-level differential privacy (docs/privacy.md): the Gaussian noise on the sum "
        "of clipped changes, as a multiple of dp_clip; 0 turns DP off",
    )
    dp_clip: float = setting(
        0.0,
        allowed=Range(0.0, 1e12),
        doc="DP: the L2 bound on each device's change (the adaptive clip's start); > 0 with DP",
    )
    dp_clipping: str = setting(
        "fixed",
        allowed=OneOf(CLIPPINGS),
        doc="DP: a fixed clip, or one that follows dp_target_quantile of the changes' norms "
        "(Andrew et al. 2021; its estimate is privatised too)",
    )
    dp_target_quantile: float = setting(
        0.5,
        allowed=Range(0.0, 1.0),
        doc="DP, adaptive clipping: the share of changes the clip aims to leave unclipped",
    )
    dp_clip_learning_rate: float = setting(
        0.2,
        allowed=Range(0.0, 10.0),
        doc="DP, adaptive clipping: how fast the clip moves (geometric step per version)",
    )
    dp_clip_bits_stddev: float = setting(
        0.0,
        allowed=Range(0.0, 1e9),
        doc="DP, adaptive clipping: the noise on the count of unclipped changes; 0: the "
        "expected devices per version / 20",
    )
    dp_delta: float = setting(
        0.0,
        allowed=Range(0.0, 0.1),
        doc="DP: the delta epsilon is reported at; 0: 1/N**1.1, N the population sampled from",
    )
    dp_epsilon_budget: float = setting(
        0.0,
        allowed=Range(0.0, 1e6),
        doc="DP: pause the experiment before a version would spend more epsilon than this; "
        "0: no budget",
    )

    def __post_init__(self) -> None:
        if isinstance(self.aggregation_params, Mapping):  # cdk.json may give an object
            object.__setattr__(
                self, "aggregation_params", rule_params.canonical(self.aggregation_params)
            )
        if isinstance(self.task_params, Mapping):
            object.__setattr__(self, "task_params", task_params_.canonical(self.task_params))
        super().__post_init__()

    def check_together(self) -> None:
        # The rule's parameters are checked here, once per record, and kept as one text.
        try:
            given = rule_params.parse(self.aggregation_params)
            rule_params.check(self.aggregation, given)
        except rule_params.ParamsError as e:
            raise ConfigError(f"config key 'aggregation_params': {e}") from e
        object.__setattr__(self, "aggregation_params", rule_params.canonical(given))
        # The task's parameters likewise (a task named by import path checks its own).
        try:
            given_task = task_params_.parse(self.task_params)
            task_params_.check(self.task, given_task)
        except rule_params.ParamsError as e:
            raise ConfigError(f"config key 'task_params': {e}") from e
        object.__setattr__(self, "task_params", task_params_.canonical(given_task))
        if self.round_soft_deadline_seconds > self.round_deadline_seconds:
            raise ConfigError(
                f"config key 'round_soft_deadline_seconds': {self.round_soft_deadline_seconds} "
                f"is after round_deadline_seconds={self.round_deadline_seconds}; "
                "allowed: a number no larger than round_deadline_seconds"
            )
        if self.mode == "buffered":
            self._check_buffered()
        if self.dp_noise_multiplier > 0:
            self._check_private()

    def _check_buffered(self) -> None:
        """What buffered mode cannot run with, refused with the reason."""
        if self.aggregation in READS_ALL_AT_ONCE:
            raise ConfigError(
                f"config key 'aggregation': {self.aggregation!r} is not allowed with "
                "mode=buffered: it reads every update of a step at once, and a buffer's "
                "updates are rebased and streamed one at a time; allowed: fedavg, fedavgm, "
                "fedadam, fedyogi, fedadagrad, or a rule of yours that streams"
            )
        if self.aggregation_shard_above:
            raise ConfigError(
                f"config key 'aggregation_shard_above': {self.aggregation_shard_above} is not "
                "allowed with mode=buffered: a buffer of at most buffer_size updates is "
                "summed in one invocation; allowed: 0"
            )

    @property
    def private(self) -> bool:
        """User-level DP is on (docs/privacy.md)."""
        return self.dp_noise_multiplier > 0

    def _check_private(self) -> None:
        """What DP cannot run with, refused with the reason (docs/privacy.md)."""
        if self.dp_clip <= 0:
            raise ConfigError(
                "config key 'dp_clip': 0 is not allowed with dp_noise_multiplier > 0: the "
                "noise is calibrated to the clip; allowed: a number > 0"
            )
        if self.selection != DP_SELECTION:
            raise ConfigError(
                f"config key 'selection': {self.selection!r} is not allowed with "
                "dp_noise_multiplier > 0: the accountant covers Poisson sampling of the "
                "population ('utility' and 'fast_clients' pick by device history, 'random' "
                f"and 'all' a fixed count); allowed: {DP_SELECTION}"
            )
        if self.aggregation in READS_ALL_AT_ONCE:
            raise ConfigError(
                f"config key 'aggregation': {self.aggregation!r} is not allowed with "
                "dp_noise_multiplier > 0: it reads single updates, in ways the Gaussian "
                "mechanism's sensitivity (one clipped change in a sum) does not bound; "
                "allowed: fedavg, fedavgm, fedadam, fedyogi, fedadagrad, or a rule of yours "
                "that sums in shards"
            )
        if self.dp_clipping == "adaptive" and self.dp_clip_bits_stddev > 0:
            try:
                split_noise(self.dp_noise_multiplier, self.dp_clip_bits_stddev)
            except ValueError as e:
                raise ConfigError(f"config key 'dp_clip_bits_stddev': {e}") from e
        if self.mode == "buffered":
            raise ConfigError(
                "config key 'mode': 'buffered' is not allowed with dp_noise_multiplier > 0: "
                "a buffer takes whoever answers, not a Poisson sample, and this accountant "
                "does not cover it yet; allowed: rounds"
            )

    # --- the Lambdas' environment --------------------------------------------------------

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> FederationConfig:
        """Build from ``SFL_*`` environment variables (how the Lambdas receive it)."""
        values: dict[str, Any] = {}
        for name in cls.key_specs():
            variable = ENV_PREFIX + name.upper()
            raw = env.get(variable)
            if raw is not None:
                values[name] = cls.parse_value(name, raw, where=f"env {variable}")
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The ``SFL_*`` environment variables that ``from_env`` reads back."""
        return {ENV_PREFIX + name.upper(): str(getattr(self, name)) for name in self.key_specs()}


def describe() -> list[tuple[str, str, str, str]]:
    """(key, default, allowed, meaning) for every key, for docs and ``sfl config``."""
    return FederationConfig.describe()
