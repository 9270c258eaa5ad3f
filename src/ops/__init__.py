"""Operations: DDP + multirun, W&B, SLURM requeue, exact resume, fine-tuning, safe atomic checkpoints, fault handling.

See ``src/ops/README.md`` for how to use each piece from the command line.
"""
