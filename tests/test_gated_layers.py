"""GatedLinear / GatedConv2d and their skipping ops against a dense torch.nn.functional reference.

The semantics are docs/design.md §3.
"""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tg_kernels import use_backend
from tg_kernels.nn import GatedConv2d, GatedLinear
from tg_kernels.ops import _skip
from tg_kernels.ops.gated_conv import gated_conv2d, gated_conv2d_backward_op, gated_conv2d_op
from tg_kernels.ops.gated_linear import gated_linear, gated_linear_backward_op, gated_linear_op

MODES = ("none", "exact", "hard")
PATTERNS = ("all_open", "some_closed", "all_closed")
F64 = torch.float64


def make_gate(channels: int, pattern: str, seed: int = 0, binary: bool = False) -> torch.Tensor:
    """Gate values with exact zeros for closed channels; open values are 1 (binary) or random in [0.5, 1.5]."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.ones(channels, dtype=F64) if binary else 0.5 + torch.rand(channels, generator=gen, dtype=F64)
    if pattern == "all_closed":
        values.zero_()
    elif pattern == "some_closed":
        closed = torch.rand(channels, generator=gen) < 0.6
        closed[0] = True
        closed[-1] = False
        values[closed] = 0
    return values


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def grads_of(fn, inputs: list[torch.Tensor | None], seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Run fn on fresh leaves of `inputs`, backpropagate a fixed random dy, return (y, grads)."""
    leaves = [leaf(t) if t is not None else None for t in inputs]
    y = fn(*leaves)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    y.backward(dy)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def reference(layer, mode: str):
    """Dense reference: layer(x, w, b) * gate with plain autograd; "hard" removes closed channels' gate gradient."""

    def fn(x, w, b, gate):
        z = layer(x, w, b)
        g = gate * (gate != 0) if mode == "hard" else gate
        return z * g.view([1, -1] + [1] * (z.dim() - 2))

    return fn


def assert_all_close(actual, expected, rtol=1e-9, atol=1e-9):
    for a, e in zip(actual, expected, strict=True):
        if e is None:
            assert a is None
            continue
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------- Linear


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "scaled"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_reference(mode, pattern, bias, binary):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 11, generator=gen, dtype=F64)
    w = torch.randn(37, 11, generator=gen, dtype=F64)
    b = torch.randn(37, generator=gen, dtype=F64) if bias else None
    gate = make_gate(37, pattern, binary=binary)
    y, grads = grads_of(lambda x, w, b, g: gated_linear(x, w, b, g, skip=mode), [x, w, b, gate])
    y_ref, grads_ref = grads_of(reference(F.linear, mode), [x, w, b, gate])
    assert_all_close([y, *grads], [y_ref, *grads_ref])
    if mode == "hard":
        assert (grads[3][gate == 0] == 0).all()
    elif pattern != "all_open":
        assert grads[3][gate == 0].abs().sum() > 0  # exact gate gradients for closed channels


def test_linear_exact_equals_none_for_modules():
    torch.manual_seed(0)
    layers = {mode: GatedLinear(9, 20, skip=mode, dtype=F64) for mode in MODES}
    state = layers["none"].state_dict()
    state["gate.weight"] = torch.randn(20, dtype=F64)
    x = torch.randn(3, 4, 9, dtype=F64)
    results = {}
    for mode, layer in layers.items():
        layer.load_state_dict(state)
        xi = leaf(x)
        y = layer(xi)
        (y * torch.arange(20, dtype=F64)).sum().backward()
        results[mode] = [y, xi.grad, layer.weight.grad, layer.bias.grad, layer.gate.weight.grad]
    assert_all_close(results["exact"], results["none"])
    closed = state["gate.weight"] < 0
    assert (results["hard"][4][closed] == 0).all()
    assert_all_close(results["hard"][:4], results["none"][:4])
    torch.testing.assert_close(results["hard"][4][~closed], results["none"][4][~closed])


