"""nn.MultiheadAttention models: attach swaps in PrunableMultiheadAttention, whose heads and stream prune.

Checks: PrunableMultiheadAttention computes what nn.MultiheadAttention computes (every mask kind,
batch_first, unbatched inputs, need_weights, the is_causal hint); a bare nn.MultiheadAttention
inside a user module (self- and cross-attention, batch_first True and False, key padding and
attention masks) gets head gates, exports exactly (float64) and trains in ``hard`` mode; torch's
transformer layers do not take their fused inference path past the gates.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tg_kernels as tg
from tg_kernels.nn import PrunableMultiheadAttention, swap_multihead_attention

B, L, S, E, H = 3, 5, 7, 16, 4


def _mask(kind: str | None, shape: tuple[int, ...], causal: bool = False) -> torch.Tensor | None:
    if kind is None:
        return None
    g = torch.Generator().manual_seed(1)
    if kind == "float3d":
        return torch.randn(shape, generator=g, dtype=torch.float64)
    blocked = torch.ones(shape, dtype=torch.bool).triu(1) if causal else torch.rand(shape, generator=g) > 0.7
    blocked[..., 0] = False  # every query attends somewhere
    if kind == "bool":
        return blocked
    return torch.zeros(shape, dtype=torch.float64).masked_fill(blocked, float("-inf"))


CASES = [
    c
    for c in itertools.product(
        [True, False],  # batch_first
        [True, False],  # self-attention (query is key is value)
        [True, False],  # need_weights
        [True, False],  # average_attn_weights
        [None, "bool", "float"],  # key_padding_mask
        [None, "bool", "float", "float3d"],  # attn_mask
        [False, True],  # is_causal hint
        [True, False],  # batched
    )
    if not (c[6] and (c[5] is None or not c[1]))  # the hint needs a (causal) mask of self-attention
    and not (c[4] is not None and c[5] is not None and (c[4] == "bool") != (c[5] == "bool"))  # one mask type
]


@pytest.mark.parametrize("batch_first, same, need, average, kpm, am, causal, batched", CASES)
def test_prunable_attention_computes_what_multihead_attention_computes(
    batch_first, same, need, average, kpm, am, causal, batched
):
    torch.manual_seed(0)
    kdim = None if same else 12
    mha = nn.MultiheadAttention(E, H, kdim=kdim, vdim=kdim, batch_first=batch_first, dtype=torch.float64).eval()
    ours = PrunableMultiheadAttention.from_torch(mha)

    def shape(n: int, d: int) -> tuple[int, ...]:
        return (n, d) if not batched else (B, n, d) if batch_first else (n, B, d)

    src = L if same else S
    q = torch.randn(shape(L, E), dtype=torch.float64)
    k = q if same else torch.randn(shape(src, kdim), dtype=torch.float64)
    v = q if same else torch.randn(shape(src, kdim), dtype=torch.float64)
    padding = _mask(kpm, (B, src) if batched else (src,))
    if padding is not None:
        padding[..., 0] = False if padding.dtype == torch.bool else 0.0
    attn_mask = _mask(am, ((B * H if batched else H), L, src) if am == "float3d" else (L, src), causal)
    kwargs = dict(
        key_padding_mask=padding,
        need_weights=need,
        attn_mask=attn_mask,
        average_attn_weights=average,
        is_causal=causal,
    )
    with torch.no_grad():
        expected = mha(q, k, v, **kwargs)
        actual = ours(q, k, v, **kwargs)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-10, atol=1e-12)
    if need:
        torch.testing.assert_close(actual[1], expected[1], rtol=1e-10, atol=1e-12)
    else:
        assert actual[1] is None and expected[1] is None


def test_is_causal_without_a_mask_is_refused_like_multihead_attention():
    ours = PrunableMultiheadAttention(E, H, batch_first=True)
    x = torch.randn(B, L, E)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ours(x, x, x, is_causal=True)


def test_swap_keeps_shared_modules_shared_and_leaves_unsupported_ones():
    shared = nn.MultiheadAttention(E, H)
    model = nn.ModuleDict({"a": shared, "b": shared, "kv": nn.MultiheadAttention(E, H, add_bias_kv=True)})
    assert swap_multihead_attention(model) == ["a"]
    assert isinstance(model["a"], PrunableMultiheadAttention) and model["b"] is model["a"]
    assert isinstance(model["kv"], nn.MultiheadAttention)


class AttentionNet(nn.Module):
    """A user module around bare nn.MultiheadAttention: self-attention over the input, cross-attention
    to a context of another width, LayerNorms on the stream, an MLP and a classifier."""

    def __init__(self, batch_first: bool, dim: int = 16, heads: int = 4, context: int = 10) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(6, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.norm1 = nn.LayerNorm(dim)
        self.cross = nn.MultiheadAttention(dim, heads, kdim=context, vdim=context, batch_first=batch_first)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x, ctx, padding=None, mask=None):
        if not self.batch_first:
            x, ctx = x.transpose(0, 1), ctx.transpose(0, 1)
        h = self.inp(x)
        a, _ = self.attn(h, h, h, key_padding_mask=padding, attn_mask=mask)  # need_weights=True: unused
        h = self.norm1(h + a)
        h = self.norm2(h + self.cross(h, ctx, ctx, need_weights=False)[0])
        h = h + self.fc2(torch.relu(self.fc1(h)))
        out = self.head(h)
        return out if self.batch_first else out.transpose(0, 1)


def _inputs(masks: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, L, 6, generator=g), torch.randn(2, S, 10, generator=g)
    padding = torch.zeros(2, L, dtype=torch.bool)
    padding[1, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    if masks == "none":
        return x, ctx
    if masks == "padding":
        return x, ctx, padding
    return x, ctx, None, causal


def _close_half(bank: tg.GateBank) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for gate in bank.gates.values():
            gate.weight.fill_(0.5)
            gate.weight[torch.randperm(gate.num_channels, generator=g)[: gate.num_channels // 2]] = -0.5


def _macs(model: nn.Module, args: tuple) -> float:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*args)
    return float(counter.get_total_flops())


@pytest.mark.parametrize("masks", ["none", "padding", "causal"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_bare_multihead_attention_prunes_heads_and_stream(batch_first, masks):
    torch.manual_seed(0)
    args = _inputs(masks)
    model = AttentionNet(batch_first).eval()
    with torch.no_grad():
        before = model(*args)
    full = _macs(model, args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no self-check or compact warning: everything found prunes
        model, bank = tg.attach_gates(model, args, prunable_attention=True)
    assert isinstance(model.attn, PrunableMultiheadAttention) and isinstance(model.cross, PrunableMultiheadAttention)
    with torch.no_grad():
        torch.testing.assert_close(model(*args), before, rtol=1e-5, atol=1e-6)  # the swap changes nothing
    producers = [set(g.producers) for g in bank.groups]
    for name in ("attn", "cross"):
        assert {f"{name}.q_proj", f"{name}.k_proj", f"{name}.v_proj"} in producers
        assert next(g for g in bank.groups if f"{name}.q_proj" in g.producers).size == 4  # one gate per head
    stream = next(g for g in bank.groups if "inp" in g.producers)
    assert {"attn.out_proj", "cross.out_proj", "fc2"} <= set(stream.producers) and stream.size == 16
    budget = tg.Budget(model, target=1.0)
    assert budget.usage().full_flops == pytest.approx(full, rel=1e-6)

    _close_half(bank)
    model.double()
    dargs = tuple(a.double() if a is not None and a.is_floating_point() else a for a in args)
    with torch.no_grad():
        expected = model(*dargs)
        exported = tg.export(model)
        torch.testing.assert_close(exported(*dargs), expected, rtol=1e-10, atol=1e-12)
    # both attention layers lose half their heads (2 of 4) and, in each kept head, half the head dims
    # (2 of 4; self-attention's need_weights path is unfused attention, cross-attention calls sdpa),
    # which nn.MultiheadAttention cannot hold (its heads span its width and its scale follows
    # head_dim): they stay PrunableMultiheadAttention, with the original scale
    attn, cross = exported.attn, exported.cross
    assert type(attn) is PrunableMultiheadAttention and (attn.num_heads, attn.head_dim, attn.embed_dim) == (2, 2, 8)
    assert attn.q_proj.weight.shape == (4, 8) and attn.out_proj.weight.shape == (8, 4) and attn.scaling == 0.5
    assert type(cross) is PrunableMultiheadAttention and (cross.num_heads, cross.head_dim, cross.kdim) == (2, 2, 10)
    assert cross.k_proj.weight.shape == (4, 10) and cross.scaling == 0.5  # 1 / sqrt(4), the original head_dim
    others = [n for n, m in exported.named_modules() if type(m).__module__.startswith("tg_kernels")]
    assert others == ["attn", "cross"]
    assert all(hd.space is not None for hd in bank.analysis.head_dims) and len(bank.analysis.head_dims) == 2
    assert budget.usage().flops == pytest.approx(_macs(exported.float(), args), rel=1e-6)

    # a training step in hard mode (compact execution) with the budget: gradients reach open weights
    # and gates only, and the trained model still exports exactly
    model.float().train()
    bank.set_skip("hard")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(*args).square().mean() + tg.Budget(model, target=0.5, weight=0.5)()
    loss.backward()
    assert bank.compact.disabled_reason is None and bank.compact.stats.forwards >= 1
    q_grad = model.attn.q_proj.weight.grad
    heads = next(g for g in bank.groups if "attn.q_proj" in g.producers)
    closed_heads = ~bank.gates[heads.key].open_mask()
    assert q_grad.abs().sum() > 0
    assert torch.all(q_grad.view(4, 4, -1)[closed_heads] == 0)
    optimizer.step()
    model.double().eval()
    with torch.no_grad():
        torch.testing.assert_close(tg.export(model)(*dargs), model(*dargs), rtol=1e-10, atol=1e-12)


def test_heads_pruned_apart_from_the_stream_export_as_prunable_attention():
    """Half the heads closed, the stream whole: nn.MultiheadAttention cannot hold that (its heads
    span its input width), so export keeps PrunableMultiheadAttention, and stays exact."""
    torch.manual_seed(0)
    args = _inputs("padding")
    model, bank = tg.attach_gates(AttentionNet(False).eval(), args, prunable_attention=True)
    _close_half(bank)
    stream = next(g for g in bank.groups if "inp" in g.producers)
    dims = [g for g in bank.groups if g.key.endswith("head_dims")]  # whole head dims too: heads only
    assert len(dims) == 2
    with torch.no_grad():
        for group in [stream, *dims]:
            bank.gates[group.key].weight.fill_(0.5)
    model.double()
    dargs = tuple(a.double() if a is not None and a.is_floating_point() else a for a in args)
    with torch.no_grad():
        exported = tg.export(model)
        torch.testing.assert_close(exported(*dargs), model(*dargs), rtol=1e-10, atol=1e-12)
    attn = exported.attn
    assert type(attn) is PrunableMultiheadAttention and (attn.embed_dim, attn.num_heads, attn.out_dim) == (16, 2, 16)
    assert attn.q_proj.weight.shape == (8, 16) and attn.out_proj.weight.shape == (16, 8)


def test_encoder_layers_run_their_gates_in_eval():
    """nn.TransformerEncoder in eval / no_grad would take the fused path (nested tensors with a padding
    mask, torch._transformer_encoder_layer_fwd): with gates attached it must not skip them."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.Sequential()
    model.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    model.head = nn.Linear(16, 3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.body = nn.Linear(6, 16), model

        def forward(self, x, padding):
            return self.body.head(self.body.encoder(self.embed(x), src_key_padding_mask=padding))

    x = torch.randn(2, L, 6)
    padding = torch.zeros(2, L, dtype=torch.bool)
    padding[1, -2:] = True
    net = Net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net, bank = tg.attach_gates(net, (x, padding), prunable_attention=True)
    assert {g.size for g in bank.groups} == {4, 32, 16}  # heads, FFN units, the stream
    _close_half(bank)
    net.double()
    with torch.no_grad():
        gated = net(x.double(), padding)
        exported = tg.export(net)
        torch.testing.assert_close(exported(x.double(), padding), gated, rtol=1e-10, atol=1e-12)
        bank.compact.enabled = False  # the per-layer path too
        torch.testing.assert_close(net(x.double(), padding), gated, rtol=1e-10, atol=1e-12)
    # padded positions: the exported model's encoder output there is what the gated model computes
    assert not gated.isnan().any()


def test_excluded_multihead_attention_keeps_its_class_and_the_encoder_ffn_still_prunes():
    """exclude=[nn.MultiheadAttention] keeps PyTorch's class (heads and stream whole); the encoder
    layers' FFN units are gated, and their fused inference path is kept off so the gates apply."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 3)).eval()
    x = torch.randn(2, L, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stream reaches nn.MultiheadAttention: it stays whole
        model, bank = tg.attach_gates(model, x, exclude=[nn.MultiheadAttention], prunable_attention=True)
    assert isinstance(model[0].layers[0].self_attn, nn.MultiheadAttention)
    assert sorted(g.producers for g in bank.groups) == [("0.layers.0.linear1",), ("0.layers.1.linear1",)]
    _close_half(bank)
    with torch.no_grad():
        exported = tg.export(model)
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-6)
    assert exported[0].layers[0].linear1.out_features == 16


@pytest.mark.parametrize("stream_whole", [False, True])
def test_save_and_load_pruned_attention(tmp_path, stream_whole):
    torch.manual_seed(0)
    args = _inputs("causal")
    model, bank = tg.attach_gates(AttentionNet(True).eval(), args, prunable_attention=True)
    _close_half(bank)
    if stream_whole:  # export keeps PrunableMultiheadAttention
        with torch.no_grad():
            bank.gates[next(g for g in bank.groups if "inp" in g.producers).key].weight.fill_(0.5)
    exported = tg.export(model)
    tg.save(exported, tmp_path / "m.pt")
    loaded = tg.load(tmp_path / "m.pt", AttentionNet(True))
    assert type(loaded.attn) is type(exported.attn)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(*args), exported.eval()(*args))


def test_a_checkpoint_of_the_original_model_loads_into_the_gated_one():
    torch.manual_seed(0)
    args = _inputs("padding")
    original = AttentionNet(False).eval()
    model, _ = tg.attach_gates(AttentionNet(False).eval(), args, prunable_attention=True)  # other weights
    missing, unexpected = model.load_state_dict(original.state_dict(), strict=False)
    assert unexpected == [] and missing and all(key.startswith("tg_gates.") or ".gate." in key for key in missing)
    with torch.no_grad():
        torch.testing.assert_close(model(*args), original(*args), rtol=1e-5, atol=1e-6)
