"""Allowed values of the model group (configs/model/*.yaml): the DiffusionModule options with their UNet2D / UNet3D /
ViViT denoisers, and the AutoencoderModule (model=kl_vae). Checked by difflab.config_checks before a job starts; a
rule applies only when its key is present (each option has its own keys)."""
from difflab.config_checks import (Rule, boolean, existing_path, integer, list_of, mapping, non_negative, number,
                                   one_of, optional, positive, probability, sigma_interval, string)

# depth, width, heads of the DiT presets (src/models/dit.py PRESETS; a test keeps the two equal, and this module
# must not import torch so that --help stays fast)
DIT_PRESETS = {"T": (6, 192, 3), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
LEVELS = list_of(integer(min=0))
GUIDANCE_METHODS = ["cfg", "cfgpp", "apg", "autoguidance"]    # src/diffusion/guidance.py GUIDANCE_METHODS (a test)
BETAS = Rule(lambda v: isinstance(v, list) and len(v) == 2 and all(
    isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v),
    "a list of two numbers in [0, 1), e.g. [0.9, 0.999]")               # torch.optim.AdamW

RULES = {
    # optimiser and LR schedule (src/lit_modules/lr_schedules.py)
    "lr": positive(),
    "betas": BETAS,
    "weight_decay": non_negative(),
    "eps": non_negative(),
    "warmup_steps": non_negative().described_as("an integer number of steps >= 0 or a fraction in [0, 1) of all "
                                                "steps"),
    "warmup_start_factor": non_negative(),
    "final_lr_fraction": non_negative(),
    "loss_buckets": integer(min=1),
    "compile": boolean(),
    "channels_last": boolean(),
    "class_names": optional(list_of(string())),        # null: filled from the datamodule
    "prompts": optional(list_of(string())),
    # classifier-free guidance (src/diffusion/guidance.py: diffusers convention, 1 = none, 0 = unconditional)
    "p_uncond": probability(max_open=True).described_as("a number in [0, 1) (1 would drop every condition)"),
    "guidance.scale": non_negative(),
    "guidance.rescale": probability(),
    "guidance.interval": optional(sigma_interval()),
    "guidance.per_class": optional(mapping(non_negative())),
    # guidance methods (configs/guidance/*.yaml, merged into model.guidance; src/diffusion/guidance.py)
    "guidance.method": one_of(GUIDANCE_METHODS),
    "guidance.eta": number(),                                        # apg: weight of the parallel component
    "guidance.norm_threshold": non_negative(),                       # apg: 0 = no norm clipping
    "guidance.momentum": number(min=-1, max=1, min_open=True, max_open=True),   # apg: running-sum momentum
    "guidance.guide_ckpt": optional(existing_path()).described_as(
        "an existing checkpoint or export of the guide model (null unless guidance.method=autoguidance)"),
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
    "net.groups": integer(min=1),
    "net.head_dim": integer(min=1),
    "net.num_transformer_blocks": integer(min=0),
    "net.transformer_head_dim": integer(min=1),
    "net.mlp_ratio": positive(),
    "net.temporal_kernel": Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v % 2 == 1,
                                "an odd integer >= 1"),
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
    "net.sample_shape": list_of(integer(min=1), min_len=3),          # ${model.sample_shape}: from the datamodule
    "net.size": one_of(["T", "S", "B", "L", "XL"]),
    "net.num_heads": optional(integer(min=1)),
    "net.max_frames": integer(min=1),
    "net.attention": one_of(["factorised", "full"]),
    "net.pos_embed": one_of(["sincos", "rope"]),
    "net.text_mode": one_of(["cross", "joint"]),
    "net.fused_qkv": boolean(),
    "net.checkpoint_activations": boolean(),
    "net.compile_blocks": boolean(),
    "net.freq_dim": Rule(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2 and v % 2 == 0,
                         "an even integer >= 2"),
    # AutoencoderModule (model=kl_vae; src/lit_modules/autoencoder_module.py)
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
    if not isinstance(mults, list) or not mults:      # an empty list is reported by its own rule
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


def guidance_method_settings(model: dict):
    """What one guidance method needs of the shared keys: CFG++'s lambda (the scale, per-class scales too) in [0, 1],
    autoguidance's guide checkpoint, rescale only where the method has it (cfg, autoguidance)."""
    g = model.get("guidance") or {}
    method = g.get("method", "cfg")
    if method == "cfgpp":
        if isinstance(g.get("scale"), (int, float)) and not 0 <= g["scale"] <= 1:
            return "guidance.scale", "a number in [0, 1] with guidance.method=cfgpp (CFG++'s lambda, e.g. 0.6)"
        per_class = g.get("per_class") or {}
        if isinstance(per_class, dict) and any(isinstance(v, (int, float)) and v > 1 for v in per_class.values()):
            return "guidance.per_class", "scales in [0, 1] with guidance.method=cfgpp (CFG++'s lambda)"
    if method == "autoguidance" and not g.get("guide_ckpt"):
        return "guidance.guide_ckpt", "a checkpoint of the guide model with guidance.method=autoguidance"
    if method in ("cfgpp", "apg") and isinstance(g.get("rescale"), (int, float)) and g["rescale"] > 0:
        return "guidance.rescale", f"0 with guidance.method={method} (rescale belongs to cfg and autoguidance)"
    return None


CHECKS = [guidance_method_settings, levels_inside_channel_mults, vivit_heads_divide_width, dit_heads_divide_width,
          joint_text_needs_full_video_attention]
