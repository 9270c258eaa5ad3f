"""The continuous processes (edm, flow) against independent implementations and published formulas.

References (test-only dependencies; each part skips cleanly when its reference is missing):
- k-diffusion's ``sampling`` module (Crowson): ``get_sigmas_karras``, ``sample_euler``, ``sample_heun`` (with
  churn) and ``sample_dpmpp_2m`` on a denoiser D(x, sigma). Its package ``__init__`` imports scikit-image and other
  training-only modules, so the module is loaded on its own behind a stand-in package (``_load_k_diffusion``).
- diffusers' ``FlowMatchEulerDiscreteScheduler`` (SD3's sampler): grid, shift and Euler steps.
- Formulas written out here from the papers: EDM's preconditioning, loss weight, training density and Algorithm 2
  (Karras et al. 2022, NVlabs/edm ``training/networks.py``, ``training/loss.py``); SD3's path, velocity target,
  timestep densities and resolution shift (Esser et al. 2024).

The k-diffusion comparisons run in float64, so the tolerance (1e-6) is far above the round-off we observe (~1e-15);
diffusers keeps its sigmas and steps in float32, so those comparisons allow float32 round-off.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import sys
import types

import pytest
import torch

from difflab.diffusion.guidance import guided_model_fn
from difflab.diffusion.objectives import Objective, edm_coefficients, predictions_from_output, training_target
from difflab.diffusion.processes import EDMProcess, FlowProcess, VPProcess, flow_density, shift_time
from difflab.diffusion.samplers import dpmpp_2m, euler, heun, model_evaluations

KD_TOL = 1e-6
STEP_COUNTS = [5, 18, 40]


# ------------------------------------------------------------------ helpers


def _load_k_diffusion():
    """Import ``k_diffusion.sampling`` without running ``k_diffusion/__init__.py``.

    A bare module with the package's ``__path__`` stands in for the package while the submodule (and its relative
    ``from . import utils``) is imported; afterwards ``sys.modules`` is put back as it was, so nothing else in the
    session sees the stand-in. The returned module keeps working (its globals hold what it imported).
    """
    for dep in ("scipy", "torchsde", "torchdiffeq", "tqdm", "PIL", "safetensors", "torchvision"):
        pytest.importorskip(dep)
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed")
    ours = lambda name: name == "k_diffusion" or name.startswith("k_diffusion.")  # noqa: E731
    saved = {name: mod for name, mod in sys.modules.items() if ours(name)}
    for name in saved:
        del sys.modules[name]
    stand_in = types.ModuleType("k_diffusion")
    stand_in.__path__ = list(spec.submodule_search_locations)
    sys.modules["k_diffusion"] = stand_in
    try:
        return importlib.import_module("k_diffusion.sampling")
    finally:
        for name in [n for n in sys.modules if ours(n)]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def kd():
    return _load_k_diffusion()


def _karras(kd, n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """k-diffusion's Karras grid in float64 (its ``torch.linspace`` follows the default dtype, float32 otherwise)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return kd.get_sigmas_karras(n, sigma_min, sigma_max, rho)
    finally:
        torch.set_default_dtype(previous)


DIM = 6
_W = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64) / DIM**0.5


def denoiser(x: torch.Tensor, sigma) -> torch.Tensor:
    """A fixed nonlinear D(x, sigma) (float64): a tanh of a linear map whose scale and offset depend on sigma."""
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    return 0.7 * torch.tanh((x @ _W) / (s**2 + 0.25).sqrt()) + 0.1 * torch.sin(s.log())


def direct_model_fn(x, t):
    """difflab's model_fn for ``denoiser`` on edm (alpha = 1, sigma = t): (x0, eps) = (D, (x - D) / t)."""
    x0 = denoiser(x, t)
    return x0, (x - x0) / t


def _x_T(process, seed=0, n=4, dtype=torch.float64):
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype) * process.prior_std


def _max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


# ------------------------------------------------------------------ (a) EDM vs k-diffusion


