"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2,
arXiv 2312.02696, Sec. 3 "Post-hoc EMA" and Appendix C): power-function EMA profiles, their closed-form inner
products, and the least-squares reconstruction of an EMA of any length from stored snapshots.

A power-function EMA with exponent gamma, read at step t, averages the weights theta_tau (tau = 1..t) with the profile
p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t] (Sec. 3.1). Its length relative to t is
sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (Sec. 3.1). Tracked with the per-step decay
beta_t = (1 - 1/t)^(gamma + 1), step tau gets exactly the mass of p on [tau - 1, tau], so the discrete average is the
continuous profile binned per step. Snapshots of a few profiles at a few steps span a family of averages; the one
closest (in L2 over tau) to the profile of the wanted (gamma, t) is a linear combination of the snapshots with
coefficients solving A x = b, A and b being inner products of profiles (Sec. 3.2, Appendix C). Plain numpy / torch
functions.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence, overload

import numpy as np
import numpy.typing as npt
import torch

# sigma_rel(gamma) rises from 0 at gamma = -1 to this maximum at gamma = GAMMA_AT_MAX, then falls towards 0 as gamma
# grows: lengths are taken on the falling branch (gamma >= GAMMA_AT_MAX), where the map is one-to-one.
GAMMA_AT_MAX = (math.sqrt(5) - 3) / 2  # d log sigma_rel / d gamma = 0  <=>  gamma^2 + 3 gamma + 1 = 0
DEFAULT_TOLERANCE = 0.05  # refuse a reconstruction whose profile misses the target by more (relative L2)
# a float or an array of them (the EMA length maps work elementwise)
FloatsLike = float | Sequence[float] | npt.NDArray[np.floating[Any]]


