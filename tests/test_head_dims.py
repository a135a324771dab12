"""Head dims: one gate per dim within the heads (shared by q, k, v and the out-projection's columns),
where removing it is exact: attention with an explicit scale, across rotary pairs, with grouped KV
heads, with a fused qkv projection; kept whole (with the reason) under sdpa's default scale and
where a rotary table is read by something else. Each case: export with half of every group closed
equals the gated model (float64), and Budget counts the exported model's FLOPs."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import close_half
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tg_kernels as tg
from tg_kernels.pruning.compact import _tensor_leaves


def _macs(model: nn.Module, x: torch.Tensor) -> float:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


class Rotary(nn.Module):
    """Llama's rotary table: ``cos``, ``sin`` of ``cat(freqs, freqs)``, ``freqs`` = positions x ``inv_freq``."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(x.shape[1], dtype=torch.float32)[None, :, None]
        freqs = pos * self.inv_freq.to(x.dtype)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Hugging Face style attention: separate (or fused, GPT-2 style) projections, ``view(B, N, -1,
    self.head_dim)``, ``scaling`` fixed at init and passed to sdpa (``scale=None``: sdpa's default),
    optional rotary embedding and grouped KV heads (``repeat_kv`` or sdpa's ``enable_gqa``)."""

    def __init__(
        self, dim=24, heads=4, kv_heads=None, explicit=True, rotary=False, fused=False, gqa="repeat", unfused=False
    ):
        super().__init__()
        self.head_dim, self.kv_heads, self.heads = dim // heads, kv_heads or heads, heads
        self.scaling = self.head_dim**-0.5 if explicit else None
        self.rotary, self.fused, self.gqa, self.unfused = rotary, fused, gqa, unfused
        self.split_size = heads * self.head_dim
        if fused:
            self.qkv = nn.Linear(dim, 3 * self.split_size)
        else:
            self.q = nn.Linear(dim, heads * self.head_dim)
            self.k = nn.Linear(dim, self.kv_heads * self.head_dim)
            self.v = nn.Linear(dim, self.kv_heads * self.head_dim)
        self.o = nn.Linear(heads * self.head_dim, dim)

    def forward(self, x, table=None):
        B, N, _ = x.shape
        if self.fused == "unbind":  # timm: reshape(B, N, 3, heads, -1), permute, unbind
            q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            if self.fused:
                q, k, v = self.qkv(x).split(self.split_size, dim=2)
            else:
                q, k, v = self.q(x), self.k(x), self.v(x)
            q, k, v = (t.view(B, N, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if table is not None:
            cos, sin = (t.unsqueeze(1) for t in table)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        gqa = k.shape[1] != q.shape[1]
        if gqa and self.gqa == "repeat":
            b, h, n, d = k.shape
            k, v = (t[:, :, None].expand(b, h, q.shape[1] // h, n, d).reshape(b, q.shape[1], n, d) for t in (k, v))
        if self.unfused:  # timm's Swin: q * self.scale @ k^T, a bias, softmax, @ v
            scores = (q * self.scaling) @ k.transpose(-2, -1) + torch.linspace(-1, 1, N)
            y = scores.softmax(-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, scale=self.scaling, enable_gqa=gqa and self.gqa == "sdpa")
        return self.o(y.transpose(1, 2).reshape(B, N, -1))


class Net(nn.Module):
    def __init__(self, layers=2, leak=False, **attention):
        super().__init__()
        self.inp = nn.Linear(6, 24)
        self.attn = nn.ModuleList(Attention(**attention) for _ in range(layers))
        self.rotary = Rotary(self.attn[0].head_dim) if attention.get("rotary") else None
        self.leak = leak
        self.out = nn.Linear(24, 3)

    def forward(self, x):
        h = self.inp(x)
        table = self.rotary(h) if self.rotary is not None else None
        for attn in self.attn:
            h = h + attn(h, table)
        if self.leak:  # the rotary table also feeds the output: it cannot be sliced
            h = h + table[0].sum(-1, keepdim=True)
        return self.out(h)


def _attached(model: nn.Module, x: torch.Tensor, **options):
    torch.manual_seed(0)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tg.attach_gates(model, x, **options)


def _exact_and_counted(model: nn.Module, x: torch.Tensor):
    """Attach, close half of every group, export: exact, and Budget counts the exported FLOPs."""
    full = _macs(model.eval(), x)
    model, bank = _attached(model, x)
    budget = tg.Budget(model, target=1.0)
    assert budget.usage().full_flops == pytest.approx(full, rel=1e-6)
    close_half(bank)
    model.double()
    with torch.no_grad():
        expected = model(x.double())
        exported = tg.export(model)
        torch.testing.assert_close(exported(x.double()), expected, rtol=1e-10, atol=1e-12)
    assert budget.usage().flops == pytest.approx(_macs(exported.float(), x), rel=1e-6)
    return bank, exported


def _dims_group(bank: tg.GateBank, hd):
    key = bank.key_of_space[hd.space]
    return next(g for g in bank.groups if g.key == key)


def _kept(bank: tg.GateBank, producer: str) -> torch.Tensor:
    """The open channels of the group that ``producer`` makes (heads for a projection)."""
    group = next(g for g in bank.groups if producer in g.producers and "head_dims" not in g.key)
    return torch.nonzero(bank.gates[group.key].open_mask()).flatten()


def _assert_q_rows(bank, original, exported, i: int, dims: torch.Tensor, heads_per_gate: int = 1) -> None:
    """Exported q rows (and input columns) are the original's at (kept head, kept dim) pairs."""
    before, after = original.attn[i].q.weight, exported.attn[i].q.weight
    heads = (_kept(bank, f"attn.{i}.q")[:, None] * heads_per_gate + torch.arange(heads_per_gate)).flatten()
    rows = (heads[:, None] * 6 + dims[None, :]).flatten()
    cols = _kept(bank, "inp")
    torch.testing.assert_close(after.float(), before[rows][:, cols])


X = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kv_heads,gqa", [(None, "repeat"), (2, "repeat"), (2, "sdpa")])
def test_explicit_scale_prunes_head_dims_shared_by_q_k_v_and_o(kv_heads, gqa):
    model = Net(kv_heads=kv_heads, gqa=gqa)
    original = copy.deepcopy(model)
    bank, exported = _exact_and_counted(model, X)
    assert [hd.reason for hd in bank.analysis.head_dims] == [None, None]
    for i, hd in enumerate(bank.analysis.head_dims):
        assert hd.size == 6 and _dims_group(bank, hd).size == 6
        attn, before = exported.attn[i], original.attn[i]
        gate = bank.gates[bank.key_of_space[hd.space]]
        kept_dims = torch.nonzero(gate.open_mask()).flatten()
        assert attn.head_dim == kept_dims.numel() == 3  # the size attribute follows the kept dims
        heads = attn.o.in_features // attn.head_dim
        assert attn.q.out_features == heads * 3 and attn.o.in_features == heads * 3
        assert attn.k.out_features == attn.v.out_features == (kv_heads or 4) // 2 * 3
        assert before.head_dim == 6
        _assert_q_rows(bank, original, exported, i, kept_dims, 4 // (kv_heads or 4))


def test_fused_qkv_split_prunes_head_dims_and_split_size():
    bank, exported = _exact_and_counted(Net(fused=True), X)
    assert all(hd.space is not None for hd in bank.analysis.head_dims)
    attn = exported.attn[0]
    assert attn.head_dim == 3 and attn.split_size == attn.qkv.out_features // 3 == attn.o.in_features


@pytest.mark.parametrize("unfused", [False, True])
def test_fused_qkv_unbind_prunes_head_dims(unfused):
    """timm's layout: one projection reshaped to (B, N, 3, heads, -1), permuted, unbound into q, k, v;
    with sdpa and an explicit scale, or unfused with a scale fixed at init (Swin's window attention)."""
    bank, exported = _exact_and_counted(Net(fused="unbind", unfused=unfused), X)
    assert all(hd.space is not None for hd in bank.analysis.head_dims), bank.analysis.head_dims
    attn = exported.attn[0]
    assert attn.qkv.out_features == 3 * attn.o.in_features == 3 * 2 * 3  # 2 heads x 3 dims each, for q, k, v


def test_unfused_attention_with_a_constant_scale_prunes_head_dims():
    bank, exported = _exact_and_counted(Net(unfused=True, kv_heads=2), X)
    assert all(hd.space is not None for hd in bank.analysis.head_dims)
    assert {hd.node for hd in bank.analysis.head_dims} == {"matmul", "matmul_2"}  # the scores' products
    assert all(attn.head_dim == 3 for attn in exported.attn)


def test_default_scale_keeps_head_dims_whole():
    bank, exported = _exact_and_counted(Net(explicit=False), X)
    assert all(hd.space is None and "default scale" in hd.reason for hd in bank.analysis.head_dims)
    assert any("head dims" in name for name in bank.skipped)
    assert all(attn.head_dim == 6 for attn in exported.attn)
    assert not any("head_dims" in g.key for g in bank.groups) and len(bank.groups) == 3  # stream, heads x 2


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_rotary_pairs_share_a_gate_and_the_table_is_sliced(kv_heads):
    model = Net(rotary=True, kv_heads=kv_heads)
    original = copy.deepcopy(model)
    bank, exported = _exact_and_counted(model, X)
    spaces = {hd.space for hd in bank.analysis.head_dims}
    assert None not in spaces and len(spaces) == 1  # one table for both layers: one set of kept pairs
    hd = bank.analysis.head_dims[0]
    assert hd.size == 3  # D / 2 pairs (d, d + D / 2)
    kept = torch.nonzero(bank.gates[bank.key_of_space[hd.space]].open_mask()).flatten()
    torch.testing.assert_close(exported.rotary.inv_freq.float(), original.rotary.inv_freq[kept])
    attn = exported.attn[0]
    assert attn.head_dim == 2 * kept.numel()
    dims = torch.cat([kept, kept + 3])  # each kept pair keeps both of its dims
    _assert_q_rows(bank, original, exported, 0, dims, 4 // (kv_heads or 4))


def test_a_rotary_table_read_elsewhere_keeps_head_dims_whole():
    bank, _ = _exact_and_counted(Net(rotary=True, leak=True), X)
    assert all(hd.space is None and "rotary table" in hd.reason for hd in bank.analysis.head_dims)


def test_a_scale_computed_from_head_dim_in_the_forward_is_caught_by_the_self_check():
    class Recomputed(Attention):
        def forward(self, x, table=None):
            self.scaling = self.head_dim**-0.5  # changes with the kept head dims: not exact
            return super().forward(x, table)

    model = Net()
    model.attn = nn.ModuleList(Recomputed() for _ in range(2))
    model.load_state_dict(Net().state_dict())
    _, bank = _attached(model, X)
    assert all(hd.space is None for hd in bank.analysis.head_dims)
    assert any("self-check" in why or "export" in why for why in bank.skipped.values())


@pytest.mark.parametrize("rotary", [False, True])
def test_compact_gathers_heads_times_head_dims_and_matches_per_layer(rotary):
    torch.manual_seed(0)
    base = Net(rotary=rotary, kv_heads=2).double()
    x = X.double()
    compact, cbank = _attached(copy.deepcopy(base), x, skip="hard")
    per_layer, pbank = _attached(copy.deepcopy(base), x, skip="hard", compact=False)
    assert any("head dims" in why for why in cbank.compact.full_width.values())  # "exact" training only
    grads = []
    for model, bank in ((compact, cbank), (per_layer, pbank)):
        close_half(bank)
        model.double()
        out = model(x)
        out.square().mean().backward()
        grads.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert cbank.compact.stats.forwards >= 1 and cbank.compact.disabled_reason is None
    plan = cbank.compact._plan
    for hd in cbank.analysis.head_dims:  # "hard" runs at the exported width: half the head dims
        key = cbank.key_of_space[hd.space]
        assert plan.kept[key].numel() == hd.size - hd.size // 2
    (oc, gc), (op, gp) = grads
    torch.testing.assert_close(oc, op, rtol=1e-10, atol=1e-12)
    for name, g in gp.items():
        if g is not None and gc[name] is not None:
            torch.testing.assert_close(gc[name], g, rtol=1e-9, atol=1e-12, msg=name)


def test_exact_mode_gradients_equal_none_mode_with_head_dims():
    torch.manual_seed(0)
    base = Net(rotary=True).double()
    x = X.double()
    results = []
    for skip in ("exact", "none"):
        model, bank = _attached(copy.deepcopy(base), x, skip=skip)
        close_half(bank)
        model.double().train()
        sum(t.square().mean() for t in _tensor_leaves(model(x))).backward()
        results.append({n: p.grad for n, p in model.named_parameters()})
    exact, none = results
    for name, g in none.items():
        if g is not None:
            torch.testing.assert_close(exact[name], g, rtol=1e-9, atol=1e-12, msg=name)


def test_prunable_multihead_attention_passes_its_scale_and_prunes_head_dims():
    mha = tg.nn.PrunableMultiheadAttention(24, 4, batch_first=True)
    assert mha.scaling == math.sqrt(1.0 / 6)
    x = torch.randn(2, 5, 24)
    ref = nn.MultiheadAttention(24, 4, batch_first=True)
    mha = tg.nn.PrunableMultiheadAttention.from_torch(ref)
    with torch.no_grad():
        torch.testing.assert_close(mha(x, x, x)[0], ref(x, x, x)[0])
    mha.head_dim = 3  # as export leaves it after removing half the head dims: the scale stays
    assert mha.scaling == math.sqrt(1.0 / 6) and mha.to_torch() is None


@pytest.mark.parametrize("rotary", [False, True])
def test_save_and_load_restore_head_dim_and_the_sliced_rotary_table(tmp_path, rotary):
    """``self.head_dim`` (an attribute no layer type names) and the non-persistent ``inv_freq`` buffer
    export sliced travel with the file, so a freshly built model loads into the exported one's shape."""
    bank, exported = _exact_and_counted(Net(rotary=rotary, kv_heads=2), X)
    tg.save(exported, tmp_path / "small.pt")
    fresh = tg.load(tmp_path / "small.pt", Net(rotary=rotary, kv_heads=2))
    assert fresh.attn[0].head_dim == exported.attn[0].head_dim < 6
    with torch.no_grad():
        torch.testing.assert_close(fresh.float()(X), exported.float()(X))