@pytest.mark.parametrize("rho", [7.0, 3.0])
@pytest.mark.parametrize("n", STEP_COUNTS)
def test_edm_grid_is_k_diffusions_karras_grid(kd, n, rho):
    """EDMProcess.sampling_times(n) is get_sigmas_karras(n, sigma_min, sigma_max, rho), the final 0 included."""
    ours = EDMProcess(0.002, 80.0, rho).sampling_times(n)
    theirs = _karras(kd, n, 0.002, 80.0, rho)
    assert ours.shape == theirs.shape == (n + 1,) and ours[-1] == 0
    assert _max_diff(ours, theirs) <= 1e-12


@pytest.mark.parametrize("n", STEP_COUNTS)
@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_edm_samplers_match_k_diffusion(kd, name, n):
    """Same D, same x_T = randn * sigma_max, same grid: difflab's euler / heun / dpmpp_2m on EDMProcess give
    k-diffusion's sample_euler / sample_heun / sample_dpmpp_2m (observed max difference ~1e-15)."""
    process = EDMProcess()
    ours_fn = {"euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m}[name]
    theirs_fn = getattr(kd, f"sample_{name}")
    x = _x_T(process)
    ours = ours_fn(direct_model_fn, x, process, steps=n)
    theirs = theirs_fn(denoiser, x, _karras(kd, n), disable=True)
    assert _max_diff(ours, theirs) <= KD_TOL, name


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_heun_model_evaluations_match_k_diffusion(kd, n):
    """Heun corrects every step but the last (to sigma 0) in both: 2n - 1 evaluations. The first step starts at
    exactly sigma_max = 80 = difflab's default euler_above, and is corrected (the check is sigma <= euler_above)."""
    process = EDMProcess()
    theirs_calls, ours_calls = [], []

    def counted_denoiser(x, sigma):
        theirs_calls.append(float(sigma[0]))
        return denoiser(x, sigma)

    def counted_model_fn(x, t):
        ours_calls.append(float(t))
        return direct_model_fn(x, t)

    kd.sample_heun(counted_denoiser, _x_T(process), _karras(kd, n), disable=True)
    heun(counted_model_fn, _x_T(process), process, steps=n)
    assert len(theirs_calls) == len(ours_calls) == model_evaluations(heun, process, n) == 2 * n - 1
    assert ours_calls == pytest.approx(theirs_calls, rel=1e-12)


@pytest.fixture
def global_rng():
    """k-diffusion's churn draws from the global RNG: seed it inside these tests, then put its state back."""
    with torch.random.fork_rng(devices=[]):
        yield


def _seeded(seed, burn, x):
    """Seed the global RNG, then draw (and discard) ``burn`` noise tensors shaped like x."""
    torch.manual_seed(seed)
    for _ in range(burn):
        torch.randn_like(x)


CHURN = dict(s_churn=40.0, s_noise=1.003)


@pytest.mark.parametrize("window", [(0.05, 50.0), (0.3, 5.0), (0.0, math.inf)], ids=["edm", "narrow", "everywhere"])
@pytest.mark.parametrize("name", ["euler", "heun"])
def test_churn_matches_k_diffusion_once_the_draws_are_aligned(kd, global_rng, name, window):
    """EDM Algorithm 2 (churn) against k-diffusion, with the random draws aligned.

    The draw patterns differ: k-diffusion draws ``torch.randn_like(x)`` from the global RNG at *every* step (and
    discards it where gamma = 0); difflab draws (from ``generator``, the global RNG when None) only on steps that
    churn. Steps inside [s_tmin, s_tmax] are contiguous, so discarding, before difflab runs, one draw per
    un-churned step that precedes the window lines the two streams up. euler_above=None keeps this test independent of Heun's euler_above rule (tested below).
    """
    s_tmin, s_tmax = window
    n = 18
    process = EDMProcess()
    sigmas = _karras(kd, n)
    x = _x_T(process)
    burn = [s_tmin <= s <= s_tmax for s in sigmas[:-1].tolist()].index(True)
    kw = dict(CHURN, s_tmin=s_tmin, s_tmax=s_tmax)
    _seeded(11, 0, x)
    theirs = getattr(kd, f"sample_{name}")(denoiser, x, sigmas, disable=True, **kw)
    extra = dict(euler_above=None) if name == "heun" else {}
    _seeded(11, burn, x)
    ours = {"euler": euler, "heun": heun}[name](direct_model_fn, x, process, steps=n, **kw, **extra)
    assert _max_diff(ours, theirs) <= KD_TOL
    if burn:  # without the alignment the two really do use different noise
        _seeded(11, 0, x)
        misaligned = {"euler": euler, "heun": heun}[name](direct_model_fn, x, process, steps=n, **kw, **extra)
        assert _max_diff(misaligned, theirs) > 1e-3


def _algorithm_2(D, x, sigmas, s_churn, s_tmin, s_tmax, s_noise, noise):
    """EDM's Algorithm 2 (Karras et al. 2022) transcribed: stochastic Heun on t = sigma; ``noise()`` gives eps_i."""
    n = len(sigmas) - 1
    for i in range(n):
        t, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t <= s_tmax else 0.0
        t_hat = t + gamma * t
        if gamma > 0:
            x = x + math.sqrt(t_hat**2 - t**2) * s_noise * noise()
        d = (x - D(x, t_hat)) / t_hat
        x_next = x + (t_next - t_hat) * d
        if t_next != 0:
            d_next = (x_next - D(x_next, t_next)) / t_next
            x_next = x + (t_next - t_hat) * (d + d_next) / 2
        x = x_next
    return x


def test_heun_churn_is_edm_algorithm_2_with_a_generator():
    """difflab's heun with churn and an explicit generator against a direct transcription of EDM Algorithm 2 fed
    the same generator (difflab draws exactly once per churned step, in step order)."""
    process = EDMProcess()
    n = 18
    sigmas = process.sampling_times(n).tolist()
    x = _x_T(process)
    kw = dict(CHURN, s_tmin=0.05, s_tmax=50.0)
    g_ref = torch.Generator().manual_seed(3)
    ref = _algorithm_2(denoiser, x, sigmas, noise=lambda: torch.randn(x.shape, generator=g_ref, dtype=x.dtype), **kw)
    g_ours = torch.Generator().manual_seed(3)
    ours = heun(direct_model_fn, x, process, steps=n, generator=g_ours, **kw)
    assert _max_diff(ours, ref) <= KD_TOL
    assert torch.equal(g_ours.get_state(), g_ref.get_state())  # both consumed the same number of draws


def test_heun_churn_with_default_euler_above_matches_k_diffusion(kd, global_rng):
    """Default settings (euler_above=80, s_tmax=inf) with s_churn=40: churn lifts sigma_hat = 80 (1 + gamma) above
    euler_above on the first steps, but whether Heun corrects depends on the grid, as in EDM Algorithm 2 (found by
    this test: difflab once took Euler steps there, 6.7e-6 off, and model_evaluations over-counted)."""
    process = EDMProcess()
    n = 18
    x = _x_T(process)
    _seeded(11, 0, x)
    theirs = kd.sample_heun(denoiser, x, _karras(kd, n), disable=True, **CHURN)
    calls = []

    def counted(x, t):
        calls.append(t)
        return direct_model_fn(x, t)

    _seeded(11, 0, x)
    ours = heun(counted, x, process, steps=n, **CHURN)
    assert _max_diff(ours, theirs) <= KD_TOL
    assert len(calls) == model_evaluations(functools.partial(heun, steps=n, **CHURN), process)


def test_heun_rho5_first_step_is_corrected_like_k_diffusion(kd):
    """EDMProcess(rho=5): the grid's first point is sigma_max up to round-off (80.00000000000003); it is corrected
    as in k-diffusion (euler_above compares with a relative tolerance)."""
    process = EDMProcess(rho=5.0)
    x = _x_T(process)
    theirs = kd.sample_heun(denoiser, x, _karras(kd, 18, rho=5.0), disable=True)
    ours = heun(direct_model_fn, x, process, steps=18)
    assert _max_diff(ours, theirs) <= KD_TOL


# ------------------------------------------------------------------ (b) EDM preconditioning through guided_model_fn

SIGMA_DATA = 0.5
_V = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(6), dtype=torch.float64) / DIM**0.5