@overload
def gamma_to_sigma_rel(gamma: float) -> float: ...
@overload
def gamma_to_sigma_rel(gamma: FloatsLike) -> float | npt.NDArray[np.float64]: ...
def gamma_to_sigma_rel(gamma: FloatsLike) -> float | npt.NDArray[np.float64]:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))): EDM2 Sec. 3.1 (the profile's standard deviation
    relative to its length t). Works on floats and numpy arrays."""
    g = np.asarray(gamma, dtype=np.float64)
    out = np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))
    return float(out) if out.ndim == 0 else out


SIGMA_REL_MAX = gamma_to_sigma_rel(GAMMA_AT_MAX)  # ~0.3003: no power-function EMA is relatively longer


@overload
def sigma_rel_to_gamma(sigma_rel: float) -> float: ...
@overload
def sigma_rel_to_gamma(sigma_rel: FloatsLike) -> float | npt.NDArray[np.float64]: ...
def sigma_rel_to_gamma(sigma_rel: FloatsLike) -> float | npt.NDArray[np.float64]:
    """The exponent gamma of a relative length (inverse of the map of EDM2 Sec. 3.1): the largest real root of
    g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0, i.e. (g + 2)^2 (g + 3) s^2 = g + 1. Needs 0 < s <= SIGMA_REL_MAX."""
    s = np.asarray(sigma_rel, dtype=np.float64)
    if np.any(~np.isfinite(s)) or np.any(s <= 0) or np.any(s > SIGMA_REL_MAX + 1e-12):
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}]; got {sigma_rel}")
    roots = [np.roots([1.0, 7.0, 16.0 - v**-2, 12.0 - v**-2]) for v in s.ravel()]
    gammas = np.array(
        [r[np.abs(r.imag) < 1e-7].real.max() if np.any(np.abs(r.imag) < 1e-7) else GAMMA_AT_MAX for r in roots]
    ).reshape(s.shape)
    return float(gammas) if gammas.ndim == 0 else gammas


def power_ema_beta(step: int, gamma: float) -> float:
    """Per-step decay of a power-function EMA, beta_t = (1 - 1/t)^(gamma + 1) (EDM2 Sec. 3.1 / Appendix C, with t in
    optimizer steps rather than images, counted from 1); beta_1 = 0 makes the first update a copy."""
    if step < 1:
        raise ValueError(f"power-function EMA steps count from 1; got {step}")
    beta: float = (1.0 - 1.0 / step) ** (gamma + 1.0)  # float ** float is Any in typeshed
    return beta


def profile_inner_products(
    gamma_a: npt.ArrayLike, t_a: npt.ArrayLike, gamma_b: npt.ArrayLike, t_b: npt.ArrayLike
) -> np.ndarray:
    """<p_a, p_b> = integral over tau of two power-function profiles (EDM2 Appendix C), broadcast over the inputs:
    (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)), m = min(t_a, t_b).
    Evaluated in log space, as the powers overflow for long runs and large gamma."""
    ga, ta, gb, tb = (np.asarray(v, dtype=np.float64) for v in (gamma_a, t_a, gamma_b, t_b))
    m = np.minimum(ta, tb)
    log = (
        np.log(ga + 1)
        + np.log(gb + 1)
        - np.log(ga + gb + 1)
        + (ga + gb + 1) * np.log(m)
        - (ga + 1) * np.log(ta)
        - (gb + 1) * np.log(tb)
    )
    return np.exp(log)


def solve_coefficients(
    gammas: Sequence[float], steps: Sequence[float], gamma_out: float, step_out: float
) -> tuple[np.ndarray, float]:
    """Coefficients x of the snapshots (gamma_i taken at step t_i) whose combination sum_i x_i p_i is the closest
    to the profile of (gamma_out, step_out) in L2 (EDM2 Sec. 3.2 and Appendix C: A x = b with A_ij = <p_i, p_j>,
    b_i = <p_i, p_out>), and the residual ||sum_i x_i p_i - p_out|| / ||p_out||. Least squares through an SVD with
    a relative cut-off, since snapshots close in time make A nearly singular. The coefficients are then rescaled to
    sum to 1, as EDM2's ``solve_posthoc_coefficients`` does: every profile has mass 1, and a parameter that never
    changes must come back unchanged (the raw solution's sum is off by up to ~1e-2)."""
    g, t = np.asarray(gammas, dtype=np.float64), np.asarray(steps, dtype=np.float64)
    a = profile_inner_products(g[:, None], t[:, None], g[None, :], t[None, :])
    b = profile_inner_products(g, t, gamma_out, step_out)
    x = np.linalg.lstsq(a, b, rcond=1e-13)[0]
    x = x / x.sum()
    target = float(profile_inner_products(gamma_out, step_out, gamma_out, step_out))
    err2 = max(float(x @ a @ x - 2 * x @ b + target), 0.0)
    return x, math.sqrt(err2 / target)


def reconstructable_range(
    gammas: Sequence[float],
    steps: Sequence[float],
    step_out: float,
    tolerance: float = DEFAULT_TOLERANCE,
    lo: float = 1e-3,
    n: int = 200,
) -> tuple[float, float] | None:
    """The sigma_rel interval (on a log grid from ``lo`` to SIGMA_REL_MAX) that the snapshots reconstruct at
    ``step_out`` within ``tolerance`` (relative L2 of the profile); None when no length passes. For error lines."""
    grid = np.geomspace(lo, SIGMA_REL_MAX, n)
    ok = [s for s in grid if solve_coefficients(gammas, steps, sigma_rel_to_gamma(s), step_out)[1] <= tolerance]
    return (float(min(ok)), float(max(ok))) if ok else None


def check_expressible(
    gammas: Sequence[float],
    steps: Sequence[float],
    gamma_out: float,
    step_out: float,
    tolerance: float = DEFAULT_TOLERANCE,
    tracked: Sequence[float] = (),
    where: str = "the snapshots",
) -> tuple[np.ndarray, float]:
    """Coefficients for (gamma_out, step_out) and their relative residual, or a one-line ConfigError when the
    snapshots cannot express that profile within ``tolerance`` (relative L2 residual of EDM2's Sec. 3.2 fit); the line
    names the tracked sigma_rels and the range of lengths that can be reconstructed at that step."""
    from difflab.utils.errors import ConfigError

    coeffs, residual = solve_coefficients(gammas, steps, gamma_out, step_out)
    if residual <= tolerance:
        return coeffs, residual
    span = reconstructable_range(gammas, steps, step_out, tolerance)
    can = (f"sigma_rel in [{span[0]:.3f}, {span[1]:.3f}]" if span else "no length") + f" at step {int(step_out)}"
    raise ConfigError(
        f"sigma_rel={gamma_to_sigma_rel(gamma_out):.4g} (gamma={gamma_out:.4g}) at step {int(step_out)} cannot be "
        f"reconstructed from {where}: the closest combination misses its profile by {residual:.1%} (tolerance "
        f"{tolerance:.0%}); tracked sigma_rel {', '.join(f'{s:g}' for s in tracked) or '?'} over "
        f"snapshots at t={int(min(steps))}..{int(max(steps))} ({len(set(steps))} steps); reconstructable: {can}"
    )


def combine_state_dicts(
    state_dicts: Iterable[dict[str, torch.Tensor]], coeffs: Sequence[float]
) -> dict[str, torch.Tensor]:
    """sum_i coeffs_i * state_dicts_i, key by key (EDM2 Sec. 3.2: the fitted combination applied to the
    weights), accumulated in
    float64 (the coefficients of close snapshots can be large with alternating signs) and returned in each tensor's
    own dtype; non-float entries come from the first. ``state_dicts`` may be a generator, so snapshots can be read one
    at a time."""
    acc: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    count = 0
    for sd, c in zip(state_dicts, coeffs):
        count += 1
        for key, value in sd.items():
            if not value.is_floating_point():
                acc.setdefault(key, value.clone())
                continue
            if key not in acc:
                acc[key] = torch.zeros(value.shape, dtype=torch.float64, device=value.device)
                dtypes[key] = value.dtype
            acc[key].add_(value.to(torch.float64), alpha=float(c))
    if count != len(coeffs) or not count:
        raise ValueError(f"need one coefficient per state dict; got {len(coeffs)} for {count}")
    return {k: v.to(dtypes[k]) if k in dtypes else v for k, v in acc.items()}