@pytest.mark.parametrize("mode", MODES)
def test_linear_stack_with_shared_workspace(mode):
    """Two skipping layers in a row (temporaries share workspace buffers) still match the reference."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 10, generator=gen, dtype=F64)
    w1, w2 = torch.randn(24, 10, generator=gen, dtype=F64), torch.randn(24, 24, generator=gen, dtype=F64)
    b1, b2 = torch.randn(24, generator=gen, dtype=F64), torch.randn(24, generator=gen, dtype=F64)
    g1, g2 = make_gate(24, "some_closed", seed=1, binary=True), make_gate(24, "some_closed", seed=2, binary=True)

    def ours(x, w1, b1, g1, w2, b2, g2):
        return gated_linear(torch.tanh(gated_linear(x, w1, b1, g1, mode)), w2, b2, g2, mode)

    def ref(x, w1, b1, g1, w2, b2, g2):
        inner = reference(F.linear, mode)
        return inner(torch.tanh(inner(x, w1, b1, g1)), w2, b2, g2)

    for _ in range(2):
        y, grads = grads_of(ours, [x, w1, b1, g1, w2, b2, g2])
        y_ref, grads_ref = grads_of(ref, [x, w1, b1, g1, w2, b2, g2])
        assert_all_close([y, *grads], [y_ref, *grads_ref])


@pytest.mark.parametrize("mode", ["exact", "hard"])
def test_linear_one_channel_and_batch_zero(mode):
    for channels, n in ((1, 3), (5, 0)):
        for pattern in ("all_open", "all_closed"):
            x = torch.randn(n, 4, dtype=F64)
            w = torch.randn(channels, 4, dtype=F64)
            b = torch.randn(channels, dtype=F64)
            gate = make_gate(channels, pattern)
            y, grads = grads_of(lambda x, w, b, g: gated_linear(x, w, b, g, skip=mode), [x, w, b, gate])
            y_ref, grads_ref = grads_of(reference(F.linear, mode), [x, w, b, gate])
            assert_all_close([y, *grads], [y_ref, *grads_ref])


# ---------------------------------------------------------------------------------------------- Conv2d

CONV_CASES = {
    "basic": dict(cin=4, cout=16, k=3, stride=1, padding=1, dilation=1, groups=1),
    "stride_dilation": dict(cin=3, cout=10, k=3, stride=2, padding=2, dilation=2, groups=1),
    "rect_kernel": dict(cin=3, cout=9, k=(1, 3), stride=(2, 1), padding=(0, 1), dilation=1, groups=1),
    "groups2": dict(cin=4, cout=12, k=3, stride=1, padding=1, dilation=1, groups=2),
    "depthwise": dict(cin=6, cout=6, k=3, stride=1, padding=1, dilation=1, groups=6),
    "depthwise_x2": dict(cin=4, cout=8, k=3, stride=2, padding=1, dilation=1, groups=4),
}


def conv_inputs(case: dict, n: int = 2, hw: int = 7, bias: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    k = case["k"] if isinstance(case["k"], tuple) else (case["k"], case["k"])
    x = torch.randn(n, case["cin"], hw, hw, generator=gen, dtype=F64)
    w = torch.randn(case["cout"], case["cin"] // case["groups"], *k, generator=gen, dtype=F64)
    b = torch.randn(case["cout"], generator=gen, dtype=F64) if bias else None
    return x, w, b


def conv_fn(case: dict, mode: str | None = None):
    args = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"])
    if mode is None:
        return lambda x, w, b: F.conv2d(x, w, b, **args)
    return lambda x, w, b, g: gated_conv2d(x, w, b, g, skip=mode, **args)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "scaled"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_matches_reference(case, mode, pattern, binary):
    spec = CONV_CASES[case]
    x, w, b = conv_inputs(spec, bias=case != "basic" or pattern != "some_closed")
    gate = make_gate(spec["cout"], pattern, seed=3, binary=binary)
    y, grads = grads_of(conv_fn(spec, mode), [x, w, b, gate])
    y_ref, grads_ref = grads_of(reference(conv_fn(spec), mode), [x, w, b, gate])
    assert_all_close([y, *grads], [y_ref, *grads_ref])


@pytest.mark.parametrize(
    "gate_values, sel, in_idx, has_zero_row",
    [
        ([1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0], [0, 1, 9, 10], [0, 1, 4, 5], True),  # closed padding in group 0
        ([1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0], [0, 1, 8, 9], [0, 1, 4, 5], False),  # no zero row: scatter
    ],
)
def test_conv_grouped_drops_closed_groups(gate_values, sel, in_idx, has_zero_row):
    """A group with every channel closed is dropped with its inputs; the others keep k channels each."""
    gate = torch.tensor(gate_values, dtype=F64)
    plan = _skip.plan_active(gate, groups=3, in_channels=6)
    assert plan.kind == "skip" and plan.groups == 2
    assert plan.sel.tolist() == sel and plan.in_idx.tolist() == in_idx
    assert (plan.out_map is not None) == has_zero_row
    spec = dict(cin=6, cout=12, k=3, stride=1, padding=1, dilation=1, groups=3)
    x, w, b = conv_inputs(spec)
    for scale in (1.0, 1.5):  # binary gates and general gate values
        for mode in MODES:
            y, grads = grads_of(conv_fn(spec, mode), [x, w, b, gate * scale])
            y_ref, grads_ref = grads_of(reference(conv_fn(spec), mode), [x, w, b, gate * scale])
            assert_all_close([y, *grads], [y_ref, *grads_ref])


def test_plan_pads_to_multiple_of_eight():
    gate = torch.zeros(20)
    gate[[3, 11]] = 1
    plan = _skip.plan_active(gate, groups=1, in_channels=4)
    assert plan.kind == "skip" and plan.binary
    assert plan.sel.numel() == 8 and {3, 11} <= set(plan.sel.tolist()) and plan.pad.numel() == 6
    assert plan.out_map[3] == plan.sel.tolist().index(3) and plan.out_map[0] in plan.pad
    gate[:19] = 0.5
    plan = _skip.plan_active(gate, 1, 4)
    assert plan.sel.numel() == 20 and plan.pad.tolist() == [19] and not plan.binary
    assert _skip.plan_active(torch.ones(20), 1, 4).kind == "dense"
    assert _skip.plan_active(torch.zeros(20), 1, 4).kind == "empty"
    gate = (torch.arange(20) % 2 == 0).float()[:16]  # 8 open of 16
    plan = _skip.plan_active(gate, 1, 4)
    assert plan.sel.numel() == 8 and plan.out_map is None and plan.unsel.tolist() == list(range(1, 16, 2))
    plan = _skip.plan_active(gate, 1, 4, zero_row=True)  # Linear: always one zero row to gather from
    assert plan.sel.numel() == 16 and plan.out_map is not None


@pytest.mark.parametrize("mode", MODES)
def test_conv_without_padding_rows(mode):
    """8 of 16 open: no zero row to gather from, so the output is scattered."""
    spec = CONV_CASES["basic"]
    x, w, b = conv_inputs(spec)
    for scale in (1.0, 0.7):
        gate = (torch.arange(16) % 2 == 0).to(F64) * scale
        y, grads = grads_of(conv_fn(spec, mode), [x, w, b, gate])
        y_ref, grads_ref = grads_of(reference(conv_fn(spec), mode), [x, w, b, gate])
        assert_all_close([y, *grads], [y_ref, *grads_ref])


@pytest.mark.parametrize("mode", MODES)
def test_conv_channels_last(mode):
    spec = CONV_CASES["basic"]
    x, w, b = conv_inputs(spec)
    gate = make_gate(spec["cout"], "some_closed")
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    leaves = [leaf(x_cl), leaf(w_cl), leaf(b), leaf(gate)]
    y = conv_fn(spec, mode)(*leaves)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(torch.randn_like(y))
    assert leaves[0].grad.is_contiguous(memory_format=torch.channels_last)
    y_ref, grads_ref = grads_of(reference(conv_fn(spec), mode), [x, w, b, gate])
    _, grads = grads_of(conv_fn(spec, mode), [x_cl, w_cl, b, gate])
    torch.testing.assert_close(y.detach(), y_ref)
    assert_all_close(grads, grads_ref)


@pytest.mark.parametrize("mode", ["exact", "hard"])
def test_conv_batch_zero_and_one_channel(mode):
    for n, cout, pattern in ((0, 8, "some_closed"), (0, 8, "all_closed"), (2, 1, "all_open"), (2, 1, "all_closed")):
        spec = dict(cin=3, cout=cout, k=3, stride=1, padding=1, dilation=1, groups=1)
        x, w, b = conv_inputs(spec, n=n, hw=5)
        gate = make_gate(cout, pattern)
        y, grads = grads_of(conv_fn(spec, mode), [x, w, b, gate])
        y_ref, grads_ref = grads_of(reference(conv_fn(spec), mode), [x, w, b, gate])
        assert_all_close([y, *grads], [y_ref, *grads_ref])


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mode", ["exact", "hard"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_fused_and_torch_gather_scatter(backend, mode, memory_format):
    """Both ways of gathering dy and scattering the output (the fused kernels, see _skip.fused_kernels,
    and the torch sequences) match the reference, with and without zero padding rows."""
    spec = CONV_CASES["basic"]
    x, w, b = conv_inputs(spec)
    x, w = x.contiguous(memory_format=memory_format), w.contiguous(memory_format=memory_format)
    lin_x, lin_w = torch.randn(5, 7, dtype=F64), torch.randn(16, 7, dtype=F64)
    with use_backend(backend):
        assert _skip.fused_kernels(x) == (backend == "cpp")
        for open_channels in (torch.arange(16) % 2 == 0, make_gate(16, "some_closed") != 0):
            for scale in (1.0, 0.7):
                gate = open_channels.to(F64) * scale
                y, grads = grads_of(conv_fn(spec, mode), [x, w, b, gate])
                y_ref, grads_ref = grads_of(reference(conv_fn(spec), mode), [x, w, b, gate])
                assert_all_close([y, *grads], [y_ref, *grads_ref])
                assert y.is_contiguous(memory_format=memory_format)
                linear = lambda x, w, b, g: gated_linear(x, w, b, g, skip=mode)  # noqa: E731
                y, grads = grads_of(linear, [lin_x, lin_w, b, gate])
                y_ref, grads_ref = grads_of(reference(F.linear, mode), [lin_x, lin_w, b, gate])
                assert_all_close([y, *grads], [y_ref, *grads_ref])


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
@pytest.mark.parametrize("mode", MODES)
def test_conv_module_padding_modes(mode, padding_mode):
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 8, 3, padding=1, padding_mode=padding_mode, bias=False, dtype=F64)
    gated = GatedConv2d.from_conv(plain, skip=mode)
    with torch.no_grad():
        gated.gate.weight.copy_(torch.tensor([1.0, -1, 1, -1, -1, 1, 1, -1]))
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    mask = (gated.gate.weight >= 0).to(F64).view(1, -1, 1, 1)
    torch.testing.assert_close(gated(x), plain(x) * mask)
    for padding in ("same", "valid"):
        gated_str = GatedConv2d(3, 8, 4, padding=padding, dtype=F64, skip=mode)
        ref = nn.Conv2d(3, 8, 4, padding=padding, dtype=F64)
        ref.load_state_dict(gated_str.state_dict(), strict=False)
        torch.testing.assert_close(gated_str(x), ref(x))


# ---------------------------------------------------------------------------------------------- modules


def test_eval_and_no_grad_skip_closed_channels(monkeypatch):
    from tg_kernels.ops.gated_linear import LinearMath

    computed = []
    original = LinearMath.forward

    def spy(self, x, weight, bias, groups, out=None):
        computed.append(weight.shape[0])
        return original(self, x, weight, bias, groups, out)

    monkeypatch.setattr(LinearMath, "forward", spy)
    for mode in MODES:
        layer = GatedLinear(5, 32, skip=mode)
        with torch.no_grad():
            layer.gate.weight[4:] = -1  # 4 open -> padded to 8
        x = torch.randn(3, 5)
        computed.clear()
        with torch.no_grad():
            layer(x)
        layer.eval()
        layer(x).sum().backward()
        assert computed == [8, 8], mode
        layer.train()
        computed.clear()
        layer(x)
        assert computed == ([] if mode == "none" else [8]), mode


def test_skip_validation_and_repr():
    with pytest.raises(ValueError, match="skip must be"):
        GatedLinear(3, 4, skip="soft")
    with pytest.raises(ValueError, match="skip must be"):
        GatedConv2d(3, 4, 3, skip=None)
    layer = GatedConv2d(3, 4, 3, skip="hard")
    with torch.no_grad():
        layer.gate.weight[0] = -1
    assert "skip='hard'" in repr(layer) and "open=3/4" in repr(layer)


def test_state_dict_and_from_layers():
    linear = nn.Linear(6, 10, dtype=F64)
    gated = GatedLinear.from_linear(linear, skip="hard", gate_init=0.25)
    assert list(gated.state_dict()) == ["weight", "bias", "gate.weight"]
    assert gated.weight is linear.weight and gated.skip == "hard"
    assert gated.gate.weight.dtype == F64 and (gated.gate.weight == 0.25).all()
    x = torch.randn(4, 6, dtype=F64)
    torch.testing.assert_close(gated(x), linear(x))

    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False, padding_mode="reflect")
    gated_conv = GatedConv2d.from_conv(conv)
    assert list(gated_conv.state_dict()) == ["weight", "gate.weight"]
    assert gated_conv.groups == 2 and gated_conv.padding_mode == "reflect" and gated_conv.bias is None
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(gated_conv(x), conv(x))

    fresh = GatedConv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False, padding_mode="reflect")
    fresh.load_state_dict(gated_conv.state_dict())
    torch.testing.assert_close(fresh(x), conv(x))


@pytest.mark.parametrize("mode", MODES)
def test_all_closed_exact_gates_still_learn(mode):
    layer = GatedConv2d(3, 8, 3, padding=1, skip=mode)
    with torch.no_grad():
        layer.gate.weight.fill_(-0.5)
    x = torch.randn(2, 3, 5, 5)
    y = layer(x)
    assert (y == 0).all()
    y.backward(torch.randn_like(y))
    grad = layer.gate.weight.grad
    assert (grad == 0).all() if mode == "hard" else (grad != 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_autocast(mode, dtype):
    torch.manual_seed(0)
    layer = GatedLinear(16, 24, skip=mode)
    conv = GatedConv2d(4, 8, 3, padding=1, skip=mode)
    with torch.no_grad():
        layer.gate.weight[::3] = -1
        conv.gate.weight[::3] = -1
    x, xc = torch.randn(5, 16), torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=dtype):
        y, yc = layer(x), conv(xc)
        ref = F.linear(x, layer.weight, layer.bias) * layer.gate().detach()
        ref_c = F.conv2d(xc, conv.weight, conv.bias, padding=1) * conv.gate().detach().view(1, -1, 1, 1)
    assert y.dtype == yc.dtype == dtype
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(yc.float(), ref_c.float(), rtol=2e-2, atol=2e-2)
    (y.float().sum() + yc.float().sum()).backward()
    for p in (layer.weight, layer.gate.weight, conv.weight, conv.gate.weight):
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


# ---------------------------------------------------------------------------------------------- ops


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("mode", ["exact", "hard"])
def test_opcheck_linear(mode, pattern):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=gen, requires_grad=True)
    w = torch.randn(12, 6, generator=gen, requires_grad=True)
    b = torch.randn(12, generator=gen, requires_grad=True)
    gate = make_gate(12, pattern).float().requires_grad_(True)
    _opcheck(gated_linear_op, (x, w, b, gate, mode))
    _opcheck(gated_linear_op, (x, w, None, gate, mode))
    dy = torch.randn(5, 12)
    for need_input, need_params in ((True, True), (False, True), (True, False)):
        args = (dy, x.detach(), w.detach(), b.detach(), gate.detach(), mode, need_input, need_params)
        _opcheck(gated_linear_backward_op, args)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("mode", ["exact", "hard"])
def test_opcheck_conv(mode, groups, memory_format):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=gen).contiguous(memory_format=memory_format).requires_grad_(True)
    w = torch.randn(8, 4 // groups, 3, 3, generator=gen, requires_grad=True)
    b = torch.randn(8, generator=gen, requires_grad=True)
    params = ([2, 1], [1, 1], [1, 1], groups)
    for pattern in PATTERNS:
        gate = make_gate(8, pattern).float().requires_grad_(True)
        _opcheck(gated_conv2d_op, (x, w, b, gate, *params, mode))
    dy = torch.randn(2, 8, 3, 6).contiguous(memory_format=memory_format)
    args = (dy, x.detach(), w.detach(), None, gate.detach(), *params, mode, True, True)
    _opcheck(gated_conv2d_backward_op, args)


# ---------------------------------------------------------------------------------------------- compile


def _compiled_matches_eager(backend: str):
    torch.manual_seed(0)
    model = nn.Sequential(
        GatedConv2d(3, 8, 3, padding=1, skip="exact"),
        nn.ReLU(),
        GatedConv2d(8, 8, 3, padding=1, groups=2, skip="hard"),
        nn.Flatten(),
        GatedLinear(8 * 16, 10, skip="exact"),
    )
    with torch.no_grad():
        model[0].gate.weight[::2] = -1
        model[4].gate.weight[:3] = -1
    x = torch.randn(2, 3, 4, 4)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        y = fn(x)
        y.square().sum().backward()
        grads.append([y.detach()] + [p.grad.clone() for p in model.parameters()])
    assert_all_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_aot_eager():
    _compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    _compiled_matches_eager("inductor")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_cpu(mode):
    """The torch implementation on CUDA tensors (no Triton/CUDA kernels wired in yet) against float64 CPU."""
    torch.manual_seed(0)
    for layer in (GatedLinear(32, 48, skip=mode), GatedConv2d(8, 24, 3, padding=1, groups=2, skip=mode)):
        with torch.no_grad():
            layer.gate.weight[::3] = -1
        x = torch.randn(4, 32) if isinstance(layer, GatedLinear) else torch.randn(2, 8, 6, 6)
        results = []
        for device, dtype in (("cpu", F64), ("cuda", torch.float32)):
            m = layer.to(device=device, dtype=dtype)
            m.zero_grad()
            xi = leaf(x.to(device=device, dtype=dtype))
            y = m(xi)
            y.backward(torch.ones_like(y))
            results.append(
                [t.detach().cpu().double() for t in (y, xi.grad, m.weight.grad, m.bias.grad, m.gate.weight.grad)]
            )
        # cuDNN runs float32 convs in TF32 unless the user's settings forbid it (torch's default allows
        # it: about 1e-3 relative error here); float32 matmuls (the Linear layer) are IEEE by default.
        tol = 5e-3 if isinstance(layer, GatedConv2d) and _cudnn_conv_allows_tf32() else 1e-4
        assert_all_close(results[1], results[0], rtol=tol, atol=tol)


def _cudnn_conv_allows_tf32() -> bool:
    """Whether float32 cuDNN convolutions may use TF32 under the current torch settings (new API)."""
    backends = torch.backends
    for precision in (backends.cudnn.conv.fp32_precision, backends.cudnn.fp32_precision, backends.fp32_precision):
        if precision != "none":
            return precision == "tf32"
    return False


@pytest.mark.parametrize("skip", ["none", "exact", "hard"])
def test_linear_without_input_features_gives_gated_bias(skip):
    """in_features == 0: y = bias * gate, and bias and gates get their gradients (x is empty, y is not)."""
    torch.manual_seed(0)
    layer = GatedLinear(0, 6, skip=skip)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(6))
        layer.gate.weight[[1, 4]] = -1.0
    y = layer(torch.randn(3, 0))
    y.backward(torch.ones_like(y))
    gate = layer.gate().detach()
    torch.testing.assert_close(y, (layer.bias * gate).expand(3, 6))
    torch.testing.assert_close(layer.bias.grad, 3 * gate)
    expected_gate_grad = 3 * layer.bias.detach() * (gate if skip == "hard" else 1)
    torch.testing.assert_close(layer.gate.weight.grad, expected_gate_grad)


# Host synchronisations. On CUDA every read of a gate value on the host (nonzero, item, bool(...), a
# copy to the CPU) stalls until the GPU catches up. Here on CPU the layers are made to take their
# device path (_host._needs_transfer -> True), each device-to-host transfer is counted (with how many
# tensors it carries), and a dispatch mode counts every other synchronising op outside the host-side
# planning functions.
_SYNC_OPS = {"nonzero", "_local_scalar_dense", "is_nonzero", "item", "masked_select", "unique", "equal"}


class _SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts synchronising ops, inside tg_kernels' custom ops too (their Python bodies run under the mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.on_host = 0  # > 0 inside host-side planning (its tensors are host copies)
        self.syncs: list[str] = []
        self.bodies = {f"tg_kernels::{op._name}": op._init_fn for op in _CUSTOM_OPS}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS and not self.on_host:
            self.syncs.append(name)
        body = self.bodies.get(func._schema.name)
        if body is not None:
            with self:
                return body(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


_CUSTOM_OPS = (gated_conv2d_op, gated_conv2d_backward_op, gated_linear_op, gated_linear_backward_op)


@pytest.fixture
def count_syncs(monkeypatch):
    """``count_syncs(run) -> (transfers, syncs)``: the sizes of the device-to-host transfers `run` made
    and the other synchronising ops it ran, with every tensor treated as a device tensor."""
    from tg_kernels import _host
    from tg_kernels.ops import gated_conv

    _host.forget()  # only this test's gates are tracked
    counter = _SyncCounter()
    transfers: list[int] = []
    monkeypatch.setattr(_host, "_needs_transfer", lambda t: True)

    def on_host(original, record=None):
        def wrapped(*args, **kwargs):
            if record is not None:
                record.append(len(args[0]))
            counter.on_host += 1
            try:
                return original(*args, **kwargs)
            finally:
                counter.on_host -= 1

        return wrapped

    monkeypatch.setattr(_host, "_device_to_host", on_host(_host._device_to_host, transfers))
    host_side = ((_skip, "_plan_from_host"), (_skip, "_open_index_from_host"), (_host, "_refresh"))
    for module, name in (*host_side, (_host, "_concat"), (gated_conv, "_open_mask_values")):
        monkeypatch.setattr(module, name, on_host(getattr(module, name)))

    def count(run):
        transfers.clear()
        counter.syncs = []
        with counter:
            run()
        return list(transfers), counter.syncs

    yield count
    _host.forget()


def _chain(mode: str, after_norm: bool = False) -> nn.Sequential:
    """Three gated convs; the second and third read their input gates (hard mode drops closed inputs)."""
    torch.manual_seed(0)
    first = GatedConv2d(3, 16, 3, padding=1, skip=mode)
    second = GatedConv2d(16, 16, 3, padding=1, skip=mode, gate_after_norm=after_norm)
    third = GatedConv2d(16, 8, 3, padding=1, skip=mode)
    with torch.no_grad():
        first.gate.weight[::3] = -1.0
        second.gate.weight[1::4] = -1.0
        third.gate.weight[:2] = -1.0
    second.input_gate = lambda like: first.gate()
    third.input_gate = lambda like: second.gate()
    return nn.Sequential(first, second, third)


@pytest.mark.parametrize("mode", ["exact", "hard"])
@pytest.mark.parametrize("after_norm", [False, True])
def test_gated_convs_synchronise_only_when_their_gates_change(count_syncs, mode, after_norm):
    """Steady state: no synchronisation per GatedConv2d forward or backward while the gates are unchanged,
    one transfer for every gate of the model after an optimizer step (before: one per layer per forward)."""
    model = _chain(mode, after_norm)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = {}

    def forward():
        out["y"] = model(x)

    def backward():
        out["y"].square().sum().backward()

    # first call: each layer reads its newly seen gate (input gates come from the gates already read)
    assert count_syncs(forward) == ([1, 1, 1], [])
    assert count_syncs(backward) == ([], []), "the backward planned again"
    assert count_syncs(forward) == ([], []), "unchanged gates were read again"
    assert count_syncs(backward) == ([], [])
    opt.step()  # changes every gate weight: one transfer for all of them, at the first layer
    assert count_syncs(forward) == ([3], [])
    assert count_syncs(backward) == ([], [])
    with torch.no_grad():
        assert count_syncs(lambda: model(x)) == ([], [])
        model[1].gate.weight[2] = -1.0  # an in-place change of one gate: only that gate is read again
        assert count_syncs(lambda: out.update(y=model(x))) == ([1], [])
    torch.testing.assert_close(out["y"], _freshly_planned(model, x))


def _freshly_planned(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output from copies of its layers (new gate modules: they plan from scratch)."""
    copy = nn.Sequential(*(GatedConv2d.from_conv(m, skip=m.skip, gate_after_norm=m.gate_after_norm) for m in model))
    for new, old in zip(copy, model):
        with torch.no_grad():
            new.gate.weight.copy_(old.gate.weight)
        new.gate.min_open, new.gate.M = old.gate.min_open, old.gate.M
    for i in range(1, len(copy)):
        copy[i].input_gate = lambda like, g=copy[i - 1].gate: g()
    with torch.no_grad():
        return copy(x)