def raw_F(x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
    """An arbitrary 'raw network' F(c_in x; c_noise) (float64)."""
    c = c_noise.to(torch.float64).reshape(-1, 1)
    return torch.tanh(x_in @ _V + 0.3 * c) + 0.2 * torch.cos(c) * x_in


def edm_net(x_in, t_net, cond):
    """F as a difflab network: EDMProcess's time input is c_noise * time_scale (1000)."""
    return raw_F(x_in, t_net.double() / 1000.0)


def published_D(x, sigma):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), EDM Table 1 (sigma_data = 0.5, c_noise = ln(sigma) / 4),
    written out here from the paper, not from difflab."""
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    sd = SIGMA_DATA
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / (s**2 + sd**2).sqrt()
    c_in = 1 / (s**2 + sd**2).sqrt()
    c_noise = s.log() / 4
    return c_skip * x + c_out * raw_F(c_in * x, c_noise.expand(x.shape[0], 1))


def test_guided_model_fn_applies_the_published_edm_preconditioning():
    """guided_model_fn(prediction='edm') on EDMProcess returns x0 = D(x, sigma) of the published formula (and the
    consistent eps), from sigma_max down to sigma_min. Tolerance: the time input travels in float32."""
    process = EDMProcess()
    mf = guided_model_fn(edm_net, process, "edm", {}, None, sigma_data=SIGMA_DATA)
    worst = 0.0
    for sigma in process.sampling_times(40)[:-1].tolist() + [1.0, 0.5]:
        x = torch.randn(5, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * (sigma + 0.5)
        x0, eps = mf(x, sigma)
        ref = published_D(x, sigma)
        worst = max(worst, _max_diff(x0, ref))
        assert torch.allclose(eps, (x - ref) / sigma, atol=1e-6 / sigma + 1e-6)
    assert worst <= 1e-6, worst
    # difflab's own coefficient helper agrees with the paper's at alpha = 1
    s = torch.tensor([0.002, 0.3, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = edm_coefficients(torch.ones_like(s), s, SIGMA_DATA)
    d2 = s**2 + SIGMA_DATA**2
    assert torch.allclose(c_skip, SIGMA_DATA**2 / d2) and torch.allclose(c_out, s * SIGMA_DATA / d2.sqrt())
    assert torch.allclose(c_in, 1 / d2.sqrt())


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_full_stack_edm_sampling_matches_k_diffusion(kd, name):
    """The whole stack (network F -> guided_model_fn with net_time / input_scale / the edm conversion -> sampler)
    against k-diffusion's sampler driven by the published D built from the same F."""
    process = EDMProcess()
    mf = guided_model_fn(edm_net, process, "edm", {}, None, sigma_data=SIGMA_DATA)
    for n in STEP_COUNTS:
        x = _x_T(process, seed=2)
        ours = {"euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m}[name](mf, x, process, steps=n)
        theirs = getattr(kd, f"sample_{name}")(published_D, x, _karras(kd, n), disable=True)
        assert _max_diff(ours, theirs) <= KD_TOL, (name, n)  # observed ~1e-9 (float32 time input)


# ------------------------------------------------------------------ (c) flow vs diffusers


def _flow_scheduler(shift):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 28, 50])
def test_flow_grid_matches_diffusers_without_shift(n):
    """shift=1: FlowProcess(t_min=1/1000).sampling_times(n) is diffusers' scheduler.sigmas after set_timesteps(n),
    final 0 included, to the last bit once rounded to diffusers' float32."""
    sched = _flow_scheduler(1.0)
    sched.set_timesteps(n)
    ours = FlowProcess(shift=1.0, t_min=1 / 1000).sampling_times(n)
    assert sched.sigmas.shape == ours.shape and sched.sigmas[-1] == 0
    assert torch.equal(ours.float(), sched.sigmas)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5, None])
