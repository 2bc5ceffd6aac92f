"""The activation sharding-constraint hook.

Models call `constrain(x, ("batch", "seq", "embed"))` to say how an activation should be laid
out, without importing `parallel/`. Until `parallel/` installs a mesh (with `use_constraint`),
it is the identity, so the same model code runs on one device untouched.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

Axes = tuple[str | None, ...]
ConstraintFn = Callable[[torch.Tensor, Axes], torch.Tensor]

_active: ConstraintFn | None = None


def constrain(x: torch.Tensor, axes: Axes) -> torch.Tensor:
    """Pin activation `x` to the layout its logical `axes` map to (identity without a mesh)."""
    return x if _active is None else _active(x, axes)


@contextlib.contextmanager
def use_constraint(fn: ConstraintFn | None) -> Iterator[None]:
    global _active
    previous, _active = _active, fn
    try:
        yield
    finally:
        _active = previous
