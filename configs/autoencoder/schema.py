"""Allowed values of the autoencoder group (configs/autoencoder/*.yaml: difflab's KL autoencoder or a diffusers
AutoencoderKL), checked by difflab.config_checks before a job starts."""

from difflab.config_checks import boolean, existing_file, integer, list_of, optional, positive, probability, string

RULES = {
    # kl_vae (src/autoencoders/kl_vae.py)
    "in_channels": integer(min=1),
    "latent_channels": integer(min=1),
    "base_channels": integer(min=1),
    "channel_mults": list_of(integer(min=1), min_len=1),
    "num_res_blocks": integer(min=0),
    "norm_groups": integer(min=1),
    "mid_attention": boolean(),
    "dropout": probability(),
    "ckpt_path": optional(existing_file()).described_as("an existing autoencoder checkpoint (*.ckpt) or null"),
    # diffusers_kl (src/autoencoders/diffusers_kl.py)
    "pretrained": string(nonempty=True).described_as("a Hub id or a local save_pretrained directory"),
    "subfolder": optional(string()),
    "scaling_factor": optional(positive()),
    "local_files_only": boolean(),
}
