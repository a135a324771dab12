"""Everyday paths that used to crash, gate nothing or compute something else, one test per mechanism.

Each test names the defect it guards against; each fails on the code before its fix.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import warnings

import pytest
import torch
import torchvision
from helpers import close_random_half
from torch import nn

import tg_kernels as tg


def _close(bank, keep_fraction: float, seed: int = 0) -> None:
    """Every group keeps a share of open gates that is not a multiple of 8 (so round_to pads)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in bank.gates.values():
            n = gate.num_channels
            w = torch.rand(n, generator=g) + 0.1
            w[torch.randperm(n, generator=g)[: n - max(1, int(n * keep_fraction))]] = -0.3
            gate.weight.copy_(w)


class NormNet(nn.Module):
    """A LayerNorm over gated Linear features, and a GroupNorm over gated conv channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.fc1 = nn.Linear(8, 32)
        self.ln = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.gn(self.conv(x))).mean((2, 3))
        return self.fc2(self.ln(self.fc1(h)))


def _loss_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(x).square().sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("skip", ["exact", "hard", "none"])
def test_deepcopy_of_a_gated_model_with_norms_trains_the_same_network(skip):
    """Defect: compact execution keyed full-width norms by id(module), stale in a deepcopy."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    model, bank = tg.attach_gates(NormNet().double(), x, skip=skip)
    close_random_half(bank)
    model.train()
    twin = copy.deepcopy(model)
    loss, grads = _loss_and_grads(model, x)
    twin_loss, twin_grads = _loss_and_grads(twin, x)
    torch.testing.assert_close(twin_loss, loss)
    for a, b in zip(twin_grads, grads, strict=True):
        torch.testing.assert_close(a, b)
    averaged = torch.optim.swa_utils.AveragedModel(model)  # built by deepcopy too
    averaged.train()
    torch.testing.assert_close(averaged(x), model(x))


def test_torch_save_and_load_of_a_whole_gated_model():
    """Defect: the analysis held ATen op objects that pickle cannot store."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model, bank = tg.attach_gates(torchvision.models.resnet18(num_classes=10), x)
    close_random_half(bank)
    model.eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    loaded.eval()
    torch.testing.assert_close(loaded(x), model(x))
    loaded.train()
    loaded(x).sum().backward()  # the loaded model trains (exact mode, with its side pass)
    assert loaded.tg_gates.gates[next(iter(loaded.tg_gates.gates))].weight.grad is not None


class CatAlongHeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], dim=2))


@pytest.mark.parametrize("skip", ["exact", "hard"])
def test_cat_along_a_spatial_dim_couples_channels_and_trains(skip):
    """Defect: concatenation along height was taken for a channel concatenation; the step raised."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    model, bank = tg.attach_gates(CatAlongHeight().double(), x, skip=skip)
    assert bank.gates, bank.skipped
    close_random_half(bank)
    model.train()
    model(x).sum().backward()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(tg.export(model)(x), model(x))


def test_export_round_to_8_pads_only_where_exact_and_matches():
    """Defect: round_to=8 raised where a padded closed channel had no layer to be zeroed in."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model, bank = tg.attach_gates(torchvision.models.resnet18(num_classes=10), x)
    _close(bank, 0.45)
    model.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = tg.export(model, round_to=8)
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    # a block's first conv feeds a gate on the second conv's input: padded (its zeros fold into conv2)
    inner = [m.out_channels for name, m in small.named_modules() if name.endswith(".conv1")]
    assert inner and all(w % 8 == 0 for w in inner), inner
    # block outputs past a residual add have no layer to fold zeros into: left at their open count, named
    messages = [str(w.message) for w in caught if "round_to=8" in str(w.message)]
    assert len(messages) == 1 and "no layer to fold into" in messages[0], messages


class InstanceNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.InstanceNorm2d(16)  # non-affine, no running stats: no tensor tells its size
        self.c2 = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.norm(self.c1(x))))


def test_exported_non_affine_instance_norm_has_its_kept_size_after_save_and_load():
    """Defect: a norm without tensors kept its full num_features (warned, and raised when affine)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model, bank = tg.attach_gates(InstanceNormNet(), x)
    close_random_half(bank)
    model.eval()
    small = tg.export(model)
    kept = small.c1.out_channels
    assert kept < 16 and small.norm.num_features == kept
    buffer = io.BytesIO()
    tg.save(small, buffer)
    buffer.seek(0)
    loaded = tg.load(buffer, InstanceNormNet())
    assert loaded.norm.num_features == kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(loaded(x), model(x))