@pytest.mark.parametrize("n", [1, 5, 10, 28])
def test_flow_grid_matches_diffusers_default_grid(shift, n):
    """FlowProcess(shift).sampling_times(n) is diffusers' FlowMatchEulerDiscreteScheduler(shift=shift)
    .set_timesteps(n) grid (None: both classes' defaults), lower end included: diffusers spaces points down to its
    already shifted sigma_min and shifts them again, so the lowest nonzero time is shift(shift(1/1000)), 0.00893 at
    shift 3 (float32 round-off)."""
    diffusers = pytest.importorskip("diffusers")
    kwargs = {} if shift is None else {"shift": shift}
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**kwargs)
    sched.set_timesteps(n)
    ours = FlowProcess(**kwargs).sampling_times(n)
    assert sched.sigmas.shape == ours.shape and _max_diff(sched.sigmas, ours) <= 2e-7
    if shift == 3.0 and n > 1:
        assert float(ours[-2]) == pytest.approx(0.0089286, abs=1e-6)


@pytest.mark.parametrize("grid_shift", [0.33, 0.5, 3.0])
def test_flow_sampling_shift_is_diffusers_grid_of_that_shift(grid_shift):
    """process.sampling_shift (and a number in sampler.spacing) moves the sampling grid alone: the grid is diffusers'
    FlowMatchEulerDiscreteScheduler(shift=grid_shift) grid while training times keep the process's own shift."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=grid_shift)
    sched.set_timesteps(10)
    own = FlowProcess(shift=1.0, sampling_shift=grid_shift)
    assert _max_diff(sched.sigmas, own.sampling_times(10)) <= 5e-7  # a few float32 ulps (diffusers' sigmas)
    assert _max_diff(sched.sigmas, FlowProcess(shift=1.0).sampling_times(10, grid_shift)) <= 5e-7
    g = torch.Generator().manual_seed(0)
    plain = FlowProcess(shift=1.0).sample_times(64, generator=g)
    assert torch.equal(own.sample_times(64, generator=torch.Generator().manual_seed(0)), plain)


def test_flow_spacing_refuses_a_name_and_vp_refuses_a_number():
    """sampler.spacing: vp takes a spacing name, flow a grid shift; each refuses the other's kind in one line."""
    with pytest.raises(ValueError, match=r"sampler.spacing='trailing' does not apply to process=flow"):
        FlowProcess().sampling_times(10, "trailing")
    with pytest.raises(ValueError, match=r"process.sampling_shift=-1.0 .*a number > 0"):
        FlowProcess(sampling_shift=-1.0)
    with pytest.raises(ValueError, match=r"sampler.spacing=0.5 does not apply to process=vp"):
        VPProcess().sampling_times(10, 0.5)


