"""Allowed values of the method group (configs/method/*.yaml: src/methods/), checked by difflab.config_checks before
a job starts. What a method needs of its settings together (a teacher, step counts a power of two apart, a grid
that nests, the student's sampler) its class states; the pre-flight builds it (config_checks.constructor_problems).
The rules that read other groups (the budget, the teacher's network) are train checks in configs/schema.py."""

from difflab.config_checks import existing_path, integer, optional

RULES = {
    "teacher_ckpt": optional(existing_path()).described_as(
        "an existing checkpoint or export of the model to distil (a run's checkpoints/last.ckpt)"
    ),
    "teacher_steps": integer(min=2),
    "student_steps": integer(min=1),
    "steps_per_round": integer(min=1),
}
