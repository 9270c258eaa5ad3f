"""Diagnostics and metrics callbacks: a training run with `callbacks=diagnostics` writes every figure and scalar,
report.py redraws them from the checkpoint, and the pieces (DDIM reconstruction, spikes, norms, sample metrics with
the digit classifier, FVD / CLIP score paths, missing weights) are checked against closed forms."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import TINY, compose_train, run_hydra_main

torch.set_num_threads(1)

KINDS_DENSE = ["reconstruction", "denoise_collage", "guidance_grid", "embedding_tsne"]
N_SAMPLES = 32


def squeeze_backbone(folder: Path) -> Path:
    """A random torchvision SqueezeNet 1.1 state dict under its real file name (LPIPS backbone, 5 MB)."""
    from torchvision.models import squeezenet1_1

    path = folder / "squeezenet1_1-b8a52dc0.pth"
    if not path.is_file():
        torch.manual_seed(0)
        torch.save(squeezenet1_1(weights=None).state_dict(), path)
    return path


def run_overrides(tmp: Path, backbone: Path) -> list[str]:
    lp = [f"lpips_backbone={backbone}", "lpips_net=squeeze"]
    return [
        "callbacks=diagnostics",
        "debug=fast",
        *TINY,
        "logger=default",
        "trainer.val_check_interval=2",
        "trainer.max_steps=4",
        f"paths.data_dir={tmp / 'data'}",
        "conditioning.embed_dim=16",
        "callbacks.reconstruction.n_images=4",
        "callbacks.reconstruction.steps=4",
        *[f"callbacks.reconstruction.{x}" for x in lp],
        "callbacks.guidance_grid.dense_early=true",
        "callbacks.guidance_grid.scales=[1,3]",
        "callbacks.guidance_grid.sampler.steps=2",
        "callbacks.denoise_collage.max_rows=4",
        "callbacks.denoise_collage.dense_early=true",
        "callbacks.denoise_collage.sampler.steps=4",
        "callbacks.sample_metrics.sampler.steps=2",
        "callbacks.sample_metrics.every_n_steps=4",
        f"callbacks.sample_metrics.n_samples={N_SAMPLES}",
        "callbacks.sample_metrics.n_real=128",
        "callbacks.sample_metrics.kid_subset_size=16",
        "callbacks.sample_metrics.lpips_pairs=8",
        *[f"callbacks.sample_metrics.{x}" for x in lp],
    ]


@pytest.fixture(scope="module")
def diag_run(tmp_path_factory) -> Path:
    """A 4-step tiny digits run through the real config path with every diagnostic on."""
    from difflab.pipeline import train

    out = tmp_path_factory.mktemp("diag_run")
    cfg = compose_train(out, run_overrides(out, squeeze_backbone(out)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    (out / "warnings.txt").write_text("\n".join(str(w.message) for w in caught))
    return out


def csv_columns(run: Path) -> set[str]:
    with open(run / "csv" / "metrics.csv") as f:
        return set(next(csv.reader(f)))


def csv_values(run: Path, key: str) -> list[float]:
    with open(run / "csv" / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key) not in (None, "")]


def assert_real_picture(path: Path) -> None:
    from PIL import Image

    img = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert img.shape[0] > 100 and img.shape[1] > 150 and img.std() > 10, f"{path} looks empty"


# ------------------------------------------------------------------------------------------- the training run
def test_run_writes_every_figure_grouped_by_step(diag_run):
    figs = diag_run / "figures"
    for kind in KINDS_DENSE:  # dense early: steps 1, 2, 4
        assert sorted(p.name for p in (figs / kind).glob("*.png")) == [
            "step_0000001.png",
            "step_0000002.png",
            "step_0000004.png",
        ], kind
    assert sorted(p.name for p in (figs / "timestep_loss").glob("*.png")) == ["step_0000002.png", "step_0000004.png"]
    for kind in [*KINDS_DENSE, "timestep_loss"]:
        assert_real_picture(figs / kind / "step_0000004.png")
    with open(diag_run / "csv" / "figures.csv") as f:  # the CSV logger's image index
        index = {(int(r["step"]), r["key"]) for r in csv.DictReader(f)}
    for kind in KINDS_DENSE:
        assert {(1, f"diagnostics/{kind}"), (4, f"diagnostics/{kind}")} <= index
    assert (4, "diagnostics/timestep_loss") in index


def test_run_sends_figures_to_tensorboard(diag_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(diag_run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = set(acc.Tags()["images"])
    assert {f"diagnostics/{k}" for k in [*KINDS_DENSE, "timestep_loss"]} <= tags
    assert [e.step for e in acc.Images("diagnostics/reconstruction")] == [1, 2, 4]


def test_run_logs_every_scalar(diag_run):
    cols = csv_columns(diag_run)
    expected = {
        *(f"recon/mse_t{f:.2f}" for f in (0.7, 0.5, 0.3, 0.2)),
        *(f"recon/lpips_t{f:.2f}" for f in (0.7, 0.2)),
        "guidance/sample_std_s1",
        "guidance/sample_std_s3",
        "embeddings/mean_cosine",
        "val_loss_t/bucket_00",
        "val_loss_t/worst_bucket",
        "val_loss_t/low_t_ratio",
        "health/grad_norm",
        "health/param_norm",
        "health/ema_distance",
        "train/lr",
        "health/loss_spikes",
        "health/loss_median",
        f"metrics/fd_digit{N_SAMPLES}",
        f"metrics/kd_digit{N_SAMPLES}",
        "metrics/digit_accuracy",
        "metrics/lpips_diversity",
    }
    assert expected <= cols, sorted(expected - cols)
    assert all(v > 0 for v in csv_values(diag_run, "health/grad_norm"))
    assert all(v > 0 for v in csv_values(diag_run, "train/lr"))
    assert not {c for c in cols if c.startswith("lr-") or c == "health/lr"}  # the learning rate is logged once
    assert all(0 <= v < 1 for v in csv_values(diag_run, "health/ema_distance"))
    assert 0 <= csv_values(diag_run, "metrics/digit_accuracy")[0] <= 1
    assert csv_values(diag_run, f"metrics/fd_digit{N_SAMPLES}")[0] > 0
    assert all(v in {float(b) for b in range(10)} for v in csv_values(diag_run, "val_loss_t/worst_bucket"))
    cached = list((diag_run / "data" / "stats").glob("DigitsDataModule-*-train-1x8x8-digit-classifier-128-n128.pt"))
    assert len(cached) == 1  # real statistics cached per dataset / resolution / feature network


def test_run_checkpoint_keeps_timestep_loss_history(diag_run):
    ck = torch.load(diag_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = next(v for k, v in ck["callbacks"].items() if k.startswith("TimestepLossCallback"))
    assert [s for s, _ in state["history"]] == [2] and len(state["history"][0][1]) == 10


# ------------------------------------------------------------------------------------------- report.py
def test_report_command_redraws_every_figure_from_the_checkpoint(diag_run, tmp_path):
    import report

    out = tmp_path / "report"
    backbone = squeeze_backbone(diag_run)
    args = [
        f"ckpt_path={diag_run / 'checkpoints' / 'last.ckpt'}",
        f"out_dir={out}",
        f"hydra.run.dir={tmp_path / 'h'}",
        "device=cpu",
        f"paths.data_dir={diag_run / 'data'}",
        "callbacks.sample_metrics.n_samples=16",
        "callbacks.sample_metrics.n_real=128",
        "callbacks.sample_metrics.kid_subset_size=8",
        "callbacks.sample_metrics.lpips_net=squeeze",
        f"callbacks.sample_metrics.lpips_backbone={backbone}",
        "callbacks.guidance_grid.scales=[1,3]",
        "callbacks.class_grid.n_cols=2",
        "val_batches=1",
    ]
    assert run_hydra_main(report.main, args) == 0
    summary = json.loads((out / "report.json").read_text())
    assert summary["failed"] == {} and summary["step"] == 4
    for name in [*KINDS_DENSE, "timestep_loss", "class_grid"]:
        assert Path(summary["figures"][name]) == out / f"{name}.png"
        assert_real_picture(out / f"{name}.png")
    assert {
        "metrics/fd_digit16",
        "metrics/digit_accuracy",
        "metrics/lpips_diversity",
        "recon/mse_t0.70",
        "embeddings/mean_cosine",
    } <= set(summary["scalars"])
    assert "![reconstruction](reconstruction.png)" in (out / "report.md").read_text()


def test_report_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    import report

    code = run_hydra_main(
        report.main,
        [f"ckpt_path={tmp_path / 'nope.ckpt'}", f"out_dir={tmp_path / 'o'}", f"hydra.run.dir={tmp_path / 'h'}"],
    )
    assert code == 2 and "checkpoint not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- reconstruction
class OracleModule:
    """A module-like stand-in whose network knows the clean data: it outputs the exact target for it, so DDIM from
    any x_t must give back x0 exactly, on any process. Its ``diffusion`` is the real object."""

    def __init__(self, x0: torch.Tensor, prediction: str = "v", process=None):
        import functools

        from difflab.diffusion.objectives import Objective
        from difflab.diffusion.processes import VPProcess
        from difflab.diffusion.samplers import ddim
        from difflab.diffusion.system import Diffusion

        self.x0 = x0
        self.diffusion = Diffusion(
            process or VPProcess("cosine", 1000),
            Objective(prediction=prediction, x0_clip="none"),
            functools.partial(ddim, steps=2),
            sample_shape=tuple(x0.shape[1:]),
        )

    def __call__(self, x_in, t_net, vector=None, context=None, context_mask=None):
        from difflab.diffusion.objectives import input_scale, training_target

        process, prediction = self.diffusion.process, self.diffusion.objective.prediction
        t = process.time_from_net_time(t_net[:1].double())
        a, s = process.coefficients(t)
        da, ds = process.derivatives(t) if prediction == "flow" else (None, None)
        x_t = x_in.double() / input_scale(a, s, prediction)
        x0 = self.x0.repeat(x_t.shape[0] // self.x0.shape[0], 1, 1, 1).double()
        return training_target(x0, (x_t - a * x0) / s, a, s, prediction, da, ds).float()


@pytest.mark.parametrize("process_name, prediction", [("vp", "v"), ("vp", "eps"), ("edm", "edm"), ("flow", "flow")])
def test_ddim_reconstruction_of_an_oracle_denoiser_is_exact_on_every_process(process_name, prediction):
    from difflab.diagnostics.reconstruction import reconstruct
    from difflab.diffusion.processes import EDMProcess, FlowProcess

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    process = {"vp": None, "edm": EDMProcess(), "flow": FlowProcess()}[process_name]
    module = OracleModule(x0, prediction, process)
    x_t, rec, starts = reconstruct(module, x0, None, [0.7, 0.3, 0.005], noise=noise, steps=8)
    assert rec.shape == (9, 1, 8, 8)
    assert torch.allclose(rec, x0.repeat(3, 1, 1, 1), atol=1e-4)
    a, s = (float(v) for v in module.diffusion.process.coefficients(torch.tensor(starts[0], dtype=torch.float64)))
    assert torch.allclose(x_t[:3], a * x0 + s * noise, atol=1e-5)  # the first rows are noised to exactly starts[0]
    assert starts[0] == module.diffusion.process.time_at_fraction(0.7)


def test_reconstruction_start_levels():
    from difflab.diagnostics.reconstruction import check_fraction
    from difflab.diffusion.processes import EDMProcess, FlowProcess, VPProcess

    vp = VPProcess("cosine", 1000)
    assert vp.time_at_fraction(0.7) == 700 and vp.time_at_fraction(1.0) == 999
    assert FlowProcess().time_at_fraction(0.7) == pytest.approx(0.7)
    assert FlowProcess(shift=3.0).time_at_fraction(0.5) == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)
    assert EDMProcess().time_at_fraction(0.0) == pytest.approx(0.002) and EDMProcess().time_at_fraction(
        1
    ) == pytest.approx(80)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_fraction(1.5)


# ------------------------------------------------------------------------------------------- health
def test_spike_detector_flags_only_outliers_after_history():
    from difflab.callbacks.training_health import SpikeDetector

    det = SpikeDetector(factor=3.0, window=10, min_history=5)
    assert not det.add(100.0)  # no history yet: never a spike
    for v in [1.0, 1.2, 0.9, 1.1, 1.0]:
        assert not det.add(v)
    assert det.median() == pytest.approx(1.05)  # window [100, 1, 1.2, 0.9, 1.1, 1]
    assert not det.add(3.0)  # 3.0 < 3 x 1.05
    assert det.add(3.5) and det.count == 1  # 3.5 > 3 x median(..., 3.0) = 3.3


def test_norms_and_ema_distance_closed_form():
    from difflab.callbacks.training_health import ema_distance, global_norm

    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        for p in a.parameters():
            p.fill_(1.0)  # 8 parameters of value 1: norm sqrt(8)
        for p in b.parameters():
            p.fill_(1.5)
    assert global_norm(list(a.parameters())) == pytest.approx(8**0.5)
    assert ema_distance(b, a) == pytest.approx(0.5)  # ||1.5 - 1|| / ||1|| elementwise


# ------------------------------------------------------------------------------------------- t-SNE, names
def test_tsne_and_mean_cosine():
    from difflab.diagnostics.embedding_tsne import mean_cosine, tsne_2d

    v = np.eye(6)[:, :4] + 0.0
    assert mean_cosine(np.ones((3, 5))) == pytest.approx(1.0)
    assert mean_cosine(np.eye(4)) == pytest.approx(0.0)
    assert tsne_2d(np.random.default_rng(0).normal(size=(11, 16))).shape == (11, 2)
    assert tsne_2d(v[:3]).shape == (3, 2)


def test_metric_names_carry_sample_and_frame_counts():
    from difflab.metrics.sample_metrics import metric_names, resolve_feature_kind

    assert metric_names("i3d", 256, (3, 16, 64, 64)) == ("fvd256_16f", "kvd256_16f")
    assert metric_names("inception", 1000, (3, 32, 32)) == ("fid1000", "kid1000")
    assert metric_names("digit_classifier", 64, (1, 16, 16)) == ("fd_digit64", "kd_digit64")
    assert resolve_feature_kind("auto", (3, 8, 16, 16)) == "i3d"
    assert resolve_feature_kind("auto", (1, 16, 16)) == "digit_classifier"
    assert resolve_feature_kind("auto", (3, 32, 32)) == "inception"
    with pytest.raises(ValueError, match="choose one of"):
        resolve_feature_kind("clip", (3, 32, 32))


# ------------------------------------------------------------------------------------------- sample metrics
class ReplayDiffusion:
    """Diffusion-like stand-in that 'samples' given data (an image of the requested class, picked by the sample's
    noise, which depends only on its global index) or the noise itself, so metric outcomes are known in advance."""

    def __init__(self, pool: torch.Tensor, labels: torch.Tensor | None, prompts=None, noise: bool = False):
        from difflab.diffusion.guidance import CFG

        self.pool, self.labels, self.noise = pool, labels, noise
        self.sample_shape = tuple(pool.shape[1:])
        self.autoencoder, self.prompts, self.guidance = None, prompts, CFG()
        self.requests: list = []

    def default_conditions(self, n, device=None):
        if self.prompts:
            return [self.prompts[i % len(self.prompts)] for i in range(n)]
        return torch.arange(n) % 10 if self.labels is not None else None

    def guidance_for(self, overrides):
        return self.guidance.updated(overrides)

    def sample(self, net, n, raw=None, sampler=None, guidance=None, guidance_scale=None, noise=None, generator=None):
        self.requests.append(raw)
        if self.noise:
            return noise.clamp(-1, 1)
        if torch.is_tensor(raw):  # an image of the requested digit, chosen by the sample's noise (i.e. its index)
            picks = []
            for c, z in zip(raw.tolist(), noise):
                of_class = torch.nonzero(self.labels == c).flatten()
                picks.append(int(of_class[int(z.abs().sum() * 1000) % len(of_class)]))
            return self.pool[picks]
        return self.pool[:n]

    def to_pixels(self, x):
        return x


class ReplayModule:
    """Module-like stand-in around a ``ReplayDiffusion``."""

    def __init__(self, pool: torch.Tensor, labels: torch.Tensor | None, prompts=None, noise: bool = False):
        self.diffusion = ReplayDiffusion(pool, labels, prompts, noise)
        self.device = torch.device("cpu")
        self.run_config = None
        key = "text" if prompts else ("label" if labels is not None else None)
        self.conditioner = SimpleNamespace(batch_key=key, num_classes=10)

    @property
    def requests(self) -> list:
        return self.diffusion.requests


def _digits_datamodule():
    from difflab.datamodules.digits import DigitsDataModule

    dm = DigitsDataModule(image_size=16, batch_size=64)
    dm.setup("fit")
    return dm


def test_digit_fd_via_sample_metrics_on_a_few_samples(tmp_path):
    from difflab.metrics.sample_metrics import SampleMetrics

    dm = _digits_datamodule()
    x, y = dm.train_set.x, dm.train_set.labels
    kw = dict(
        n_samples=40,
        n_real=300,
        batch_size=16,
        stats_dir=str(tmp_path / "stats"),
        lpips_net=None,
        kid_subsets=5,
        kid_subset_size=20,
    )
    real_like = SampleMetrics(**kw)
    real_like.prepare(ReplayModule(x, y), dm, tmp_path)
    good = real_like.evaluate(ReplayModule(x, y))
    assert "computed" in real_like.real_source
    noise = SampleMetrics(**kw)
    noise.prepare(ReplayModule(x, y, noise=True), dm, tmp_path)
    assert noise.real_source.startswith("loaded")  # the cache written by the first one
    bad = noise.evaluate(ReplayModule(x, y, noise=True))
    assert good["metrics/digit_accuracy"] > 0.9 and bad["metrics/digit_accuracy"] < 0.4
    assert 0 < good["metrics/fd_digit40"] < 0.2 * bad["metrics/fd_digit40"]
    assert good["metrics/kd_digit40"] < bad["metrics/kd_digit40"]


def test_second_opinions_match_their_formulas_on_replayed_digits(tmp_path):
    """Judge 2's FD and accuracy, pixel FD and k-NN precision / recall in both judges, each against its formula on
    the very samples generated and the reference items, and the floors against the unseen real items."""
    from difflab.metrics.digit_features import DigitFeatures, DigitJudge2Features
    from difflab.metrics.frechet import frechet_distance, gaussian_stats
    from difflab.metrics.precision_recall import precision_recall
    from difflab.metrics.sample_metrics import SampleMetrics

    dm = _digits_datamodule()
    x, y = dm.train_set.x, dm.train_set.labels
    kw = dict(n_samples=60, n_real=300, batch_size=16, lpips_net=None, kid_subsets=0, stats_dir=str(tmp_path))
    results, generated = {}, {}
    for kind in ("replay", "noise"):
        module = ReplayModule(x, y, noise=kind == "noise")
        drawn, sample = [], module.diffusion.sample
        module.diffusion.sample = lambda *a, _s=sample, _d=drawn, **k: _d.append(out := _s(*a, **k)) or out
        metrics = SampleMetrics(**kw)
        metrics.prepare(module, dm, tmp_path)
        results[kind], generated[kind] = metrics.evaluate(module), torch.cat(drawn)
    dataset = dm.train_dataloader().dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    ref, unseen = (torch.stack([dataset[i]["x"] for i in idx.tolist()]) for idx in (order[:300], order[300:360]))

    def fd(a, b):
        return float(frechet_distance(*gaussian_stats(a.double()), *gaussian_stats(b.double())))

    got, gen, labels = results["replay"], generated["replay"], torch.arange(60) % 10
    with torch.no_grad():
        judges = {"digit": DigitFeatures(), "lenet": DigitJudge2Features()}
        feats = {k: (j(ref), j(gen), j(unseen)) for k, j in judges.items()}
        for slug, (r, g, u) in feats.items():
            for kind, want, floor in zip(("precision", "recall"), precision_recall(r, g), precision_recall(r, u)):
                assert got[f"metrics/{kind}_{slug}60"] == pytest.approx(want)
                assert got[f"metrics/{kind}_{slug}60_floor"] == pytest.approx(floor)
        r, g, u = feats["lenet"]
        assert got["metrics/fd_lenet60"] == pytest.approx(fd(g, r), rel=1e-6)
        assert got["metrics/fd_lenet60_floor"] == pytest.approx(fd(u, r), rel=1e-6)
        want_acc = (judges["lenet"].predict(g) == labels).double().mean().item()
        assert got["metrics/lenet_accuracy"] == pytest.approx(want_acc)
    assert got["metrics/fd_pixel60"] == pytest.approx(fd(gen.flatten(1), ref.flatten(1)), rel=1e-6)
    assert got["metrics/fd_pixel60_floor"] == pytest.approx(fd(unseen.flatten(1), ref.flatten(1)), rel=1e-6)
    bad = results["noise"]
    assert got["metrics/lenet_accuracy"] > 0.9 and bad["metrics/lenet_accuracy"] < 0.4
    for name in ("fd_lenet60", "fd_pixel60"):
        assert got[f"metrics/{name}"] < 0.5 * bad[f"metrics/{name}"]
    # noise lies off the real manifold in the classifier's features; in judge 2's saturating (tanh) features it
    # collapses into a few real balls, which k-NN precision cannot see and recall does
    assert got["metrics/precision_digit60"] > 0.8 and bad["metrics/precision_digit60"] < 0.2
    assert got["metrics/recall_lenet60"] > 0.8 and bad["metrics/recall_lenet60"] < 0.2
    protocol = metrics.protocol
    assert protocol["metrics/fd_pixel60"]["feature"] == "pixels-1x16x16"
    assert protocol["metrics/recall_lenet60"]["floor"] == pytest.approx(got["metrics/recall_lenet60_floor"])


def test_second_opinions_off_and_an_old_floor_cache_recomputed(tmp_path):
    """second_opinions=false keeps today's digit metrics only; a floor cache without the second opinions' floors
    (written before they existed) is recomputed, not trusted."""
    import json

    from difflab.metrics.sample_metrics import SampleMetrics

    dm = _digits_datamodule()
    module = ReplayModule(dm.train_set.x, dm.train_set.labels)
    kw = dict(n_samples=20, n_real=100, batch_size=16, lpips_net=None, kid_subsets=0, stats_dir=str(tmp_path))
    off = SampleMetrics(second_opinions=False, **kw)
    off.prepare(module, dm, tmp_path)
    assert set(off.evaluate(module)) == {"metrics/fd_digit20", "metrics/fd_digit20_floor", "metrics/digit_accuracy"}
    (floor_cache,) = tmp_path.glob("*-floor-n20.json")
    assert set(json.loads(floor_cache.read_text())["floor"]) == {"frechet"}
    on = SampleMetrics(**kw)
    on.prepare(module, dm, tmp_path)
    assert {"fd_lenet", "fd_pixel", "recall_digit", "precision_lenet"} <= set(on.floor)
    assert set(json.loads(floor_cache.read_text())["floor"]) == set(on.floor)


def test_precision_recall_skipped_with_a_warning_below_four_samples(tmp_path):
    """k-NN radii need k + 1 = 4 points per set: three samples keep the FDs and skip precision / recall, with a warning."""
    from difflab.metrics import common
    from difflab.metrics.sample_metrics import SampleMetrics

    common._WARNED.clear()
    dm = _digits_datamodule()
    module = ReplayModule(dm.train_set.x, dm.train_set.labels)
    metrics = SampleMetrics(n_samples=3, n_real=100, lpips_net=None, kid_subsets=0, stats_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="precision / recall skipped"):
        metrics.prepare(module, dm, tmp_path)
    out = metrics.evaluate(module)
    assert "metrics/fd_lenet3" in out and "metrics/fd_pixel3" in out
    assert not [k for k in out if "precision" in k or "recall" in k]


def test_missing_weights_skip_the_metric_with_one_warning(tmp_path):
    from difflab.metrics import common
    from difflab.metrics.sample_metrics import SampleMetrics

    common._WARNED.clear()
    dm = _digits_datamodule()
    x, y = dm.train_set.x, dm.train_set.labels
    module = ReplayModule(x, y)
    metrics = SampleMetrics(
        n_samples=8,
        feature="inception",
        inception_weights=str(tmp_path / "inception.pth"),
        lpips_net="alex",
        lpips_backbone=str(tmp_path / "alexnet.pth"),
    )
    with pytest.warns(UserWarning) as rec:
        metrics.prepare(module, dm, tmp_path)
        first = metrics.evaluate(module)
        second = metrics.evaluate(module)
    messages = [str(w.message) for w in rec]
    assert first == second == {}
    assert sum("FID skipped" in m and "inception.pth" in m for m in messages) == 1
    assert sum("LPIPS skipped" in m for m in messages) == 1


class FakeI3D(nn.Module):
    """The StyleGAN-V I3D TorchScript call signature on top of simple per-channel statistics."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 400)

    def forward(self, x: torch.Tensor, rescale: bool, resize: bool, return_features: bool) -> torch.Tensor:
        v = x.float() / 127.5 - 1
        return self.proj(torch.cat([v.mean(dim=(2, 3, 4)), v.std(dim=(2, 3, 4))], dim=1))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_fvd_for_video_samples_with_a_local_i3d_file(tmp_path):
    from torch.utils.data import DataLoader

    from difflab.datamodules.digits import TensorDictDataset
    from difflab.metrics.sample_metrics import SampleMetrics

    torch.manual_seed(0)
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(FakeI3D()), str(path))
    videos = torch.rand(60, 1, 4, 8, 8) * 2 - 1
    dm = SimpleNamespace(train_dataloader=lambda: DataLoader(TensorDictDataset(videos), batch_size=16))
    metrics = SampleMetrics(
        n_samples=24, n_real=60, i3d_weights=str(path), lpips_net=None, kid_subsets=0, stats_dir=str(tmp_path)
    )
    module = ReplayModule(videos, None)
    metrics.prepare(module, dm, tmp_path)
    out = metrics.evaluate(module)
    assert set(out) == {"metrics/fvd24_4f", "metrics/fvd24_4f_floor"} and out["metrics/fvd24_4f"] >= 0
    # all 60 real clips are the reference set: the floor's 24 real clips cannot avoid it, and the protocol says so
    entry = metrics.protocol["metrics/fvd24_4f"]
    assert entry["floor_real_items_overlap_reference"] is True and entry["floor"] == out["metrics/fvd24_4f_floor"]


