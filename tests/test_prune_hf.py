"""tg.prune with Hugging Face-style data: dict batches, the model's own .loss, autocast, a Llama."""

from __future__ import annotations

import pytest
import torch
from test_trust import tiny_llama
from torch import nn

import tg_kernels as tg
from tg_kernels.pruning.train import example_of

SHORT = dict(gate_epochs=1, finetune_epochs=1, min_search_steps=30, progress=False, gate_init="constant")


def llama_batches(n: int = 4, batch: int = 4, seq: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Dict batches of a Hugging Face causal LM: input_ids, attention_mask, labels (= input_ids)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_dict_batches_and_the_models_own_loss_reach_a_parameter_target_on_a_llama():
    torch.manual_seed(0)
    model = tiny_llama()
    dense = n_params(model)
    seen = []
    result = tg.prune(model, llama_batches(), target=0.5, metric="params", log=seen.append, **SHORT)
    small = result.model
    assert abs(n_params(small) / dense - 0.5) <= 0.01 * 0.5, (n_params(small), dense)
    assert result.status.within(0.01)
    losses = [row["loss"] for row in result.history if row["phase"] != "start"]
    assert all(0 < loss < 10 for loss in losses), losses  # the LM's own cross-entropy (log 64 = 4.2 at chance)
    ids = llama_batches(1, seed=1)[0]["input_ids"]
    small.eval()
    result.gated.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, result.gated(ids).logits, rtol=1e-4, atol=1e-4)


