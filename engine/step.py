"""What a training step is to the engine: a function and the state it mutates.

A ``Step`` is the unit that ``flashdistill.engine.capture`` turns into a replayable graph. ``fn`` runs one
whole update (forward, losses, backward, optimizer step) and returns a dict of detached device tensors
(the loss and metrics; no ``.item()``). Everything the update changes besides the parameters of
``optimizers`` is named in ``sources`` (the noise streams it advances) and ``state`` (EMA weights,
buffers), so that the engine can roll the warm-up iterations back and register the streams with a graph.

A ``Recipe`` is an ordered set of named steps and how often each runs (DMD2: the fake-score update every
iteration, the generator update every fifth). Recipes are built by ``flashdistill.engine.recipes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

import torch
from torch import Tensor, nn

__all__ = ["Step", "Recipe"]


@dataclass
class Step:
    """One update: ``fn(*batch) -> dict[str, Tensor]`` and the state it mutates.

    fn          runs forward, loss, backward and ``optimizer.step()``; no host synchronization
    optimizers  the optimizers ``fn`` steps (their parameters and state change)
    sources     the ``NoiseSource`` objects and ``torch.Generator`` objects ``fn`` draws from
    state       other modules or tensors ``fn`` changes in place (an EMA copy, normalization buffers)
    every       run at the iterations ``i`` with ``i % every == 0``
    """

    fn: Callable[..., dict]
    optimizers: tuple = ()
    sources: tuple = ()
    state: tuple = ()
    every: int = 1

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"Step: fn must be callable, got {type(self.fn).__name__}")
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ValueError(f"Step: every must be an int >= 1, got {self.every!r}")
        self.optimizers = tuple(self.optimizers)
        self.sources = tuple(self.sources)
        self.state = tuple(self.state)
        for opt in self.optimizers:
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"Step: optimizers must be torch.optim.Optimizer objects, got {type(opt).__name__}")
        for s in self.state:
            if not isinstance(s, (nn.Module, Tensor)):
                raise TypeError(f"Step: state holds modules or tensors, got {type(s).__name__}")

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


@dataclass
class Recipe:
    """Named steps in the order they run within one iteration.

    >>> for i, batch in enumerate(loader):
    ...     for name in recipe.due(i):
    ...         metrics = steps[name](*batch)      # steps[name] = capture(recipe.steps[name], *batch)
    """

    name: str
    steps: dict = field(default_factory=dict)

    def due(self, iteration: int) -> list:
        """The names of the steps that run at ``iteration`` (0-based), in order."""
        return [name for name, step in self.steps.items() if iteration % step.every == 0]

    def __getitem__(self, name: str) -> Step:
        return self.steps[name]