def velocity(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed velocity field v(x, t) (t in [0, 1], per sample or scalar)."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1)
    return torch.tanh(x @ _W.to(x.dtype)) * (1 + t) - 0.3 * t * x + 0.2 * torch.cos(3 * t)


def velocity_net(x_in, t_net, cond):
    return velocity(x_in, t_net.to(x_in.dtype) / 1000.0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [5, 28])
def test_flow_euler_matches_diffusers_steps(shift, n):
    """difflab euler (network v -> guided_model_fn(prediction='flow') -> x0, eps -> DDIM-form step) against
    diffusers' scheduler.step(v, timestep, sample) loop, same v and same x_T, on diffusers' own default grid.

    diffusers keeps sigmas, timesteps and the sample in float32, so both run on float32 inputs; each step carries
    float32 round-off (~6e-8 relative) in the grid, the time input and the update, and difflab converts through
    x0 / eps instead of adding dt v directly, so 1e-5 absolute on outputs of size ~1 leaves a wide margin over the
    ~1e-6 observed.
    """
    process = FlowProcess(shift=shift)
    sched = _flow_scheduler(shift)
    sched.set_timesteps(n)
    x = torch.randn(4, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    theirs = x.clone()
    for timestep in sched.timesteps:
        v = velocity(theirs, float(timestep) / 1000.0)
        theirs = sched.step(v, timestep, theirs).prev_sample
    ours = euler(guided_model_fn(velocity_net, process, "flow", {}, None), x, process, steps=n)
    assert ours.dtype == torch.float32
    assert _max_diff(ours, theirs) <= 1e-5
    # and the float64 run of difflab is within float32 round-off of both
    ours64 = euler(guided_model_fn(velocity_net, process, "flow", {}, None), x.double(), process, steps=n)
    assert _max_diff(ours64, theirs) <= 1e-5


def test_flow_target_path_and_conversions_are_sd3s():
    """On FlowProcess: x_t = (1 - t) x0 + t eps, the flow target is eps - x0, and a velocity output v converts to
    x0_hat = x_t - t v and eps_hat = x_t + (1 - t) v; Objective.losses feeds the network exactly that x_t at
    1000 t and regresses eps - x0 (noise drawn as torch.randn(x0.shape, generator))."""
    process = FlowProcess()
    x0 = torch.randn(6, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = torch.randn(6, DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.37, 0.5, 0.9, 1.0], dtype=torch.float64)
    tc = t[:, None]
    a, s = process.coefficients(tc)
    da, ds = process.derivatives(tc)
    assert torch.allclose(a * x0 + s * eps, (1 - tc) * x0 + tc * eps, atol=0)
    assert torch.allclose(training_target(x0, eps, a, s, "flow", da, ds), eps - x0, atol=1e-15)
    x_t = (1 - tc) * x0 + tc * eps
    v = velocity(x_t, t)
    x0_hat, eps_hat = predictions_from_output(v, x_t, a, s, "flow", da, ds)
    assert torch.allclose(x0_hat, x_t - tc * v, atol=1e-14)
    assert torch.allclose(eps_hat, x_t + (1 - tc) * v, atol=1e-14)

    seen = {}

    def net(x_in, t_net):
        seen.update(x_in=x_in, t_net=t_net)
        return velocity(x_in, t_net.double() / 1000)

    out = Objective(prediction="flow", weighting="uniform").losses(
        net, x0, process, t=t, generator=torch.Generator().manual_seed(9)
    )
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9), dtype=x0.dtype)
    expected_x_t = (1 - tc) * x0 + tc * noise
    assert torch.allclose(seen["x_in"], expected_x_t, atol=1e-14)
    assert torch.allclose(seen["t_net"], (1000 * t).float())
    v_out = velocity(expected_x_t, t)
    assert torch.allclose(out["raw"], ((v_out - (noise - x0)) ** 2).mean(1).float(), rtol=1e-5)
    assert torch.allclose(out["x0_hat"], (expected_x_t - tc * v_out).float(), atol=1e-5)


