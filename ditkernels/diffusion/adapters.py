"""One small interface between the samplers/losses and any denoising model.

A denoiser is called as ``denoiser(x_t, t, y)``: x_t [B, C, H, W], t [B] holding
the original timesteps (int64 0..999 even after respacing; float and fractional from
the continuous-time samplers: DPM-Solver's N t - 1, flow matching's 1000 t), y int64
[B] labels or None for an unconditional model. It returns eps [B, C, H, W] (the
velocity under flow matching), or [eps | v] with 2C channels when it learns the
variance (learn_sigma). The adapter also says whether the model is
class-conditional and which label index is its null class for classifier-free
guidance.

DiT and DiffiT (forward(x, t, y), attributes in_channels / learn_sigma / y_embedder),
DiffiTUNet and unconditional U-ViT adapt with ``as_denoiser(model)``. A U-ViT trained
for guidance counts its null class in num_classes (1001 = 1000 classes + null id
1000), which its attributes cannot tell apart from 1001 real classes: pass
``as_denoiser(uvit, num_classes=1000, null_class=1000)``. Models with other call
signatures pass ``forward=`` (a lambda) and the metadata explicitly.

A text-conditioned model called as model(x, t, context=...) (UViTT2I) adapts with
``as_denoiser(model, context=prompts, null_context=empty)``: the labels y then pick
rows of the encoded prompts [P, L, D], and the null class P conditions on the
encoding of the empty prompt [L, D], so the samplers' labels and classifier-free
guidance work unchanged.
"""

import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import Tensor

_UNSET: Any = object()


@dataclasses.dataclass(frozen=True)
class DiffusionModelAdapter:
    """A model plus what the samplers need to know about it.

    forward: (x_t, t, y_or_None) -> output. in_channels: C of x_t (None skips the
    shape checks). learn_sigma: output has 2C channels, eps first. num_classes: 0
    for an unconditional model. null_class: the label meaning "no class" (the extra
    embedding row a model trained with label dropout has), None when it has none;
    classifier-free guidance needs it.
    """

    forward: Callable[[Tensor, Tensor, Optional[Tensor]], Tensor] = dataclasses.field(repr=False)
    in_channels: Optional[int] = None
    learn_sigma: bool = False
    num_classes: int = 0
    null_class: Optional[int] = None

    def __post_init__(self):
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.null_class is not None and self.num_classes == 0:
            raise ValueError("an unconditional model (num_classes=0) has no null class")

    @property
    def class_conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def supports_cfg(self) -> bool:
        return self.null_class is not None

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        if self.class_conditional and y is None:
            raise ValueError("this model is class-conditional: pass labels y (its null class "
                             f"{self.null_class} samples unconditionally, if it has one)")
        if not self.class_conditional and y is not None:
            raise ValueError("this model is unconditional but was given labels y")
        if self.in_channels is not None and x.shape[1] != self.in_channels:
            raise ValueError(f"model expects {self.in_channels} input channels, got x of shape "
                             f"{tuple(x.shape)}")
        out = self.forward(x, t, y)
        if self.in_channels is not None:
            expected = self.in_channels * (2 if self.learn_sigma else 1)
            if out.shape[1] != expected:
                raise ValueError(f"model output has {out.shape[1]} channels, expected "
                                 f"{expected} (in_channels={self.in_channels}, "
                                 f"learn_sigma={self.learn_sigma})")
        return out


def _num_classes(model) -> int:
    n = getattr(model, "num_classes", None)
    if n is None:
        n = getattr(getattr(model, "y_embedder", None), "num_classes", None)
    # U-ViT marks an unconditional model with num_classes = -1.
    return max(0, int(n or 0))


def _in_channels(model) -> Optional[int]:
    return getattr(model, "in_channels", getattr(model, "in_chans", None))


def _learn_sigma(model, in_channels: Optional[int]) -> bool:
    if hasattr(model, "learn_sigma"):
        return bool(model.learn_sigma)
    out_channels = getattr(model, "out_channels", None)
    return in_channels is not None and out_channels == 2 * in_channels


