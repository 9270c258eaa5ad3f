"""How sampling code reaches the EMA weights during training, whatever the strategy and the callback order.

The contract: a callback that averages weights sets ``provides_ema_weights = True`` and implements
``prepare_weights(trainer, pl_module)`` (bring the average up to date for this step; a collective under sharding),
``average_module(pl_module)`` (the module holding the EMA weights), ``whole_copies(pl_module)`` and
``load_full_state(...)``. ``ema_provider`` finds it: the first callback of the trainer that says so.

A callback that samples from the EMA weights sets ``samples_ema_weights = True`` and, on every rank at the same point,
enters ``ema_weights(trainer, pl_module)`` (or calls ``prepare_ema_weights`` and later ``ema_module``). Under FSDP
entering is a collective: every rank helps gather the sharded average, whichever ranks then draw.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Protocol

from difflab.utils.errors import ConfigError


class EMAWeightsProvider(Protocol):
    """What a weight-averaging callback offers to the code that samples from it."""

    provides_ema_weights: bool

    def prepare_weights(self, trainer: Any, pl_module: Any) -> None: ...

    def average_module(self, pl_module: Any) -> Any: ...

    def whole_copies(self, pl_module: Any) -> dict[str, Any]: ...

    def load_full_state(
        self, state_dict: dict, strict: bool = True, source: str = "", num_updates: int | None = None
    ) -> None: ...


def ema_provider(trainer: Any) -> EMAWeightsProvider | None:
    """The trainer's callback that provides EMA weights (``provides_ema_weights``), if any."""
    return next((cb for cb in getattr(trainer, "callbacks", ()) if getattr(cb, "provides_ema_weights", False)), None)


def prepare_ema_weights(trainer: Any, pl_module: Any) -> None:
    """Bring the EMA weights up to date for this step (under FSDP: gather them); every rank calls it together."""
    provider = ema_provider(trainer)
    if provider is not None:
        provider.prepare_weights(trainer, pl_module)


def ema_module(trainer: Any, pl_module: Any) -> Any:
    """The module holding the EMA weights to sample from (``pl_module`` itself when EMA is off)."""
    provider = ema_provider(trainer)
    return pl_module if provider is None else provider.average_module(pl_module)


@contextmanager
def ema_weights(trainer: Any, pl_module: Any) -> Iterator[Any]:
    """``with ema_weights(trainer, pl_module) as module:`` sample from the EMA weights; enter it on every rank."""
    prepare_ema_weights(trainer, pl_module)
    yield ema_module(trainer, pl_module)


def check_sampling_has_ema(trainer: Any, why: str) -> None:
    """Refuse sampling callbacks without an EMA provider where only the provider can give them whole weights."""
    samplers = [cb for cb in getattr(trainer, "callbacks", ()) if getattr(cb, "samples_ema_weights", False)]
    if samplers and ema_provider(trainer) is None:
        names = ", ".join(sorted({type(cb).__name__ for cb in samplers}))
        raise ConfigError(
            f"{why}: {names} sample from the whole model, which only the EMA callback gathers: keep "
            "callbacks.ema (decay=0 follows the raw weights) or remove those callbacks"
        )
