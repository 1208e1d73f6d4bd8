"""Server optimisers on the pseudo-gradient (Reddi et al., "Adaptive Federated Optimization";
Hsu et al. for FedAvgM): FedAvgM, FedAdam, FedYogi, FedAdagrad.

Each round, the bounded FedAvg of the updates gives ``avg``; ``delta = avg - base`` is the
pseudo-gradient. The optimiser folds ``delta`` into its state (momentum, moments, a step
count) and the next model is a function of the base model and that state alone
(``model_from_state``), so a retried aggregation that finds the state already written
reproduces the same model from it. The maths follows Flower's strategies of the same names
(tested for parity against them), in float64. Tensors that are not floating point (counters)
take FedAvg's value, kept in the state too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from sfl.core.params import FedAdagradParams, FedAdamParams, FedAvgMParams
from sfl.learning.rules.aggregation import (
    Abilities,
    Aggregate,
    FedAvg,
    Rule,
    State,
    UpdateSet,
    cast_like,
)

STEP = "step"  # how many optimiser steps the state holds (1 after the first)
_KEEP = "keep/"  # FedAvg's value of a non-float tensor


class ServerOptimizer(Rule):
    """FedAvg, then a step of a server optimiser whose state persists between rounds."""

    abilities = Abilities(stateful=True, sums_in_shards=True)
    slots: tuple[str, ...] = ()  # per-tensor state, e.g. ("m", "v")

    def aggregate(
        self, base: Mapping[str, torch.Tensor], updates: UpdateSet, state: State | None
    ) -> Aggregate | None:
        averaged = FedAvg().aggregate(base, updates, None)
        if averaged is None:
            return None
        previous = self.usable_state(base, state)
        step = 1 + (int(previous[STEP].item()) if previous is not None else 0)
        new: dict[str, torch.Tensor] = {STEP: torch.tensor(float(step), dtype=torch.float64)}
        for name, start in base.items():
            if not start.dtype.is_floating_point:
                new[_KEEP + name] = averaged.model[name].clone()
                continue
            delta = averaged.model[name].to(torch.float64) - start.to(torch.float64)
            old = {s: previous[f"{s}/{name}"] for s in self.slots} if previous else None
            new.update({f"{s}/{name}": v for s, v in self.update(delta, old, step).items()})
        return Aggregate(model=self.model_from_state(base, new), state=new)

    def model_from_state(
        self, base: Mapping[str, torch.Tensor], state: State
    ) -> dict[str, torch.Tensor]:
        step = int(state[STEP].item())
        out: dict[str, torch.Tensor] = {}
        for name, start in base.items():
            if not start.dtype.is_floating_point:
                out[name] = state[_KEEP + name].to(start.dtype).clone()
                continue
            slots = {s: state[f"{s}/{name}"] for s in self.slots}
            out[name] = cast_like(start.to(torch.float64) + self.move(slots, step), start.dtype)
        return out

    def usable_state(self, base: Mapping[str, torch.Tensor], state: State | None) -> State | None:
        """The previous state if it is this rule's, for this model; else None (start afresh:
        the first round, a changed rule, or a model whose tensors changed)."""
        if state is None or STEP not in state:
            return None
        expected = {STEP}
        for name, t in base.items():
            if t.dtype.is_floating_point:
                expected |= {f"{s}/{name}" for s in self.slots}
            else:
                expected.add(_KEEP + name)
        if set(state) != expected:
            return None
        for key, value in state.items():
            name = key.partition("/")[2]
            want = () if key == STEP else tuple(base[name].shape)
            if tuple(value.shape) != want or not bool(torch.isfinite(value.double()).all()):
                return None
        return state

    # --- the optimiser ------------------------------------------------------------------

    def update(
        self, delta: torch.Tensor, old: Mapping[str, torch.Tensor] | None, step: int
    ) -> dict[str, torch.Tensor]:
        """New per-tensor state from the old one (None: zeros) and the pseudo-gradient."""
        raise NotImplementedError

    def move(self, slots: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        """The change from the base model that the state calls for."""
        raise NotImplementedError


class FedAvgM(ServerOptimizer):
    """Server momentum: ``m = momentum * m + (base - avg)``, model ``base - lr * m``."""

    name = "fedavgm"
    Params = FedAvgMParams
    params: FedAvgMParams
    slots = ("momentum",)

    def update(
        self, delta: torch.Tensor, old: Mapping[str, torch.Tensor] | None, step: int
    ) -> dict[str, torch.Tensor]:
        gradient = -delta  # Flower's pseudo-gradient: base - avg
        if old is None:
            return {"momentum": gradient}
        return {"momentum": self.params.server_momentum * old["momentum"] + gradient}

    def move(self, slots: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        return -self.params.server_lr * slots["momentum"]


class _Adaptive(ServerOptimizer):
    """First moment ``m`` as in Adam; the second moment ``v`` is the subclass's."""

    slots = ("m", "v")
    params: FedAdamParams | FedAdagradParams

    def update(
        self, delta: torch.Tensor, old: Mapping[str, torch.Tensor] | None, step: int
    ) -> dict[str, torch.Tensor]:
        beta_1 = self.params.beta_1 if isinstance(self.params, FedAdamParams) else 0.0
        m = torch.zeros_like(delta) if old is None else old["m"]
        v = torch.zeros_like(delta) if old is None else old["v"]
        return {"m": beta_1 * m + (1.0 - beta_1) * delta, "v": self.second_moment(v, delta)}

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def move(self, slots: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:
        return self.rate(step) * slots["m"] / (slots["v"].sqrt() + self.params.tau)

    def rate(self, step: int) -> float:
        return self.params.eta


class FedAdam(_Adaptive):
    """Adam on the pseudo-gradient, with Flower's bias-corrected rate."""

    name = "fedadam"
    Params = FedAdamParams
    params: FedAdamParams

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        beta_2 = self.params.beta_2
        return beta_2 * v + (1.0 - beta_2) * delta * delta

    def rate(self, step: int) -> float:
        # Flower's FedAdam corrects with exponent (round + 1); ``step`` plays the round.
        beta_1, beta_2 = self.params.beta_1, self.params.beta_2
        return self.params.eta * math.sqrt(1 - beta_2 ** (step + 1)) / (1 - beta_1 ** (step + 1))


class FedYogi(_Adaptive):
    """Yogi: the second moment moves towards ``delta**2`` additively, by its sign."""

    name = "fedyogi"
    Params = FedAdamParams
    params: FedAdamParams

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        squared = delta * delta
        return v - (1.0 - self.params.beta_2) * squared * torch.sign(v - squared)


class FedAdagrad(_Adaptive):
    """Adagrad: the second moment sums ``delta**2``; no momentum (as Flower's)."""

    name = "fedadagrad"
    Params = FedAdagradParams
    params: FedAdagradParams

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return v + delta * delta
