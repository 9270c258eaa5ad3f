"""Allowed values of the model group (configs/model/*.yaml): the DiffusionModule options with their UNet2D / UNet3D /
ViViT denoisers, and the AutoencoderModule (model=kl_vae). Checked by difflab.config_checks before a job starts; a
rule applies only when its key is present (each option has its own keys)."""
from difflab.config_checks import (Rule, boolean, integer, list_of, mapping, non_negative, number, one_of, optional,
                                   positive, probability, sigma_interval, string)

LEVELS = list_of(integer(min=0))
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
    # denoisers (src/models/unet2d.py, unet3d.py, vivit.py)
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
    "net.hidden_dim": integer(min=1),
    "net.depth": integer(min=1),
    "net.cross_attention_every": integer(min=1),
    "net.input_residual": boolean(),
    "net.learn_output_scale": boolean(),
    "net.output_scale_init": number(),
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


CHECKS = [levels_inside_channel_mults, vivit_heads_divide_width]
