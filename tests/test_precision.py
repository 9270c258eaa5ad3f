"""trainer.precision=auto and the hardware fallbacks, with the hardware detection mocked."""

from __future__ import annotations

import logging

import pytest
import torch

from difflab.ops import precision as prec
from difflab.ops.hardware import fit_accelerator
from tests.helpers import compose_train, tiny_overrides


def machine(monkeypatch, *, cuda: bool, gpu_native_bf16: bool = False, cpu_flags=(), arch="x86_64"):
    """Pretend to run on a machine with these properties."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)

    def is_bf16_supported(including_emulation: bool = True):
        return gpu_native_bf16 or (cuda and including_emulation)  # pre-Ampere GPUs report True with emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(prec, "cpu_flags", lambda: set(cpu_flags))
    monkeypatch.setattr(prec.platform, "machine", lambda: arch)


BIG, SMALL = 20_000_000, 740_000


@pytest.mark.parametrize(
    "case, expected",
    [
        (dict(cuda=True, gpu_native_bf16=True), "bf16-mixed"),  # A100 / H100
        (dict(cuda=True, gpu_native_bf16=False), "16-mixed"),  # V100 / T4: emulated bf16 is not asked for
        (dict(cuda=False, cpu_flags={"avx512f", "amx_bf16", "amx_tile"}), "bf16-mixed"),  # Sapphire Rapids
        (dict(cuda=False, cpu_flags={"avx512f", "avx512_bf16"}), "bf16-mixed"),  # Zen 4 / Cooper Lake
        (dict(cuda=False, cpu_flags={"avx2", "fma"}), "32-true"),  # no native bf16
        (dict(cuda=False, cpu_flags={"fp", "asimd", "bf16"}, arch="aarch64"), "bf16-mixed"),  # Graviton 3
        (dict(cuda=False, cpu_flags={"fp", "asimd"}, arch="aarch64"), "32-true"),
    ],
)
def test_auto_resolves_by_hardware_for_a_large_model(monkeypatch, case, expected):
    machine(monkeypatch, **case)
    assert prec.resolve_precision("auto", "auto", BIG) == expected


def test_auto_keeps_small_models_in_fp32_on_native_bf16_cpus(monkeypatch):
    machine(monkeypatch, cuda=False, cpu_flags={"avx512_bf16"})
    assert prec.resolve_precision("auto", "cpu", SMALL) == "32-true"
    assert prec.resolve_precision("auto", "cpu", prec.CPU_BF16_MIN_PARAMS) == "bf16-mixed"
    machine(monkeypatch, cuda=True, gpu_native_bf16=True)  # on a GPU the size does not matter
    assert prec.resolve_precision("auto", "gpu", SMALL) == "bf16-mixed"
    assert prec.resolve_precision("auto", "cpu", SMALL) == "32-true"  # accelerator=cpu on a GPU machine is the CPU


def test_explicit_bf16_falls_back_to_fp16_only_on_gpus_without_native_bf16(monkeypatch):
    machine(monkeypatch, cuda=True, gpu_native_bf16=False)
    assert prec.resolve_precision("bf16-mixed", "gpu") == "16-mixed"
    assert prec.resolve_precision("bf16-true", "auto") == "16-true"
    assert prec.resolve_precision("32-true", "gpu") == "32-true"
    machine(monkeypatch, cuda=True, gpu_native_bf16=True)
    assert prec.resolve_precision("bf16-mixed", "gpu") == "bf16-mixed"


def test_auto_choice_is_logged(monkeypatch, caplog):
    machine(monkeypatch, cuda=False, cpu_flags={"avx2"})
    with caplog.at_level(logging.INFO, logger=prec.__name__):
        prec.resolve_precision("auto", "cpu", BIG)
    assert "precision=auto -> 32-true (CPU without native bf16" in caplog.text


def test_gpu_recipe_on_a_cpu_only_machine_falls_back_with_one_warning(monkeypatch, caplog):
    machine(monkeypatch, cuda=False)
    with caplog.at_level(logging.WARNING):
        out = fit_accelerator({"accelerator": "gpu", "devices": -1, "strategy": "ddp", "sync_batchnorm": False})
    assert (out["accelerator"], out["devices"], out["strategy"]) == ("cpu", 1, "auto")
    assert "trainer=cpu" in caplog.text and len(caplog.records) == 1
    kept = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}
    assert fit_accelerator(kept) == kept
    machine(monkeypatch, cuda=True)
    on_gpu = {"accelerator": "gpu", "devices": 1, "strategy": "auto"}
    assert fit_accelerator(on_gpu) == on_gpu


def test_trainer_gpu_builds_a_cpu_trainer_without_a_gpu(tmp_path, monkeypatch):
    from difflab.pipeline import build

    machine(monkeypatch, cuda=False, cpu_flags={"avx2"})
    objs = build(compose_train(tmp_path, tiny_overrides(extra=["trainer=gpu", "logger=none"])))
    trainer = objs["trainer"]
    assert type(trainer.accelerator).__name__ == "CPUAccelerator" and trainer.precision == "32-true"
