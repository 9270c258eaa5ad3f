"""``optimizer=muon``: torch's Muon on the 2-D weight matrices and AdamW on every other parameter, as one optimizer.

Muon orthogonalises the momentum of a weight matrix (Newton-Schulz), which is defined only for 2-D parameters;
torch's documentation gives the rest (biases, norms, convolution kernels, embeddings' gains) to a standard method.
``adjust_lr_fn="match_rms_adamw"`` (Moonshot's scaling) lets Muon reuse AdamW's learning rate and weight decay.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any, Callable, Iterable, Sequence

import torch


class _RoutedState(MutableMapping):
    """The two inner optimizers' ``state`` seen as one mapping (writes go to the optimizer that owns the key)."""

    def __init__(self, *owners: tuple[set[int], torch.optim.Optimizer]):
        self.owners = owners

    def _map(self, key) -> dict:
        for ids, optimizer in self.owners:
            if id(key) in ids:
                return optimizer.state
        raise KeyError(key)

    def __getitem__(self, key):
        return self._map(key)[key]

    def __setitem__(self, key, value) -> None:
        self._map(key)[key] = value

    def __delitem__(self, key) -> None:
        del self._map(key)[key]

    def __iter__(self) -> Iterator:
        for _, optimizer in self.owners:
            yield from optimizer.state

    def __len__(self) -> int:
        return sum(len(optimizer.state) for _, optimizer in self.owners)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for 2-D weights, AdamW for the rest; one ``param_groups`` list so LR schedules scale both."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = "match_rms_adamw",
        adamw_lr: float | None = None,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
    ):
        params = [p for p in params if p.requires_grad]
        matrices = [p for p in params if p.ndim == 2]
        rest = [p for p in params if p.ndim != 2]
        if not matrices:
            raise ValueError("optimizer=muon found no 2-D weight to orthogonalise; use optimizer=adamw")
        super().__init__(params, {"lr": lr})
        self.muon = torch.optim.Muon(
            matrices,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        self.adamw = torch.optim.AdamW(
            rest or [torch.zeros(0, requires_grad=True)],
            lr=lr if adamw_lr is None else adamw_lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay if adamw_weight_decay is None else adamw_weight_decay,
        )
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self.state = _RoutedState(
            ({id(p) for p in matrices}, self.muon),
            ({id(p) for g in self.adamw.param_groups for p in g["params"]}, self.adamw),
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One step of both optimizers (the closure, if any, runs once with gradients on)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