def test_gates_changed_out_of_sight_are_read_again(count_syncs):
    """A fused optimizer's step does not bump the gate weight's version, a ``.data`` edit neither: the
    step still counts as a change (optimizer hook), and forget_open_sets() covers the rest."""
    from tg_kernels.nn import forget_open_sets

    model = _chain("hard")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
    gates = [m.gate.weight for m in model]
    opt = torch.optim.Adam(gates, lr=10.0, fused=True)
    versions = [g._version for g in gates]
    model(x).sum().backward()
    opt.step()  # lr 10: every gate with a gradient changes sign
    assert [g._version for g in gates] == versions, "fused Adam bumps versions now: the hook is redundant"
    with torch.no_grad():
        transfers, _ = count_syncs(lambda: model(x))
        assert transfers == [3]
        torch.testing.assert_close(model(x), _freshly_planned(model, x))
        model(x)  # remembered again
        model[0].gate.weight.data[:8] = -1.0  # invisible to the version counter
        forget_open_sets()
        torch.testing.assert_close(model(x), _freshly_planned(model, x))


def test_the_remembered_open_set_follows_every_visible_change(count_syncs):
    """min_open, a new tensor assigned through .data, a dtype change: each makes the layer read its gate
    again, and its output stays that of a layer planned from scratch. The paper form is read every call."""
    model = _chain("hard")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
        gate = model[2].gate
        gate.min_open = 7  # keeps 7 open where the step keeps 6
        assert count_syncs(lambda: model(x))[0] == [1]
        torch.testing.assert_close(model(x), _freshly_planned(model, x))
        gate.weight.data = -gate.weight.detach().clone()  # new storage, version unchanged
        assert count_syncs(lambda: model(x))[0] == [1]
        torch.testing.assert_close(model(x), _freshly_planned(model, x))
        model.double()
        assert count_syncs(lambda: model(x.double()))[0] == [3]
        torch.testing.assert_close(model(x.double()), _freshly_planned(model, x.double()))
        paper = GatedConv2d(3, 8, 3, padding=1, gate_M=4.0)
        paper.gate.weight[::2] = -0.5  # M * w an integer: the paper form's value is exactly 0 there
        first = count_syncs(lambda: paper(x))[0]
        assert first == [1] and count_syncs(lambda: paper(x))[0] == [1], "paper-form gates are read every call"