def test_the_models_loss_is_the_one_trained_and_loss_fn_overrides_it():
    """A model returning {"loss", "logits"}: its loss is used; loss_fn, when given, wins."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

        def forward(self, x, labels=None):
            logits = self.fc2(torch.relu(self.fc1(x)))
            out = {"logits": logits}
            if labels is not None:
                self.calls += 1
                out["loss"] = nn.functional.cross_entropy(logits, labels)
            return out

    torch.manual_seed(0)
    data = [{"x": torch.randn(8, 8), "labels": torch.randint(0, 3, (8,))} for _ in range(3)]
    net = Net()
    net.calls = 0
    tg.prune(net, data, target=0.5, **SHORT)
    assert net.calls > 0

    def constant(output, targets):  # a loss that ignores the model's: nothing but the budget moves the gates
        assert isinstance(output, dict) and targets.shape == (8,)
        return output["logits"].sum() * 0

    torch.manual_seed(0)
    other = Net()
    other.calls = 0
    result = tg.prune(other, data, target=0.5, loss_fn=constant, **SHORT)
    assert all(row["loss"] == 0 for row in result.history if row["phase"] != "start")


def test_tuple_batches_still_work_and_bad_batches_say_what_is_expected():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    data = [(torch.randn(8, 8), torch.randint(0, 3, (8,))) for _ in range(3)]
    result = tg.prune(net, data, target=0.5, **SHORT)
    assert result.status.within(0.01)
    with pytest.raises(TypeError, match="dicts of the model's keyword arguments"):
        tg.prune(nn.Linear(4, 4), [torch.randn(2, 4)], **SHORT)
    with pytest.raises(ValueError, match="autocast"):
        tg.prune(nn.Linear(4, 4), data, autocast="bf16", **SHORT)


def test_example_inputs_from_a_dict_batch_leave_labels_out():
    batch = llama_batches(1)[0]
    example = example_of(batch)
    assert set(example) == {"input_ids", "attention_mask"}
    assert example["input_ids"].shape == (1, 16)


def test_bf16_autocast_on_cpu_runs_the_forward_in_bf16():
    torch.manual_seed(0)
    model = tiny_llama()
    dtypes = set()
    model.lm_head.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    result = tg.prune(model, llama_batches(2), target=0.7, autocast=torch.bfloat16, **SHORT)
    assert torch.bfloat16 in dtypes
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # weights stay float32
    assert result.status.within(0.01)


def test_the_package_imports_without_transformers():
    """transformers stays optional: importing tg_kernels (and tg.prune) never imports it."""
    import subprocess
    import sys

    code = "import sys, tg_kernels, tg_kernels.pruning.train; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=".")
    assert out.stdout.strip() == "False", out.stderr


def test_uniform_pruning_round_trips_through_save_pretrained(tmp_path):
    """make_uniform ties each layer's groups and holds head dims: the exported Llama fits its config."""
    transformers = pytest.importorskip("transformers")
    from tg_kernels.integrations.hf import divisible_stream, fit_config

    torch.manual_seed(0)
    model = tiny_llama()
    ids = llama_batches(1)[0]["input_ids"]
    model, bank = tg.attach_gates(model, example_kwargs={"input_ids": ids[:1]})
    ties = bank.make_uniform()
    assert len(ties) == 2 and all(len(keys) == 2 for keys in ties.values()), ties  # KV groups and MLP units
    budget = tg.Budget(model, target=0.5, metric="params")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for gate in {id(gt): gt for gt in bank.gates.values()}.values():
            gate.weight.copy_(torch.rand(gate.num_channels, generator=g) - 0.5)  # a random half closed
    budget.settle(0.01)
    divisible_stream(model, budget, 0.01)  # hidden size a multiple of the kept heads (a Llama config checks it)
    assert budget.status().within(0.01)
    model.eval()
    small = tg.export(model)
    config = fit_config(small)
    assert config.head_dim == 8  # held whole
    assert config.num_attention_heads == 2 * config.num_key_value_heads  # a KV group keeps its query heads
    assert abs(n_params(small) / n_params(tiny_llama()) - 0.5) <= 0.01 * 0.5
    small.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert n_params(loaded) == n_params(small)
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(small(ids).logits, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_prune_uniform_gives_a_llama_that_save_pretrained_round_trips_at_its_parameter_target(tmp_path):
    """tg.prune(uniform=True): the same widths in every layer, the hidden size a multiple of the kept heads,
    the exported model's config set to its widths, so from_pretrained rebuilds it with the same logits."""
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    model = tiny_llama()
    dense = n_params(model)
    result = tg.prune(model, llama_batches(), target=0.5, metric="params", uniform=True, **SHORT)
    small = result.model
    assert abs(n_params(small) / dense - 0.5) <= 0.01 * 0.5, (n_params(small), dense)
    layers = small.model.layers
    assert len({(a.q_proj.out_features, a.k_proj.out_features) for a in (x.self_attn for x in layers)}) == 1
    assert len({x.mlp.gate_proj.out_features for x in layers}) == 1
    config = small.config
    assert config.hidden_size == small.model.embed_tokens.embedding_dim < 32  # the stream pruned, in the config
    assert config.hidden_size % config.num_attention_heads == 0 and config.head_dim == 8
    assert config.intermediate_size == layers[0].mlp.gate_proj.out_features
    small.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert n_params(loaded) == n_params(small)
    ids = llama_batches(1, seed=1)[0]["input_ids"]
    small.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, small(ids).logits, rtol=0, atol=0)


def test_per_layer_widths_and_pruned_head_dims_are_refused_by_fit_config():
    pytest.importorskip("transformers")
    from tg_kernels.integrations.hf import fit_config

    torch.manual_seed(0)
    ids = llama_batches(1)[0]["input_ids"]
    model, bank = tg.attach_gates(tiny_llama(), example_kwargs={"input_ids": ids[:1]})
    with torch.no_grad():
        bank.gates["model_layers_0_mlp_gate_proj"].weight[:10] = -1.0  # layer 0 keeps fewer MLP units
    with pytest.raises(ValueError, match="widths differ"):
        fit_config(tg.export(model))
    with torch.no_grad():
        bank.gates["model_layers_0_mlp_gate_proj"].weight.fill_(0.5)
        bank.gates[bank.head_dim_groups()[0]].weight[0] = -1.0  # one rotary pair closed
    with pytest.raises(ValueError, match="rotary"):
        fit_config(tg.export(model))
