"""Sample-quality metrics: Frechet distance / KID math, the streaming metric and its real-stats cache, and the
weight loaders (Inception, I3D, LPIPS backbone, CLIP) on tiny random models saved in the users' on-disk formats."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import difflab.metrics.common
from difflab.metrics.common import to_uint8
from difflab.metrics.feature_metrics import FrechetMetric, StaleCacheError, load_or_compute_real_stats
from difflab.metrics.frechet import frechet_distance, gaussian_stats, kernel_inception_distance
from difflab.utils.errors import CheckpointError

f64 = torch.float64


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """Independent reference: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) with scipy."""
    mu1, s1, mu2, s2 = (np.asarray(t, dtype=np.float64) for t in (mu1, s1, mu2, s2))
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def random_cov(d: int, gen: torch.Generator, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(d, rank or d, generator=gen, dtype=f64)
    return a @ a.T / (rank or d) + (0 if rank else 0.05) * torch.eye(d, dtype=f64)


def mvn(n: int, mu: torch.Tensor, cov: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    chol = torch.linalg.cholesky(cov)
    return mu + torch.randn(n, mu.shape[0], generator=gen, dtype=f64) @ chol.T


def linear_feature(d_in: int, d_out: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out).double()


def record(fn, prefix: str) -> list[str]:
    """Call fn twice; return the messages of the UserWarnings starting with prefix."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fn() is None
        assert fn() is None
    return [str(w.message) for w in caught if str(w.message).startswith(prefix)]


# ------------------------------------------------------------------------------------------- Frechet math
@pytest.mark.parametrize("rank", [None, 5])  # full-rank S1 (Cholesky path) and singular S1 (eigh fallback)
def test_frechet_distance_matches_scipy(rank):
    gen = torch.Generator().manual_seed(0)
    d = 12
    s1, s2 = random_cov(d, gen, rank), random_cov(d, gen)
    mu1, mu2 = torch.randn(d, generator=gen, dtype=f64), torch.randn(d, generator=gen, dtype=f64)
    ours = float(frechet_distance(mu1, s1, mu2, s2))
    assert ours == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-8)
    # identical inputs: exact up to round-off; a singular S1 leaves sqrt(round-off) ~ 1e-8 per null direction
    assert float(frechet_distance(mu1, s1, mu1, s1)) == pytest.approx(0.0, abs=1e-9 if rank is None else 1e-6)


def test_gaussian_stats_is_mean_and_unbiased_cov():
    x = torch.randn(50, 3, dtype=f64)
    mu, cov = gaussian_stats(x)
    assert torch.allclose(mu, x.mean(0))
    assert torch.allclose(cov, torch.from_numpy(np.cov(x.numpy(), rowvar=False)))
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(x[:1])


def test_streaming_metric_matches_analytic_gaussian_fd():
    """x ~ N(mu, S) through a fixed linear layer W: features ~ N(W mu + b, W S W^T); compare with the closed form."""
    gen = torch.Generator().manual_seed(1)
    d_in, d = 6, 4
    lin = linear_feature(d_in, d)
    mu_r, cov_r = torch.zeros(d_in, dtype=f64), random_cov(d_in, gen)
    mu_f, cov_f = torch.full((d_in,), 0.6, dtype=f64), random_cov(d_in, gen)
    w, b = lin.weight.detach(), lin.bias.detach()
    analytic = scipy_frechet(w @ mu_r + b, w @ cov_r @ w.T, w @ mu_f + b, w @ cov_f @ w.T)

    metric = FrechetMetric(lin, d)
    n = 200_000
    for real, mu, cov in ((True, mu_r, cov_r), (False, mu_f, cov_f)):
        for chunk in mvn(n, mu, cov, gen).split(20_000):
            metric.update(chunk, real=real)
    est = float(metric.compute()["frechet"])
    # measured: analytic 0.3694, estimate 0.3711 (0.47% off) at n=200k; sampling error ~1/sqrt(n), bias O(d/n)
    assert est == pytest.approx(analytic, rel=0.02)
    assert analytic > 0.3


def test_identical_sets_give_zero_fd():
    torch.manual_seed(0)
    feature = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    metric = FrechetMetric(feature, 8)
    x = torch.rand(64, 3, 16, 16) * 2 - 1
    metric.update(x, real=True)
    metric.update(x, real=False)
    assert abs(float(metric.compute()["frechet"])) < 1e-8


def test_metric_rejects_wrong_feature_width():
    metric = FrechetMetric(nn.Identity(), 5)
    with pytest.raises(ValueError, match="expected 4 x 5"):
        metric.update(torch.randn(4, 3), real=True)
    with pytest.raises(ValueError, match="num_features"):
        FrechetMetric(nn.Identity())


