"""One writer, one quantiser, one LPIPS frame preparation: atomic writes honour the umask, every [-1, 1] -> uint8
conversion gives the same bytes, and every LPIPS caller prepares frames the same way."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from difflab.ops import atomic
from difflab.ops.atomic import atomic_torch_save, atomic_write, current_umask
from difflab.utils.images import round_to_uint8, save_png, to_uint8

torch.set_num_threads(1)


@pytest.fixture
def umask():
    """Set the process umask for one test and restore the previous one afterwards."""
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    try:
        yield set_mask
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ------------------------------------------------------------------------------------------- atomic writes / umask
@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    a = atomic_write(tmp_path / "a.txt", lambda tmp: tmp.write_text("hello"))
    b = atomic_torch_save({"w": torch.ones(3)}, tmp_path / "sub" / "b.pt")
    png = save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "c.png")
    assert a.read_text() == "hello" and torch.equal(torch.load(b, weights_only=True)["w"], torch.ones(3))
    assert [_mode(p) for p in (a, b, png)] == [expected] * 3
    assert not list(tmp_path.rglob("*.tmp"))  # no temporaries left behind


def test_overwrite_takes_the_current_umask_not_the_old_file_mode(tmp_path, umask):
    umask(0o077)
    path = atomic_write(tmp_path / "x.bin", lambda tmp: tmp.write_bytes(b"1"))
    assert _mode(path) == 0o600
    umask(0o022)
    atomic_write(path, lambda tmp: tmp.write_bytes(b"2"))
    assert _mode(path) == 0o644 and path.read_bytes() == b"2"


def test_lightning_checkpoint_io_and_samples_npz_honour_the_umask(tmp_path, umask):
    from difflab.ops.checkpoint_io import AtomicCheckpointIO
    from difflab.sampling import write_outputs

    umask(0o022)
    ckpt = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    assert _mode(ckpt) == 0o644
    samples = torch.rand(4, 1, 8, 8) * 2 - 1
    out = write_outputs(tmp_path / "out", samples, torch.tensor([0, 1, 0, 1]))
    assert out["npz"].name == "samples.npz" and _mode(out["npz"]) == 0o644 and _mode(out["grid"]) == 0o644
    with np.load(out["npz"]) as z:  # numpy wrote the temporary itself, not "<tmp>.npz" next to it
        assert np.array_equal(z["images"], to_uint8(samples).numpy())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["grid.png", "samples.npz"]


def test_former_hand_written_writers_go_through_the_atomic_writer(tmp_path, umask):
    from difflab.datamodules.image_common import MARKER_NAME, _read_marker, _write_marker
    from difflab.latents.cache import FORMAT, read_manifest, write_manifest

    umask(0o027)
    write_manifest(tmp_path, {"format": FORMAT, "status": "x"})
    assert _mode(tmp_path / "manifest.json") == 0o640
    assert read_manifest(tmp_path)["status"] == "x" and "updated" in read_manifest(tmp_path)
    _write_marker(tmp_path, {"f": {"size": 1}})
    assert _mode(tmp_path / MARKER_NAME) == 0o640 and _read_marker(tmp_path) == {"f": {"size": 1}}
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_umask_fallback_without_proc_restores_the_mask(monkeypatch, umask):
    umask(0o027)

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(atomic, "open", no_proc, raising=False)
    assert current_umask() == 0o027
    monkeypatch.undo()
    assert current_umask() == 0o027  # the set-and-restore fallback put it back


def test_atomic_module_imports_without_lightning():
    code = "import sys, difflab.ops.atomic; assert 'lightning' not in sys.modules, 'lightning imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------------------- uint8 quantiser
def test_to_uint8_endpoints_clamping_and_round_trip():
    x = torch.tensor([-1.0, 1.0, 0.0, -5.0, 7.0, float("-inf"), float("inf")])
    assert to_uint8(x).tolist() == [0, 255, 128, 0, 255, 0, 255]
    k = torch.arange(256)
    assert torch.equal(to_uint8(k / 127.5 - 1).long(), k)
    assert torch.equal(to_uint8(k.double() / 127.5 - 1).long(), k)
    u8 = k.to(torch.uint8)
    assert to_uint8(u8) is u8  # already quantised
    with pytest.raises(TypeError, match="float pixels"):
        to_uint8(k)


def test_round_to_uint8_rounds_half_to_even_and_clamps():
    v = torch.tensor([0.5, 1.5, 2.5, 127.5, 254.5, -3.0, 300.0, 254.6])
    assert round_to_uint8(v).tolist() == [0, 2, 2, 128, 254, 0, 255, 255]


def test_to_uint8_keeps_shape_and_quantises_low_precision_in_float32():
    x = torch.rand(2, 3, 5, 7) * 2.4 - 1.2
    u8 = to_uint8(x)
    assert u8.shape == x.shape and u8.dtype == torch.uint8 and u8.device == x.device
    bf = x.bfloat16()
    assert torch.equal(to_uint8(bf), to_uint8(bf.float()))


def test_video_and_metric_paths_give_the_same_bytes_as_the_image_quantiser():
    import difflab.metrics.common as mc
    from difflab.video.io import to_uint8_video

    g = torch.Generator().manual_seed(0)
    videos = torch.rand(2, 3, 4, 6, 5, generator=g) * 2.2 - 1.1  # B x C x T x H x W, some values out of range
    videos[0, 0, 0, 0, :3] = torch.tensor([-1.0, 0.0, 1.0])
    ref = to_uint8(videos)
    assert np.array_equal(to_uint8_video(videos), ref.permute(0, 2, 3, 4, 1).numpy())
    assert np.array_equal(to_uint8_video(videos[1]), ref[1].permute(1, 2, 3, 0).numpy())
    assert np.array_equal(to_uint8_video(videos.numpy()), ref.permute(0, 2, 3, 4, 1).numpy())
    assert torch.equal(mc.to_uint8(videos), ref) and mc.to_uint8 is to_uint8


def test_uint8_resizers_share_the_rounding():
    from difflab.datamodules.sign_video import crop_resize
    from difflab.video.io import resize_uint8

    frames = np.random.default_rng(0).integers(0, 256, (2, 12, 16, 3), dtype=np.uint8)
    got = crop_resize(frames, (6, 8))  # same aspect: no crop, only the resize
    x = torch.nn.functional.interpolate(
        torch.from_numpy(frames).permute(0, 3, 1, 2).float(),
        size=(6, 8),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    expected = round_to_uint8(x).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got, expected)
    assert np.array_equal(
        resize_uint8(torch.from_numpy(frames).permute(0, 3, 1, 2), (6, 8)).permute(0, 2, 3, 1).numpy(), expected
    )


# ------------------------------------------------------------------------------------------ LPIPS frame preparation
def test_prepare_lpips_frames_upsamples_small_frames_only():
    from difflab.metrics.lpips_metric import LPIPS_MIN_SIDE, prepare_lpips_frames

    assert LPIPS_MIN_SIDE >= 31  # alexnet, the default backbone, fails below 31 px
    grey = torch.rand(2, 1, 8, 8) * 2 - 1
    out = prepare_lpips_frames(grey)
    assert out.shape == (2, 3, LPIPS_MIN_SIDE, LPIPS_MIN_SIDE) and out.dtype == torch.float32
    assert grey.min() - 1e-6 <= out.min() and out.max() <= grey.max() + 1e-6  # bilinear: no overshoot
    assert torch.equal(out[:, 0], out[:, 2])  # grey repeated to RGB
    wide = prepare_lpips_frames(torch.zeros(1, 3, 16, 24))
    assert wide.shape == (1, 3, LPIPS_MIN_SIDE, LPIPS_MIN_SIDE * 3 // 2)  # aspect kept
    big = torch.rand(3, 3, LPIPS_MIN_SIDE, LPIPS_MIN_SIDE + 10) * 2 - 1
    assert torch.equal(prepare_lpips_frames(big), big)  # large enough: untouched
    video = torch.rand(2, 3, 5, 8, 8) * 2 - 1  # B x C x T x H x W -> (B*T) frames, sample-major
    frames = prepare_lpips_frames(video)
    assert frames.shape == (10, 3, LPIPS_MIN_SIDE, LPIPS_MIN_SIDE)
    assert torch.equal(frames[7], prepare_lpips_frames(video[1:2, :, 2])[0])


def test_prepare_lpips_frames_errors_and_gradients():
    from difflab.metrics.lpips_metric import prepare_lpips_frames

    with pytest.raises(ValueError, match="latents"):
        prepare_lpips_frames(torch.zeros(2, 4, 8, 8))
    with pytest.raises(TypeError, match="float"):
        prepare_lpips_frames(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    prepare_lpips_frames(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_loss_term_metric_and_callback_agree_on_small_frames(squeeze_backbone):
    from difflab.diffusion.objectives import PerceptualTerm
    from difflab.metrics.lpips_metric import build_lpips, lpips_distance

    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1, torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    metric = lpips_distance(build_lpips("squeeze", squeeze_backbone), a, b)  # also what the callbacks call
    term = PerceptualTerm("squeeze", squeeze_backbone)(a, b)
    assert metric.shape == (3,) and torch.allclose(term, metric, atol=1e-6)
    with pytest.raises(ValueError, match="objective.lpips_weight=0"):
        PerceptualTerm("squeeze", squeeze_backbone)(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8))


def test_default_alex_backbone_runs_on_prepared_tiny_frames():
    from difflab.metrics.lpips_metric import build_lpips, lpips_distance

    model = build_lpips("alex", pnet_rand=True)
    x = torch.rand(2, 1, 8, 8) * 2 - 1  # 8 x 8 would crash alexnet without the preparation
    assert torch.equal(lpips_distance(model, x, x), torch.zeros(2))
