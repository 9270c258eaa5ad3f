"""Allowed values of the model group (configs/model/*.yaml): the DiffusionModule options with their UNet2D / UNet3D /
ViViT denoisers, and the AutoencoderModule (model=kl_vae). Checked by difflab.config_checks before a job starts; a
rule applies only when its key is present (each option has its own keys)."""

from difflab.config_checks import (
    Rule,
    adam_betas,
    boolean,
    integer,
    list_of,
    non_negative,
    number,
    one_of,
    optional,
    positive,
    probability,
    string,
)
from difflab.registry import DIT_PRESETS

LEVELS = list_of(integer(min=0))

RULES = {
    # the training loop (src/lit_modules/diffusion_module.py); optimizer and lr_schedule are groups of their own
    "lr": positive(),
    "loss_buckets": integer(min=1),
    "compile": boolean(),
    "channels_last": boolean(),
    # the Diffusion object (src/diffusion/system.py); process, objective, sampler, guidance come from their groups
    "diffusion.class_names": optional(list_of(string())),  # null: filled from the datamodule
    "diffusion.prompts": optional(list_of(string())),
    "diffusion.p_uncond": probability(max_open=True).described_as("a number in [0, 1) (1 would drop every condition)"),
    # denoisers (src/models/unet2d.py, unet3d.py, vivit.py; dit.py below)
    "net.in_channels": integer(min=1),
    "net.out_channels": optional(integer(min=1)),
    "net.base_channels": integer(min=1),
    "net.channel_mults": list_of(integer(min=1), min_len=1),
    "net.num_res_blocks": integer(min=0),
    "net.attention_levels": LEVELS,
    "net.cross_attention_levels": optional(LEVELS),
    "net.temporal_attention_levels": optional(LEVELS),
    "net.dropout": probability(),
    "net.interval_input": boolean(),  # MeanFlow's second time input (every denoiser; method=meanflow sets it)
    "net.guidance_input": boolean(),  # a guidance-distilled student's scale input (every denoiser; method.guidance_scales)
    "net.groups": integer(min=1),
    "net.head_dim": integer(min=1),
    "net.num_transformer_blocks": integer(min=0),
    "net.transformer_head_dim": integer(min=1),
    "net.mlp_ratio": positive(),
    "net.temporal_kernel": Rule(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v % 2 == 1, "an odd integer >= 1"
    ),
    "net.max_distance": integer(min=1),
    "net.frame_embedding": boolean(),
    "net.patch_size": integer(min=1),
    "net.tubelet_size": integer(min=1),
    "net.hidden_dim": optional(integer(min=1)),
    "net.depth": optional(integer(min=1)),
    "net.cross_attention_every": integer(min=1),
    "net.input_residual": boolean(),
    "net.learn_output_scale": boolean(),
    "net.output_scale_init": number(),
    # transformers (src/models/dit.py: DiT, VideoDiT)
    "net.sample_shape": list_of(integer(min=1), min_len=3),  # ${model.diffusion.sample_shape}: from the datamodule
    "net.size": one_of(list(DIT_PRESETS)),
    "net.num_heads": optional(integer(min=1)),
    "net.max_frames": integer(min=1),
    "net.attention": one_of(["factorised", "full"]),
    "net.pos_embed": one_of(["sincos", "rope"]),
    "net.text_mode": one_of(["cross", "joint"]),
    "net.fused_qkv": boolean(),
    "net.checkpoint_activations": boolean(),
    "net.compile_blocks": boolean(),
    "net.freq_dim": Rule(
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2 and v % 2 == 0, "an even integer >= 2"
    ),
    # AutoencoderModule (model=kl_vae; src/lit_modules/autoencoder_module.py, its own Adam)
    "betas": adam_betas(),
    "weight_decay": non_negative(),
    "kl_weight": non_negative(),
    "recon_loss": one_of(["l1", "l2"]),
    "lpips_weight": non_negative(),
    "lpips_net": one_of(["alex", "vgg", "squeeze"]),
    "lpips_backbone_weights": optional(string()),
    "lpips_min_size": integer(min=1),
}


def levels_inside_channel_mults(model: dict):
    """UNet attention levels index channel_mults (src/models/unet2d.py raises otherwise)."""
    net = model.get("net") or {}
    mults = net.get("channel_mults")
    if not isinstance(mults, list) or not mults:  # an empty list is reported by its own rule
        return None
    for key in ("attention_levels", "cross_attention_levels", "temporal_attention_levels"):
        levels = net.get(key)
        if isinstance(levels, list) and any(isinstance(lv, int) and lv >= len(mults) for lv in levels):
            return f"net.{key}", f"levels in 0..{len(mults) - 1} (net.channel_mults has {len(mults)})"
    return None


def vivit_heads_divide_width(model: dict):
    """ViViT splits hidden_dim into heads of head_dim (src/models/vivit.py)."""
    net = model.get("net") or {}
    hidden, head = net.get("hidden_dim"), net.get("head_dim")
    if isinstance(hidden, int) and isinstance(head, int) and head > 0 and hidden % head:
        return "net.hidden_dim", f"a multiple of net.head_dim={head}"
    return None


def dit_heads_divide_width(model: dict):
    """A DiT splits its width into num_heads heads of even width (rotary pairs), preset values included."""
    net = model.get("net") or {}
    if "num_heads" not in net or net.get("size") not in DIT_PRESETS:
        return None
    depth, hidden, heads = DIT_PRESETS[net["size"]]
    hidden = net.get("hidden_dim") if isinstance(net.get("hidden_dim"), int) else hidden
    heads = net.get("num_heads") if isinstance(net.get("num_heads"), int) else heads
    if heads > 0 and (hidden % heads or (hidden // heads) % 2):
        key = "net.hidden_dim" if net.get("hidden_dim") is not None else "net.num_heads"
        return key, f"a width that splits into heads of even width (hidden_dim={hidden}, num_heads={heads})"
    return None


def joint_text_needs_full_video_attention(model: dict):
    """VideoDiT joins the text to the whole clip in joint mode, so it needs full attention (src/models/dit.py)."""
    net = model.get("net") or {}
    if net.get("text_mode") == "joint" and net.get("attention") == "factorised":
        return "net.attention", "full when net.text_mode=joint (or text_mode=cross with factorised attention)"
    return None


CHECKS = [
    levels_inside_channel_mults,
    vivit_heads_divide_width,
    dit_heads_divide_width,
    joint_text_needs_full_video_attention,
]