# ------------------------------------------------------------------------------------------- KID
def test_kid_single_full_subset_equals_torchmetrics_poly_mmd():
    from torchmetrics.image.kid import poly_mmd

    gen = torch.Generator().manual_seed(2)
    f1, f2 = torch.randn(40, 7, generator=gen, dtype=f64), torch.randn(40, 7, generator=gen, dtype=f64) + 0.5
    mean, std = kernel_inception_distance(f1, f2, subsets=1, subset_size=40, generator=gen)
    assert float(mean) == pytest.approx(float(poly_mmd(f1, f2, degree=3)), rel=1e-10)
    assert float(std) == 0.0


def test_kid_near_zero_for_same_distribution_positive_for_shift():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(2000, 16, generator=gen), torch.randn(2000, 16, generator=gen)
    same, same_std = kernel_inception_distance(a, b, subsets=20, subset_size=500, generator=gen)
    shifted, shift_std = kernel_inception_distance(a, b + 0.5, subsets=20, subset_size=500, generator=gen)
    assert abs(float(same)) < 3 * float(same_std) + 1e-3
    assert float(shifted) > 10 * abs(float(same)) and float(shifted) > 5 * float(shift_std)


def test_metric_kid_uses_all_features_and_caps_subset_size():
    gen = torch.Generator().manual_seed(4)
    real, fake = torch.randn(30, 5, generator=gen), torch.randn(30, 5, generator=gen) + 1
    metric = FrechetMetric(nn.Identity(), 5, kid_subsets=1, kid_subset_size=1000)
    metric.update(real[:10], real=True)
    metric.update(real[10:], real=True)
    metric.update(fake, real=False)
    out = metric.compute()
    from torchmetrics.image.kid import poly_mmd

    assert float(out["kid_mean"]) == pytest.approx(float(poly_mmd(real.double(), fake.double())), rel=1e-6)


# ------------------------------------------------------------------------------------------- real-stats cache
KEY = {"dataset": "toy", "split": "train", "resolution": 8, "n": 64}


def _filled(kid: bool = False, feature_name: str = "lin") -> tuple[FrechetMetric, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    metric = FrechetMetric(
        linear_feature(6, 4), 4, feature_name=feature_name, kid_subsets=3 if kid else 0, kid_subset_size=16
    )
    real, fake = torch.randn(64, 6, generator=gen, dtype=f64), torch.randn(48, 6, generator=gen, dtype=f64) + 0.2
    return metric, real, fake


@pytest.mark.parametrize("kid", [False, True])
def test_real_stats_cache_round_trip(tmp_path, kid):
    metric, real, fake = _filled(kid)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = metric.compute()
    path = tmp_path / "stats" / "toy_train_8.pt"
    metric.save_real_stats(path, KEY)

    data = torch.load(path, weights_only=True)
    assert data["count"] == 64 and data["mean"].dtype == f64 and data["cov"].shape == (4, 4)
    assert data["key"] == {**KEY, "feature": "lin", "num_features": 4}
    assert ("features" in data) == kid

    fresh, _, _ = _filled(kid)
    fresh.load_real_stats(path, KEY)
    fresh.update(fake, real=False)
    got = fresh.compute()
    for k, v in expected.items():
        assert float(got[k]) == pytest.approx(float(v), rel=1e-10, abs=1e-12), k
    with pytest.raises(RuntimeError, match="loaded from"):
        fresh.update(real, real=True)
    fresh.reset()  # a reset keeps the cache: the next evaluation only streams fakes
    fresh.update(fake, real=False)
    assert float(fresh.compute()["frechet"]) == pytest.approx(float(expected["frechet"]), rel=1e-10)


def test_stale_cache_is_refused(tmp_path):
    metric, real, _ = _filled(kid=False)
    metric.update(real, real=True)
    path = tmp_path / "stats.pt"
    metric.save_real_stats(path, KEY)

    with pytest.raises(StaleCacheError, match="resolution: cached 8 vs needed 16"):
        _filled()[0].load_real_stats(path, {**KEY, "resolution": 16})
    with pytest.raises(StaleCacheError, match="feature: cached 'lin' vs needed 'other'"):
        _filled(feature_name="other")[0].load_real_stats(path, KEY)
    with pytest.raises(StaleCacheError, match="KID"):
        _filled(kid=True)[0].load_real_stats(path, KEY)
    torch.save({"mean": torch.zeros(4)}, tmp_path / "foreign.pt")
    with pytest.raises(StaleCacheError, match="not a difflab"):
        _filled()[0].load_real_stats(tmp_path / "foreign.pt", KEY)


def test_load_or_compute_real_stats(tmp_path):
    metric, real, fake = _filled()
    path = tmp_path / "cache.pt"
    assert load_or_compute_real_stats(metric, path, KEY, real.split(16)) == "computed"
    assert path.is_file()
    again, _, _ = _filled()
    assert load_or_compute_real_stats(again, path, KEY, real.split(16)) == "loaded"
    for m in (metric, again):
        m.update(fake, real=False)
    assert float(again.compute()["frechet"]) == pytest.approx(float(metric.compute()["frechet"]), rel=1e-10)


@pytest.mark.parametrize("kid", [False, True])  # KID keeps feature lists, which torchmetrics clears in place
def test_reset_real_features_false_keeps_real_side(kid):
    metric, real, fake = _filled(kid)
    metric.reset_real_features = False
    metric.update(real, real=True)
    metric.update(fake, real=False)
    before = {k: float(v) for k, v in metric.compute().items()}
    metric.reset()
    assert int(metric.real_count) == 64 and int(metric.fake_count) == 0
    metric.update(fake, real=False)
    after = {k: float(v) for k, v in metric.compute().items()}
    assert after == pytest.approx(before, rel=1e-12) and ("kid_mean" in after) == kid


def test_feature_network_not_in_state_dict():
    metric, _, _ = _filled()
    assert not any("weight" in k for k in metric.state_dict())


def test_to_uint8_round_trip_and_stylegan_rounding():
    k = torch.arange(256)
    assert torch.equal(to_uint8(k / 127.5 - 1).long(), k)
    x = torch.rand(1000) * 2.2 - 1.1
    stylegan = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    assert (to_uint8(x).long() - stylegan.long()).abs().max() <= 1  # equal up to float ties


# ------------------------------------------------------------------------------------------- Inception (FID)
def test_inception_missing_weights_warns_once(tmp_path):
    from difflab.metrics.inception import build_fid_metric, load_inception

    path = tmp_path / "absent" / "pt_inception-2015-12-05-6726825d.pth"
    msgs = record(lambda: load_inception(path), "FID skipped")
    assert len(msgs) == 1
    assert str(path) in msgs[0] and "https://" in msgs[0] and "metrics.inception_weights" in msgs[0]
    assert build_fid_metric(path) is None


def test_inception_wrong_file_raises(tmp_path):
    from difflab.metrics.inception import load_inception

    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(CheckpointError, match="not the FID Inception"):
        load_inception(bad)


def test_inception_without_torch_fidelity_warns_once(tmp_path, monkeypatch):
    from difflab.metrics.inception import load_inception

    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # makes the import raise ImportError
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"Mixed_7c.branch_pool.conv.weight": torch.zeros(1)}, path)
    difflab.metrics.common._WARNED.discard("inception-no-torch-fidelity")
    msgs = record(lambda: load_inception(path), "FID skipped")
    assert msgs == ["FID skipped: torch-fidelity is not installed; pip install torch-fidelity"]


