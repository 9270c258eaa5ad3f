"""FD_DINOv2 features (difflab.metrics.dinov2) on tiny, randomly initialised DINOv2 models saved with save_pretrained.

The reference preprocessing here is written independently of the module from the facts in its docstring
(dgm-eval: PIL bicubic resize to 224x224, no crop, /255, ImageNet mean/std; hub models: CLS after final norm,
positional embeddings resized with scale_factor (grid + 0.1) / M); one test also checks it against PIL itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflab.metrics.dinov2 import DinoV2Features, build_dinov2_metric, dinov2_feature_name
from difflab.metrics.feature_metrics import FrechetMetric
from difflab.utils.errors import CorruptDataError, DataNotFoundError

transformers = pytest.importorskip("transformers")
from transformers import Dinov2Config, Dinov2Model  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _tiny_config(image_size: int) -> Dinov2Config:
    # Dinov2Config sizes its MLP with mlp_ratio (it has no intermediate_size field): 2 * 32 = 64.
    return Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=image_size
    )


def _save_tiny(path, image_size: int, seed: int):
    torch.manual_seed(seed)
    model = Dinov2Model(_tiny_config(image_size))
    with torch.no_grad():  # make the positional embeddings matter (HF initialises them small)
        model.embeddings.position_embeddings.normal_(0, 1.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny224(tmp_path_factory):
    """Native 16x16 position grid: no positional-embedding interpolation at 224x224."""
    return _save_tiny(tmp_path_factory.mktemp("dinov2_224") / "dinov2-tiny", 224, 0)


@pytest.fixture(scope="module")
def tiny518(tmp_path_factory):
    """Native 37x37 position grid like the real checkpoints (image_size 518): interpolated to 16x16 at 224."""
    return _save_tiny(tmp_path_factory.mktemp("dinov2_518") / "dinov2-tiny", 518, 1)


@pytest.fixture(scope="module")
def feat224(tiny224):
    return DinoV2Features(tiny224)


@pytest.fixture(scope="module")
def hf224(tiny224):
    return _load_hf(tiny224)


def _load_hf(path) -> Dinov2Model:
    return Dinov2Model.from_pretrained(str(path), local_files_only=True).eval()


# ------------------------------------------------------------------ independent reference
def _ref_preprocess(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> 8-bit levels -> RGB -> PIL-like bicubic 224x224 (width pass, 8-bit, height pass, 8-bit)
    -> [0, 1] -> ImageNet normalisation."""
    if x.dtype != torch.uint8:
        x = torch.round((x.clamp(-1, 1) + 1) * 127.5)
    x = x.float()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    h, w = x.shape[-2:]
    if w != 224:
        x = F.interpolate(x, size=(h, 224), mode="bicubic", antialias=True).clamp(0, 255).round()
    if h != 224:
        x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 255).round()
    return (x / 255 - MEAN) / STD


def _hub_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """facebookresearch/dinov2 interpolate_pos_encoding with interpolate_offset=0.1, antialias=False."""
    m = int(math.sqrt(pos.shape[1] - 1))
    if m == grid:
        return pos
    patch = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    s = (grid + 0.1) / m
    patch = F.interpolate(patch, scale_factor=(s, s), mode="bicubic", antialias=False)
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def _hub_style_hf(path) -> Dinov2Model:
    model = _load_hf(path)
    emb = model.embeddings
    emb.position_embeddings = nn.Parameter(_hub_pos_embed(emb.position_embeddings.data, 16))
    return model