def tiny_llama() -> nn.Module:
    """A tiny Hugging Face Llama with grouped KV heads and its default config (use_cache=True)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    assert config.use_cache
    return transformers.LlamaForCausalLM(config)


def test_hugging_face_llama_with_its_default_config_and_positional_input_is_gated():
    """Defect: use_cache=True returns a DynamicCache, which stopped the trace: nothing was gated."""
    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, bank = tg.attach_gates(model, (ids,))
    assert len(bank.gates) >= 6, bank.skipped
    assert not [w for w in caught if "cannot trace" in str(w.message)]
    close_random_half(bank)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(tg.export(model)(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


class PositionalEncoding(nn.Module):
    def __init__(self, d_model: int, dropout: float = 0.1, max_len: int = 64) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, 1, d_model)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + self.pe[: x.size(0)])


class TutorialTransformer(nn.Module):
    """PyTorch's language-modelling tutorial model: the causal mask is made in the forward."""

    def __init__(self, ntoken: int = 50, d_model: int = 32, nhead: int = 2, d_hid: int = 64, nlayers: int = 2):
        super().__init__()
        self.pos_encoder = PositionalEncoding(d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, d_hid, 0.1)
        self.transformer_encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.embedding = nn.Embedding(ntoken, d_model)
        self.d_model = d_model
        self.linear = nn.Linear(d_model, ntoken)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        src = self.pos_encoder(self.embedding(src) * math.sqrt(self.d_model))
        if src_mask is None:
            src_mask = nn.Transformer.generate_square_subsequent_mask(len(src)).to(src.device)
        return self.linear(self.transformer_encoder(src, src_mask))


@pytest.mark.parametrize(("prunable_attention", "groups"), [(False, 2), (True, 4)])
def test_tutorial_transformer_with_a_mask_made_in_the_forward_is_gated_quietly(capfd, prunable_attention, groups):
    """Defect: the causal-mask check reads tensor values; torch.export failed, nothing was gated,
    and the failed trace printed a whole graph. By default nn.MultiheadAttention stays (its heads
    and the stream stay whole, the FFNs prune); opting in prunes them too, with a warning."""
    torch.manual_seed(0)
    x = torch.randint(0, 50, (10, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, bank = tg.attach_gates(TutorialTransformer(), (x,), prunable_attention=prunable_attention)
    out, err = capfd.readouterr()
    assert "def forward" not in out + err  # no graph dump
    assert len(bank.gates) >= groups, bank.skipped
    messages = [str(w.message) for w in caught]
    assert sum("example inputs" in m for m in messages) == 1, messages
    close_random_half(bank)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small = tg.export(model)
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    foreign = [m for m in small.modules() if type(m).__module__.startswith("tg_kernels")]
    warned = [w for w in caught if "PrunableMultiheadAttention" in str(w.message)]
    assert len(warned) == (1 if foreign else 0)  # plain by default; opted-in reach that stays is named
    assert prunable_attention or not foreign
    model.train()
    model(x).sum().backward()


def test_exported_attention_models_are_plain_torch_by_default():
    """Defect: export kept tg_kernels attention modules where the kept head dims were pruned."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model, bank = tg.attach_gates(torchvision.models.VisionTransformer(32, 16, 2, 2, 32, 64, num_classes=10), x)
    close_random_half(bank)
    model.eval()
    small = tg.export(model)
    foreign = {type(m).__module__ for m in small.modules() if type(m).__module__.startswith("tg_kernels")}
    assert not foreign
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)


class InputBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:  # a branch on the data: one recorded run does not stand for every input
            h = h * 2
        return self.b(h)


def test_a_recorded_run_refuses_branches_on_the_data_but_takes_branches_on_constants():
    from tg_kernels.pruning.analysis import real_trace
    from tg_kernels.pruning.analysis.tracing import DataDependentBranch

    with pytest.raises(DataDependentBranch, match="inputs or weights"):
        real_trace(InputBranch(), (torch.randn(3, 4),))
    trace = real_trace(TutorialTransformer(), (torch.randint(0, 50, (10, 4)),))  # its mask: constants only
    assert "transformer_encoder.layers.0.linear1" in trace.calls


class _Result:  # a plain object: not a tensor, container or dataclass
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


@dataclasses.dataclass
class _DataclassResult:
    logits: torch.Tensor


class _Classifier(nn.Module):
    def __init__(self, wrap) -> None:
        super().__init__()
        self.fc1, self.fc2, self.wrap = nn.Linear(6, 16), nn.Linear(16, 4), wrap

    def forward(self, x: torch.Tensor):
        return self.wrap(self.fc2(torch.relu(self.fc1(x))))


def test_outputs_inside_dataclasses_stay_whole_and_other_objects_are_named():
    """A dataclass result counts as an output (its classes stay whole); an object that is neither
    tensor, container nor dataclass (a KV cache) is left out, and one warning names its type."""
    x = torch.randn(3, 6)
    model, bank = tg.attach_gates(_Classifier(_DataclassResult), x)
    assert "fc2" not in {p for g in bank.groups for p in g.producers}  # its outputs are the classes
    assert "fc1" in {p for g in bank.groups for p in g.producers}
    with pytest.warns(UserWarning, match="_Result, which is not counted as an output"):
        tg.attach_gates(_Classifier(_Result), x)
