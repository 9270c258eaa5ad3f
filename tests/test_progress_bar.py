"""The progress bar says how far the run is through its budget (steps, wall-clock) instead of `Epoch 0/-2`."""

from __future__ import annotations

from types import SimpleNamespace

from lightning.pytorch.callbacks import Timer

from difflab.callbacks.progress import BudgetProgressBar, budget_text


class FakeTimer(Timer):
    """A Timer at a fixed point of its budget."""

    def __init__(self, elapsed: float, remaining: float | None):
        super().__init__()
        self.elapsed, self.remaining = elapsed, remaining

    def time_elapsed(self, stage="train"):
        return self.elapsed

    def time_remaining(self, stage="train"):
        return self.remaining


def trainer(max_epochs=-1, max_steps=-1, callbacks=()):
    return SimpleNamespace(
        max_epochs=max_epochs, max_steps=max_steps, current_epoch=3, global_step=120, callbacks=list(callbacks)
    )


def test_budget_text_names_each_bound_and_no_negative_epoch():
    assert budget_text(trainer(max_steps=2000)) == "Epoch 3 · step 120/2000"
    assert (
        budget_text(trainer(max_steps=2000, callbacks=[FakeTimer(83.4, 276.6)]))
        == "Epoch 3 · step 120/2000 · 0:01:23/0:06:00"
    )
    assert budget_text(trainer(callbacks=[FakeTimer(83, None)])) == "Epoch 3 · step 120 · 0:01:23"
    assert budget_text(trainer(max_epochs=10)) == "Epoch 3/9 · step 120"


def test_the_bar_of_a_time_budgeted_run_shows_steps_and_time(tmp_path):
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    bar = BudgetProgressBar()
    fit = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=-1,
        max_steps=3,
        max_time="00:00:05:00",
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    fit.fit(BoringModel())
    label = bar.progress.tasks[bar.train_progress_bar_id].description
    assert label.startswith("Epoch 0 · step 3/3 · 0:00:0") and label.endswith("/0:05:00") and "-2" not in label