def _quantile_check(values: torch.Tensor, mean: float, std: float):
    """Empirical quantiles of ``values`` against N(mean, std^2), each within 5 standard errors of a sample quantile
    (sqrt(p (1 - p) / N) std / phi(z_p)); returns the largest |error| / standard error."""
    stats = pytest.importorskip("scipy.stats")
    n = values.numel()
    probs = [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99]
    emp = torch.quantile(values.double(), torch.tensor(probs, dtype=torch.float64)).tolist()
    worst = 0.0
    for p, q in zip(probs, emp):
        z = stats.norm.ppf(p)
        se = math.sqrt(p * (1 - p) / n) * std / stats.norm.pdf(z)
        worst = max(worst, abs(q - (mean + std * z)) / se)
    assert worst < 5, f"quantiles off by {worst:.2f} standard errors"
    return worst


N_DENSITY = 200_000


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.8, 1.6)])
def test_logit_normal_density_is_sigmoid_of_a_normal(mean, std):
    """FlowProcess(density='logit_normal', mean, std, shift=1).sample_times: logit(t) ~ N(mean, std^2).
    Quantiles within 5 standard errors at N = 200000 (the standard error is ~0.003 std at the median)."""
    t = FlowProcess(density="logit_normal", mean=mean, std=std, shift=1.0).sample_times(
        N_DENSITY, generator=torch.Generator().manual_seed(0)
    )
    assert t.dtype == torch.float64 and bool(((t > 0) & (t < 1)).all())
    _quantile_check(torch.logit(t), mean, std)


