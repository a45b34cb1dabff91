"""Optimizers over stacked client tensors: which are exact, and a step that leaves finished clients alone."""

from __future__ import annotations

import torch

from fedpeft_pl.errors import ConfigError

__all__ = ["ELEMENTWISE_OPTIMIZERS", "check_optimizer", "masked_step"]

# Optimizers whose update of each element depends only on that element's own gradient and state,
# and whose only non-elementwise state is a step count; for these, one optimizer over stacked rows
# is exactly one optimizer per row.
ELEMENTWISE_OPTIMIZERS: tuple[type, ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
)


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer whose stacked form would not equal one optimizer per client."""
    if type(optimizer) not in ELEMENTWISE_OPTIMIZERS:
        names = ", ".join(cls.__name__ for cls in ELEMENTWISE_OPTIMIZERS)
        raise ConfigError(
            f"the vectorised client runner needs an elementwise optimizer ({names}), got {type(optimizer).__name__}; "
            "use trainer.client_runner: sequential"
        )


@torch.no_grad()
def masked_step(optimizer: torch.optim.Optimizer, stacked: list[torch.Tensor], active: list[bool]) -> None:
    """``optimizer.step()``, then the rows of inactive clients (parameters and state) put back."""
    if all(active):
        optimizer.step()
        return
    if not any(active):
        return

    def rows(t: torch.Tensor) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == len(active)

    mask = torch.tensor(active, device=stacked[0].device)
    saved_params = [p.detach().clone() for p in stacked]
    saved_state = [{k: v.clone() for k, v in optimizer.state[p].items() if rows(v)} for p in stacked]
    optimizer.step()
    for p, old, state in zip(stacked, saved_params, saved_state):
        keep = mask.view(-1, *([1] * (p.dim() - 1)))
        p.copy_(torch.where(keep, p, old))
        for key, value in optimizer.state[p].items():
            if not rows(value):
                continue
            before = state.get(key, torch.zeros_like(value))
            value.copy_(torch.where(keep, value, before))
