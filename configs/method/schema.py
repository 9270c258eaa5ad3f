"""Allowed values of the method group (configs/method/*.yaml: src/methods/), checked by difflab.config_checks before
a job starts. What a method needs of its settings together (a teacher, step counts a power of two apart, a grid
that nests, the student's sampler) its class states; the pre-flight builds it (config_checks.constructor_problems).
The rules that read other groups (the budget, the teacher's network) are train checks in configs/schema.py."""

from difflab.config_checks import (
    any_of,
    boolean,
    existing_path,
    integer,
    list_of,
    non_negative,
    number,
    optional,
    positive,
    probability,
    string,
)

RULES = {
    "teacher_ckpt": optional(existing_path()).described_as(
        "an existing checkpoint or export of the model to distil (a run's checkpoints/last.ckpt)"
    ),
    "teacher_steps": integer(min=2),
    "student_steps": integer(min=1),
    "steps_per_round": any_of(integer(min=1), list_of(integer(min=1), min_len=1)),
    "pairs_dir": string(nonempty=True),
    "num_pairs": integer(min=1),
    "pairs_seed": integer(min=0),
    "chunk": integer(min=1),
    "p_mean": number(),
    "p_std": positive(),
    "q": number(min=1, min_open=True),
    "k": non_negative(),
    "b": non_negative(),
    "double_every": integer(min=1),
    "huber_c": optional(non_negative()),
    "time_groups": integer(min=1),
    "tangent_c": positive(),
    "warmup_steps": integer(min=0),
    "adaptive_weighting": boolean(),
    "ratio": probability(),
    "adaptive_p": non_negative(),
    "adaptive_c": positive(),
    "kappa": probability(max_open=True),
    "guidance_scales": optional(list_of(non_negative(), length=2)),  # [lo, hi]: lo < hi, the constructor's rule
}