def _mode_reference(u, s):
    """Esser et al. 2024, eq. for f_mode: t = 1 - u - s (cos^2(pi u / 2) - 1 + u)."""
    return 1 - u - s * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


def _cosmap_reference(u):
    """Esser et al. 2024, CosMap: t = 1 - 1 / (tan(pi u / 2) + 1)."""
    return 1 - 1 / (torch.tan(math.pi / 2 * u) + 1)


def _ks_distance(samples: torch.Tensor, cdf, points: torch.Tensor) -> float:
    emp = torch.searchsorted(samples.sort().values, points, right=True).double() / samples.numel()
    return float((emp - cdf(points)).abs().max())


def test_mode_and_cosmap_densities_are_sd3s():
    """flow_density('mode' / 'cosmap') is SD3's t = f(u) at known u, and sample_times follows the distribution those
    maps imply: cosmap's CDF is (2 / pi) atan(t / (1 - t)) (density 2 / (pi - 2 pi t + 2 pi t^2)); mode's is
    1 - f^-1(t) (f decreasing for the default scale 1.29), f^-1 by bisection here. KS distance on a grid of 199
    points below 1.95 / sqrt(N) (the 0.1% critical value)."""
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    for scale in (0.0, 0.5, 1.29, -0.5):
        assert torch.allclose(flow_density(u, u, "mode", mode_scale=scale), _mode_reference(u, scale), atol=1e-15)
    assert torch.allclose(flow_density(u, u, "mode", mode_scale=0.0), 1 - u)  # scale 0: uniform
    inner = u[1:-1]
    assert torch.allclose(flow_density(inner, inner, "cosmap"), _cosmap_reference(inner), atol=1e-15)
    assert float(flow_density(torch.tensor([0.5], dtype=torch.float64), None, "cosmap")) == pytest.approx(0.5)

    grid = torch.linspace(0.005, 0.995, 199, dtype=torch.float64)
    limit = 1.95 / math.sqrt(N_DENSITY)
    cos_t = FlowProcess(density="cosmap", shift=1.0).sample_times(N_DENSITY, generator=torch.Generator().manual_seed(1))
    assert _ks_distance(cos_t, lambda x: 2 / math.pi * torch.atan(x / (1 - x)), grid) < limit

    def mode_cdf(x, s=1.29):
        lo, hi = torch.zeros_like(x), torch.ones_like(x)  # f is decreasing: find u with f(u) = x
        for _ in range(60):
            mid = (lo + hi) / 2
            above = _mode_reference(mid, s) > x
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return 1 - (lo + hi) / 2

    mode_t = FlowProcess(density="mode", mode_scale=1.29, shift=1.0).sample_times(
        N_DENSITY, generator=torch.Generator().manual_seed(2)
    )
    assert _ks_distance(mode_t, mode_cdf, grid) < limit


