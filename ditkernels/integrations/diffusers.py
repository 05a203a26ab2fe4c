"""Fused adaLN steps inside diffusers' transformer blocks, patched in place.

patch_diffusers swaps the forward of each supported block for one that computes the
same thing with ditkernels' ops: every LayerNorm + modulate becomes one ln_modulate,
and every residual add followed by a LayerNorm of the same block becomes one
gated_residual_ln_modulate. A block's last residual stays one addcmul: the norm after
it belongs to the next block, which the model's loop (and diffusers' caches and
checkpointing) calls separately.
Everything else (timestep and label embeddings, the modulation Linears, attention
through the block's own processor, feed-forwards) is still diffusers' own module code,
called as diffusers calls it, so diffusers' numerics are kept.

The blocks keep their class (diffusers' cache hooks look blocks up by class, and read
argument positions from the class's forward signature, which the patched forwards
share), their parameters, buffers and state_dict. The forward is an attribute of the
instance, so deepcopy carries it, gradient checkpointing and torch.compile see it, and
hooks registered afterwards (FirstBlockCache, accelerate's offload hooks) wrap it.

The forwards mirror diffusers 0.42's; a block whose class forward no longer takes the
arguments they mirror is left alone with a warning rather than patched with a guess.

Mixed precision: under autocast the residual stream may be fp32 while Linear and
attention outputs are bf16/fp16. The fused ops take one dtype, so modulation vectors,
norm affines and branch outputs are cast to the residual stream's dtype first, as
ditkernels.nn.DiTBlock does (eager promotes them to it at the same place).
"""

import inspect
import types
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
from diffusers.models.normalization import (AdaLayerNormContinuous, AdaLayerNormZero,
                                            AdaLayerNormZeroSingle, SD35AdaLayerNormZeroX)
from diffusers.models.transformers.transformer_flux import (FluxSingleTransformerBlock,
                                                            FluxTransformerBlock)

from ..ops import gated_residual_ln_modulate, ln_modulate


