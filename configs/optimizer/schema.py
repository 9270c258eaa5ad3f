"""Allowed values of the optimizer group (configs/optimizer/*.yaml: torch.optim classes and src/optim/muon.py),
checked by difflab.config_checks before a job starts."""

from difflab.config_checks import adam_betas, boolean, integer, non_negative, number, one_of, optional

RULES = {
    "betas": adam_betas(),
    "weight_decay": non_negative(),
    "eps": non_negative(),
    "momentum": number(min=0, max=1, max_open=True),
    "nesterov": boolean(),
    "ns_steps": integer(min=1),  # muon: Newton-Schulz iterations
    "adjust_lr_fn": optional(one_of(["original", "match_rms_adamw"])),  # muon: torch.optim.Muon's choices
    "adamw_lr": optional(non_negative()),
    "adamw_weight_decay": optional(non_negative()),
}