def _null_class(model, num_classes: int) -> Optional[int]:
    """num_classes when the label table has the extra row that label dropout trains."""
    if num_classes == 0:
        return None
    embedder = getattr(model, "y_embedder", None)
    table = getattr(embedder, "embedding_table", None)
    if table is not None:
        return num_classes if table.num_embeddings > num_classes else None
    dropout = getattr(model, "class_dropout_prob", getattr(embedder, "dropout_prob", 0.0))
    return num_classes if dropout and dropout > 0 else None


def _context_forward(model, context: Tensor, null_context: Optional[Tensor]) -> Callable:
    """(x, t, y) -> model(x, t, context=table[y]), table = the prompts' encodings, then
    the empty prompt's when given."""
    if isinstance(model, DiffusionModelAdapter):
        raise ValueError("context= binds the text of a model called as model(x, t, "
                         "context=...): pass the model itself, not an adapter")
    if context.dim() != 3 or context.shape[0] == 0 or not context.is_floating_point():
        raise ValueError(f"context must be the floating text-encoder output of P >= 1 "
                         f"prompts, [P, L, D], got {context.dtype} of shape "
                         f"{tuple(context.shape)}")
    table = context
    if null_context is not None:
        if tuple(null_context.shape) != tuple(context.shape[1:]):
            raise ValueError(f"null_context must be one encoded prompt of shape "
                             f"{tuple(context.shape[1:])} (context is {tuple(context.shape)}), "
                             f"got shape {tuple(null_context.shape)}")
        table = torch.cat([context, null_context.to(context)[None]])

    def forward(x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
        return model(x, t, context=table.to(x.device)[y])

    return forward


def as_denoiser(model, *, forward: Optional[Callable] = None, in_channels: Any = _UNSET,
                learn_sigma: Any = _UNSET, num_classes: Any = _UNSET,
                null_class: Any = _UNSET, context: Optional[Tensor] = None,
                null_context: Optional[Tensor] = None) -> DiffusionModelAdapter:
    """Adapt ``model`` to the denoiser interface; keyword arguments override what is read.

    Read from the model when not given: in_channels (or in_chans), learn_sigma (or
    out_channels == 2 * in_channels), num_classes (attribute, or y_embedder.num_classes;
    <= 0 is unconditional) and the null class (num_classes when the label embedding
    table has num_classes + 1 rows, as DiT's does with class_dropout_prob > 0).
    forward defaults to calling model(x, t, y). An adapter passed in is returned as
    is, or copied with the overrides.

    context [P, L, D] (text-conditioned models, called as model(x, t, context=...)):
    label i conditions on context[i], so num_classes is P; null_context [L, D], the
    encoding of the empty prompt, is the null class P for classifier-free guidance.
    Given with forward, num_classes or null_class, which it sets, it is an error.
    """
    given = {k: v for k, v in dict(forward=forward, in_channels=in_channels,
                                   learn_sigma=learn_sigma, num_classes=num_classes,
                                   null_class=null_class).items()
             if v is not _UNSET and not (k == "forward" and v is None)}
    if context is None and null_context is not None:
        raise ValueError("null_context needs context, the encoded prompts")
    if context is not None:
        if given.keys() & {"forward", "num_classes", "null_class"}:
            raise ValueError("context= sets forward, num_classes and null_class: do not pass "
                             "them as well")
        given["forward"] = _context_forward(model, context, null_context)
        prompts = context.shape[0]
        given.update(num_classes=prompts, null_class=None if null_context is None else prompts)
    if isinstance(model, DiffusionModelAdapter):
        return dataclasses.replace(model, **given) if given else model
    if not callable(model) and forward is None:
        raise TypeError(f"cannot adapt {type(model).__name__}: it is not callable")
    n = given.get("num_classes", _num_classes(model))
    channels = given.get("in_channels", _in_channels(model))
    return DiffusionModelAdapter(
        forward=given.get("forward", model),
        in_channels=channels,
        learn_sigma=bool(given.get("learn_sigma", _learn_sigma(model, channels))),
        num_classes=n,
        null_class=given.get("null_class", _null_class(model, n)),
    )
