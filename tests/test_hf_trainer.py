"""tg_kernels.integrations.hf.PruningTrainer: the Trainer prunes a tiny Llama, in one process and in 2-process DDP."""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from test_trust import tiny_llama  # noqa: E402

from tg_kernels.integrations.hf import PruningArguments, PruningTrainer  # noqa: E402

STEPS = 24


def dataset(n: int = 32, seq: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 64, (seq,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def train(out_dir: str, **pruning) -> PruningTrainer:
    torch.manual_seed(0)
    args = transformers.TrainingArguments(
        output_dir=out_dir,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    model = tiny_llama()
    options = dict(target=0.5, metric="params", gate_init="constant") | pruning
    trainer = PruningTrainer(model, args, pruning=PruningArguments(**options), train_dataset=dataset())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_trainer_prunes_to_the_target_and_exports(tmp_path):
    dense = n_params(tiny_llama())
    trainer = train(str(tmp_path))
    assert trainer.phase == "tune"
    assert trainer.budget.status().within(0.01)
    assert trainer.bank.compact.side_pass_every == PruningArguments().side_pass_every > 1  # tg.prune's search
    small = trainer.pruned_model
    assert abs(n_params(small) / dense - 0.5) <= 0.01 * 0.5
    assert all(not p.requires_grad for p in trainer.bank.parameters())  # frozen after the search
    ratios = [row["tg_ratio"] for row in trainer.state.log_history if "tg_ratio" in row]
    assert ratios and ratios[-1] < 0.52
    ids = dataset(1, seed=1)[0]["input_ids"][None]
    trainer.gated_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, trainer.gated_model(ids).logits, rtol=1e-4, atol=1e-4)


def test_uniform_taylor_run_saves_a_plain_hugging_face_model(tmp_path):
    trainer = train(str(tmp_path), gate_init="taylor", importance_batches=2, uniform=True)
    assert trainer.budget.status().within(0.01)
    assert trainer.save_pruned(tmp_path / "pruned") == str(tmp_path / "pruned")  # save_pretrained, not tg.save
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    ids = dataset(1, seed=1)[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trainer.pruned_model.eval()(ids).logits)


def test_bad_arguments():
    with pytest.raises(ValueError, match="target"):
        PruningArguments(target=1.5).check()
    with pytest.raises(ValueError, match="metric"):
        PruningArguments(metric="latency").check()
    for every in (0, 2.0, True):
        with pytest.raises(ValueError, match="side_pass_every must be an int >= 1"):
            PruningArguments(side_pass_every=every).check()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), ACCELERATE_USE_CPU="true",
    )  # fmt: skip
    torch.set_num_threads(1)
    try:
        trainer = train(out_dir, gate_init="taylor", importance_batches=2)
        assert dist.is_initialized() and dist.get_world_size() == world, "the Trainer did not run distributed"
        assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
        gates = torch.cat([g.weight.detach() for g in trainer.bank.gates.values()])
        weights = torch.cat([p.detach().flatten() for p in trainer.pruned_model.parameters()])
        torch.save(
            {"gates": gates, "weights": weights, "ratio": trainer.budget.status().ratio},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_trainer_ddp_two_processes_keep_gates_identical(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(r0["gates"], r1["gates"])
    assert torch.equal(r0["weights"], r1["weights"])
    assert abs(r0["ratio"] / 0.5 - 1) <= 0.01
