"""How the current timesteps reach the int8 modules: a small context object per model,
filled by hooks on the model's forward.

The int8 modules need, for each sample of their input, the model's original timestep
(0..num_timesteps-1) to pick a row of their activation-scale table. A forward pre-hook
on the model reads its timestep argument (``t`` for DiT, ``timesteps`` for U-ViT,
positional or keyword) into ``TimestepContext.t`` and a forward hook clears it. The
timesteps stay per sample, so a batch may mix them: classifier-free guidance batches
[cond; uncond] with t repeated, a sampler may batch several steps.

DiT's ``forward_with_cfg`` calls ``self.forward`` directly, bypassing the model's hooks,
so a model with a ``t_embedder`` module (DiT-style) also gets a pre-hook there, which
receives the same t on every path into the network.
"""

import inspect
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

# Names models give their timestep argument.
TIMESTEP_ARGS = ("t", "timesteps", "timestep")


class TimestepContext:
    """The timesteps of the forward pass in flight, shared by one model's int8 modules.

    ``t``: int64 [B], or None outside a forward. A plain object, not a module: it holds
    nothing worth saving, and the modules' tables are indexed by ``t`` at call time.
    """

    def __init__(self):
        self.t: Optional[Tensor] = None
        self.handles = []

    def set(self, t) -> None:
        t = torch.as_tensor(t)
        if t.is_floating_point():
            # Samplers pass integer timesteps; fractional ones use the nearest table row.
            t = t.round()
        self.t = t.to(torch.int64).reshape(-1)

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _timestep_position(model: nn.Module):
    """(index among positional arguments after self, name) of the model's timestep
    argument."""
    params = list(inspect.signature(model.forward).parameters.values())
    for i, p in enumerate(params):
        if p.name in TIMESTEP_ARGS:
            return i, p.name
    raise ValueError(f"{type(model).__name__}.forward has no timestep argument (one of "
                     f"{TIMESTEP_ARGS}); its int8 modules cannot find their timesteps")


class _ReadTimesteps:
    """Forward pre-hook (with kwargs) copying the model's timestep argument into the
    context. Hooks are small classes, not closures, so that copy.deepcopy of a
    quantized model hooks the copy to the copy's context, and pickling works."""

    def __init__(self, context: TimestepContext, index: int, name: str):
        self.context, self.index, self.name = context, index, name

    def __call__(self, module, args, kwargs):
        if self.name in kwargs:
            self.context.set(kwargs[self.name])
        elif len(args) > self.index:
            self.context.set(args[self.index])
        else:
            raise ValueError(f"{type(module).__name__} was called without its timestep "
                             f"argument {self.name!r}")


class _ReadEmbedderInput:
    """Forward pre-hook on a timestep embedder, whose first argument is t."""

    def __init__(self, context: TimestepContext):
        self.context = context

    def __call__(self, module, args):
        self.context.set(args[0])


class _ClearTimesteps:
    """Forward hook that forgets the timesteps once the model's forward is done."""

    def __init__(self, context: TimestepContext):
        self.context = context

    def __call__(self, module, args, kwargs, output):
        self.context.t = None


def attach_timestep_context(model: nn.Module, context: TimestepContext) -> None:
    """Register the hooks that keep ``context.t`` equal to the timesteps of the model's
    forward in flight (see the module docstring)."""
    index, name = _timestep_position(model)
    context.handles.append(model.register_forward_pre_hook(
        _ReadTimesteps(context, index, name), with_kwargs=True))
    context.handles.append(model.register_forward_hook(
        _ClearTimesteps(context), with_kwargs=True, always_call=True))
    embedder = getattr(model, "t_embedder", None)
    if isinstance(embedder, nn.Module):
        context.handles.append(embedder.register_forward_pre_hook(_ReadEmbedderInput(context)))
