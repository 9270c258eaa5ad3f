"""Diffusion transformers (src/models/dit.py): sizes against the DiT paper, positions against reference formulas,
adaLN-Zero identity at init, text paths, run options that must not change the function, errors, and end-to-end runs."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.models.dit import PRESETS, DiT, JointBlock, VideoDiT, apply_rope, rope_tables, sincos_grid
from difflab.utils.errors import ConfigError

torch.set_num_threads(1)


def _perturb(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter (the zero-initialised gates and heads included), so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_dit(**kw):
    args = dict(sample_shape=(2, 8, 8), size="T", patch_size=2, depth=2, hidden_dim=32, num_heads=2, cond_dim=6)
    args.update(kw)
    return DiT(**args)


def tiny_video(**kw):
    args = dict(
        sample_shape=(2, 4, 8, 8), size="T", patch_size=4, depth=2, hidden_dim=32, num_heads=2, max_frames=6, cond_dim=6
    )
    args.update(kw)
    return VideoDiT(**args)


def _inputs(shape, cond_dim=6, ctx_dim=None, n_ctx=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    t = torch.rand(shape[0], generator=g) * 1000
    cond = torch.randn(shape[0], cond_dim, generator=g)
    ctx = torch.randn(shape[0], n_ctx, ctx_dim, generator=g) if ctx_dim else None
    mask = torch.ones(shape[0], n_ctx, dtype=torch.bool) if ctx_dim else None
    return x, t, cond, ctx, mask


# ------------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("size,paper_millions", [("S", 33), ("B", 130), ("L", 458), ("XL", 675)])
def test_preset_parameter_counts_match_the_dit_paper(size, paper_millions):
    """DiT paper Table 1: DiT-{S,B,L,XL}/2 on 32x32x4 latents with 1000 classes (class table + null class) and a
    learned variance (8 output channels)."""
    from difflab.conditioning.base import ClassConditioner

    hidden = PRESETS[size][1]
    with torch.device("meta"):
        net = DiT((4, 32, 32), out_channels=8, size=size, patch_size=2, cond_dim=hidden)
        labels = ClassConditioner(num_classes=1000, embed_dim=hidden)
    n = sum(p.numel() for m in (net, labels) for p in m.parameters())
    assert abs(n / 1e6 - paper_millions) / paper_millions < 0.01, n
    assert (net.depth, net.hidden_dim, net.num_heads) == PRESETS[size]


def test_schema_presets_equal_the_model_presets():
    from difflab.configs.model.schema import DIT_PRESETS

    assert DIT_PRESETS == PRESETS


def test_patch_size_sets_the_token_count_and_explicit_values_override_the_preset():
    net = DiT((4, 32, 32), size="S", patch_size=8, depth=3)
    assert (net.depth, net.hidden_dim, net.num_heads) == (3, 384, 6)
    assert net.patch_embed.weight.shape == (384, 4, 8, 8)
    assert net.final.linear.out_features == 8 * 8 * 4


# ------------------------------------------------------------------------------------------------- positions
def test_sincos_table_equals_dits_2d_table():
    diffusers = pytest.importorskip("diffusers.models.embeddings")
    ref = diffusers.get_2d_sincos_pos_embed(64, 6, base_size=6, output_type="pt").float()
    torch.testing.assert_close(sincos_grid((6, 6), 64), ref, atol=1e-6, rtol=0)


def test_sincos_table_of_a_rectangular_grid_encodes_rows_and_columns_separately():
    table = sincos_grid((3, 5), 16).view(3, 5, 16)
    # the first half depends only on the column, the second only on the row
    assert torch.equal(table[0, :, :8], table[2, :, :8]) and torch.equal(table[:, 0, 8:], table[:, 4, 8:])
    assert not torch.equal(table[0, 0, :8], table[0, 1, :8]) and not torch.equal(table[0, 0, 8:], table[1, 0, 8:])


def test_rope_matches_complex_rotation_and_depends_only_on_offsets():
    head, n = 8, 7
    cos, sin = rope_tables((n,), head)
    x = torch.randn(n, head, dtype=torch.float64)
    out = apply_rope(x, (cos.double(), sin.double()))
    # reference: each channel pair (2i, 2i+1) is a complex number multiplied by exp(i * pos * 10000^(-i/(head/2)))
    freqs = 10000.0 ** (-torch.arange(head // 2, dtype=torch.float64) / (head // 2))
    angle = torch.arange(n, dtype=torch.float64)[:, None] * freqs[None]
    rotation = torch.polar(torch.ones_like(angle), angle)
    ref = torch.view_as_real(torch.view_as_complex(x.view(n, head // 2, 2)) * rotation)
    torch.testing.assert_close(out, ref.reshape(n, head), atol=1e-6, rtol=0)
    # a query-key score depends on the positions only through their difference
    q, k = torch.randn(head, dtype=torch.float64), torch.randn(head, dtype=torch.float64)
    table = (cos.double(), sin.double())
    rq, rk = apply_rope(q.expand(n, head), table), apply_rope(k.expand(n, head), table)
    assert math.isclose(float(rq[1] @ rk[3]), float(rq[4] @ rk[6]), rel_tol=1e-6)
    assert not math.isclose(float(rq[1] @ rk[3]), float(rq[1] @ rk[4]), rel_tol=1e-3)


def test_rope_2d_shares_the_pairs_between_rows_and_columns():
    cos, sin = rope_tables((3, 4), 8)  # 4 pairs: 2 rotate with the row, 2 with the column
    angle = torch.atan2(sin, cos).view(3, 4, 4)
    assert torch.allclose(angle[:, 0, :2], angle[:, 3, :2]) and torch.allclose(angle[0, :, 2:], angle[2, :, 2:])
    assert not torch.allclose(angle[0, 0, :2], angle[1, 0, :2]) and not torch.allclose(angle[0, 0, 2:], angle[0, 1, 2:])
    assert torch.allclose(angle[1, 0, :2], torch.tensor([1.0, 0.01]), atol=1e-6)


# ------------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize(
    "make,shape",
    [
        (tiny_dit, (3, 2, 8, 8)),
        (tiny_video, (3, 2, 4, 8, 8)),
        (lambda **k: tiny_video(attention="full", **k), (3, 2, 4, 8, 8)),
    ],
)
def test_adaln_zero_starts_as_zero_output_and_identity_blocks(make, shape):
    net = make()
    x, t, cond, *_ = _inputs(shape)
    assert torch.count_nonzero(net(x, t, cond)) == 0  # zero head
    tokens = (
        torch.randn(3, 4, 2, 32)
        if isinstance(net, VideoDiT) and net.attention == "factorised"
        else torch.randn(3, 16, 32)
    )
    emb = net.embed(t, cond)
    for block in net.blocks:
        assert torch.equal(block(tokens, emb), tokens)  # gated branches start closed


@pytest.mark.parametrize("kind", ["image", "video_factorised", "video_full"])
@pytest.mark.parametrize("pos", ["sincos", "rope"])
@pytest.mark.parametrize("text_mode", ["cross", "joint", None])
def test_shapes_gradients_and_every_input_is_used(kind, pos, text_mode):
    if kind == "video_factorised" and text_mode == "joint":
        pytest.skip("joint attention needs full video attention (tested as an error)")
    ctx_dim = 12 if text_mode else None
    kw = dict(pos_embed=pos, text_mode=text_mode or "cross", context_dim=ctx_dim)
    if kind == "image":
        net, shape = tiny_dit(**kw), (2, 2, 8, 8)
    else:
        net, shape = tiny_video(attention=kind.split("_")[1], **kw), (2, 2, 4, 8, 8)
    _perturb(net)
    x, t, cond, ctx, mask = _inputs(shape, ctx_dim=ctx_dim)
    x.requires_grad_(True)
    out = net(x, t, cond, ctx, mask)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)
    with torch.no_grad():
        assert not torch.allclose(net(x, t + 100, cond, ctx, mask), out)
        assert not torch.allclose(net(x, t, cond + 1, ctx, mask), out)
        if ctx is not None:
            assert not torch.allclose(net(x, t, cond, ctx + 1, mask), out)
    assert net.count_cross_attention() == (2 if text_mode else 0)


@pytest.mark.parametrize(
    "make,shape",
    [(lambda **k: tiny_dit(**k), (2, 2, 8, 8)), (lambda **k: tiny_video(attention="full", **k), (2, 2, 4, 8, 8))],
)
@pytest.mark.parametrize("text_mode", ["cross", "joint"])
def test_padded_text_tokens_do_not_change_the_output(make, shape, text_mode):
    net = _perturb(make(text_mode=text_mode, context_dim=12))
    x, t, cond, ctx, _ = _inputs(shape, ctx_dim=12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    changed = ctx.clone()
    changed[0, 3:] += 5.0
    changed[1, 4:] -= 5.0
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, cond, ctx, mask), net(x, t, cond, changed, mask))
        changed[0, 2] += 5.0  # a real token
        assert not torch.allclose(net(x, t, cond, ctx, mask)[0], net(x, t, cond, changed, mask)[0])


def test_joint_blocks_update_the_text_stream():
    block = _perturb(JointBlock(16, 2))
    x, ctx, emb = torch.randn(2, 9, 16), torch.randn(2, 4, 16), torch.randn(2, 16)
    x2, ctx2 = block(x, emb, ctx)
    assert x2.shape == x.shape and ctx2.shape == ctx.shape and not torch.allclose(ctx2, ctx)
    last = JointBlock(16, 2, update_text=False)  # SD3's last block: the text stream's output would be unused
    assert not hasattr(last, "c_mlp") and last(x, emb, ctx)[1] is ctx
    with pytest.raises(ValueError, match="joint"):
        block(x, emb, None)


def test_factorised_video_mixes_frames_only_through_temporal_attention():
    net = _perturb(tiny_video())
    x, t, cond, *_ = _inputs((1, 2, 4, 8, 8))
    for block in net.blocks:
        torch.nn.init.zeros_(block.ada.linear.weight)
        with torch.no_grad():
            block.ada.linear.bias.zero_()
            block.ada.linear.bias[2 * 32 : 3 * 32] = 1.0  # spatial gate open
            block.ada.linear.bias[8 * 32 :] = 1.0  # MLP gate open; temporal gate (5) stays closed
    with torch.no_grad():
        base = net(x, t, cond)
        x2 = x.clone()
        x2[:, :, 0] += 1.0  # change frame 0 only
        out = net(x2, t, cond)
    assert torch.allclose(out[:, :, 1:], base[:, :, 1:]) and not torch.allclose(out[:, :, 0], base[:, :, 0])


def test_video_runs_any_number_of_frames_up_to_the_maximum():
    net = _perturb(tiny_video(max_frames=6))
    for frames in (1, 3, 6):
        x, t, cond, *_ = _inputs((1, 2, frames, 8, 8))
        assert net(x, t, cond).shape == x.shape
    x, t, cond, *_ = _inputs((1, 2, 7, 8, 8))
    with pytest.raises(ValueError, match="7 frames.*max_frames=6"):
        net(x, t, cond)


# ------------------------------------------------------------------------------------------------- run options
def _copy_into_unfused(fused: torch.nn.Module, unfused: torch.nn.Module) -> None:
    state = {}
    for key, value in fused.state_dict().items():
        if ".qkv.qkv." in key:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                state[key.replace(".qkv.qkv.", f".qkv.{name}.")] = part
        else:
            state[key] = value
    unfused.load_state_dict(state)


@pytest.mark.parametrize("make,shape", [(tiny_dit, (2, 2, 8, 8)), (tiny_video, (2, 2, 4, 8, 8))])
def test_fused_and_separate_qkv_compute_the_same_function(make, shape):
    fused, separate = _perturb(make(fused_qkv=True)), make(fused_qkv=False)
    _copy_into_unfused(fused, separate)
    x, t, cond, *_ = _inputs(shape)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, t, cond), separate(x, t, cond), atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients_and_saves_activations():
    plain = _perturb(tiny_dit(context_dim=12))
    ckpt = tiny_dit(context_dim=12, checkpoint_activations=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, cond, ctx, mask = _inputs((2, 2, 8, 8), ctx_dim=12)

    def grads_and_saved(net):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda z: saved.append(z.numel()) or z, lambda z: z):
            loss = net(x, t, cond, ctx, mask).square().mean()
        loss.backward()
        return [p.grad.clone() for p in net.parameters()], sum(saved)

    g_plain, saved_plain = grads_and_saved(plain)
    g_ckpt, saved_ckpt = grads_and_saved(ckpt)
    for a, b in zip(g_plain, g_ckpt):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert saved_ckpt < saved_plain / 2


@pytest.mark.slow  # torch.compile on CPU: ~1 min of compilation
def test_regional_compile_keeps_the_function_and_state_dict_keys():
    plain = _perturb(tiny_dit())
    compiled = tiny_dit(compile_blocks=True)
    assert set(compiled.state_dict()) == set(plain.state_dict())
    compiled.load_state_dict(plain.state_dict())
    x, t, cond, *_ = _inputs((2, 2, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, cond), plain(x, t, cond), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- errors
def test_bad_sizes_fail_at_build_naming_both_values():
    with pytest.raises(ConfigError, match=r"patch_size=3 does not divide the image size 8x8"):
        tiny_dit(patch_size=3)
    with pytest.raises(ConfigError, match=r"12 frames but model.net.max_frames=6"):
        tiny_video(sample_shape=(2, 12, 8, 8))
    with pytest.raises(ConfigError, match="tubelet_size=2"):
        tiny_video(sample_shape=(2, 3, 8, 8), tubelet_size=2)
    with pytest.raises(ConfigError, match="model=video_dit"):
        tiny_dit(sample_shape=(2, 4, 8, 8))
    with pytest.raises(ConfigError, match="attention=full"):
        tiny_video(text_mode="joint", context_dim=12)
    with pytest.raises(ConfigError, match="not a DiT preset"):
        tiny_dit(size="M")
    with pytest.raises(ConfigError, match="hidden_dim=30"):
        tiny_dit(hidden_dim=30, num_heads=4)


# ------------------------------------------------------------------------------------------------- configs and runs
TINY_DIT = [
    "model=dit",
    "datamodule.image_size=8",
    "model.net.depth=2",
    "model.net.hidden_dim=32",
    "model.net.num_heads=2",
    "model.net.patch_size=2",
]


def _tiny(extra=()):
    from tests.helpers import TINY, tiny_overrides

    keep = [o for o in tiny_overrides(max_steps=4, save_every=2) if not o.startswith("model.net.")]
    assert len(keep) == len(tiny_overrides(max_steps=4, save_every=2)) - sum(o.startswith("model.net.") for o in TINY)
    return [*keep, *TINY_DIT, *extra]


def _compose(overrides, tmp_path):
    from tests.helpers import compose_train

    return compose_train(tmp_path, list(overrides))


def _constructor_args(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self"}


@pytest.mark.parametrize("name,cls", [("dit", DiT), ("video_dit", VideoDiT)])
def test_model_configs_match_the_constructors_and_take_the_datas_shape(name, cls, tmp_path):
    from omegaconf import OmegaConf

    from difflab.lit_modules.diffusion_module import DiffusionModule

    cfg = _compose([f"model={name}"], tmp_path)
    net = OmegaConf.to_container(cfg.model.net)
    assert net["_target_"] == f"difflab.models.dit.{cls.__name__}"
    assert set(net) - {"_target_", "_partial_"} <= _constructor_args(cls)
    assert set(cfg.model) - {"_target_"} <= _constructor_args(DiffusionModule)
    assert net["sample_shape"] == "${model.diffusion.sample_shape}"


@pytest.mark.parametrize(
    "dit,base", [("moving_digits_t2v_dit", "moving_digits_t2v"), ("sign_text2video_dit", "sign_text2video")]
)
def test_transformer_recipes_repeat_their_unet_recipe_but_the_denoiser(dit, base, tmp_path):
    from omegaconf import OmegaConf

    a, b = (OmegaConf.to_container(_compose([f"experiment={e}"], tmp_path)) for e in (dit, base))
    assert a["model"]["net"]["_target_"].endswith("VideoDiT")
    assert {k: v for k, v in a.items() if k not in ("model", "tags")} == {
        k: v for k, v in b.items() if k not in ("model", "tags")
    }
    differ = {k for k in a["model"] if a["model"][k] != b["model"].get(k)}
    assert differ <= {"net", "lr", "_target_"}, differ


def test_cli_patch_size_that_does_not_divide_the_image_fails_in_one_line(tmp_path, capsys):
    import train
    from tests.helpers import run_hydra_main

    code = run_hydra_main(train.main, [*_tiny(["model.net.patch_size=3"]), f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == (
        "error: model.net.patch_size=3 is invalid: a divisor of the image size (datamodule.image_size=8)"
    )
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_cli_more_frames_than_the_temporal_positions_fails_in_one_line(tmp_path, capsys):
    import train
    from tests.helpers import run_hydra_main

    args = [
        "experiment=moving_digits_t2v_dit",
        "model.net.max_frames=4",
        f"paths.data_dir={tmp_path / 'data'}",
        "trainer=cpu",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    code = run_hydra_main(train.main, args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == (
        "error: model.net.max_frames=4 is invalid: at least the clips' frame count (datamodule.num_frames=8)"
    )
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_size_errors_from_data_the_config_does_not_describe_reach_the_cli_as_one_line(tmp_path, monkeypatch):
    """A latent cache's shape is known only once the data is opened: the denoiser's own check must still surface
    as a one-line user error, not as Hydra's InstantiationException."""
    from difflab.utils.errors import instantiate_reporting

    cfg = _compose(
        ["model=dit", "model.diffusion.sample_shape=[4,6,6]", "model.net.patch_size=4", "conditioning=none"], tmp_path
    )
    with pytest.raises(ConfigError, match="patch_size=4 does not divide the image size 6x6"):
        instantiate_reporting(cfg.model)


