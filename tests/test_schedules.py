"""Noise schedules: closed forms, zero terminal SNR, spacing grids, derived quantities and the schedule configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from difflab.configs import CONFIG_DIR
from difflab.diffusion.processes import VPProcess
from difflab.diffusion.schedules import BETA_SCHEDULES, cosine_alpha_bar, rescale_zero_terminal_snr, spaced_timesteps

ROOT = Path(__file__).resolve().parents[1]
KINDS = sorted(BETA_SCHEDULES)


def test_cosine_matches_improved_ddpm_closed_form():
    T, s = 1000, 0.008
    sch = VPProcess("cosine", T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    # the cap only binds at the very end (beta 0.999): compare before it, and check the cap itself
    assert torch.allclose(sch.alphas_cumprod[:-1], expected[:-1], rtol=1e-12, atol=0)
    assert sch.betas.max().item() == pytest.approx(0.999)
    assert sch.alphas_cumprod[-1].item() == pytest.approx(expected[-2].item() * 0.001, rel=1e-9)


def test_cosine_offset_and_shift_change_the_schedule_as_documented():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    base, wide = cosine_alpha_bar(t, 0.008), cosine_alpha_bar(t, 0.1)
    assert base[0] == wide[0] == 1.0 and base[-1] < 1e-30 and wide[-1] < 1e-30
    assert bool((wide[1:-1] < base[1:-1]).all()), "a larger offset adds noise at every intermediate t"
    shifted = cosine_alpha_bar(t, 0.008, logsnr_shift=-2.0)
    logsnr = lambda ab: torch.log(ab / (1 - ab))  # noqa: E731
    assert torch.allclose(logsnr(shifted[1:-1]), logsnr(base[1:-1]) - 2.0, atol=1e-9)
    a = VPProcess("cosine", 100, offset=0.05)
    b = instantiate_schedule("cosine_offset", ["schedule.offset=0.05", "schedule.num_timesteps=100"])
    assert torch.equal(a.alphas_cumprod, b.alphas_cumprod)


def test_linear_scaled_linear_sigmoid_betas():
    assert torch.allclose(
        VPProcess("linear", 5).betas,
        torch.tensor([1e-4, 0.0050750, 0.01005, 0.0150250, 0.02], dtype=torch.float64),
        atol=1e-12,
    )
    sl = VPProcess("scaled_linear", 3).betas
    assert torch.allclose(
        sl.sqrt(), torch.tensor([0.00085**0.5, (0.00085**0.5 + 0.012**0.5) / 2, 0.012**0.5], dtype=torch.float64)
    )
    sg = VPProcess("sigmoid", 3).betas
    assert sg[1].item() == pytest.approx(1e-4 + 0.5 * (0.02 - 1e-4))
    assert sg[0].item() == pytest.approx(1e-4 + (0.02 - 1e-4) / (1 + math.exp(6)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [100, 500, 1000])
@pytest.mark.parametrize("zero", [False, True])
def test_every_schedule_is_valid(kind, T, zero):
    sch = VPProcess(kind, T, zero_terminal_snr=zero)
    ab = sch.alphas_cumprod
    assert ab.dtype == torch.float64 and ab.shape == (T,)
    assert bool((ab[1:] < ab[:-1]).all()) and 0 < ab[0] < 1
    assert bool(((sch.betas > 0) & (sch.betas <= 1)).all())
    snr = sch.snr
    assert torch.allclose(snr[:-1], ab[:-1] / (1 - ab[:-1]))
    assert torch.allclose(sch.log_snr[:-1], snr[:-1].log())
    assert torch.allclose(sch.sigmas[:-1], snr[:-1].rsqrt())
    if zero:
        assert ab[-1] == 0 and snr[-1] == 0 and sch.log_snr[-1] == -math.inf and sch.sigmas[-1] == math.inf
        plain = VPProcess(kind, T)
        assert ab[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12), "first step unchanged"
    else:
        assert torch.isfinite(sch.log_snr).all()


def test_zero_terminal_snr_rescale_is_affine_in_sqrt_alpha_bar():
    betas = VPProcess("linear", 1000).betas
    old = torch.cumprod(1 - betas, 0).sqrt()
    new = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0).sqrt()
    scale = (old[0]) / (old[0] - old[-1])
    assert torch.allclose(new, (old - old[-1]) * scale, atol=1e-12)


def test_alpha_bar_gathers_and_broadcasts():
    sch = VPProcess("cosine", 100)
    x = torch.zeros(3, 2, 4, 4)
    ab = sch.alpha_bar(torch.tensor([0, 50, 99]), like=x)
    assert ab.shape == (3, 1, 1, 1) and ab.dtype == torch.float32
    assert ab.flatten()[1].item() == pytest.approx(sch.alphas_cumprod[50].item(), rel=1e-6)


@pytest.mark.parametrize(
    "spacing,expected",
    [
        ("leading", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        ("trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
        ("linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
    ],
)
def test_spacing_grids(spacing, expected):
    assert spaced_timesteps(1000, 10, spacing).tolist() == expected


def test_spacing_grids_for_multistep_solvers_and_odd_counts():
    # DPM-Solver grids: steps + 1 points, t = 0 dropped (diffusers' DPMSolverMultistepScheduler)
    assert spaced_timesteps(1000, 4, "leading", exclude_zero=True).tolist() == [800, 600, 400, 200]
    assert spaced_timesteps(1000, 4, "linspace", exclude_zero=True).tolist() == [999, 749, 500, 250]
    assert spaced_timesteps(1000, 4, "trailing", exclude_zero=True).tolist() == [999, 749, 499, 249]
    assert spaced_timesteps(1000, 3, "trailing").tolist() == [999, 666, 332]
    assert spaced_timesteps(100, 100, "leading").tolist() == list(range(99, -1, -1))
    assert spaced_timesteps(1000, 10, "leading", offset=1).tolist()[-1] == 1


def test_schedule_spacing_default_and_override():
    sch = VPProcess("linear", 100, spacing="trailing")
    assert sch.sampling_timesteps(4).tolist() == [99, 74, 49, 24]
    assert sch.sampling_timesteps(4, "leading").tolist() == [75, 50, 25, 0]


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(kind="quadratic"), "unknown schedule kind"),
        (dict(kind="linear", offset=0.1), "does not take"),
        (dict(kind="cosine", spacing="middle"), "spacing"),
        (dict(kind="cosine", num_timesteps=1), "num_timesteps"),
        (dict(kind="cosine", offset=-0.1), "offset"),
    ],
)
def test_bad_schedule_settings_fail_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        VPProcess(**bad)


def test_bad_step_counts_fail_clearly():
    sch = VPProcess("cosine", 100)
    with pytest.raises(ValueError, match="steps must be in"):
        sch.sampling_timesteps(101)
    with pytest.raises(ValueError, match="steps must be in"):
        sch.sampling_timesteps(100, "leading", exclude_zero=True)  # leading places steps + 1 points
    with pytest.raises(ValueError, match="spacing"):
        sch.sampling_timesteps(10, "random")


def test_from_alphas_cumprod_keeps_values():
    ab = VPProcess("linear", 50, zero_terminal_snr=True).alphas_cumprod.float()
    sch = VPProcess.from_alphas_cumprod(ab, spacing="trailing")
    assert torch.equal(sch.alphas_cumprod, ab.double()) and sch.zero_terminal_snr and sch.num_timesteps == 50
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        VPProcess.from_alphas_cumprod([1.0, 0.5])


def instantiate_schedule(name: str, overrides: list[str] | None = None) -> VPProcess:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"schedule={name}", *(overrides or [])])
    return instantiate(cfg.schedule)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine", "cosine_offset", "sigmoid"])
def test_schedule_configs_compose_with_every_option(name):
    sch = instantiate_schedule(
        name, ["schedule.zero_terminal_snr=true", "schedule.num_timesteps=500", "schedule.spacing=trailing"]
    )
    assert isinstance(sch, VPProcess) and sch.num_timesteps == 500 and sch.zero_terminal_snr
    assert sch.snr[-1] == 0 and sch.spacing == "trailing"
    assert sch.kind == ("cosine" if name == "cosine_offset" else name)


def test_the_old_vp_target_still_builds():
    """Stored configs name the vp process by its old place, difflab.diffusion.schedules.DiscreteSchedule: the
    checkpoint migration maps it to VPProcess."""
    from difflab.checkpoints import migrate_config

    stored = {
        "model": {
            "process": {
                "_target_": "difflab.diffusion.schedules.DiscreteSchedule",
                "kind": "cosine",
                "num_timesteps": 10,
            }
        }
    }
    old = instantiate(migrate_config(stored)["model"]["process"])
    assert type(old) is VPProcess and old.num_timesteps == 10
