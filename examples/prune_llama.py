"""Prune a small Llama end to end inside the Hugging Face Trainer, and compare it with two baselines.

1. Train a small Llama with grouped KV heads (2.4M parameters at the defaults) from scratch on
   English text (byte-level tokens) from the Debian package ``fortunes`` (``apt-get install
   fortunes``: about 2.5 MB of quotations, poems, jokes and literature excerpts under
   /usr/share/games/fortunes; nothing is downloaded). Of every ten entries, the ninth is the
   validation split and the tenth the test split.
2. Prune it to 50% of its parameters with :class:`tg_kernels.integrations.hf.PruningTrainer`
   (``uniform=True``: every layer keeps the same KV groups and MLP units, the residual stream
   prunes, head dims stay whole), so the result is a plain ``LlamaForCausalLM`` that
   ``save_pretrained`` / ``from_pretrained`` round-trip.
3. The same run in skip mode ``"none"`` (every step dense): the tokens/s reference.
4. Baselines, held-out perplexity at the same parameter count:
   - Torch-Pruning's LLM recipe, run by the library itself (``torch_pruning``, a benchmark
     requirement only): ``BasePruner`` with ``GroupMagnitudeImportance(p=2)``, local pruning of
     the hidden size and the MLP units at one ratio, query heads at the same ratio within each KV
     group (KV heads kept), head dims whole, ``lm_head`` ignored, as in its
     ``examples/LLMs/prune_llm.py``; the ratio is bisected to the gates' parameter count, then the
     model is fine-tuned on the same batches as the pruning run. Three things make it run on
     transformers 5.24's Llama (see :func:`torch_pruning_recipe`).
   - a dense Llama of the pruned model's widths trained from scratch with the same total compute
     (training FLOPs ``6 * parameters * tokens`` of the dense pretraining plus the pruning run).

Writes ``results.json``, ``steps.csv`` and ``throughput.png`` to ``--out``
(default ``examples/results/llm``). ``python examples/prune_llama.py --help`` lists the sizes.
``--repeat-seeds 1,2`` (with ``--reuse-dense``) reruns the gates and the Torch-Pruning baseline
on the same dense model with other data orders and reports mean and spread.

The committed results come from one plain run and two more seeds (5.5 minutes, then 2, on the
quiet 2-core machine)::

    python examples/prune_llama.py
    python examples/prune_llama.py --reuse-dense --repeat-seeds 1,2

On a shared machine the from-scratch baseline can run in a second process beside the rest, its
widths those of the gates' result (in ``results.json`` once the gates' run ends) and its steps
fixed from the expected compute; ``--report`` then records both runs' training FLOPs
(``flops_vs_tg``)::

    python examples/prune_llama.py --no-scratch &
    python examples/prune_llama.py --scratch-only HIDDEN,INTER,HEADS,KV,STEPS   # once results.json has "tg"
    python examples/prune_llama.py --report   # once both are done
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

CORPUS = Path("/usr/share/games/fortunes")
ROOT = Path(__file__).resolve().parents[1]


def load_corpus(corpus: Path = CORPUS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(train, validation, test) bytes of the fortunes package: of every ten entries the ninth is
    validation, the tenth test."""
    files = sorted(p for p in corpus.glob("*") if p.is_file() and not p.is_symlink() and p.suffix != ".dat")
    if not files:
        return None
    entries = []
    for path in files:
        text = path.read_bytes().decode("latin-1")
        entries += [e.strip() for e in text.split("\n%\n") if e.strip()]
    split = lambda keep: "\n\n".join(e for i, e in enumerate(entries) if keep(i % 10))  # noqa: E731
    as_bytes = lambda t: torch.tensor(list(t.encode("latin-1", errors="replace")), dtype=torch.long)  # noqa: E731
    return as_bytes(split(lambda r: r < 8)), as_bytes(split(lambda r: r == 8)), as_bytes(split(lambda r: r == 9))