def _tiny_clip(folder: Path) -> Path:
    """A random tiny CLIP (text + vision) with a byte-level tokenizer, saved like a Hub checkpoint."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    eos = vocab["<|endoftext|>"]
    text = dict(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=vocab["<|startoftext|>"],
    )
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    proc = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}), tok)
    out = folder / "clip"
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def test_clip_score_for_text_models(tmp_path):
    from difflab.metrics.clip_score import load_clip_scorer
    from difflab.metrics.sample_metrics import SampleMetrics

    clip_dir = _tiny_clip(tmp_path)
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    prompts = ["a red square", "a cat"]
    module = ReplayModule(images, None, prompts=prompts)
    metrics = SampleMetrics(n_samples=6, batch_size=4, feature="none", lpips_net=None, clip_model=str(clip_dir))
    metrics.prepare(module, None, tmp_path)
    out = metrics.evaluate(module)
    texts = [prompts[i % 2] for i in range(6)]
    want = load_clip_scorer(clip_dir).scores(images, texts).mean().clamp(min=0)
    assert out["metrics/clip_score"] == pytest.approx(float(want), rel=1e-4)
    assert module.requests[0] == texts[0:4] and module.requests[1] == texts[4:6]


def test_sample_noise_depends_only_on_the_global_index():
    from difflab.metrics.sample_metrics import SampleMetrics

    m = SampleMetrics(n_samples=10, seed=3)
    whole = m._noise(list(range(10)), (1, 4, 4))
    assert torch.equal(m._noise([1, 3, 5, 7, 9], (1, 4, 4)), whole[1::2])  # rank 1 of 2 gets samples 1, 3, ...


# ------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    from difflab.metrics.sample_metrics import SampleMetrics

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dm = _digits_datamodule()
        module = ReplayModule(dm.train_set.x, dm.train_set.labels)
        metrics = SampleMetrics(
            n_samples=30,
            n_real=200,
            batch_size=8,
            stats_dir=os.path.join(out_dir, "ddp_stats"),
            lpips_net=None,
            kid_subsets=0,
        )
        metrics.prepare(module, dm, out_dir)
        out = metrics.evaluate(module)
        out["requested"] = sum(len(r) for r in module.requests)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about 20 s of CPU
def test_sharded_sample_metrics_under_ddp_equal_single_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from difflab.metrics.sample_metrics import SampleMetrics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    dm = _digits_datamodule()
    module = ReplayModule(dm.train_set.x, dm.train_set.labels)
    single = SampleMetrics(
        n_samples=30, n_real=200, batch_size=8, stats_dir=str(tmp_path / "single_stats"), lpips_net=None, kid_subsets=0
    )
    single.prepare(module, dm, tmp_path)
    want = single.evaluate(module)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r.pop("requested") for r in ranks] == [15, 15]  # each rank sampled half
    for got in ranks:
        assert got["metrics/fd_digit30"] == pytest.approx(want["metrics/fd_digit30"], rel=1e-6)
        assert got["metrics/digit_accuracy"] == pytest.approx(want["metrics/digit_accuracy"])
        second = [k for k in want if "lenet" in k or "pixel" in k or "precision" in k or "recall" in k]
        assert len(second) == 13  # 2 FDs, 4 precision / recall, their 6 floors and judge 2's accuracy
        for key in second:
            assert got[key] == pytest.approx(want[key], rel=1e-6), key  # gathered across ranks in item order
    cached = torch.load(next((tmp_path / "ddp_stats").glob("*.pt")), weights_only=True)
    assert cached["count"] == 200  # both ranks' real shards went into the one cache