def _like(t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    return None if t is None else t.to(x.dtype)


def _per_sample(t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """A [B, C] (or broadcastable [1, C]) modulation vector as the [B, C] the fused ops
    take, in x's dtype; eager diffusers broadcasts a batch-1 conditioning the same way."""
    return None if t is None else t.to(x.dtype).expand(x.shape[0], -1)


def _norm_modulate(norm: nn.LayerNorm, x: Tensor, shift: Optional[Tensor],
                   scale: Optional[Tensor]) -> Tensor:
    """norm(x) * (1 + scale[:, None]) + shift[:, None] (or plain norm(x) for None) in one
    op, with norm's own eps and affine parameters."""
    return ln_modulate(x, _per_sample(shift, x), _per_sample(scale, x), norm.eps,
                       _like(norm.weight, x), _like(norm.bias, x))


def _residual_norm_modulate(norm: nn.LayerNorm, x: Tensor, h: Tensor, gate: Optional[Tensor],
                            shift: Optional[Tensor], scale: Optional[Tensor]
                            ) -> Tuple[Tensor, Tensor]:
    """(x + gate[:, None] * h, _norm_modulate(norm, that, shift, scale)) in one op; an
    ungated residual for gate None."""
    return gated_residual_ln_modulate(x, h.to(x.dtype), _per_sample(gate, x),
                                      _per_sample(shift, x), _per_sample(scale, x), norm.eps,
                                      _like(norm.weight, x), _like(norm.bias, x))


def _gated_residual(x: Tensor, gate: Tensor, h: Tensor) -> Tensor:
    """x + gate[:, None] * h, for the residuals no norm follows inside the block."""
    return torch.addcmul(x, gate.to(x.dtype).unsqueeze(1), h.to(x.dtype))


def _modulation(ada: nn.Module, emb: Tensor, chunks: int,
                dtype: torch.dtype) -> Tuple[Tensor, ...]:
    """The chunks of an AdaLayerNormZero-style ada.linear(ada.silu(emb)), each [B, D]."""
    return ada.linear(ada.silu(emb)).to(dtype).chunk(chunks, dim=1)


def _feed_forward(block: nn.Module, ff: nn.Module, y: Tensor) -> Tensor:
    """ff(y), in chunks where the block was set to chunk its feed-forward (as diffusers'
    _chunked_feed_forward, whose error message for sizes that do not divide it keeps)."""
    chunk_size = getattr(block, "_chunk_size", None)
    if chunk_size is None:
        return ff(y)
    dim = block._chunk_dim
    if y.shape[dim] % chunk_size:
        raise ValueError(f"`hidden_states` dimension to be chunked: {y.shape[dim]} has to be "
                         f"divisible by chunk size: {chunk_size}. Make sure to set an "
                         f"appropriate `chunk_size` when calling `unet.enable_forward_chunking`.")
    return torch.cat([ff(part) for part in y.chunk(y.shape[dim] // chunk_size, dim=dim)],
                     dim=dim)


def _ada_continuous(norm: AdaLayerNormContinuous, x: Tensor, conditioning: Tensor) -> Tensor:
    # diffusers chunks this projection (scale, shift), the reverse of adaLN-Zero's order.
    emb = norm.linear(norm.silu(conditioning).to(x.dtype))
    scale, shift = emb.to(x.dtype).chunk(2, dim=1)
    return _norm_modulate(norm.norm, x, shift, scale)


# ---------------------------------------------------------------------------
# patched forwards (same signatures as the classes' own, which diffusers' hooks read)
# ---------------------------------------------------------------------------


def _ada_layer_norm_continuous_forward(self, x: Tensor, conditioning_embedding: Tensor) -> Tensor:
    return _ada_continuous(self, x, conditioning_embedding)


def _basic_transformer_block_forward(
        self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
        encoder_hidden_states: Optional[Tensor] = None,
        encoder_attention_mask: Optional[Tensor] = None, timestep: Optional[Tensor] = None,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        class_labels: Optional[Tensor] = None,
        added_cond_kwargs: Optional[Dict[str, Tensor]] = None) -> Tensor:
    """BasicTransformerBlock with norm_type "ada_norm_zero" (DiT) or "ada_norm_single"
    (PixArt), without positional embeddings or a GLIGEN fuser (checked when patching)."""
    x = hidden_states
    if self.norm_type == "ada_norm_zero":
        emb = self.norm1.emb(timestep, class_labels, hidden_dtype=x.dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(
            self.norm1, emb, 6, x.dtype)
        y = _norm_modulate(self.norm1.norm, x, shift_msa, scale_msa)
        mlp_norm = self.norm3
    else:
        # PixArt: the model's adaln_single already projected the timestep to [B, 6D].
        modulation = self.scale_shift_table[None] + timestep.reshape(x.shape[0], 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            modulation.to(x.dtype).unbind(1))
        y = _norm_modulate(self.norm1, x, shift_msa, scale_msa)
        mlp_norm = self.norm2

    cross_attention_kwargs = dict(cross_attention_kwargs or {})
    if cross_attention_kwargs.pop("gligen", None) is not None:
        raise ValueError("patched BasicTransformerBlock: cross_attention_kwargs['gligen'] was "
                         "given, but the block has no GLIGEN fuser")
    attn_output = self.attn1(
        y, encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
        attention_mask=attention_mask, **cross_attention_kwargs)
    if self.attn2 is not None:
        if self.norm_type == "ada_norm_zero":
            x, y = _residual_norm_modulate(self.norm2, x, attn_output, gate_msa, None, None)
        else:  # PixArt's cross-attention reads the residual stream itself, un-normalised.
            x = y = _gated_residual(x, gate_msa, attn_output)
        attn_output = self.attn2(y, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=encoder_attention_mask, **cross_attention_kwargs)
        gate_msa = None  # the cross-attention residual is ungated
    x, y = _residual_norm_modulate(mlp_norm, x, attn_output, gate_msa, shift_mlp, scale_mlp)
    return _gated_residual(x, gate_mlp, _feed_forward(self, self.ff, y))


def _joint_transformer_block_forward(
        self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
        joint_attention_kwargs: Optional[Dict[str, Any]] = None
        ) -> Tuple[Optional[Tensor], Tensor]:
    """SD3's JointTransformerBlock, with SD3.5's dual attention and the context_pre_only
    last block."""
    joint_attention_kwargs = joint_attention_kwargs or {}
    x, context = hidden_states, encoder_hidden_states
    if self.use_dual_attention:
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2,
         gate_msa2) = _modulation(self.norm1, temb, 9, x.dtype)
        y2 = _norm_modulate(self.norm1.norm, x, shift_msa2, scale_msa2)
    else:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(
            self.norm1, temb, 6, x.dtype)
    y = _norm_modulate(self.norm1.norm, x, shift_msa, scale_msa)
    if self.context_pre_only:
        context_y = _ada_continuous(self.norm1_context, context, temb)
    else:
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _modulation(
            self.norm1_context, temb, 6, context.dtype)
        context_y = _norm_modulate(self.norm1_context.norm, context, c_shift_msa, c_scale_msa)

    attn_output, context_attn_output = self.attn(hidden_states=y, encoder_hidden_states=context_y,
                                                 **joint_attention_kwargs)
    if self.use_dual_attention:
        x = _gated_residual(x, gate_msa, attn_output)
        attn_output, gate_msa = self.attn2(hidden_states=y2, **joint_attention_kwargs), gate_msa2
    x, y = _residual_norm_modulate(self.norm2, x, attn_output, gate_msa, shift_mlp, scale_mlp)
    x = _gated_residual(x, gate_mlp, _feed_forward(self, self.ff, y))

    if self.context_pre_only:
        return None, x
    context, context_y = _residual_norm_modulate(self.norm2_context, context, context_attn_output,
                                                 c_gate_msa, c_shift_mlp, c_scale_mlp)
    context = _gated_residual(context, c_gate_mlp, _feed_forward(self, self.ff_context, context_y))
    return context, x


def _flux_transformer_block_forward(
        self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
        image_rotary_emb: Optional[Tuple[Tensor, Tensor]] = None,
        joint_attention_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[Tensor, Tensor]:
    """Flux's double-stream block (IP-adapter's third attention output included)."""
    x, context = hidden_states, encoder_hidden_states
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(
        self.norm1, temb, 6, x.dtype)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _modulation(
        self.norm1_context, temb, 6, context.dtype)
    attention_outputs = self.attn(
        hidden_states=_norm_modulate(self.norm1.norm, x, shift_msa, scale_msa),
        encoder_hidden_states=_norm_modulate(self.norm1_context.norm, context, c_shift_msa,
                                             c_scale_msa),
        image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    attn_output, context_attn_output = attention_outputs[:2]

    x, y = _residual_norm_modulate(self.norm2, x, attn_output, gate_msa, shift_mlp, scale_mlp)
    x = _gated_residual(x, gate_mlp, self.ff(y))
    if len(attention_outputs) == 3:
        x = x + attention_outputs[2]

    context, context_y = _residual_norm_modulate(self.norm2_context, context, context_attn_output,
                                                 c_gate_msa, c_shift_mlp, c_scale_mlp)
    context = _gated_residual(context, c_gate_mlp, self.ff_context(context_y))
    if context.dtype == torch.float16:
        context = context.clip(-65504, 65504)
    return context, x


def _flux_single_transformer_block_forward(
        self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
        image_rotary_emb: Optional[Tuple[Tensor, Tensor]] = None,
        joint_attention_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[Tensor, Tensor]:
    """Flux's single-stream block: text and image tokens in one sequence, attention and
    MLP side by side on one AdaLayerNormZeroSingle output."""
    text_seq_len = encoder_hidden_states.shape[1]
    x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    shift, scale, gate = _modulation(self.norm, temb, 3, x.dtype)
    y = _norm_modulate(self.norm.norm, x, shift, scale)
    mlp_hidden_states = self.act_mlp(self.proj_mlp(y))
    attn_output = self.attn(hidden_states=y, image_rotary_emb=image_rotary_emb,
                            **(joint_attention_kwargs or {}))
    x = _gated_residual(x, gate, self.proj_out(torch.cat([attn_output, mlp_hidden_states], dim=2)))
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x[:, :text_seq_len], x[:, text_seq_len:]


# ---------------------------------------------------------------------------
# what can be patched
# ---------------------------------------------------------------------------


def _layer_norm_problem(name: str, norm: Any, dim: int) -> Optional[str]:
    if type(norm) is not nn.LayerNorm:
        return f"{name} is a {type(norm).__name__}, not an nn.LayerNorm"
    if tuple(norm.normalized_shape) != (dim,):
        return f"{name} normalises shape {tuple(norm.normalized_shape)}, not ({dim},)"
    return None


def _ada_zero_problem(name: str, ada: Any, cls: type, dim: int) -> Optional[str]:
    """Why ada is not a cls (AdaLayerNormZero, ...) on an nn.LayerNorm over dim."""
    if type(ada) is not cls:
        return f"{name} is a {type(ada).__name__}, not a {cls.__name__}"
    return _layer_norm_problem(f"{name}.norm", ada.norm, dim)


def _first_problem(*problems: Callable[[], Optional[str]]) -> Optional[str]:
    for problem in problems:
        reason = problem()
        if reason is not None:
            return reason
    return None


def _basic_transformer_block_problem(block: BasicTransformerBlock) -> Optional[str]:
    dim = block.dim
    if block.norm_type not in ("ada_norm_zero", "ada_norm_single"):
        return (f"norm_type {block.norm_type!r} has no adaLN modulation to fuse (only "
                f"'ada_norm_zero' and 'ada_norm_single' are patched)")
    if block.pos_embed is not None:
        return "it adds positional embeddings after its first norm"
    if hasattr(block, "fuser"):
        return "it has a GLIGEN fuser"
    if block.norm_type == "ada_norm_zero":
        return _first_problem(
            lambda: _ada_zero_problem("norm1", block.norm1, AdaLayerNormZero, dim),
            lambda: None if block.norm1.emb is not None else "norm1 has no embedding of its own",
            lambda: _layer_norm_problem("norm2", block.norm2, dim) if block.attn2 else None,
            lambda: _layer_norm_problem("norm3", block.norm3, dim))
    return _first_problem(lambda: _layer_norm_problem("norm1", block.norm1, dim),
                          lambda: _layer_norm_problem("norm2", block.norm2, dim))


def _joint_transformer_block_problem(block: JointTransformerBlock) -> Optional[str]:
    dim = block.norm2.normalized_shape[0] if isinstance(block.norm2, nn.LayerNorm) else -1
    norm1_cls = SD35AdaLayerNormZeroX if block.use_dual_attention else AdaLayerNormZero
    return _first_problem(
        lambda: _layer_norm_problem("norm2", block.norm2, dim),
        lambda: _ada_zero_problem("norm1", block.norm1, norm1_cls, dim),
        lambda: (_ada_continuous_problem(block.norm1_context, "norm1_context")
                 if block.context_pre_only else
                 _ada_zero_problem("norm1_context", block.norm1_context, AdaLayerNormZero, dim)),
        lambda: (None if block.context_pre_only else
                 _layer_norm_problem("norm2_context", block.norm2_context, dim)))


def _flux_transformer_block_problem(block: FluxTransformerBlock) -> Optional[str]:
    dim = block.norm1.linear.in_features
    return _first_problem(
        lambda: _ada_zero_problem("norm1", block.norm1, AdaLayerNormZero, dim),
        lambda: _ada_zero_problem("norm1_context", block.norm1_context, AdaLayerNormZero, dim),
        lambda: _layer_norm_problem("norm2", block.norm2, dim),
        lambda: _layer_norm_problem("norm2_context", block.norm2_context, dim))


def _flux_single_transformer_block_problem(block: FluxSingleTransformerBlock) -> Optional[str]:
    return _ada_zero_problem("norm", block.norm, AdaLayerNormZeroSingle,
                             block.norm.linear.in_features)


def _ada_continuous_problem(norm: AdaLayerNormContinuous, name: str = "it") -> Optional[str]:
    if type(norm) is not AdaLayerNormContinuous:
        return f"{name} is a {type(norm).__name__}, not an AdaLayerNormContinuous"
    return _layer_norm_problem(f"{name}.norm" if name != "it" else "its norm", norm.norm,
                               norm.linear.out_features // 2)


# class -> (patched forward, why an instance cannot take it or None)
_PATCHES: Dict[type, Tuple[Callable, Callable[[Any], Optional[str]]]] = {
    BasicTransformerBlock: (_basic_transformer_block_forward, _basic_transformer_block_problem),
    JointTransformerBlock: (_joint_transformer_block_forward, _joint_transformer_block_problem),
    FluxTransformerBlock: (_flux_transformer_block_forward, _flux_transformer_block_problem),
    FluxSingleTransformerBlock: (_flux_single_transformer_block_forward,
                                 _flux_single_transformer_block_problem),
    AdaLayerNormContinuous: (_ada_layer_norm_continuous_forward, _ada_continuous_problem),
}
_PATCHED_FORWARDS = {forward for forward, _ in _PATCHES.values()}


def _parameter_names(fn: Callable) -> List[str]:
    return list(inspect.signature(fn).parameters)


def _signature_problem(cls: type, forward: Callable) -> Optional[str]:
    """The patched forward replaces the class's; both must take the same arguments in the
    same order (diffusers' hooks find hidden_states by position in the class's)."""
    if _parameter_names(cls.forward) != _parameter_names(forward):
        return (f"{cls.__name__}.forward{inspect.signature(cls.forward)} is not the forward "
                f"this patch mirrors ({_parameter_names(forward)}): another diffusers version?")
    return None


def patch_diffusers(model: nn.Module) -> List[str]:
    """Swap, in place, the forward of every supported block of a diffusers model for one
    on ditkernels' fused adaLN ops; returns the qualified names of the modules patched.
    model may also be a diffusers pipeline: then every nn.Module among its components
    is patched, and the names start with the component's ("transformer.").

    Supported: BasicTransformerBlock with norm_type "ada_norm_zero" (DiT) or
    "ada_norm_single" (PixArt-alpha/sigma), JointTransformerBlock (SD3, SD3.5 with dual
    attention), FluxTransformerBlock, FluxSingleTransformerBlock, and
    AdaLayerNormContinuous on a LayerNorm (the SD3/Flux output head). Any of those that
    differs in a detail (another norm class, positional embeddings inside the block,
    ...) is left alone with a warning that names the reason, as is one whose forward was
    already replaced on the instance by someone else (hooks: patch before applying
    caches or offloading). Blocks patched already are skipped silently. model may itself
    be a block. The models' inline output heads (DiT's, PixArt's norm_out) stay eager.
    """
    if not isinstance(model, nn.Module):
        components = getattr(model, "components", None)
        if not isinstance(components, dict):
            raise TypeError(f"patch_diffusers: model must be an nn.Module or a diffusers "
                            f"pipeline, got a {type(model).__name__}")
        return [f"{key}.{name}" if name else key for key, component in components.items()
                if isinstance(component, nn.Module) for name in patch_diffusers(component)]
    patched = []
    for name, module in model.named_modules():
        entry = _PATCHES.get(type(module))
        if entry is None:
            continue
        forward, problem = entry
        instance_forward = module.__dict__.get("forward")
        if getattr(instance_forward, "__func__", None) in _PATCHED_FORWARDS:
            continue
        reason = _signature_problem(type(module), forward)
        if reason is None and instance_forward is not None:
            reason = ("its forward is already replaced on the instance (by hooks such as "
                      "diffusers' caches or offloading, or accelerate's): call "
                      "patch_diffusers before applying them")
        if reason is None:
            reason = problem(module)
        if reason is not None:
            warnings.warn(f"patch_diffusers: leaving {name or 'the model'} "
                          f"({type(module).__name__}) unpatched: {reason}")
            continue
        module.forward = types.MethodType(forward, module)
        patched.append(name)
    return patched