class Windows(torch.utils.data.Dataset):
    """Fixed random windows of ``seq`` bytes: rows of ``{"input_ids", "attention_mask", "labels"}``."""

    def __init__(self, data: torch.Tensor, seq: int, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data, self.seq = data, seq
        self.starts = torch.randint(0, len(data) - seq - 1, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.data[self.starts[i] : self.starts[i] + self.seq]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _shown(path: Path) -> str:
    """A path as results.json records it: relative to the repository where it lies inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def llama(transformers, hidden: int, inter: int, layers: int, heads: int, kv: int, head_dim: int, seq: int):
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=seq,
        tie_word_embeddings=False,
        use_cache=False,
    )
    return transformers.LlamaForCausalLM(config)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def perplexity(model: nn.Module, held: torch.Tensor, seq: int, windows: int) -> float:
    """exp(mean next-byte cross-entropy) over the first ``windows`` non-overlapping held-out windows."""
    model.eval()
    n = min(windows, (len(held) - 1) // seq)
    ids = held[: n * seq].view(n, seq)
    total = 0.0
    for chunk in ids.split(32):
        total += float(model(input_ids=chunk, labels=chunk).loss) * len(chunk)
    return math.exp(total / n)


class StepTimes:
    """A TrainerCallback recording each optimizer step's wall time and the model's parameter count."""

    def __init__(self, transformers, trainer=None) -> None:
        outer = self

        class Callback(transformers.TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                outer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                row = {"step": state.global_step, "seconds": time.perf_counter() - outer.start}
                if outer.trainer is not None:
                    row["phase"] = outer.trainer.phase if outer.trainer.phase == "tune" else "search"
                    row["params"] = outer.trainer.budget.usage().params
                outer.rows.append(row)

        self.rows: list[dict] = []
        self.trainer = trainer
        self.callback = Callback()


def training_args(transformers, out: Path, steps: int, lr: float, batch: int, seed: int, warmup: float = 0.05):
    return transformers.TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=int(warmup * steps),
        weight_decay=0.01,
        logging_steps=max(steps // 10, 1),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        dataloader_num_workers=0,
    )


def fit(transformers, model, out, steps, lr, batch, data, seed) -> float:
    """Plain Trainer training; returns the wall time."""
    trainer = transformers.Trainer(model, training_args(transformers, out, steps, lr, batch, seed), train_dataset=data)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def prune_run(transformers, hf, dense, out, args, data, skip, seed):
    """The PruningTrainer run on a copy of ``dense``; returns (trainer, step rows, wall time)."""
    # the side pass on every search step (not the default 8th): the run in skip "none" then has the same
    # gradients, so the two runs differ in speed only (the figures in examples/results/llm were taken so)
    pruning = hf.PruningArguments(
        target=args.target, metric="params", search=args.search, uniform=True, skip=skip, side_pass_every=1
    )
    model = copy.deepcopy(dense)
    trainer = hf.PruningTrainer(
        model, training_args(transformers, out, args.prune_steps, args.tune_lr, args.batch, seed),
        pruning=pruning, train_dataset=data,
    )  # fmt: skip
    timer = StepTimes(transformers, trainer)
    trainer.add_callback(timer.callback)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer, timer.rows, time.perf_counter() - start


def widths(model: nn.Module) -> dict[str, int]:
    c = model.config
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
    return {k: getattr(c, k) for k in keys}


# --------------------------------------------------------------------------------------------------
# the Torch-Pruning baseline: its LLM recipe, run by the library
# --------------------------------------------------------------------------------------------------


def torch_pruning_recipe(tp, dense: nn.Module, ratio: float, example: torch.Tensor) -> nn.Module:
    """A copy of ``dense`` pruned by Torch-Pruning's LLM recipe at ``ratio`` (its
    ``examples/LLMs/prune_llm.py``): ``GroupMagnitudeImportance(p=2, group_reduction="mean")``, local
    pruning of the hidden size and the MLP units at ``ratio``, query heads at ``ratio`` within each KV
    group (``num_heads``, ``prune_num_heads=True``, ``prune_head_dims=False``), ``lm_head`` ignored;
    then the config and the attention modules set to the new widths, as that script does.

    Three things make torch-pruning 1.6.1 work on transformers 5.24's ``LlamaForCausalLM``, all only
    while the pruner traces the model (its dependency graph), none changing what is pruned:

    - the rotary embedding is left out of the trace. ``rotate_half`` (two slices of the head dim,
      a negation, a concat) and the products with cos / sin form a cycle in the graph, and each
      lap of it shifts the indices by the concat's offset, so ``DependencyGraph.get_pruning_group``
      never finds the entry it already holds and loops forever (this was the hang);
    - eager attention, the path on which it was checked that every kept query head still reads its
      own KV head (the library reads GQA from ``repeat_kv``'s expand);
    - ``round_to=8`` (the script uses 4) keeps the hidden size a multiple of the kept heads, which
      transformers checks when a config is saved.

    With two query heads per KV head the library prunes no heads: it removes one per group, and
    its GQA test then compares the already-decremented query head count with the KV count.
    """
    from transformers.models.llama import modeling_llama

    model = copy.deepcopy(dense).eval()
    config = model.config
    num_heads = {}
    for layer in model.model.layers:
        attention = layer.self_attn
        num_heads[attention.q_proj] = config.num_attention_heads
        num_heads[attention.k_proj] = num_heads[attention.v_proj] = config.num_key_value_heads
    rotary, implementation = modeling_llama.apply_rotary_pos_emb, config._attn_implementation
    modeling_llama.apply_rotary_pos_emb = lambda q, k, *args, **kwargs: (q, k)
    model.set_attn_implementation("eager")
    try:
        pruner = tp.pruner.BasePruner(
            model, example_inputs=example, global_pruning=False,
            importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
            output_transform=lambda out: out.logits, pruning_ratio=ratio,
            ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
            head_pruning_ratio=ratio, round_to=8,
        )  # fmt: skip
    finally:
        modeling_llama.apply_rotary_pos_emb = rotary
        model.set_attn_implementation(implementation)
    for group in pruner.step(interactive=True):
        group.prune()
    layers = model.model.layers
    config.hidden_size = model.lm_head.in_features
    config.intermediate_size = layers[0].mlp.gate_proj.out_features
    config.num_attention_heads = layers[0].self_attn.q_proj.out_features // config.head_dim
    shapes = {(a.q_proj.out_features, a.k_proj.out_features, m.gate_proj.out_features) for a, m in
              ((layer.self_attn, layer.mlp) for layer in layers)}  # fmt: skip
    if len(shapes) != 1:
        raise RuntimeError(f"torch-pruning left the layers at different widths {sorted(shapes)}")
    for layer in layers:
        layer.self_attn.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
    return model


def torch_pruning_at(tp, dense: nn.Module, target: int, example: torch.Tensor) -> tuple[nn.Module, float]:
    """The recipe at the largest ratio (bisected) whose model keeps at least ``target`` parameters."""
    lo, hi = 0.0, 0.9
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if n_params(torch_pruning_recipe(tp, dense, mid, example)) >= target else (lo, mid)
    return torch_pruning_recipe(tp, dense, lo, example), lo


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=12)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dense-steps", type=int, default=400)
    parser.add_argument("--prune-steps", type=int, default=250)
    parser.add_argument("--search", type=float, default=0.5, help="fraction of the pruning run that searches")
    parser.add_argument("--target", type=float, default=0.5, help="fraction of the parameters kept")
    parser.add_argument("--lr", type=float, default=2e-3, help="dense pretraining and from-scratch learning rate")
    parser.add_argument("--tune-lr", type=float, default=1e-3, help="pruning run and baseline fine-tuning")
    parser.add_argument("--eval-windows", type=int, default=200)
    parser.add_argument("--eval-split", choices=("test", "validation"), default="test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "results" / "llm")
    parser.add_argument(
        "--scratch-only",
        metavar="HIDDEN,INTER,HEADS,KV,STEPS",
        help="only the from-scratch baseline, with these widths and steps, into scratch.json (to run it in a "
        "second process beside the rest: its widths and steps fixed in advance)",
    )
    parser.add_argument("--reuse-dense", action="store_true", help="start from the dense model a former run saved")
    parser.add_argument(
        "--repeat-seeds",
        metavar="S1,S2",
        help="with --reuse-dense: rerun only the gates and the Torch-Pruning baseline with these data-order seeds, "
        "and add them to results.json with mean and spread",
    )
    parser.add_argument("--no-scratch", action="store_true", help="leave out the from-scratch baseline")
    parser.add_argument("--report", action="store_true", help="merge scratch.json into results.json and plot")
    args = parser.parse_args(argv)

    corpus = load_corpus()
    if corpus is None:
        print(f"prune_llama: the corpus is missing ({CORPUS}); install it with `apt-get install fortunes`. Skipping.")
        return 0
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        print(f"prune_llama: needs transformers and accelerate ({error}). Skipping.")
        return 0
    sys.path.insert(0, str(ROOT))
    from tg_kernels.integrations import hf

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*DynamicCache.*")
    args.out.mkdir(parents=True, exist_ok=True)
    train_bytes, validation, test = corpus
    held = test if args.eval_split == "test" else validation
    tokens_per_step = args.batch * args.seq
    print(
        f"corpus: {len(train_bytes):,} train bytes, {len(held):,} {args.eval_split} bytes; {tokens_per_step} per step"
    )
    results: dict = {"args": {k: _shown(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    ppl = lambda m: perplexity(m, held, args.seq, args.eval_windows)  # noqa: E731
    if args.scratch_only:
        hidden, inter, heads, kv, steps = (int(v) for v in args.scratch_only.split(","))
        torch.manual_seed(args.seed)
        scratch = llama(transformers, hidden, inter, args.layers, heads, kv, args.head_dim, args.seq)
        data = Windows(train_bytes, args.seq, steps * args.batch, seed=args.seed + 2)
        seconds = fit(transformers, scratch, args.out / "scratch", steps, args.lr, args.batch, data, args.seed)
        row = {"params": n_params(scratch), "steps": steps, "seconds": seconds, "ppl": ppl(scratch),
               "flops": 6 * n_params(scratch) * tokens_per_step * steps,
               "config": {"hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads,
                          "num_key_value_heads": kv, "head_dim": args.head_dim}}  # fmt: skip
        (args.out / "scratch.json").write_text(json.dumps(row, indent=2) + "\n")
        print("scratch:", row)
        return 0
    if args.report:
        return report(args.out, tokens_per_step)
    if args.repeat_seeds and not args.reuse_dense:
        parser.error("--repeat-seeds reruns on the dense model of a former run: add --reuse-dense")
    shape = dict(hidden=args.hidden, inter=args.intermediate, layers=args.layers, heads=args.heads, kv=args.kv_heads)
    torch.manual_seed(args.seed)
    dense = llama(transformers, **shape, head_dim=args.head_dim, seq=args.seq)
    full = n_params(dense)
    pre_data = Windows(train_bytes, args.seq, args.dense_steps * args.batch, seed=args.seed)
    prune_data = lambda seed: Windows(train_bytes, args.seq, args.prune_steps * args.batch, seed=seed + 1)  # noqa: E731

    # 1. dense pretraining (or the model a former run saved: the later stages can be rerun from it)
    saved_dense = args.out / "dense-model"
    if args.reuse_dense and saved_dense.exists():
        dense = transformers.LlamaForCausalLM.from_pretrained(saved_dense)
        results = json.loads((args.out / "results.json").read_text())
        seconds = results["dense"]["seconds"]
    else:
        seconds = fit(transformers, dense, args.out, args.dense_steps, args.lr, args.batch, pre_data, args.seed)
        dense.save_pretrained(saved_dense)
    if args.repeat_seeds:
        seeds = [int(v) for v in args.repeat_seeds.split(",")]
        return repeat(transformers, hf, dense, args, results, seeds, prune_data, ppl)
    results["dense"] = {"params": full, "steps": args.dense_steps, "seconds": seconds, "ppl": ppl(dense)}
    print("dense:", results["dense"])
    save()

    # 2. pruning inside the Trainer, and the same run with every step dense
    data = prune_data(args.seed)
    trainer, rows, seconds = prune_run(transformers, hf, dense, args.out, args, data, ("exact", "hard"), args.seed + 1)
    small = trainer.pruned_model
    saved = args.out / "pruned-model"
    trainer.save_pruned(saved)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(saved)
    results["tg"] = {
        "params": n_params(small), "ratio": n_params(small) / full, "config": widths(small), "seconds": seconds,
        "ppl": ppl(small), "ppl_reloaded": ppl(reloaded), "params_reloaded": n_params(reloaded),
        "settled_flips": trainer.settled_flips,
    }  # fmt: skip
    print("tg:", results["tg"])
    save()
    none_trainer, none_rows, none_seconds = prune_run(
        transformers, hf, dense, args.out, args, data, ("none", "none"), args.seed + 1
    )
    results["tg_none"] = {"seconds": none_seconds, "ppl": ppl(none_trainer.pruned_model)}
    results["tokens_per_s"] = tokens_per_s(rows, none_rows, tokens_per_step)
    print("tokens/s (median step):", results["tokens_per_s"])
    with open(args.out / "steps.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "phase", "params", "seconds", "none_seconds"])
        for r, n in zip(rows, none_rows):
            writer.writerow([r["step"], r["phase"], int(r["params"]), f"{r['seconds']:.4f}", f"{n['seconds']:.4f}"])
    save()

    # 3. Torch-Pruning's recipe at the same parameter count, fine-tuned on the same batches
    results["torch_pruning"] = torch_pruning_baseline(transformers, dense, n_params(small), args, data, args.seed, ppl)
    print("torch_pruning:", results["torch_pruning"])
    save()

    # 4. a dense model of the pruned widths from scratch, with the same training FLOPs
    if args.no_scratch:
        plot(rows, none_rows, full, tokens_per_step, args.out / "throughput.png")
        return 0
    flops = 6 * full * tokens_per_step * args.dense_steps + sum(6 * r["params"] * tokens_per_step for r in rows)
    c = small.config
    torch.manual_seed(args.seed)
    scratch = llama(
        transformers, hidden=c.hidden_size, inter=c.intermediate_size, layers=args.layers,
        heads=c.num_attention_heads, kv=c.num_key_value_heads, head_dim=c.head_dim, seq=args.seq,
    )  # fmt: skip
    steps = round(flops / (6 * n_params(scratch) * tokens_per_step))
    scratch_data = Windows(train_bytes, args.seq, steps * args.batch, seed=args.seed + 2)
    seconds = fit(transformers, scratch, args.out, steps, args.lr, args.batch, scratch_data, args.seed)
    results["scratch"] = {"params": n_params(scratch), "steps": steps, "seconds": seconds, "ppl": ppl(scratch)}
    print("scratch:", results["scratch"])
    save()
    plot(rows, none_rows, full, tokens_per_step, args.out / "throughput.png")
    return 0


def tokens_per_s(rows: list[dict], none_rows: list[dict], tokens_per_step: int) -> dict[str, float]:
    """Median-step tokens/s per phase of both runs, and of the first and last tenth of the gates' search."""

    def rate(table: list[dict], skip_first: int = 2) -> float:
        times = sorted(r["seconds"] for r in table[skip_first:])  # the first steps warm up
        return tokens_per_step / times[len(times) // 2] if times else float("nan")

    out = {}
    for name, table in (("tg", rows), ("none", none_rows)):
        for phase in ("search", "tune"):
            out[f"{name}_{phase}"] = rate([r for r in table if r["phase"] == phase])
    search = [r for r in rows if r["phase"] == "search"]
    tenth = max(len(search) // 10, 3)
    out["tg_search_first_tenth"] = rate(search[: tenth + 2])
    out["tg_search_last_tenth"] = rate(search[-tenth:], skip_first=0)
    return out


def torch_pruning_baseline(transformers, dense, target: int, args, data, seed: int, ppl) -> dict:
    """Torch-Pruning's recipe at ``target`` parameters, fine-tuned on ``data``; checks that the result
    reloads with ``from_pretrained`` at the parameter count it claims and the same perplexity."""
    try:
        import torch_pruning as tp
    except ImportError as error:
        return {"skipped": f"torch-pruning is not installed ({error})"}
    model, ratio = torch_pruning_at(tp, dense, target, data[0]["input_ids"][None])
    ppl0 = ppl(model)
    seconds = fit(transformers, model, args.out, args.prune_steps, args.tune_lr, args.batch, data, seed + 1)
    saved = args.out / "torch-pruning-model"
    model.save_pretrained(saved)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(saved)
    full = n_params(dense)
    return {
        "params": n_params(model), "ratio": n_params(model) / full, "pruning_ratio": ratio, "config": widths(model),
        "ppl_before_tuning": ppl0, "ppl": ppl(model), "ppl_reloaded": ppl(reloaded),
        "params_reloaded": n_params(reloaded), "seconds": seconds,
    }  # fmt: skip


def seeds_summary(runs: dict) -> dict:
    """Mean, sample standard deviation, min and max of each method's perplexity over the seeds."""
    summary = {}
    for name in ("tg", "torch_pruning"):
        values = [run[name]["ppl"] for run in runs.values()]
        mean = sum(values) / len(values)
        spread = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
        summary[name] = {"seeds": len(values), "ppl_mean": mean, "ppl_std": spread, "ppl_min": min(values),
                         "ppl_max": max(values)}  # fmt: skip
    return summary


def repeat(transformers, hf, dense, args, results: dict, seeds: list[int], prune_data, ppl) -> int:
    """The gates and the Torch-Pruning baseline again on the same dense model with other data orders."""
    full = n_params(dense)
    runs = results.setdefault("seeds", {})
    runs[str(args.seed)] = {name: {"ppl": results[name]["ppl"], "ratio": results[name]["ratio"]}
                            for name in ("tg", "torch_pruning")}  # fmt: skip
    for seed in seeds:
        data = prune_data(seed)
        trainer, _, seconds = prune_run(transformers, hf, dense, args.out, args, data, ("exact", "hard"), seed + 1)
        small = trainer.pruned_model
        tp_row = torch_pruning_baseline(transformers, dense, n_params(small), args, data, seed, ppl)
        runs[str(seed)] = {
            "tg": {"ppl": ppl(small), "ratio": n_params(small) / full, "seconds": seconds},
            "torch_pruning": {"ppl": tp_row["ppl"], "ratio": tp_row["ratio"], "seconds": tp_row["seconds"]},
        }
        print(f"seed {seed}:", runs[str(seed)])
        results["seeds_summary"] = seeds_summary(runs)  # after every seed: a stopped run keeps what it has
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    summary = results.get("seeds_summary", seeds_summary(runs))
    print("seeds:", summary)
    return 0


def report(out: Path, tokens_per_step: int) -> int:
    """Merge a second process's scratch.json into results.json (with both runs' training FLOPs) and plot."""
    results = json.loads((out / "results.json").read_text())
    with open(out / "steps.csv") as f:
        table = list(csv.DictReader(f))
    rows = [{"step": int(r["step"]), "phase": r["phase"], "params": float(r["params"]), "seconds": float(r["seconds"])}
            for r in table]  # fmt: skip
    none_rows = [{"step": int(r["step"]), "seconds": float(r["none_seconds"])} for r in table]
    full = results["dense"]["params"]
    flops = 6 * tokens_per_step * (full * results["dense"]["steps"] + sum(r["params"] for r in rows))
    results["tg"]["flops"] = flops
    if (out / "scratch.json").exists():
        results["scratch"] = json.loads((out / "scratch.json").read_text())
        results["scratch"]["flops_vs_tg"] = results["scratch"]["flops"] / flops
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(rows, none_rows, full, tokens_per_step, out / "throughput.png")
    print(json.dumps(results, indent=2))
    return 0


def plot(rows: list[dict], none_rows: list[dict], full: int, tokens_per_step: int, path: Path) -> None:
    """Tokens/s (a running median over 9 steps) of both runs and the parameter count, over the steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return

    def smooth(values: list[float], k: int = 9) -> list[float]:
        windows = [sorted(values[max(0, i - k // 2) : i + k // 2 + 1]) for i in range(len(values))]
        return [w[len(w) // 2] for w in windows]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [r["step"] for r in rows]
    ax.plot(steps, smooth([tokens_per_step / r["seconds"] for r in rows]), label="tg_kernels (exact, then hard)")
    ax.plot(
        [r["step"] for r in none_rows],
        smooth([tokens_per_step / r["seconds"] for r in none_rows]),
        label="same run, skip='none' (dense steps)",
    )
    ax.set_xlabel("optimizer step of the pruning run")
    ax.set_ylabel("tokens / s")
    ax.legend(loc="upper left")
    twin = ax.twinx()
    twin.plot(steps, [r["params"] / full for r in rows], color="gray", linestyle="--", label="parameters (fraction)")
    twin.set_ylabel("parameters / dense")
    twin.set_ylim(0, 1.05)
    twin.legend(loc="lower right")
    search_end = max((r["step"] for r in rows if r["phase"] == "search"), default=0)
    ax.axvline(search_end, color="black", linewidth=0.5)
    ax.set_title("Pruning a Llama inside the Trainer: throughput as gates close (2-core CPU, shared)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
