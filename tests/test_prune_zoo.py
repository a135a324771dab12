"""attach_gates beyond torchvision: timm, Hugging Face transformers, the paper's task families.

For each model: attach (through the torch.export graph), close a random half of every group,
export, and check that (1) the exported model computes what the gated model computes (float64),
(2) its MACs (counted by ``torch.utils.flop_counter.FlopCounterMode``) are at most the measured
ratio plus a margin, and (3) ``Budget.usage()`` agrees with FlopCounterMode within 2% on both the
full and the exported model. FlopCounterMode runs with the math attention backend and gradients
enabled, because on CPU it counts neither the fused ``scaled_dot_product_attention`` kernel nor
``nn.MultiheadAttention``'s inference fast path.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import close_half
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import tg_kernels as tg
from tests.prune_zoo import TIMM_MODELS, hf_models, rnn_models, task_family_models

# The exported/original MACs at 50% closed, measured on this CPU (see the README's table), with the
# structural reason where it is above 0.35. The tests allow 0.03 above these. Attention prunes by whole
# heads and by head dims (where the scale does not follow head_dim: timm's ViT keeps them whole).
EXPECTED_RATIO = {
    "efficientnet_b0": 0.28,
    "mobilenetv3_large_100": 0.28,
    "convnext_atto": 0.27,
    "densenet121": 0.26,
    "ghostnet_100": 0.29,
    "repvgg_a0": 0.25,
    "vit_tiny_patch16_224": 0.34,
    "swin_tiny_patch4_window7_224": 0.22,  # head dims too (unfused attention, scale fixed at init)
    "bert": 0.19,  # heads and head dims (explicit scale)
    "gpt2": 0.24,
    "llama_gqa": 0.25,  # head dims in rotary pairs, one set for both layers (one rotary table)
    "vit": 0.27,  # transformers' ViTForImageClassification
    "t5": 0.39,  # the residual stream is an output (encoder_last_hidden_state), tied to the decoder's
    "style_transfer": 0.34,
    "flownet_s": 0.31,
    "translation": 0.19,  # nn.Transformer: heads, head dims, FFN units and the stream (PrunableMultiheadAttention)
    "lstm_lm": 0.28,
    "gru_tagger": 0.26,
    "lstm_classifier": 0.25,
}


def _macs(model: nn.Module, args: tuple, kwargs: dict) -> float:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return float(counter.get_total_flops())


def _rnn_macs(model: nn.Module, args: tuple, kwargs: dict) -> float:
    """FlopCounterMode's count plus every ``nn.LSTM`` call's matrix products, counted by hand.

    On CPU FlopCounterMode counts nothing inside ``aten.lstm`` (it runs as one fused kernel), while
    it counts ``nn.GRU``'s matrix products; :func:`test_rnn_flop_count_by_hand` checks both facts and
    that the hand count equals FlopCounterMode's for a GRU. Per layer and direction an RNN computes
    ``x W_ih^T``, ``h W_hh^T`` (and the LSTM's projection ``W_hr``) for every token: ``2 * tokens``
    times the weights' entries.
    """
    extra = [0.0]

    def count(module: nn.Module, inputs: tuple, output) -> None:
        shape = inputs[0].shape
        tokens = shape[0] * shape[1] if len(shape) == 3 else shape[0]
        weights = [p for n, p in module.named_parameters() if n.startswith(("weight_ih", "weight_hh", "weight_hr"))]
        extra[0] += 2.0 * tokens * sum(p.numel() for p in weights)

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.LSTM)]
    try:
        total = _macs(model, args, kwargs)
    finally:
        for h in handles:
            h.remove()
    return total + extra[0]


def _leaves(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "values"):
        return [t for v in value.values() for t in _leaves(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _leaves(v)]
    return []


def _check(name: str, model: nn.Module, args: tuple, kwargs: dict, macs_of=_macs) -> None:
    model.eval()
    full_macs = macs_of(model, args, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, bank = tg.attach_gates(model, args, example_kwargs=kwargs)
    assert bank.analysis.tracer == "export"
    assert len(bank.groups) > 0
    assert 0 < bank.analysis.coverage <= 1 and "gates control" in bank.coverage()
    budget = tg.Budget(model, target=1.0)  # usage only (a tight target may be below what min_open allows)
    assert budget.usage().full_flops == pytest.approx(full_macs, rel=0.02)
    close_half(bank)
    model.double()
    dargs = tuple(a.double() if a.is_floating_point() else a for a in args)
    with torch.no_grad():
        expected = _leaves(model(*dargs, **kwargs))
        exported = tg.export(model)
        actual = _leaves(exported(*dargs, **kwargs))
    for e, a in zip(expected, actual, strict=True):
        if e.is_floating_point():
            scale = e.abs().max().clamp_min(1e-30)
            torch.testing.assert_close(a / scale, e / scale, rtol=0, atol=1e-6)
    exported.float()
    macs = macs_of(exported, args, kwargs)
    usage = budget.usage()
    assert usage.flops == pytest.approx(macs, rel=0.02)
    assert macs / full_macs <= EXPECTED_RATIO[name] + 0.03, f"{name}: {macs / full_macs:.3f}"


@pytest.mark.parametrize("name", list(task_family_models()))
def test_task_family_models(name):
    torch.manual_seed(0)
    build, args, kwargs = task_family_models()[name]
    _check(name, build(), args, kwargs)


@pytest.mark.parametrize("name", list(rnn_models()))
def test_rnn_models(name):
    """LSTM / GRU hidden units: exact export with half closed, Budget against the (hand-completed) count."""
    torch.manual_seed(0)
    build, args, kwargs = rnn_models()[name]
    model = build()
    _check(name, model, args, kwargs, macs_of=_rnn_macs)
    groups = {g.key: g.size for g in model.tg_gates.groups}
    rnn = next(n for n, m in model.named_modules() if isinstance(m, nn.LSTM | nn.GRU))
    assert groups.get(rnn) == model.get_submodule(rnn).hidden_size  # hidden units are one gated group


def test_rnn_flop_count_by_hand():
    """What _rnn_macs relies on: FlopCounterMode sees no FLOPs in an LSTM on CPU, and for a GRU (which it
    counts) the hand count of the RNN's matrix products equals its count."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 8)
    lstm = nn.LSTM(8, 6, num_layers=2, batch_first=True, bidirectional=True)
    assert _macs(lstm, (x,), {}) == 0.0
    gru = nn.GRU(8, 6, num_layers=2, batch_first=True, bidirectional=True)
    weights = sum(p.numel() for n, p in gru.named_parameters() if n.startswith("weight"))
    assert _macs(gru, (x,), {}) == 2.0 * 3 * 7 * weights
    lstm_weights = sum(p.numel() for n, p in lstm.named_parameters() if n.startswith("weight"))
    assert _rnn_macs(lstm, (x,), {}) == 2.0 * 3 * 7 * lstm_weights


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama_gqa", "vit", "t5"])
def test_transformers_models(name):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    build, args, kwargs = hf_models()[name]
    _check(name, build(), args, kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    size = 224 if ("vit" in name or "swin" in name) else 96
    _check(name, timm.create_model(name, num_classes=10), (torch.randn(1, 3, size, size),), {})


class ShapeRead(nn.Module):
    """Reads a gated tensor's size and reshapes another tensor with it (DeiT-style attention does)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.qkv = nn.Linear(8, 16), nn.Linear(8, 48)
        self.out, self.proj = nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        B, N, C = h.shape
        return self.out(h) + self.proj(self.qkv(x).reshape(B, N, -1, C).sum(2))


def test_shape_read_is_caught_by_the_self_check():
    x = torch.randn(2, 3, 8)
    with pytest.warns(UserWarning, match="self-check.*inp"):
        model, bank = tg.attach_gates(ShapeRead(), x)
    assert "self-check" in bank.skipped["inp"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unchecked, unchecked_bank = tg.attach_gates(ShapeRead(), x, self_check=False)
    unchecked_groups = [g.producers for g in unchecked_bank.groups]
    assert ("inp",) in unchecked_groups and ("inp",) not in [g.producers for g in bank.groups]  # what it removed
    assert ("qkv",) in unchecked_groups  # qkv in heads of C entries: removing whole ones stays exact
    close_half(bank)
    torch.testing.assert_close(tg.export(model).eval()(x), model.eval()(x))


def test_example_kwargs_and_tracer_choice():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x=None, **extra):
            return self.b(torch.relu(self.a(x)))

    x = torch.randn(3, 4)
    model, bank = tg.attach_gates(Kw(), example_kwargs={"x": x})
    assert [g.producers for g in bank.groups] == [("a",)]
    with pytest.raises(TypeError, match="example_kwargs"):
        tg.attach_gates(Kw(), example_kwargs=[x])
    with pytest.raises(ValueError, match="tracer"):
        tg.attach_gates(Kw(), x, tracer="jit")
    _, fx_bank = tg.attach_gates(Kw(), x, tracer="fx")
    assert fx_bank.analysis.tracer == "fx" and [g.producers for g in fx_bank.groups] == [("a",)]


def test_layer_norm_over_gated_channels_uses_open_statistics():
    """Pre-norm residual MLP stack: the stream is gated, LayerNorm runs over open channels at full width."""

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(self.norm(x))))

    class Net(nn.Module):
        def __init__(self, d=8):
            super().__init__()
            self.embed = nn.Linear(3, d)
            self.blocks = nn.Sequential(Block(d), Block(d))
            self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 2)

        def forward(self, x):
            return self.head(self.norm(self.blocks(self.embed(x))))

    torch.manual_seed(0)
    x = torch.randn(4, 5, 3)
    model, bank = tg.attach_gates(Net(), x)
    stream = next(g for g in bank.groups if "embed" in g.producers)
    assert {"embed", "blocks.0.fc2", "blocks.1.fc2"} <= set(stream.producers)
    assert {name for name, _ in bank.analysis.norms} == {"blocks.0.norm", "blocks.1.norm", "norm"}
    close_half(bank)
    model.double().eval()
    with torch.no_grad():
        exported = tg.export(model)
        torch.testing.assert_close(exported(x.double()), model(x.double()), rtol=1e-10, atol=1e-12)
    assert exported.norm.normalized_shape == (4,)


def test_per_channel_prelu_and_conv_transpose_export_exactly():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(8), nn.ConvTranspose2d(8, 6, 4, 2, 1), nn.PReLU(6), nn.Conv2d(6, 2, 1)
    )
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, bank = tg.attach_gates(model, x)
    assert sorted(g.producers for g in bank.groups) == [("0",), ("2",)]
    close_half(bank)
    model.double().eval()
    with torch.no_grad():
        exported = tg.export(model)
        torch.testing.assert_close(exported(x.double()), model(x.double()), rtol=1e-10, atol=1e-12)
    assert exported[1].weight.numel() == 4 and exported[2].out_channels == 3
    usage = tg.Budget(model, target=1.0).usage()
    assert usage.flops == pytest.approx(_macs(exported.float(), (x,), {}), rel=1e-6)


def test_grouped_convs_prune_group_aligned():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1, groups=4), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 4, 1),
    )  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    model, bank = tg.attach_gates(model, x)
    assert sorted(g.size for g in bank.groups) == [2, 3]  # channel i of each of the 4 groups shares a gate
    close_half(bank)
    model.double().eval()
    with torch.no_grad():
        exported = tg.export(model)
        torch.testing.assert_close(exported(x.double()), model(x.double()), rtol=1e-10, atol=1e-12)
    assert exported[3].groups == 4 and exported[3].in_channels == 4 and exported[3].out_channels == 8


# --------------------------------------------------------------------------------------------------
# Attention heads, on small models written the ways the model zoos write them
# --------------------------------------------------------------------------------------------------


class HeadsAttention(nn.Module):
    """Self-attention in the styles of Hugging Face (separate q/k/v, ``view(B, N, -1, D)``), of timm
    (fused qkv, ``reshape(B, N, 3, self.num_heads, self.head_dim)``, ``reshape(B, N, self.attn_dim)``),
    with grouped KV heads (``repeat_kv``: expand + reshape), unfused (``q @ k^T``, softmax, a
    relative position bias table indexed per head) and with a bias of ``zeros(1, num_heads, N, N)``."""

    def __init__(self, dim: int, heads: int, style: str, kv_heads: int | None = None, tokens: int = 5) -> None:
        super().__init__()
        self.style, self.num_heads, self.head_dim = style, heads, dim // heads
        self.kv_heads = kv_heads or heads
        self.attn_dim = heads * self.head_dim
        self.layer_idx = heads  # a position that equals the head count: export must leave it alone
        if style == "fused":
            self.qkv = nn.Linear(dim, 3 * self.attn_dim)
        else:
            self.q = nn.Linear(dim, self.attn_dim)
            self.k = nn.Linear(dim, self.kv_heads * self.head_dim)
            self.v = nn.Linear(dim, self.kv_heads * self.head_dim)
        if style == "unfused":
            self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads))
            pos = torch.arange(tokens)
            self.register_buffer("index", (pos[:, None] - pos[None, :] + tokens - 1).flatten(), persistent=False)
        self.o = nn.Linear(self.attn_dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        if self.style == "fused":
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            q, k, v = (t(x).view(B, N, -1, self.head_dim).transpose(1, 2) for t in (self.q, self.k, self.v))
        if k.shape[1] != q.shape[1] and self.style != "gqa":  # repeat_kv, sizes read from the tensors (as HF does)
            b, h, n, d = k.shape
            n_rep = q.shape[1] // h
            k, v = (t[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d) for t in (k, v))
        if self.style == "unfused":
            bias = self.table[self.index].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
            attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1) + bias
            y = attn.softmax(-1) @ v
        elif self.style == "biased":  # a bias filled per head, sized by self.num_heads (T5's cross-attention)
            bias = torch.zeros((1, self.num_heads, N, N), dtype=q.dtype)
            causal = torch.ones(N, N, dtype=torch.bool).tril()
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(causal, bias, -1e9))
        else:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.style == "gqa")
        if self.style == "fused":
            return self.o(y.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.o(y.transpose(1, 2).reshape(B, N, -1))


class TinyTransformer(nn.Module):
    """Embedding, pre-norm blocks of attention and MLP, and an LM head (tied to the embedding if asked)."""

    def __init__(self, style: str, kv_heads: int | None = None, tied: bool = False, dim: int = 24, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(20, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.LayerNorm(dim), "attn": HeadsAttention(dim, heads, style, kv_heads),
            "norm2": nn.LayerNorm(dim), "fc1": nn.Linear(dim, 2 * dim), "fc2": nn.Linear(2 * dim, dim),
        }) for _ in range(2))  # fmt: skip
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 20, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b["attn"](b["norm1"](h))
            h = h + b["fc2"](torch.relu(b["fc1"](b["norm2"](h))))
        return self.head(self.norm(h))


def _exact_and_counted(model: nn.Module, ids: torch.Tensor) -> tuple[tg.GateBank, nn.Module]:
    """Attach, close half of every group, export: the export is exact and Budget counts its FLOPs."""
    torch.manual_seed(0)
    model.eval()
    full = _macs(model, (ids,), {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, bank = tg.attach_gates(model, ids)
    budget = tg.Budget(model, target=1.0)
    assert budget.usage().full_flops == pytest.approx(full, rel=1e-6)
    close_half(bank)
    model.double()
    with torch.no_grad():
        expected = model(ids)
        exported = tg.export(model)
        torch.testing.assert_close(exported(ids), expected, rtol=1e-10, atol=1e-12)
    assert budget.usage().flops == pytest.approx(_macs(exported.float(), (ids,), {}), rel=1e-6)
    return bank, exported


@pytest.mark.parametrize("style", ["separate", "fused", "unfused", "biased"])
def test_attention_prunes_whole_heads(style):
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    bank, exported = _exact_and_counted(TinyTransformer(style), ids)
    names = ("qkv",) if style == "fused" else ("q", "k", "v")
    for i in range(2):
        heads = next(g for g in bank.groups if f"blocks.{i}.attn.{names[0]}" in g.producers)
        assert heads.size == 4 and set(heads.producers) >= {f"blocks.{i}.attn.{n}" for n in names}
        attn = exported.blocks[i]["attn"]
        assert attn.o.in_features == 2 * attn.head_dim  # two of four heads, each whole
        if style == "fused":
            assert attn.num_heads == 2 and attn.attn_dim == 12 and attn.qkv.out_features == 36
            assert attn.layer_idx == 4
        if style == "biased":
            assert attn.num_heads == 2
    stream = next(g for g in bank.groups if "embed" in g.producers)
    assert {"blocks.0.attn.o", "blocks.1.fc2"} <= set(stream.producers)


@pytest.mark.parametrize("style", ["separate", "gqa"])  # repeat_kv, or scaled_dot_product_attention(enable_gqa)
def test_grouped_kv_heads_are_tied_to_their_query_heads(style):
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    bank, exported = _exact_and_counted(TinyTransformer(style, kv_heads=2), ids)
    heads = next(g for g in bank.groups if "blocks.0.attn.q" in g.producers)
    assert heads.size == 2  # one gate per KV head, covering its two query heads
    attn = exported.blocks[0]["attn"]
    assert (attn.q.out_features, attn.k.out_features) == (12, 6)


def test_tied_embedding_and_lm_head_prune_the_residual_stream():
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    bank, exported = _exact_and_counted(TinyTransformer("separate", tied=True), ids)
    stream = next(g for g in bank.groups if "embed" in g.producers)
    assert stream.size == 24
    assert exported.head.weight is exported.embed.weight and exported.embed.weight.shape == (20, 12)


def test_group_norm_prunes_group_aligned_with_open_statistics():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.gn = nn.Conv2d(3, 12, 3, padding=1), nn.GroupNorm(3, 12)
            self.conv, self.gn2 = nn.Conv2d(12, 12, 3, padding=1), nn.GroupNorm(4, 12)
            self.head = nn.Conv2d(12, 2, 1)

        def forward(self, x):
            h = torch.relu(self.gn(self.stem(x)))
            return self.head(h + torch.relu(self.gn2(self.conv(h))))

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model, bank = tg.attach_gates(Net().eval(), x)
    assert [(g.size, set(g.producers)) for g in bank.groups] == [(1, {"stem", "conv"})]  # lcm of 3 and 4 groups
    assert {name for name, _ in bank.analysis.norms} == {"gn", "gn2"}
    single = nn.Sequential(nn.Conv2d(3, 12, 3), nn.GroupNorm(3, 12), nn.ReLU(), nn.Conv2d(12, 2, 1))
    model, bank = tg.attach_gates(single.eval(), x)
    assert [g.size for g in bank.groups] == [4]  # channel i of each of the 3 groups shares a gate
    close_half(bank)
    model.double()
    with torch.no_grad():
        exported = tg.export(model)
        torch.testing.assert_close(exported(x.double()), model(x.double()), rtol=1e-10, atol=1e-12)
    assert exported[1].num_groups == 3 and exported[1].num_channels == 6 and exported[0].out_channels == 6


def test_gate_on_flattened_channels_covers_each_channels_entries():
    """A gate needed after a flatten (a sigmoid makes closed channels non-zero) covers H * W entries."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Sigmoid(),
        nn.Linear(8 * 6 * 6, 4),
    )  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, bank = tg.attach_gates(model.eval(), x)
    assert [(p.module, p.repeat) for p in bank.analysis.gate_points if p.module == "5"] == [("5", 36)]
    close_half(bank)
    model.double()
    with torch.no_grad():
        exported = tg.export(model)
        torch.testing.assert_close(exported(x.double()), model(x.double()), rtol=1e-10, atol=1e-12)
    assert exported[6].in_features == 4 * 36
