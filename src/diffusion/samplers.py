"""Samplers: each one short function ``sampler(model_fn, x_T, process, *, steps, ..., generator) -> x_0``.

``model_fn(x_t, t) -> (x0_hat, eps_hat)`` (see ``guidance.guided_model_fn``) already applies the process's
denoiser input, the prediction-type conversion, guidance and x0 clipping, and returns a pair consistent with x_t
(``x_t = alpha x0_hat + sigma eps_hat``), so samplers are independent of those choices. Samplers walk the process's
time grid (``process.sampling_times``: descending, ending at clean data) and touch the process only through its path
coefficients alpha(t), sigma(t), so every sampler runs on every process (DDPM's ancestral chain needs a discrete
process: ``process.has_ancestral``).

``x_T`` is the start: standard Gaussian noise times ``process.prior_std`` (1 for vp and flow, sigma_max for edm).
``start=t`` starts from an intermediate time instead (the grid's times below ``t``, with ``t`` prepended), for
diagnostics that noise data to ``t`` and denoise it.

State is kept in x_t. Euler and Heun integrate the probability-flow ODE in the process's frame: ``sigma`` (state
x / alpha over sigma_ve = sigma / alpha, k-diffusion / EDM; vp and edm) or ``t`` (state x over t, flow matching).
In both frames an Euler step is x' = alpha' x0_hat + sigma' eps_hat (= DDIM with eta 0), which is also the exact limit
of a step that starts at pure noise (alpha = 0: sigma_ve = inf, log-SNR = -inf, zero terminal SNR). Configure one
with ``_partial_: true`` in ``configs/sampler/``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable, Sequence, TypeVar, cast

import torch

if TYPE_CHECKING:
    from difflab.diffusion.guidance import ModelFn  # model_fn(x_t, t) -> (x0_hat, eps_hat)
    from difflab.diffusion.processes import NoiseProcess, Spacing, VPProcess

Tensor = torch.Tensor
_T = TypeVar("_T")
# sampler(model_fn, x_T, process, *, steps, ..., generator) -> x_0: one of SAMPLERS or a functools.partial of one
Sampler = Callable[..., Tensor]


def _noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (so seeded runs replay exactly)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def _progress(iterable: Iterable[_T], enabled: bool, desc: str) -> Iterable[_T]:
    if not enabled:
        return iterable
    try:
        from rich.progress import track

        return track(iterable, description=desc, transient=True)
    except ImportError:  # pragma: no cover
        return iterable


def sampling_grid(
    process: NoiseProcess, steps: int, spacing: Spacing = None, multistep: bool = False, start: float | None = None
) -> list[tuple[float, float, float]]:
    """[(t, alpha, sigma)] along the process's descending sampling times, ending at clean data (alpha 1, sigma 0).

    ``start``: begin at that time instead (later grid times only); ``multistep``: the grid of multistep solvers
    (vp: diffusers' DPM-Solver grid that ends on a step to sigma 0).
    """
    times = process.sampling_times(int(steps), spacing, multistep).to(torch.float64)
    if start is not None:
        later = times[times < float(start)]
        times = torch.cat([times.new_tensor([float(start)]), later])
    alpha, sigma = process.coefficients(times)
    return list(zip(times.tolist(), alpha.tolist(), sigma.tolist()))


def _sigma_ve(alpha: float, sigma: float) -> float:
    return math.inf if alpha <= 0 else sigma / alpha


def ddim_step(x0: Tensor, eps: Tensor, alpha_next: float, sigma_next: float, noise_std: float = 0.0) -> Tensor:
    """x' = alpha' x0 + sqrt(sigma'^2 - s^2) eps: the DDIM update (s = 0: deterministic; the caller adds s z)."""
    scale: float = max(sigma_next**2 - noise_std**2, 0.0) ** 0.5  # float ** float is Any in typeshed
    return alpha_next * x0 + scale * eps


def ddpm(
    model_fn: ModelFn,
    x: Tensor,
    process: NoiseProcess,
    *,
    steps: int | None = None,
    spacing: Spacing = None,
    variance: str = "small",
    start: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral DDPM (Ho et al.) on any subset of a discrete (vp) process's timesteps; ``steps=None`` uses all T.

    x_prev ~ N(posterior mean(x0_hat, x_t), var) with var the posterior 'fixed small' variance
    (1 - ab') / (1 - ab) beta or 'large' (beta = 1 - ab / ab'). Noise is drawn at every step but the last (the one
    to clean data; Ho et al.'s Algorithm 2), one tensor per step like diffusers' DDPMScheduler.
    """
    if variance not in ("small", "large"):
        raise ValueError(f"sampler.variance must be 'small' or 'large', got {variance!r}")
    check_sampler(ddpm, process)
    steps = steps or cast("VPProcess", process).num_timesteps  # has_ancestral: the discrete (vp) process
    grid = sampling_grid(process, steps, spacing, start=start)
    for i in _progress(range(len(grid) - 1), progress, f"DDPM {steps}"):
        ab_t, ab_prev = grid[i][1] ** 2, grid[i + 1][1] ** 2
        x0, _ = model_fn(x, grid[i][0])
        alpha = ab_t / ab_prev
        beta = 1 - alpha
        mean = (ab_prev**0.5 * beta / (1 - ab_t)) * x0 + (alpha**0.5 * (1 - ab_prev) / (1 - ab_t)) * x
        last = i == len(grid) - 2
        var = max((1 - ab_prev) / (1 - ab_t) * beta, 1e-20) if variance == "small" else beta
        x = mean if last else mean + var**0.5 * _noise_like(x, generator)
    return x


def ddim(
    model_fn: ModelFn,
    x: Tensor,
    process: NoiseProcess,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: Spacing = None,
    start: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """DDIM (Song et al.): deterministic at eta=0, DDPM-like at eta=1, on any affine path.

    Noise std s = eta sigma' sqrt(1 - (alpha sigma' / (alpha' sigma))^2), which is Song et al.'s
    eta sqrt((1 - ab') / (1 - ab) (1 - ab / ab')) on vp and depends on the path only through its SNRs.
    """
    grid = sampling_grid(process, steps, spacing, start=start)
    for i in _progress(range(len(grid) - 1), progress, f"DDIM {steps}"):
        (t, a, s), (_, a_next, s_next) = grid[i], grid[i + 1]
        x0, eps = model_fn(x, t)
        ratio = a * s_next / (a_next * s) if s > 0 else 0.0
        std = eta * s_next * max(1.0 - ratio**2, 0.0) ** 0.5
        x = ddim_step(x0, eps, a_next, s_next, std)
        if std > 0:
            x = x + std * _noise_like(x, generator)
    return x


def _log_alpha_sigma_ratio(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma), with the limits -inf at alpha = 0 and inf at sigma = 0."""
    if alpha <= 0.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


def consistency(
    model_fn: ModelFn,
    x: Tensor,
    process: NoiseProcess,
    *,
    steps: int = 1,
    spacing: Spacing = None,
    start: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): the model's x0 at each grid time, noised
    afresh to the next (x' = alpha' x0_hat + sigma' z); one step is x0_hat at the first time. For consistency
    students (method=consistency); on a diffusion model it is a crude sampler."""
    grid = sampling_grid(process, steps, spacing, start=start)
    for i in _progress(range(len(grid) - 1), progress, f"consistency {steps}"):
        x0, _ = model_fn(x, grid[i][0])
        _, alpha_next, sigma_next = grid[i + 1]
        x = alpha_next * x0 + sigma_next * _noise_like(x, generator) if sigma_next > 0 else alpha_next * x0
    return x


def meanflow(
    model_fn: Callable[..., tuple[Tensor, Tensor]],
    x: Tensor,
    process: NoiseProcess,
    *,
    steps: int = 1,
    spacing: Spacing = None,
    start: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """MeanFlow sampling (Geng et al. 2025, Algorithm 2): from each grid time t straight to the next, r, with the
    network's average velocity over [r, t] (z_r = z_t - (t - r) u: a DDIM step of its prediction at (t, end=r)); one
    step is z_0 = z_1 - u(z_1, 0, 1). For method=meanflow students (a denoiser with an interval input)."""
    grid = sampling_grid(process, steps, spacing, start=start)
    for i in _progress(range(len(grid) - 1), progress, f"meanflow {steps}"):
        end, alpha_next, sigma_next = grid[i + 1]
        x0, eps = model_fn(x, grid[i][0], end=end)
        x = ddim_step(x0, eps, alpha_next, sigma_next)
    return x


def dpmpp_2m(
    model_fn: ModelFn,
    x: Tensor,
    process: NoiseProcess,
    *,
    steps: int = 20,
    spacing: Spacing = None,
    start: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): multistep, data prediction, midpoint form (diffusers' multistep solver,
    k-diffusion's ``sample_dpmpp_2m``).

    The first step and the last (to sigma 0: it returns x0_hat) are first order, all others second order:
    x' = (s'/s) x + alpha' (1 - e^{-h}) D, D = x0 + (x0 - x0_prev) / (2 r), r = h_prev / h, h = lambda' - lambda.
    A step from lambda = -inf (pure noise) is the exact limit x' = alpha' x0 + (s'/s) x (and the next step, with
    r = inf, is first order too).
    """
    grid = sampling_grid(process, steps, spacing, multistep=True, start=start)
    prev_x0: Tensor | None = None
    h_prev = math.nan  # read only once prev_x0 is set
    for i in _progress(range(len(grid) - 1), progress, f"DPM++2M {steps}"):
        (t, a_s, s_s), (_, a_t, s_t) = grid[i], grid[i + 1]
        x0, _ = model_fn(x, t)
        h = _log_alpha_sigma_ratio(a_t, s_t) - _log_alpha_sigma_ratio(a_s, s_s)
        last = i == len(grid) - 2
        if prev_x0 is None or last or not math.isfinite(h_prev) or not math.isfinite(h):
            d = x0
        else:
            d = x0 + (x0 - prev_x0) * (h / (2 * h_prev))  # (x0 - x0_prev) / (2 r)
        # alpha' (1 - e^{-h}) = alpha' - alpha s' / s: exact at h = inf (s' = 0 or alpha = 0)
        coef = -a_t * math.expm1(-h) if math.isfinite(h) else a_t - a_s * s_t / s_s
        x = (s_t / s_s) * x + coef * d
        prev_x0, h_prev = x0, h
    return x


def _churn(
    x: Tensor,
    process: NoiseProcess,
    t: float,
    a: float,
    s: float,
    n_steps: int,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, float, float, float]:
    """EDM's stochastic churn (Karras et al. 2022, Algorithm 2): raise sigma_ve by gamma = min(S_churn / N,
    sqrt(2) - 1) inside [S_tmin, S_tmax] and add the matching fresh noise; returns (x_hat, t_hat, alpha, sigma)."""
    sve = _sigma_ve(a, s)
    gamma = min(s_churn / n_steps, 2**0.5 - 1) if s_churn > 0 and s_tmin <= sve <= s_tmax else 0.0
    if gamma <= 0 or not math.isfinite(sve):
        return x, t, a, s
    if not process.continuous:
        raise ValueError(
            f"sampler.s_churn > 0 needs a continuous process (edm, flow); process {process.name} is "
            f"discrete: set sampler.s_churn=0"
        )
    sve_hat = sve * (1 + gamma)
    t_hat = process.time_from_sigma_ve(sve_hat)
    a_hat, s_hat = (float(v) for v in process.coefficients(torch.tensor(t_hat, dtype=torch.float64)))
    z = x / a + (sve_hat**2 - sve**2) ** 0.5 * s_noise * _noise_like(x, generator)
    return a_hat * z, t_hat, a_hat, s_hat


def _ode_slope(process: NoiseProcess, x0: Tensor, eps: Tensor) -> Tensor:
    """dy/dtau in the process's ODE frame: eps in the sigma frame, the velocity eps - x0 in the t frame."""
    return eps if process.ode_frame == "sigma" else eps - x0


def _ode_time(process: NoiseProcess, t: float, a: float, s: float) -> float:
    return _sigma_ve(a, s) if process.ode_frame == "sigma" else t


def euler(
    model_fn: ModelFn,
    x: Tensor,
    process: NoiseProcess,
    *,
    steps: int = 50,
    spacing: Spacing = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    start: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Euler's method on the probability-flow ODE (k-diffusion ``sample_euler``; on flow, the rectified-flow
    sampler x' = x + (t' - t) v), with optional EDM churn (``s_churn``, continuous processes).

    Sigma frame: z' = z + (sigma' - sigma) (z - x0_hat) / sigma with z = x / alpha; t frame: x' = x + (t' - t) v.
    Both equal x' = alpha' x0_hat + sigma' eps_hat.
    """
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    return _ode_sampler(model_fn, x, process, steps, spacing, None, churn, start, generator, progress, "Euler")


def heun(
    model_fn: ModelFn,
    x: Tensor,
    process: NoiseProcess,
    *,
    steps: int = 20,
    spacing: Spacing = None,
    euler_above: float | None = 80.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    start: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Heun's second-order method (EDM Algorithm 1; with ``s_churn`` > 0 Algorithm 2) in the process's ODE frame.

    Predictor: an Euler step; corrector: average the slopes at both ends, y' = y + (tau' - tau)(d + d') / 2 with
    (y, tau) = (x / alpha, sigma_ve) in the sigma frame and (x, t) in the t frame. Euler steps instead: the last
    step (to clean data, as in EDM), a step from pure noise in the sigma frame (sigma_ve = inf: the trapezoid rule
    has no finite form there), and in the sigma frame a step from sigma_ve > ``euler_above`` (default 80, EDM's
    sigma_max: e.g. the vp cosine schedule's last step has sigma_ve ~ 2e4; None = never). NFE: ``model_evaluations``.
    """
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    corrector: dict[str, float | None] = {"euler_above": euler_above}
    return _ode_sampler(model_fn, x, process, steps, spacing, corrector, churn, start, generator, progress, "Heun")


def _ode_sampler(
    model_fn: ModelFn,
    x: Tensor,
    process: NoiseProcess,
    steps: int,
    spacing: Spacing,
    corrector: dict[str, float | None] | None,
    churn: tuple[float, float, float, float],
    start: float | None,
    generator: torch.Generator | None,
    progress: bool,
    label: str,
) -> Tensor:
    """Euler steps along the process's grid, each with optional churn before it and, when ``corrector`` is given,
    Heun's trapezoid correction after it (where ``_heun_corrects`` allows)."""
    grid = sampling_grid(process, steps, spacing, start=start)
    n = len(grid) - 1
    for i in _progress(range(n), progress, f"{label} {steps}"):
        t, a_grid, s_grid = grid[i]
        x, t, a, s = _churn(x, process, t, a_grid, s_grid, n, *churn, generator)
        t_next, a_next, s_next = grid[i + 1]
        x0, eps = model_fn(x, t)  # a pair consistent with x, except under CFG++ (eps_hat = the unconditional eps)
        x_euler = ddim_step(x0, eps, a_next, s_next)
        # whether to correct depends on the grid, not on churn (EDM Algorithm 2 corrects every step but the last)
        if corrector is None or not _heun_corrects(process, a_grid, s_grid, a_next, s_next, corrector["euler_above"]):
            x = x_euler
            continue
        x0_next, eps_next = model_fn(x_euler, t_next)
        d, d_next = _ode_slope(process, x0, eps), _ode_slope(process, x0_next, eps_next)
        dtau = _ode_time(process, t_next, a_next, s_next) - _ode_time(process, t, a, s)
        scale = a_next if process.ode_frame == "sigma" else 1.0  # y = x / alpha in the sigma frame
        x = x_euler + scale * dtau * (d_next - d) / 2
    return x


def _heun_corrects(
    process: NoiseProcess, a: float, s: float, a_next: float, s_next: float, euler_above: float | None
) -> bool:
    """Whether Heun takes a second-order step (else a plain Euler step)."""
    if s_next <= 0.0:
        return False
    if process.ode_frame == "t":
        return True
    if a <= 0.0:
        return False
    return euler_above is None or _sigma_ve(a, s) <= euler_above * (1 + 1e-12)  # grid round-off (80.00000000000003)


SAMPLERS: dict[str, Sampler] = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m, "euler": euler, "heun": heun}


def _name(sampler: Sampler) -> str:
    return getattr(getattr(sampler, "func", sampler), "__name__", "")


def check_sampler(sampler: Sampler, process: NoiseProcess) -> None:
    """Fail at start on a sampler the process does not define (ancestral DDPM and churn on a continuous process)."""
    name, kw = _name(sampler), getattr(sampler, "keywords", {})
    if name == "ddpm" and not process.has_ancestral:
        raise ValueError(
            f"sampler=ddpm needs a discrete process (vp); process {process.name} has no ancestral chain: "
            f"use ddim (eta=1 is its stochastic analogue), euler, heun or dpmpp_2m"
        )
    if (kw.get("s_churn") or 0) > 0 and not process.continuous:
        raise ValueError(
            f"sampler.s_churn > 0 needs a continuous process (edm or flow); process={process.name}: "
            f"set sampler.s_churn=0"
        )


def model_evaluations(
    sampler_fn: Sampler, process: NoiseProcess, steps: int | None = None, spacing: Spacing = None
) -> int:
    """Number of model_fn calls (NFE) a sampler makes for ``steps`` on ``process`` (with CFG each is one batched
    forward of the conditional and unconditional inputs)."""
    keywords = getattr(sampler_fn, "keywords", {})
    # the partial's keywords and the process's T (vp) are untyped: a sampler is configured with a step count
    steps = cast(int, steps or keywords.get("steps") or getattr(process, "num_timesteps", None))
    spacing = spacing or keywords.get("spacing")
    if _name(sampler_fn) == "heun":
        euler_above = keywords.get("euler_above", 80.0)
        grid = sampling_grid(process, steps, spacing)
        return (
            len(grid)
            - 1
            + sum(_heun_corrects(process, a, s, a2, s2, euler_above) for (_, a, s), (_, a2, s2) in zip(grid, grid[1:]))
        )
    return steps


def sampler_name(sampler: Sampler) -> str:
    """Readable name of a configured sampler (a function or a functools.partial of one), e.g. 'ddim-50'."""
    steps = getattr(sampler, "keywords", {}).get("steps")
    return f"{_name(sampler)}-{steps}" if steps else _name(sampler)


def times_used(sampler: Sampler, process: NoiseProcess, steps: int, spacing: Spacing = None) -> Sequence[float]:
    """The descending process times a sampler evaluates the model at (its grid without the clean end)."""
    times = process.sampling_times(int(steps), spacing, multistep=_name(sampler) == "dpmpp_2m")
    used: list[float] = times[:-1].tolist()
    return used
