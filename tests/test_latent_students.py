"""Few-step students on latents: ``+latent=digits`` (configs/latent/digits.yaml) puts a digits experiment on a latent
cache, so one flow teacher trained with it is distilled by each method's own experiment plus the same two overrides;
the students keep the teacher's latent shape and decoder, and a pixel student of a latent teacher is refused."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import compose_train, run_hydra_main
from tests.test_latents import TINY_DM, ae_ckpt, encode_run  # noqa: F401 - ae_ckpt: a real autoencoder checkpoint (fixture)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, ae_ckpt):  # noqa: F811 - the imported fixture
    """A memory-mapped latent cache (4 x 4 x 4) of 40 tiny 1 x 16 x 16 images, encoded by ``encode_latents``."""
    out = tmp_path_factory.mktemp("latents") / "cache"
    encode_run(ae_ckpt, {"_target_": TINY_DM, "n_train": 40, "batch_size": 4, "num_workers": 0}, out)
    return out


def small(cache, steps: int) -> list[str]:
    """A latent run of ``steps`` steps: ``+latent=digits`` on ``cache`` with a narrow network (attention kept, so
    the JVP methods differentiate through it)."""
    return [
        "+latent=digits",
        f"datamodule.cache_dir={cache}",
        "datamodule.batch_size=8",
        "model.net.base_channels=8",
        "model.net.groups=4",
        "model.net.head_dim=8",
        "trainer=cpu",
        "logger=none",
        f"trainer.max_steps={steps}",
        "trainer.max_time=null",
        "trainer.val_check_interval=1000000",
        "trainer.limit_val_batches=1",
        f"callbacks.model_checkpoint.every_n_train_steps={steps}",
        "callbacks.class_grid.every_n_steps=100000",
        "+callbacks.class_grid.at_end=false",
        "~callbacks.progress_bar",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]


def train_run(tmp, overrides: list[str]):
    from difflab.pipeline import train

    return train(compose_train(tmp, overrides))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, cache):
    """The default recipe (flow, heun, CFG band) on the latents, two steps."""
    out = tmp_path_factory.mktemp("teacher")
    train_run(out, small(cache, 2))
    return out / "checkpoints" / "last.ckpt"


def test_the_overlay_changes_data_network_and_decoder_and_keeps_the_recipe(tmp_path, cache):
    pixel = compose_train(tmp_path, [])
    latent = compose_train(tmp_path, ["+latent=digits", f"datamodule.cache_dir={cache}"])
    assert latent.datamodule._target_.endswith("LatentDataModule") and latent.model.net.in_channels == 4
    assert latent.model.diffusion.autoencoder.cache_dir == str(cache) and latent.objective.x0_clip == "none"
    for key in ("process", "sampler", "guidance", "method", "trainer", "optimizer", "lr_schedule"):
        assert latent[key] == pixel[key], key  # the experiment's formulation, method and budget stay
    assert latent.model.lr == pixel.model.lr and latent.datamodule.batch_size == pixel.datamodule.batch_size
    # an experiment's own settings win where it states them; the overlay sets only the latent side
    student = compose_train(tmp_path / "s", ["experiment=digits_progressive", "+latent=digits"])
    assert student.model.lr == 5.0e-4 and student.method._target_.endswith("ProgressiveDistillation")
    assert student.model.net.in_channels == 4 and student.process.t_min == 0


@pytest.mark.parametrize(
    "experiment, extra",
    [
        ("digits_progressive", ["method.teacher_steps=2", "method.student_steps=1", "method.steps_per_round=2"]),
        ("digits_reflow", ["method.num_pairs=8", "method.chunk=8"]),
        ("digits_consistency", []),
        ("digits_meanflow", []),
    ],
)
def test_a_latent_teacher_distils_into_a_latent_student(tmp_path, cache, teacher, experiment, extra):
    """Each method's experiment with the overlay: the student trains (from the teacher where it has one), keeps
    the latent shape and the cache's decoder, and samples pixels in the one step its experiment sets."""
    from difflab.diffusion.system import load_for_sampling
    from difflab.latents.cache import load_cache_autoencoder

    taught = experiment != "digits_meanflow"  # MeanFlow trains from scratch
    overrides = [f"experiment={experiment}", *small(cache, 2), *extra]
    if experiment == "digits_reflow":
        overrides.append(f"method.pairs_dir={tmp_path}/pairs")
    if taught:
        overrides.append(f"method.teacher_ckpt={teacher}")
    objs = train_run(tmp_path / "run", overrides)
    assert objs["trainer"].global_step == 2
    diffusion, net = load_for_sampling(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert tuple(diffusion.sample_shape) == (4, 4, 4) and diffusion.autoencoder is not None
    noise = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = diffusion.sample(net, 3, torch.tensor([0, 1, 2]), noise=noise)
        latents = diffusion.sample(net, 3, torch.tensor([0, 1, 2]), noise=noise, decode=False)
    assert images.shape == (3, 1, 16, 16) and torch.isfinite(images).all()
    with torch.no_grad():  # decoded by the cache's own autoencoder, reloaded from its manifest
        pixels = load_cache_autoencoder(cache).decode(latents).clamp(-1, 1)
    assert torch.allclose(images, pixels, atol=1e-5)
    if experiment == "digits_reflow":
        assert sorted(p.name for p in (tmp_path / "pairs").iterdir())  # the latent couplings were written
    assert diffusion.describe_sampler().split()[0].endswith("-1"), diffusion.describe_sampler()


def test_a_pixel_student_of_a_latent_teacher_is_refused_writing_nothing(tmp_path, teacher, capsys):
    import train

    work = tmp_path / "run"
    argv = ["experiment=digits_progressive", f"method.teacher_ckpt={teacher}", f"hydra.run.dir={work}", "logger=none"]
    capsys.readouterr()
    assert run_hydra_main(train.main, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "method.teacher_ckpt=" in lines[0] and "trained on latents" in lines[0], lines
    assert "+latent=digits" in lines[0]  # what to add
    assert not (work / "checkpoints").exists()


def test_a_latent_student_of_a_pixel_teacher_is_refused_at_preflight(tmp_path, cache):
    from difflab.config_checks import check_config
    from tests.helpers import default_teacher_checkpoint

    teacher = default_teacher_checkpoint(tmp_path / "teacher")  # the pixel recipe's stored config
    overrides = ["experiment=digits_progressive", "+latent=digits", f"datamodule.cache_dir={cache}"]
    problems = check_config(compose_train(tmp_path, [*overrides, f"method.teacher_ckpt={teacher}"]), "train")
    assert len(problems) == 1 and "trained on pixels and this run trains on latents" in problems[0], problems
