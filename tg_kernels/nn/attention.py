"""PrunableMultiheadAttention: ``nn.MultiheadAttention`` with separate q, k, v and output projections.

``nn.MultiheadAttention`` cannot lose heads: it packs q, k and v in one ``in_proj_weight`` (cut by a
computed split inside ``F.multi_head_attention_forward``), folds the heads into the batch dim, checks
that the query's width equals ``embed_dim`` and that the projections are ``embed_dim`` wide, and
encoder layers holding it take a fused inference fast path that reads its packed tensors directly.
:func:`~tg_kernels.attach_gates` therefore swaps every ``nn.MultiheadAttention`` for this module
(the same numbers: the packed weight is cut into ``q_proj``, ``k_proj`` and ``v_proj``) before it
analyses the model. Its forward is written the way the analysis reads attention: each projection's
output is split into ``(heads, head_dim)`` with ``-1`` heads and fed to
``scaled_dot_product_attention`` (or ``q @ k^T``, softmax, ``@ v`` when the weights are asked for),
so whole heads (tied across q, k, v and the columns of ``out_proj``) and the width of the stream it
reads and writes can be pruned. Its forward takes ``nn.MultiheadAttention``'s arguments and
follows its semantics (masks, ``batch_first``, unbatched inputs, ``need_weights``,
``average_attn_weights``, the ``is_causal`` hint, dropout on the attention weights).

:func:`~tg_kernels.export` turns it back into an ``nn.MultiheadAttention`` where that class can hold
the kept sizes (:func:`restore_multihead_attention`: the kept heads span the kept input width) and
keeps this module, at the kept sizes, elsewhere.

Limits: ``add_bias_kv`` and ``add_zero_attn`` are not supported (such modules are not swapped). The
analysis keeps the heads whole where a per-head 3-D ``attn_mask`` (``(batch * num_heads, L, S)``)
meets them or where the model uses the returned attention weights (their average over heads would
change); weights computed but never read do not matter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PrunableMultiheadAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out ``nn.Linear`` layers; forward as ``nn.MultiheadAttention``.

    Args:
        embed_dim: width of the query (and of the output).
        num_heads: number of heads.
        head_dim: width of one head (``embed_dim // num_heads`` by default).
        dropout: dropout probability on the attention weights (training only).
        bias: whether the projections have biases.
        kdim, vdim: widths of key and value (``embed_dim`` by default).
        batch_first: inputs and outputs are ``(batch, seq, feature)`` instead of ``(seq, batch, feature)``.
        out_dim: width of the output (``embed_dim`` by default; differs only after pruning).
        scale: the attention scale (``1 / sqrt(head_dim)`` by default, as ``nn.MultiheadAttention``).
            Kept as the attribute ``scaling`` and passed to attention explicitly, so that it stays
            what it was when pruning removes head dims (``head_dim`` shrinks, the scale must not).

    Attributes ``embed_dim``, ``kdim``, ``vdim``, ``out_dim`` and ``num_heads`` describe the layer
    sizes (export keeps them in step with the weights); the forward reads only ``head_dim``,
    ``dropout`` and ``batch_first``. ``in_proj_weight`` and ``in_proj_bias`` are ``None`` and
    ``_qkv_same_embed_dim`` is False, because there is no packed projection: PyTorch's transformer
    layers read those attributes and then take their regular (not the fused) path.
    """

    in_proj_weight: None
    in_proj_bias: None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        out_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim if head_dim is not None else embed_dim // num_heads
        if head_dim is None and self.head_dim * num_heads != embed_dim:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.scaling = float(scale) if scale is not None else math.sqrt(1.0 / self.head_dim)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.out_dim = out_dim if out_dim is not None else embed_dim
        self.dropout = dropout
        self.batch_first = batch_first
        self._qkv_same_embed_dim = False
        self.in_proj_weight = None
        self.in_proj_bias = None
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        width = num_heads * self.head_dim
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, width, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, width, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, width, bias=bias, **factory)
        self.out_proj = nn.Linear(width, self.out_dim, bias=bias, **factory)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> PrunableMultiheadAttention:
        """The same attention as ``mha`` (its weights copied; same device, dtype and training mode)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("PrunableMultiheadAttention does not support add_bias_kv or add_zero_attn")
        weight = mha.out_proj.weight
        module = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.out_proj.bias is not None,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                weights = mha.in_proj_weight.chunk(3)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
            for proj, w, b in zip((module.q_proj, module.k_proj, module.v_proj), weights, biases):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            module.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                module.out_proj.bias.copy_(mha.out_proj.bias)
        module.train(mha.training)
        return module

    def to_torch(self) -> nn.MultiheadAttention | None:
        """The same attention as an ``nn.MultiheadAttention``, or None where that cannot hold it: it needs
        the heads to span the query's width (``num_heads * head_dim == embed_dim == out_dim``)."""
        self.sync_sizes()
        width = self.num_heads * self.head_dim
        bias = self.out_proj.bias is not None
        if not (width == self.embed_dim == self.out_dim) or self.scaling != math.sqrt(1.0 / self.head_dim):
            return None
        if any((p.bias is not None) != bias for p in (self.q_proj, self.k_proj, self.v_proj)):
            return None
        weight = self.out_proj.weight
        mha = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=bias,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            projections = (self.q_proj, self.k_proj, self.v_proj)
            if mha._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat([p.weight for p in projections]))
            else:
                for name, p in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), projections):
                    getattr(mha, name).copy_(p.weight)
            if mha.in_proj_bias is not None:
                mha.in_proj_bias.copy_(torch.cat([p.bias for p in projections]))
                mha.out_proj.bias.copy_(self.out_proj.bias)
            mha.out_proj.weight.copy_(self.out_proj.weight)
        for p in mha.parameters():
            p.requires_grad_(self.out_proj.weight.requires_grad)
        mha.train(self.training)
        return mha

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        """Also accept ``nn.MultiheadAttention``'s keys (``in_proj_weight``, ``q_proj_weight``, ...), so
        that a checkpoint of the original model loads into the gated one."""
        packed = {"in_proj_weight": "weight", "in_proj_bias": "bias"}
        for key, kind in packed.items():
            tensor = state_dict.pop(prefix + key, None)
            if tensor is not None:
                for name, piece in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3)):
                    state_dict[f"{prefix}{name}.{kind}"] = piece
        for name in ("q_proj", "k_proj", "v_proj"):
            tensor = state_dict.pop(f"{prefix}{name}_weight", None)
            if tensor is not None:
                state_dict[f"{prefix}{name}.weight"] = tensor
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def sync_sizes(self) -> None:
        """Set the size attributes from the projection weights (export calls this after removing channels)."""
        self.embed_dim = self.q_proj.weight.shape[1]
        self.kdim = self.k_proj.weight.shape[1]
        self.vdim = self.v_proj.weight.shape[1]
        self.out_dim = self.out_proj.weight.shape[0]
        self.num_heads = self.q_proj.weight.shape[0] // self.head_dim

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``nn.MultiheadAttention.forward``: returns ``(output, attention weights or None)``."""
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, tgt_len, src_len = query.shape[0], query.shape[1], key.shape[1]

        # Masks as nn.MultiheadAttention reads them: boolean True (or -inf) means "do not attend".
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the hint says attn_mask is the causal mask: attention applies it itself
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask,
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=query.dtype,
                check_other=False,
            )
            if key_padding_mask is not None:
                is_causal = False
        mask = None
        if attn_mask is not None:  # (L, S), or (batch * heads, L, S) for one mask per head
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.view(batch, -1, tgt_len, src_len)
        if key_padding_mask is not None:
            padding = key_padding_mask.view(batch, 1, 1, src_len)
            mask = padding if mask is None else mask + padding

        q = self.q_proj(query).view(batch, tgt_len, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(batch, src_len, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(batch, src_len, -1, self.head_dim).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * self.scaling) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=self.scaling
            )
        out = self.out_proj(out.transpose(1, 2).reshape(batch, tgt_len, -1))

        if not batched:
            return out.squeeze(0), weights.squeeze(0) if weights is not None else None
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"batch_first={self.batch_first}"
        )


def swap_multihead_attention(model: nn.Module, skip: set[str] | None = None) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (in place) by a :class:`PrunableMultiheadAttention`.

    Modules named in ``skip`` and modules using ``add_bias_kv`` / ``add_zero_attn`` stay as they are.
    ``nn.TransformerEncoder`` stacks whose layers were swapped stop converting inputs to nested
    tensors (their fast path). Returns the names of the swapped modules.
    """
    skip = skip or set()
    swapped: list[str] = []
    new_of: dict[int, PrunableMultiheadAttention] = {}  # a module held in two places stays one module
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.MultiheadAttention) or name in skip:
                continue
            if child.bias_k is not None or child.add_zero_attn:
                continue
            if id(child) not in new_of:
                new_of[id(child)] = PrunableMultiheadAttention.from_torch(child)
                swapped.append(name)
            parent._modules[child_name] = new_of[id(child)]
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(layer.self_attn, PrunableMultiheadAttention) for layer in module.layers
        ):
            module.use_nested_tensor = False
    return swapped


def restore_multihead_attention(model: nn.Module) -> list[str]:
    """Replace (in place) every :class:`PrunableMultiheadAttention` that ``nn.MultiheadAttention`` can
    hold (its heads span its input width) by that ``nn.MultiheadAttention``; returns their names."""
    restored: list[str] = []
    new_of: dict[int, nn.Module | None] = {}
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):
            if not isinstance(child, PrunableMultiheadAttention):
                continue
            if id(child) not in new_of:
                new_of[id(child)] = child.to_torch()
                if new_of[id(child)] is not None:
                    restored.append(f"{parent_name}.{child_name}" if parent_name else child_name)
            if new_of[id(child)] is not None:
                parent._modules[child_name] = new_of[id(child)]
    return restored


__all__ = ["PrunableMultiheadAttention", "restore_multihead_attention", "swap_multihead_attention"]