def test_gated_conv_no_grad_chain_synchronises_once_per_new_gate(count_syncs):
    model = _chain("exact")
    x = torch.randn(2, 3, 8, 8)
    out = {}
    with torch.no_grad():
        assert count_syncs(lambda: out.setdefault("y", model(x))) == ([1, 1, 1], [])
        assert count_syncs(lambda: model(x)) == ([], [])
        with torch.inference_mode():
            assert count_syncs(lambda: model(x)) == ([], [])
    torch.testing.assert_close(out["y"], _freshly_planned(model, x))


def test_an_attached_model_synchronises_once_per_training_step(count_syncs):
    """attach_gates without compact execution (per-layer skipping, input gates concatenated from the
    bank): one transfer per training step for the whole model, none in backward or evaluation."""
    import tg_kernels as tg

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1),
    )
    x = torch.randn(2, 3, 8, 8)
    model, bank = tg.attach_gates(net, x, skip="hard", compact=False)
    gc.collect()  # the copies attach_gates checked itself with (their gates were read too)
    with torch.no_grad():
        for gate in bank.gates.values():
            gate.weight[::3] = -1.0
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    out = {}

    def step():
        opt.zero_grad()
        out["loss"] = model(x).square().mean()
        out["loss"].backward()
        opt.step()

    step()
    counts = [count_syncs(step) for _ in range(3)]
    assert counts == [([len(bank.gates)], [])] * 3
    with torch.no_grad():
        assert count_syncs(lambda: model(x)) == ([len(bank.gates)], [])  # the last step changed them
        assert count_syncs(lambda: model(x)) == ([], [])