def _images(n: int, c: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, max(2, size // 4), max(2, size // 4), generator=g) * 2 - 1
    smooth = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (smooth + 0.3 * torch.randn(n, c, size, size, generator=g)).clamp(-1, 1)


# ------------------------------------------------------------------ (a) features = HF model on reference input
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [16, 32, 224])
def test_features_match_hf_model_on_reference_preprocessing(tiny224, feat224, hf224, channels, size):
    feat = feat224
    assert feat.num_features == 32 and feat.weights_path == tiny224
    x = _images(3, channels, size, seed=size + channels)
    got = feat(x)
    assert got.shape == (3, 32) and got.dtype == torch.float32
    with torch.no_grad():
        want = hf224(pixel_values=_ref_preprocess(x)).pooler_output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # uint8 input (already-quantised images) is taken as is and gives the same features
    u8 = torch.round((x.clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
    torch.testing.assert_close(feat(u8), got, rtol=0, atol=0)


def test_hub_positional_interpolation_on_a_518_checkpoint(tiny518):
    """Real checkpoints have a 37x37 grid: by default it is resized like the torch.hub model (offset 0.1)."""
    x = _images(2, 3, 32, seed=5)
    pixels = _ref_preprocess(x)
    feat = DinoV2Features(tiny518)
    with torch.no_grad():
        hub = _hub_style_hf(tiny518)(pixel_values=pixels).pooler_output
        hf = _load_hf(tiny518)(pixel_values=pixels).pooler_output
    torch.testing.assert_close(feat(x), hub, rtol=1e-5, atol=1e-5)
    hf_feat = DinoV2Features(tiny518, hub_pos_embed=False)
    torch.testing.assert_close(hf_feat(x), hf, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hub, hf, atol=1e-4)  # the two interpolation rules really differ
    assert feat.feature_name == "dinov2-vit14-2layer-32"
    assert hf_feat.feature_name == "dinov2-vit14-2layer-32-hfpos"


# ------------------------------------------------------------------ (b) CLS token after the final LayerNorm
def test_features_are_the_layernormed_cls_token(feat224, hf224):
    feat = feat224
    x = _images(2, 3, 32, seed=7)
    with torch.no_grad():
        out = hf224(pixel_values=_ref_preprocess(x), output_hidden_states=True)
        manual = hf224.layernorm(out.hidden_states[-1])[:, 0]
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(manual, out.pooler_output, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(feat(x), manual, rtol=1e-5, atol=1e-5)
    # not the pre-norm token and not a patch mean
    assert not torch.allclose(feat(x), out.hidden_states[-1][:, 0], atol=1e-3)
    assert not torch.allclose(feat(x), out.last_hidden_state[:, 1:].mean(1), atol=1e-3)


# ------------------------------------------------------------------ preprocessing vs PIL (what dgm-eval runs)
@pytest.mark.parametrize("size", [16, 32, 100, 256])
def test_preprocessing_matches_dgm_eval_pil_transform(feat224, size):
    import torchvision.transforms as T
    from PIL import Image

    feat = feat224
    x = _images(2, 3, size, seed=size)
    u8 = torch.round((x + 1) * 127.5).to(torch.uint8)
    dgm_eval = T.Compose(
        [
            T.Resize((224, 224), T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    ref = torch.stack([dgm_eval(Image.fromarray(np.ascontiguousarray(im.permute(1, 2, 0).numpy()))) for im in u8])
    ours = feat.preprocess(x)
    levels = ((ours - ref) * STD * 255).abs()  # difference in 8-bit levels
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    assert levels.max() <= 2.01, levels.max()
    assert (levels > 0.5).float().mean() < 0.01


def test_autocast_does_not_change_features(feat224):
    feat = feat224
    x = _images(2, 3, 32, seed=3)
    plain = feat(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = feat(x)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=0, atol=0)


def test_feature_name_of_real_configs():
    vitl = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=518)
    vitb = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14, image_size=518)
    assert dinov2_feature_name(vitl) == "dinov2-vitl14-1024"
    assert dinov2_feature_name(vitb) == "dinov2-vitb14-768"
    assert dinov2_feature_name(vitl, hub_pos_embed=False) == "dinov2-vitl14-1024-hfpos"


def test_attributes(tiny224):
    feat = DinoV2Features(str(tiny224))
    assert feat.feature_name == "dinov2-vit14-2layer-32"
    assert "bicubic" in feat.resize and "224x224" in feat.resize and "ImageNet" in feat.resize
    assert "\n" not in feat.resize
    assert not feat.training and not any(p.requires_grad for p in feat.parameters())
    with pytest.raises(ValueError, match="B x 1|3"):
        feat(torch.zeros(2, 4, 16, 16))


# ------------------------------------------------------------------ (c) the metric
def test_build_dinov2_metric_frechet(tiny224):
    metric = build_dinov2_metric(tiny224)
    assert isinstance(metric, FrechetMetric)
    assert metric.num_features == 32 and metric.feature_name == "dinov2-vit14-2layer-32"
    a, b = _images(48, 3, 16, seed=11), _images(48, 3, 16, seed=12) * 0.5
    metric.update(a, real=True)
    metric.update(b, real=False)
    fd = metric.compute()["frechet"]
    assert torch.isfinite(fd) and fd > 0

    same = build_dinov2_metric(tiny224, feature_name="custom", kid_subsets=2, kid_subset_size=20)
    assert same.feature_name == "custom" and same.kid_enabled
    same.update(a[:24], real=True)
    same.update(a[24:], real=True)
    same.update(a, real=False)
    out = same.compute()
    assert abs(float(out["frechet"])) < 1e-6


# ------------------------------------------------------------------ (d) one-line errors
def _assert_one_line(err, path):
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg, msg
    return msg


def test_missing_directory_raises_data_not_found(tmp_path):
    path = tmp_path / "nowhere" / "dinov2-large"
    with pytest.raises(DataNotFoundError) as err:
        DinoV2Features(path)
    msg = _assert_one_line(err, path)
    assert "hf download facebook/dinov2-large" in msg
    with pytest.raises(DataNotFoundError) as err:
        build_dinov2_metric(path)
    _assert_one_line(err, path)


def test_file_or_folder_without_config_raises_data_not_found(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(DataNotFoundError) as err:
        DinoV2Features(file)
    _assert_one_line(err, file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataNotFoundError) as err:
        DinoV2Features(empty)
    assert "config.json" in _assert_one_line(err, empty)


def test_config_without_weights_raises_data_not_found(tmp_path):
    _tiny_config(224).save_pretrained(tmp_path)
    with pytest.raises(DataNotFoundError) as err:
        DinoV2Features(tmp_path)
    assert "model.safetensors" in _assert_one_line(err, tmp_path)


@pytest.mark.parametrize("kind", ["bert", "clip", "dinov2_with_registers"])
def test_non_dinov2_config_raises_corrupt(tmp_path, kind):
    if kind == "bert":
        from transformers import BertConfig, BertModel

        BertModel(
            BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50)
        ).save_pretrained(tmp_path)
    elif kind == "clip":
        from transformers import CLIPConfig

        CLIPConfig().save_pretrained(tmp_path)
    else:
        Dinov2WithRegistersConfig = getattr(transformers, "Dinov2WithRegistersConfig", None)
        if Dinov2WithRegistersConfig is None:
            pytest.skip("this transformers has no Dinov2WithRegistersConfig")

        Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(CorruptDataError) as err:
        DinoV2Features(tmp_path)
    assert kind in _assert_one_line(err, tmp_path)


def test_unreadable_config_or_weights_raise_corrupt(tmp_path, tiny224):
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(CorruptDataError) as err:
        DinoV2Features(bad_json)
    _assert_one_line(err, bad_json)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_bytes((tiny224 / "config.json").read_bytes())
    (truncated / "model.safetensors").write_bytes((tiny224 / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CorruptDataError) as err:
        DinoV2Features(truncated)
    _assert_one_line(err, truncated)


def test_half_precision_checkpoint_runs_in_float32(tmp_path):
    torch.manual_seed(0)
    Dinov2Model(_tiny_config(224)).half().save_pretrained(tmp_path)
    feat = DinoV2Features(tmp_path)
    assert all(p.dtype == torch.float32 for p in feat.parameters())
    assert feat(_images(2, 3, 16, seed=1)).dtype == torch.float32
