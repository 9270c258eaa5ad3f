"""The forker's test, run: docs/examples/extending adds a training method and a guidance method as one file plus one
config each, outside difflab; train.py and sample.py use them from the command line with nothing in difflab changed."""

from __future__ import annotations

import itertools

import pytest
import torch

from difflab.diffusion.guidance import GuidanceStep, cfg
from tests.helpers import ROOT, run_hydra_main, tiny_overrides

EXTENDING = ROOT / "docs" / "examples" / "extending"
CONFIGS = EXTENDING / "configs"


@pytest.fixture
def mylab(forkers_package):
    """The example's package importable, as ``PYTHONPATH=docs/examples/extending`` makes it."""
    forkers_package(EXTENDING)
    import mylab.immiscible
    import mylab.ramp_guidance

    return mylab


def test_noise_assignment_is_the_batchs_cheapest_permutation(mylab):
    """Immiscible diffusion's assignment against every permutation of a batch of 6: the least summed distance, and
    the same noise draws, reordered."""
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    assigned = mylab.immiscible.assign_noise(x, noise)

    def total(order) -> float:
        return sum(float((x[i] - noise[j]).norm()) for i, j in enumerate(order))

    best = min(total(p) for p in itertools.permutations(range(6)))
    got = sum(float((x[i] - assigned[i]).norm()) for i in range(6))
    assert got == pytest.approx(best, rel=1e-6) and got < total(range(6))
    assert sorted(assigned.flatten(1).tolist()) == sorted(noise.flatten(1).tolist())


def _step(sigma: float, alpha: float, out_c: torch.Tensor, out_r: torch.Tensor) -> GuidanceStep:
    like = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    return GuidanceStep(out_c, out_r, lambda out: (out, out), out_c.double(), alpha * like, sigma * like)


@pytest.mark.parametrize("sigma,alpha,w", [(0.0, 1.0, 3.0), (0.5, 0.5, 2.0), (1.0, 0.0, 1.0), (0.25, 0.75, 2.5)])
def test_ramp_guidance_strength_rises_linearly_in_the_paths_time(mylab, sigma, alpha, w):
    """At r = sigma / (alpha + sigma): none at pure noise (w 1), CFG's scale at r = 1/2, twice its strength at the
    data (w 3 for scale 2): CFG itself at the weight the ramp gives."""
    g = torch.Generator().manual_seed(1)
    out_c, out_r = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    step = _step(sigma, alpha, out_c, out_r)
    got, _ = mylab.ramp_guidance.ramp_cfg(step, 2.0)
    want, _ = cfg(step, w)
    torch.testing.assert_close(got, want)


def test_ramp_guidance_takes_per_class_scales_video_and_rescale(mylab):
    """A scale per sample (per-class scales) ramps each sample's own strength, on images and on videos; CFG's rescale
    applies to the ramped output as it does to CFG's."""
    out_c, out_r = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    got, _ = mylab.ramp_guidance.ramp_cfg(_step(0.0, 1.0, out_c, out_r), torch.tensor([2.0, 1.5]))
    assert got[:, 0, 0, 0].tolist() == [3.0, 2.0]  # w = 2 scale - 1 at the data
    video = torch.ones(2, 1, 3, 2, 2)
    like = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    step = GuidanceStep(video, 0 * video, lambda out: (out, out), video.double(), like, 0 * like)
    assert mylab.ramp_guidance.ramp_cfg(step, torch.tensor([2.0, 1.5]))[0][:, 0, 0, 0, 0].tolist() == [3.0, 2.0]
    g = torch.Generator().manual_seed(2)
    out_c, out_r = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    step = _step(0.0, 1.0, out_c, out_r)  # at the data: w = 3 for scale 2
    torch.testing.assert_close(mylab.ramp_guidance.ramp_cfg(step, 2.0, rescale=0.7)[0], cfg(step, 3.0, rescale=0.7)[0])


def test_the_forkers_pieces_train_and_sample_from_the_command_line(mylab, tmp_path, monkeypatch, capsys):
    """train.py with ``--config-dir`` and the example's two options, then sample.py of its checkpoint: refused in one
    line without trust_stored_code (its classes are the forker's, outside difflab's allowlist), drawn with it."""
    import difflab.sample as sample
    import difflab.train as train

    monkeypatch.chdir(tmp_path)
    called = {"assign_noise": 0, "ramp_cfg": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            called[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(mylab.immiscible, "assign_noise", counted("assign_noise", mylab.immiscible.assign_noise))
    ramp = counted("ramp_cfg", mylab.ramp_guidance.ramp_cfg)
    monkeypatch.setattr(mylab.ramp_guidance.RampCFG, "combine", staticmethod(ramp))
    run = tmp_path / "run"
    args = ["--config-dir", str(CONFIGS), "method=immiscible", "guidance=ramp_cfg", *tiny_overrides(max_steps=2)]
    assert run_hydra_main(train.main, [*args, "logger=csv", f"hydra.run.dir={run}"]) == 0, capsys.readouterr().err
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and any((run / "figures" / "class_grid").iterdir())
    assert called["assign_noise"] >= 2 and called["ramp_cfg"] >= 2, called  # each training step; the grid's steps
    capsys.readouterr()
    refused = tmp_path / "refused"
    assert run_hydra_main(sample.main, [f"ckpt_path={ckpt}", f"out_dir={refused}", "n=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mylab." in err[0] and "trust_stored_code=true" in err[0], err
    assert not refused.exists()
    drawn = tmp_path / "drawn"
    argv = [f"ckpt_path={ckpt}", f"out_dir={drawn}", "n=4", "trust_stored_code=true"]
    assert run_hydra_main(sample.main, argv) == 0, capsys.readouterr().err
    assert (drawn / "samples.npz").is_file()
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["difflab"]["config"]
    assert stored["model"]["method"]["_target_"] == "mylab.immiscible.ImmiscibleTraining"
    assert stored["model"]["diffusion"]["guidance"]["_target_"] == "mylab.ramp_guidance.RampCFG"