def test_inception_loads_local_state_dict(tmp_path):
    """pytorch-fid's pt_inception file is torchvision's Inception3(num_classes=1008, aux_logits=False) state dict."""
    pytest.importorskip("torch_fidelity")
    from torchvision.models import inception_v3

    from difflab.metrics.inception import build_fid_metric

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    metric = build_fid_metric(path)
    assert metric is not None and metric.num_features == 2048
    loaded = metric._feature.module.extractor.state_dict()
    assert torch.equal(loaded["Mixed_7c.branch_pool.conv.weight"], net.state_dict()["Mixed_7c.branch_pool.conv.weight"])
    imgs = torch.rand(2, 1, 16, 16) * 2 - 1  # grayscale, tiny: resized to 299 inside
    feats = metric.extract(imgs)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()


# ------------------------------------------------------------------------------------------- I3D (FVD)
class FakeI3D(nn.Module):
    """Stand-in with the StyleGAN-V TorchScript call signature; refuses anything but the StyleGAN-V convention."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 400)

    def forward(self, x: torch.Tensor, rescale: bool, resize: bool, return_features: bool) -> torch.Tensor:
        assert x.dtype == torch.uint8 and rescale and resize and return_features
        v = x.float() / 127.5 - 1
        stats = torch.cat([v.mean(dim=(2, 3, 4)), v.std(dim=(2, 3, 4))], dim=1)
        return self.proj(stats)


def test_fvd_metric_name():
    from difflab.metrics.fvd import fvd_metric_name

    assert fvd_metric_name(2048, 16) == "fvd2048_16f"
    assert fvd_metric_name(642, 32) == "fvd642_32f"
    with pytest.raises(ValueError):
        fvd_metric_name(0, 16)


def test_fvd_missing_weights_warns_once(tmp_path):
    from difflab.metrics.fvd import build_fvd_metric

    path = tmp_path / "i3d_torchscript.pt"
    msgs = record(lambda: build_fvd_metric(path), "FVD skipped")
    assert len(msgs) == 1 and str(path) in msgs[0] and "dropbox" in msgs[0]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_fvd_with_torchscript_detector(tmp_path):
    from difflab.metrics.fvd import build_fvd_metric

    torch.manual_seed(0)
    fake_i3d = FakeI3D()
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(fake_i3d), str(path))
    metric = build_fvd_metric(path)
    assert metric is not None and metric.num_features == 400

    videos = torch.rand(20, 3, 4, 8, 8) * 2 - 1  # B x C x T x H x W in [-1, 1]
    feats = metric.extract(videos)
    assert torch.allclose(feats, fake_i3d(to_uint8(videos), True, True, True), atol=1e-5)
    metric.update(videos, real=True)
    metric.update(videos, real=False)
    assert abs(float(metric.compute()["frechet"])) < 1e-5
    metric.reset()
    metric.update(videos, real=True)
    metric.update(videos.mul(0.5), real=False)
    assert float(metric.compute()["frechet"]) > 1e-2


# ------------------------------------------------------------------------------------------- LPIPS
def test_lpips_random_backbone_zero_for_identical():
    from difflab.metrics.lpips_metric import build_lpips, lpips_distance, lpips_diversity

    torch.manual_seed(0)
    model = build_lpips("alex", pnet_rand=True)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    y = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.equal(lpips_distance(model, x, x), torch.zeros(3))
    d = lpips_distance(model, x, y)
    assert d.shape == (3,) and (d > 0).all()
    videos = torch.stack([x, y], dim=2)  # B x C x T x H x W, frames (x, y)
    assert torch.allclose(lpips_distance(model, videos, videos.flip(2)), d, atol=1e-6)
    # diversity = mean over the 3 pairs
    pair = [lpips_distance(model, x[i : i + 1], x[j : j + 1]) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert float(lpips_diversity(model, x)) == pytest.approx(float(torch.cat(pair).mean()), rel=1e-5)
    assert float(lpips_diversity(model, x[:1].expand(4, -1, -1, -1))) == 0.0


def test_lpips_local_backbone_and_missing(tmp_path):
    from torchvision.models import alexnet

    from difflab.metrics.lpips_metric import build_lpips

    torch.manual_seed(1)
    state = alexnet(weights=None).state_dict()
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(state, path)
    model = build_lpips("alex", backbone_weights=path)
    assert torch.equal(model.net.slice5.state_dict()["10.weight"], state["features.10.weight"])
    assert torch.equal(model.net.slice1.state_dict()["0.bias"], state["features.0.bias"])

    missing = tmp_path / "nope" / "alexnet-owt-7be5be79.pth"
    msgs = record(lambda: build_lpips("alex", backbone_weights=missing), "LPIPS skipped")
    assert len(msgs) == 1 and str(missing) in msgs[0] and "download.pytorch.org" in msgs[0]

    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="not a torchvision alex"):
        build_lpips("alex", backbone_weights=tmp_path / "bad.pth")


# ------------------------------------------------------------------------------------------- CLIP score
def _tiny_clip_dir(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    eos = vocab["<|endoftext|>"]
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=vocab["<|startoftext|>"],
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    proc = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tok)
    out = tmp_path / "tiny-clip"
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def test_clip_score_tiny_local_model(tmp_path):
    from difflab.metrics.clip_score import ClipScoreMetric, load_clip_scorer

    scorer = load_clip_scorer(_tiny_clip_dir(tmp_path))
    assert scorer is not None
    images = torch.rand(3, 3, 40, 36) * 2 - 1
    texts = ["a red square", "two cats", "a very long caption " * 10]  # last one is truncated to 16 tokens
    s = scorer.scores(images, texts)
    assert s.shape == (3,) and (s.abs() <= 100).all()

    # reference: the projection heads called separately, cosine x 100
    model, proc = scorer.model.module, scorer.processor
    inputs = proc(
        text=texts, images=list(to_uint8(images)), return_tensors="pt", padding=True, truncation=True, max_length=16
    )
    with torch.no_grad():
        vis = model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output
        txt = model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
        ref = 100 * torch.cosine_similarity(model.visual_projection(vis), model.text_projection(txt), dim=-1)
    assert torch.allclose(s, ref, atol=1e-4)

    metric = ClipScoreMetric(scorer)
    metric.update(images[:2], texts[:2])
    metric.update(images[2:], texts[2:])
    assert float(metric.compute()) == pytest.approx(max(float(ref.mean()), 0.0), abs=1e-4)
    videos = torch.stack([images, images], dim=2)
    assert torch.allclose(scorer.scores(videos, texts), s, atol=1e-4)


def test_clip_score_missing_model_warns_once(tmp_path):
    from difflab.metrics.clip_score import load_clip_scorer

    path = tmp_path / "no-clip-here"
    msgs = record(lambda: load_clip_scorer(str(path)), "CLIP score skipped")
    assert len(msgs) == 1 and str(path) in msgs[0]
