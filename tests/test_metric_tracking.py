"""Sample metrics as Lightning metrics (callback_metrics, ModelCheckpoint monitor, optimized_metric), the metric
protocol record with its real-vs-real floor, and the scored class grid."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import compose_train, tiny_overrides

N = 20  # generated samples per evaluation: metric names carry it (metrics/fd_digit20)
FD = f"metrics/fd_digit{N}"


def _csv_series(run: Path, name: str) -> dict[int, float]:
    """{step: value} of one metric in the CSV logger's file (sparse rows)."""
    out = {}
    with open(run / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get(name):
                out[int(row["step"])] = float(row[name])
    return out


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A tiny digits run measuring sample metrics every 2 steps, keeping only the best checkpoint by FD."""
    from difflab.pipeline import train

    out = tmp_path_factory.mktemp("tracked")
    cfg = compose_train(
        out,
        tiny_overrides(
            max_steps=8,
            save_every=2,
            extra=[
                "callbacks=metrics",
                "logger=csv",
                "callbacks.sample_metrics.every_n_steps=2",
                f"callbacks.sample_metrics.n_samples={N}",
                "callbacks.sample_metrics.n_real=64",
                "callbacks.sample_metrics.lpips_net=null",
                f"callbacks.sample_metrics.stats_dir={out}/stats",
                f"callbacks.model_checkpoint.monitor={FD}",
                "callbacks.model_checkpoint.save_top_k=1",
                f"optimized_metric={FD}",
                "model.lr=3e-3",
            ],
        ),
    )
    objs = train(cfg)
    return out, objs


def test_checkpoint_monitoring_a_sample_metric_keeps_the_best(tracked_run):
    run, objs = tracked_run
    fd = _csv_series(run, FD)
    assert sorted(fd) == [2, 4, 6, 8]  # measured at each scheduled step, logged once per step
    best_step = min(fd, key=fd.get)
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*.ckpt"))
    assert kept == [f"step_{best_step:07d}.ckpt"]  # save_top_k=1 by FD: only the best one is left
    mc = objs["trainer"].checkpoint_callback
    assert Path(mc.best_model_path).name == kept[0]
    assert float(mc.best_model_score) == pytest.approx(fd[best_step], rel=1e-6)


def test_sample_metrics_reach_callback_metrics_and_the_sweeper(tracked_run):
    from difflab.pipeline import optimized_value

    run, objs = tracked_run
    fd = _csv_series(run, FD)
    callback_metrics = objs["trainer"].callback_metrics
    assert float(callback_metrics[FD]) == pytest.approx(fd[8], rel=1e-6)
    assert "metrics/grid_agreement" in callback_metrics
    record = json.loads((run / "final_metrics.json").read_text())
    assert record["status"] == "completed" and record["step"] == 8 and record["optimized_metric"] == FD
    assert record["metrics"][FD] == pytest.approx(fd[8], rel=1e-6)
    cfg = objs["model"].run_config
    assert optimized_value(cfg, record["metrics"]) == pytest.approx(fd[8], rel=1e-6)
    assert optimized_value({"optimized_metric": "metrics/never"}, record["metrics"]) is None


def test_protocol_records_how_each_metric_was_measured_and_its_floor(tracked_run):
    from difflab.eval.digit_classifier import WEIGHTS

    run, _ = tracked_run
    protocol = json.loads((run / "metrics" / "protocol.json").read_text())
    entry = protocol[FD]
    assert entry["n_samples"] == N and entry["feature"] == "digit-classifier-128"
    assert entry["weights_sha256"] == hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()[:12]
    assert entry["reference"]["split"] == "train" and entry["reference"]["n"] == 64
    assert entry["eval_seed"] == 0 and "16x16" in entry["resize"]
    assert entry["floor_real_items_overlap_reference"] is False
    floors = _csv_series(run, FD + "_floor")
    assert sorted(floors) == [2, 4, 6, 8]  # the floor next to every measurement
    assert list(floors.values()) == pytest.approx([entry["floor"]] * 4)
    assert f"metrics/kd_digit{N}" in protocol


def test_every_logged_evaluation_records_its_seed(tracked_run):
    """Each metric a sweep compares says which noise it was evaluated on (so ablate.py pairs by it): the sample
    metrics (FD, KID, digit accuracy), the scored grid and the validation losses."""
    from difflab.ablation.comparable import protocol_entry
    from difflab.ablation.sweep import read_job
    from difflab.diffusion.system import VALIDATION_SEED

    run, objs = tracked_run
    protocol = json.loads((run / "metrics" / "protocol.json").read_text())
    assert protocol["metrics/digit_accuracy"]["eval_seed"] == 0
    assert protocol["metrics/digit_accuracy"]["n_samples"] == N
    assert protocol["metrics/digit_accuracy"]["weights_sha256"] == protocol[FD]["weights_sha256"]
    grid = protocol["metrics/grid_agreement"]
    assert grid["eval_seed"] == 0  # callbacks.class_grid.seed
    assert grid["feature"] and grid["sampler"] == objs["model"].diffusion.describe_sampler()
    assert protocol["val/loss"]["eval_seed"] == VALIDATION_SEED
    job = read_job(run, [])
    for metric in ("val/loss", "val_loss_t/bucket_03", FD, "metrics/digit_accuracy", "metrics/grid_agreement"):
        assert protocol_entry(job, metric)["eval_seed"] is not None, metric


def test_floor_is_fd_of_unseen_real_items_against_the_reference(tmp_path):
    """The floor equals an FD computed by hand: reference = the first n_real items of the seeded order of the train
    split, floor items = the next n_samples."""
    from difflab.datamodules.digits import DigitsDataModule
    from difflab.metrics.frechet import frechet_distance, gaussian_stats
    from difflab.metrics.sample_metrics import DigitFeatures, SampleMetrics

    dm = DigitsDataModule(image_size=16, batch_size=32)
    dm.prepare_data()
    dm.setup("fit")

    class Diffusion:  # what SampleMetrics reads of a module's Diffusion object
        sample_shape, autoencoder = (1, 16, 16), None

        @staticmethod
        def guidance_for(overrides):
            from difflab.diffusion.guidance import CFG

            return CFG().updated(overrides)

        @staticmethod
        def to_pixels(x):
            return x

    class Module:  # ... and of the module
        device, conditioner, run_config, diffusion = torch.device("cpu"), None, None, Diffusion()

    metrics = SampleMetrics(n_samples=40, n_real=100, kid_subsets=0, lpips_net=None, seed=3)
    metrics.prepare(Module(), dm, run_dir=tmp_path)
    dataset = dm.train_dataloader().dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(3))
    feats = DigitFeatures()
    images = lambda idx: torch.stack([dataset[i]["x"] for i in idx.tolist()])  # noqa: E731
    with torch.no_grad():
        ref, unseen = feats(images(order[:100])).double(), feats(images(order[100:140])).double()
    expected = frechet_distance(*gaussian_stats(ref), *gaussian_stats(unseen))
    assert metrics.floor["frechet"] == pytest.approx(float(expected), rel=1e-6)


def test_digit_judge_reads_real_digits_and_notices_wrong_labels():
    from difflab.datamodules.digits import DigitsDataModule
    from difflab.eval.grid_judge import DigitJudge, agreement_rate

    dm = DigitsDataModule(image_size=16, batch_size=200)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    verdict = DigitJudge().judge(batch["x"], [str(i) for i in range(10)])
    assert agreement_rate(verdict.predicted, batch["label"]) > 0.9
    assert agreement_rate(verdict.predicted, (batch["label"] + 1) % 10) < 0.2
    assert ((verdict.score > 0) & (verdict.score <= 1)).all()


def test_scored_grid_colours_and_agreement():
    from difflab.diagnostics.class_grid import score_grid
    from difflab.eval.grid_judge import Verdict

    class Fixed:  # a judge whose answers the test knows: row r predicted as r, except two cells
        name = "fixed"

        def judge(self, images, candidates, as_prompts=False):
            pred = torch.arange(3).repeat_interleave(2)  # 2 classes x 2 columns + the unconditional row
            pred[1], pred[2], pred[4:] = 0, 0, 1  # class 0 cell right, class 1 cell wrong
            return Verdict(pred, torch.full((6,), 0.5), "p")

    captions, colours, agreement = score_grid(Fixed(), torch.zeros(6, 1, 4, 4), ["zero", "one", "(uncond)"], 2)
    assert agreement == pytest.approx(0.75)  # 3 of the 4 conditional cells
    assert colours[:4] == ["#1a7f37", "#1a7f37", "#cf222e", "#1a7f37"] and colours[4:] == ["#777777"] * 2
    assert captions[2] == "zero 0.50"


def test_clip_zero_shot_matrix_agrees_with_pair_scores(tmp_path):
    from difflab.eval.grid_judge import ClipJudge
    from difflab.metrics.clip_score import load_clip_scorer
    from tests.test_metrics import _tiny_clip_dir

    scorer = load_clip_scorer(_tiny_clip_dir(tmp_path))
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    texts = ["a red square", "two cats", "a dog"]
    matrix = scorer.similarity_matrix(images, texts)
    assert matrix.shape == (3, 3)
    assert torch.allclose(matrix.diagonal(), scorer.scores(images, texts), atol=1e-4)
    verdict = ClipJudge(scorer).judge(images, texts, as_prompts=True)
    assert torch.equal(verdict.predicted, matrix.argmax(dim=1)) and torch.allclose(verdict.score, matrix.amax(1))
    classes = ClipJudge(scorer).judge(images, ["cat", "dog"])  # class names go through the template
    ref = scorer.similarity_matrix(images, ["a photo of a cat", "a photo of a dog"])
    assert torch.equal(classes.predicted, ref.argmax(dim=1))


def test_scored_grid_of_the_tracked_run_is_written(tracked_run):
    from PIL import Image

    run, _ = tracked_run
    agreement = _csv_series(run, "metrics/grid_agreement")
    assert sorted(agreement) == [2, 4, 6, 8] and all(0 <= v <= 1 for v in agreement.values())
    final = Image.open(run / "figures" / "class_grid" / "final.png")
    assert final.width > 100 and final.height > 11 * 8  # 11 labelled rows of captioned cells
    assert not math.isnan(agreement[8])


def test_optuna_search_of_four_trials_reports_the_best(tmp_path):
    """`python train.py hparams_search=digits_optuna` at a debug budget: 4 trials finish and the sweeper's best value is
    the smallest FD the trials returned."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    import yaml

    import train
    from tests.helpers import run_hydra_main

    sweep = tmp_path / "sweep"
    code = run_hydra_main(
        train.main,
        [
            "hparams_search=digits_optuna",
            "hydra.sweeper.n_trials=4",
            "hydra.sweeper.sampler.n_startup_trials=4",
            *tiny_overrides(max_steps=4, save_every=4),
            "callbacks.sample_metrics.every_n_steps=4",
            "callbacks.sample_metrics.n_samples=200",
            "callbacks.sample_metrics.n_real=256",
            "callbacks.sample_metrics.lpips_net=null",
            f"callbacks.sample_metrics.stats_dir={tmp_path}/stats",
            "logger=csv",
            f"hydra.sweep.dir={sweep}",
        ],
    )
    assert code == 0
    values = [
        json.loads((sweep / str(i) / "final_metrics.json").read_text())["metrics"]["metrics/fd_digit200"]
        for i in range(4)
    ]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(min(values))
    assert set(result["best_params"]) == {"model.lr", "model.diffusion.p_uncond", "guidance.scale"}
    lrs = [yaml.safe_load((sweep / str(i) / ".hydra" / "overrides.yaml").read_text()) for i in range(4)]
    assert len({tuple(sorted(o)) for o in lrs}) == 4  # four different trials


def test_build_judge_picks_the_digit_classifier_or_clip(tmp_path):
    from types import SimpleNamespace

    from difflab.eval.grid_judge import ClipJudge, DigitJudge, build_judge
    from tests.test_metrics import _tiny_clip_dir

    def module(shape, key="label", classes=10):
        return SimpleNamespace(
            diffusion=SimpleNamespace(sample_shape=shape),
            conditioner=SimpleNamespace(batch_key=key, num_classes=classes),
        )

    assert isinstance(build_judge("auto", module((1, 16, 16))), DigitJudge)
    assert build_judge("auto", module((3, 32, 32))) is None  # RGB without a CLIP folder: no judge
    assert build_judge("none", module((1, 16, 16))) is None
    clip = _tiny_clip_dir(tmp_path)
    assert isinstance(build_judge("auto", module((3, 32, 32), classes=4), clip_model=str(clip)), ClipJudge)
    assert isinstance(build_judge("clip", module((3, 32, 32), key="text"), clip_model=str(clip)), ClipJudge)
    with pytest.raises(ValueError, match="digit_classifier needs a 1-channel image model with 10 classes"):
        build_judge("digit_classifier", module((3, 32, 32)))


@pytest.mark.slow
def test_ddp_ranks_agree_on_monitored_sample_metric(tmp_path):
    """2 gloo processes: sample metrics are sharded, the grid's agreement is broadcast from rank 0, and
    ModelCheckpoint monitors FD on both ranks (a rank missing the value would hang the checkpoint's barrier)."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    run = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *tiny_overrides(max_steps=4, save_every=2),
        "trainer=ddp_cpu",
        "callbacks=metrics",
        "callbacks.sample_metrics.every_n_steps=2",
        f"callbacks.sample_metrics.n_samples={N}",
        "callbacks.sample_metrics.n_real=64",
        "callbacks.sample_metrics.lpips_net=null",
        f"callbacks.sample_metrics.stats_dir={tmp_path}/stats",
        f"callbacks.model_checkpoint.monitor={FD}",
        "callbacks.model_checkpoint.save_top_k=1",
        f"optimized_metric={FD}",
        "logger=csv",
        f"hydra.run.dir={run}",
    ]
    subprocess.run(cmd, check=True, timeout=600, cwd=tmp_path, capture_output=True)
    fd = _csv_series(run, FD)
    assert sorted(fd) == [2, 4]
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*.ckpt"))
    assert kept == [f"step_{min(fd, key=fd.get):07d}.ckpt"]
    record = json.loads((run / "final_metrics.json").read_text())
    assert record["metrics"][FD] == pytest.approx(fd[4], rel=1e-6) and "metrics/grid_agreement" in record["metrics"]


def test_hparams_search_without_the_optuna_plugin_is_one_line(monkeypatch):
    import difflab.utils.extras as extras
    from difflab.utils.errors import ConfigError

    monkeypatch.setattr(extras, "is_installed", lambda module: module != "hydra_plugins.hydra_optuna_sweeper")
    with pytest.raises(
        ConfigError,
        match=r"^hparams_search=digits_optuna needs the optional package "
        r"hydra-optuna-sweeper: pip install hydra-optuna-sweeper \(the extra "
        r"difflab\[optuna\]\)$",
    ):
        extras.check_command_line(["hparams_search=digits_optuna", "trainer.max_steps=4"])
    extras.check_command_line(["hparams_search=null"])