@pytest.mark.parametrize("setting", ["hard", "no_grad"])
def test_compile_fullgraph_chained_gated_convs(setting):
    """torch.compile(fullgraph=True) on gated convs that drop closed inputs (hard mode, no_grad): the
    same outputs and hard mode's gradients; the compiled graph still skips closed output channels (the
    custom op plans at run time) but drops no closed inputs (a data-dependent shape)."""
    skip = "hard" if setting == "hard" else "exact"
    model = _chain(skip)
    x = torch.randn(2, 3, 8, 8, requires_grad=setting == "hard")
    context = torch.no_grad() if setting == "no_grad" else contextlib.nullcontext()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    kinds = []
    plan_active = _skip.plan_active

    def recording(*args, **kwargs):
        plan = plan_active(*args, **kwargs)
        kinds.append(plan.kind)
        return plan

    for fn in (model, compiled):
        model.zero_grad()
        x.grad = None
        with context, pytest.MonkeyPatch.context() as patch:
            patch.setattr(_skip, "plan_active", recording)
            y = fn(x)
            if setting == "hard":
                y.square().sum().backward()
        grads = [x.grad, *(p.grad for p in model.parameters())] if setting == "hard" else []
        results.append([y.detach(), *grads])
    assert_all_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    assert kinds and set(kinds) == {"skip"}, kinds


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["exact", "hard"])
def test_gated_convs_on_cuda_synchronise_only_when_their_gates_change(mode):
    """On a GPU, counted by CUDA's own sync debug mode: no synchronisation in a forward or backward
    with unchanged gates, one for the whole chain after an optimizer step."""
    import warnings

    model = _chain(mode).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 8, 8, device="cuda", requires_grad=True)
    model(x).sum().backward()  # warm-up: cuDNN algorithm choice, allocations, first reads of the gates
    torch.cuda.synchronize()
    out = {}

    def syncs(run) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    counts = [syncs(lambda: out.update(y=model(x))), syncs(lambda: out["y"].sum().backward())]
    opt.step()
    counts += [syncs(lambda: out.update(y=model(x))), syncs(lambda: out["y"].sum().backward())]
    assert counts == [0, 0, 1, 0], counts


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gated_convs_capture_in_a_cuda_graph():
    """With unchanged gates a forward and backward plan nothing on the host, so they capture in a CUDA
    graph (the graph keeps the open set it was captured with: capture again after the gates change)."""
    model = _chain("hard").cuda()
    static_x = torch.randn(2, 3, 8, 8, device="cuda", requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: plans, cuDNN algorithms
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            model(static_x).square().sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    static_x.grad = None
    with torch.cuda.graph(graph):
        static_y = model(static_x)
        static_y.square().sum().backward()
    new_x = torch.randn(2, 3, 8, 8, device="cuda")
    with torch.no_grad():
        static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    replayed = [static_y.detach().clone(), static_x.grad.clone(), *(p.grad.clone() for p in model.parameters())]
    model.zero_grad(set_to_none=True)
    x = new_x.clone().requires_grad_(True)
    y = model(x)
    y.square().sum().backward()
    eager = [y.detach(), x.grad, *(p.grad for p in model.parameters())]
    assert_all_close(replayed, eager, rtol=1e-5, atol=1e-5)


def test_a_gated_conv_runs_outside_inference_mode_after_running_inside_it():
    conv = GatedConv2d(8, 16, 3, padding=1, skip="hard")
    with torch.no_grad():
        conv.gate.weight[::2] = -1.0
    x = torch.randn(2, 8, 8, 8)
    with torch.inference_mode():
        expected = conv(x)
    actual = conv(x)
    actual.sum().backward()
    torch.testing.assert_close(actual, expected)