@pytest.mark.parametrize("process,sampler", [("flow", "heun"), ("vp", "ddim"), ("edm", "dpmpp_2m")])
def test_train_and_sample_a_dit_with_every_process(process, sampler, tmp_path):
    """`python train.py model=dit` end to end (checkpoints, EMA, grids), then `sample.py` from its checkpoint."""
    import numpy as np

    import sample
    import train
    from difflab.checkpoints import load_checkpoint, module_from_checkpoint
    from tests.helpers import run_hydra_main

    run = tmp_path / "run"
    assert (
        run_hydra_main(
            train.main, [*_tiny([f"process={process}", f"sampler={sampler}"]), "logger=csv", f"hydra.run.dir={run}"]
        )
        == 0
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step_0000002.ckpt",
        "step_0000004.ckpt",
    ]
    module = module_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert type(module.denoiser).__name__ == "DiT" and module.denoiser.patch == 2
    ck = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert all(torch.equal(ck["state_dict"][k], module.state_dict()[k]) for k in ck["state_dict"])  # EMA weights
    assert any(not torch.equal(ck["current_model_state"][k], module.state_dict()[k]) for k in ck["state_dict"])
    out = tmp_path / "samples"
    assert (
        run_hydra_main(
            sample.main,
            [
                f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                "n=10",
                "device=cpu",
                "sampler.steps=2",
                f"out_dir={out}",
                f"hydra.run.dir={tmp_path / 'h'}",
            ],
        )
        == 0
    )
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (10, 1, 8, 8) and images.dtype == np.uint8