def test_shift_formula_moves_mass_toward_noise():
    """shift_time is t' = a t / (1 + (a - 1) t); equivalently it multiplies sigma_ve = t / (1 - t) by a. For a > 1
    every training time and grid point moves toward noise (t' >= t, same draws), and logit-normal(0, 1) with shift 3
    has median sigmoid(ln 3) = 0.75."""
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    for a in (0.5, 1.0, 3.0):
        ref = a * t / (1 + (a - 1) * t)
        assert torch.allclose(shift_time(t, a), ref, atol=1e-15)
        inner = t[1:-1]
        assert torch.allclose(shift_time(inner, a) / (1 - shift_time(inner, a)), a * inner / (1 - inner), rtol=1e-9)
    base = FlowProcess(shift=1.0).sample_times(50_000, generator=torch.Generator().manual_seed(3))
    shifted = FlowProcess(shift=3.0).sample_times(50_000, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(shifted, shift_time(base, 3.0)) and bool((shifted >= base).all())
    assert float(shifted.median()) == pytest.approx(0.75, abs=0.01)
    assert float(base.median()) == pytest.approx(0.5, abs=0.01)
    assert bool((FlowProcess(shift=3.0).sampling_times(20) >= FlowProcess(shift=1.0).sampling_times(20)).all())


# ------------------------------------------------------------------ (d) EDM training density and loss


@pytest.mark.parametrize("p_mean,p_std", [(-1.2, 1.2), (0.4, 0.6)])
def test_edm_training_sigmas_are_log_normal(p_mean, p_std):
    """EDMProcess(p_mean, p_std).sample_times: ln(sigma) ~ N(p_mean, p_std^2) (quantiles within 5 standard errors)."""
    sigma = EDMProcess(p_mean=p_mean, p_std=p_std).sample_times(N_DENSITY, generator=torch.Generator().manual_seed(4))
    assert bool((sigma > 0).all())
    _quantile_check(sigma.log(), p_mean, p_std)


def _hand_x0_hat(prediction, out, x, s):
    """x0 from a network output on the EDM path (alpha = 1, sigma = s), each conversion solved by hand."""
    sd = SIGMA_DATA
    if prediction == "edm":
        return sd**2 / (s**2 + sd**2) * x + s * sd / (s**2 + sd**2).sqrt() * out
    if prediction == "eps":
        return x - s * out
    if prediction == "x0":
        return out
    r = (1 + s**2).sqrt()  # v = (eps - s x0) / r with eps = (x - x0) / s
    return (x - s * r * out) / (1 + s**2)


@pytest.mark.parametrize("prediction", ["edm", "eps", "x0", "v"])
def test_edm_weighting_is_edms_loss(prediction):
    """Objective(weighting='edm').losses equals EDM's per-sample loss lambda(sigma) mean((D - x0)^2), lambda =
    (sigma^2 + sd^2) / (sigma sd)^2 (NVlabs/edm training/loss.py; EDM sums over elements where difflab averages),
    with the same noise, for the edm target (where the weight in F units is 1) and for the other targets (the
    weighting is stated once and converted)."""
    process = EDMProcess()
    x0 = torch.randn(8, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.5
    sigma = process.sample_times(8, generator=torch.Generator().manual_seed(2))
    sigma = torch.cat([sigma[:6], torch.tensor([0.002, 80.0], dtype=torch.float64)])

    def net(x_in, t_net):
        return raw_F(x_in, t_net.double() / 1000.0)

    objective = Objective(prediction=prediction, weighting="edm", sigma_data=SIGMA_DATA, x0_clip="none")
    out = objective.losses(net, x0, process, t=sigma, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7), dtype=x0.dtype)
    s = sigma[:, None]
    x = x0 + s * noise
    x_in = x / (s**2 + SIGMA_DATA**2).sqrt() if prediction == "edm" else x
    D = _hand_x0_hat(prediction, raw_F(x_in, s.log() / 4), x, s)
    lam = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    expected = lam * ((D - x0) ** 2).mean(1)
    assert torch.allclose(out["loss"].double(), expected, rtol=2e-5), (out["loss"], expected)
    # x0_hat comes back in float32: recovering it from an eps output loses ~sigma * 6e-8 at sigma = 80
    assert bool(((out["x0_hat"].double() - D).abs() <= 1e-5 * (1 + s)).all())
