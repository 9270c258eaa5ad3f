"""The embedded digits data and the repo's digit classifier."""

import torch

from difflab.datamodules.digits import DigitsDataModule, load_digits_tensors
from difflab.eval.digit_classifier import judge


def test_digits_datamodule_batches():
    dm = DigitsDataModule(image_size=16, batch_size=32)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (32, 1, 16, 16) and batch["x"].dtype == torch.float32
    assert batch["x"].min() >= -1 and batch["x"].max() <= 1 and batch["x"].min() < -0.9
    assert batch["label"].dtype == torch.int64 and set(batch["label"].tolist()) <= set(range(10))
    assert len(dm.train_set) + len(dm.val_set) == 1797 and len(dm.val_set) == 180
    assert dm.sample_shape == (1, 16, 16) and dm.num_classes == 10 and dm.prompts[3] == "a handwritten digit three"


def test_classifier_recognises_real_validation_digits_and_not_noise():
    x, y = load_digits_tensors(16)
    from difflab.datamodules.digits import split_indices

    _, va = split_indices(len(x), 0.1, 0)
    assert judge(x[va], y[va])["accuracy"] > 0.97
    noise = torch.rand(200, 1, 16, 16) * 2 - 1
    assert judge(noise, torch.zeros(200, dtype=torch.long))["accuracy"] < 0.5