@pytest.mark.parametrize("conditioning,text_mode", [("text_minilm", "cross"), ("text_minilm", "joint"), ("none", None)])
def test_train_a_text_conditioned_or_unconditional_dit(conditioning, text_mode, tmp_path):
    from difflab.pipeline import train

    extra = [f"conditioning={conditioning}"]
    extra += [f"model.net.text_mode={text_mode}", "conditioning.max_length=8"] if text_mode else []
    objs = train(_compose([*_tiny(extra), "logger=csv"], tmp_path))
    assert objs["model"].num_cross_attention == (2 if text_mode else 0) and objs["trainer"].global_step == 4
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_train_a_video_dit_on_moving_digits(tmp_path):
    from difflab.pipeline import train

    cfg = _compose(
        [
            "experiment=moving_digits_t2v_dit",
            f"paths.data_dir={tmp_path / 'data'}",
            "trainer=cpu",
            "logger=csv",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "datamodule.num_frames=4",
            "model.net.depth=1",
            "model.net.hidden_dim=32",
            "model.net.num_heads=2",
            "model.net.attention=full",
            "model.net.text_mode=joint",
            "model.net.pos_embed=rope",
            "lr_schedule.warmup=1",
            "sampler.steps=2",
            "callbacks.video_grid.every_n_steps=2",
            "callbacks.video_grid.n_cols=2",
            "callbacks.video_grid.max_prompts=2",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "~callbacks.progress_bar",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
        ],
        tmp_path,
    )
    objs = train(cfg)
    module = objs["model"]
    assert type(module.denoiser).__name__ == "VideoDiT" and module.diffusion.sample_shape == (1, 4, 16, 16)
    assert module.num_cross_attention == 1 and objs["trainer"].global_step == 2
    assert (tmp_path / "figures" / "video_grid" / "final.mp4").is_file()


@pytest.mark.slow  # two CPU processes (gloo)
def test_ddp_cpu_run_of_a_dit_keeps_ranks_in_sync(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *_tiny(), "trainer=ddp_cpu", "logger=csv", f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    report = json.loads((run / "ddp_check.json").read_text())[-1]
    assert report["world_size"] == 2 and report["raw"]["equal"] and report["ema"]["equal"]


def test_keys_set_for_another_denoiser_fail_at_start_in_one_line(tmp_path, capsys):
    """experiment=stl10_latent sets UNet channels; with model=dit they are no DiT arguments: refused before anything
    is written, naming the key and how to drop it."""
    import train
    from tests.helpers import run_hydra_main

    code = run_hydra_main(train.main, ["experiment=stl10_latent", "model=dit", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(
        "error: model.net.attention_levels=[1, 2] is invalid: not an argument of DiT (model.net._target_)"
    )
    assert "~model.net.attention_levels" in err[-1] and not (tmp_path / "run").exists()
