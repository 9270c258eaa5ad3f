"""SLURM integration: one requeue signal shared by SLURM/submitit, Lightning and difflab's ``GracefulShutdown``.

submitit asks SLURM for ``--signal=USR2@<signal_delay_s>`` and handles SIGUSR2 itself (it requeues without saving a
Lightning checkpoint); Lightning's ``SLURMEnvironment`` would register its own requeue handler on SIGUSR1 only if no
handler is set, and silently does nothing under submitit (Lightning#14610). difflab therefore agrees on SIGUSR2:
Lightning's SLURM requeue is switched off (``auto_requeue=False``), ``GracefulShutdown`` saves ``last.ckpt`` on
SIGUSR2 and then hands over to submitit's handler, which requeues; the requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import signal

from lightning.fabric.plugins.environments import SLURMEnvironment

REQUEUE_SIGNAL = signal.SIGUSR2


def cluster_plugins(requeue_signal: signal.Signals | None = REQUEUE_SIGNAL, handled_elsewhere: bool = True) -> list:
    """Trainer plugins for the cluster we run on: on SLURM an environment whose requeue signal is the agreed one,
    with Lightning's own requeue handler off when ``GracefulShutdown`` handles it. Empty elsewhere."""
    if not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=not handled_elsewhere, requeue_signal=requeue_signal or REQUEUE_SIGNAL)]
