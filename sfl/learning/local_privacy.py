"""Local DP on the device: the device clips its own change and adds Gaussian noise before upload.

For deployments that do not trust the server (docs/privacy.md): the server then sees only the
noised change. Each participation is a Gaussian mechanism on the device's own data with
sensitivity ``clip`` (its change, whatever its data, is within the clip) and noise standard
deviation ``noise_multiplier x clip``. No one keeps the device's sample secret from the server,
so there is no amplification by sampling: after k participations the device has spent what k
Gaussian mechanisms cost (the accountant with q = 1), which the device logs if dp-accounting is
installed on it. Only floating-point tensors are noised; counters keep the trained value (the
server replaces them with the base model's anyway).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from sfl.learning.rules.bounds import clip_scale

#: The delta a device reports its own epsilon at (docs/privacy.md).
LOCAL_DELTA = 1e-5


def change_norm(trained: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> float:
    """L2 norm, in float64, of the change of the floating-point tensors."""
    total = 0.0
    for name, t in trained.items():
        if t.dtype.is_floating_point:
            total += float(((t.to(torch.float64) - base[name].to(torch.float64)) ** 2).sum())
    return math.sqrt(total)


def privatise(
    trained: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    *,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """``base + clip_to(trained - base, clip) + N(0, (noise_multiplier x clip)**2)`` on every
    floating-point tensor, in its own dtype."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"local DP clip must be a finite number > 0, got {clip}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"local DP noise multiplier must be >= 0, got {noise_multiplier}")
    scale = clip_scale(change_norm(trained, base), clip)
    stddev = noise_multiplier * clip
    out: dict[str, torch.Tensor] = {}
    for name, t in trained.items():
        if not t.dtype.is_floating_point:
            out[name] = t.clone()
            continue
        start = base[name].to(torch.float64)
        moved = start + scale * (t.to(torch.float64) - start)
        if stddev > 0:
            moved = moved + stddev * torch.randn(t.shape, generator=generator, dtype=torch.float64)
        out[name] = moved.to(t.dtype).contiguous()
    return out


def device_epsilon(participations: int, noise_multiplier: float) -> float | None:
    """The epsilon at ``LOCAL_DELTA`` of this many participations (q = 1); None if
    dp-accounting is not installed on this device (docs/privacy.md gives the formula)."""
    if participations < 1 or noise_multiplier <= 0:
        return None
    try:
        from sfl.learning.accountant import Release, epsilon
    except ImportError:
        return None
    return epsilon([Release(1.0, noise_multiplier)] * participations, LOCAL_DELTA)
