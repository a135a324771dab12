"""Prune a small Llama end to end inside the Hugging Face Trainer, and compare it with two baselines.

1. Train a small Llama with grouped KV heads from scratch on English text (byte-level tokens) from
   the Debian package ``fortunes`` (``apt-get install fortunes``: about 2.5 MB of quotations,
   poems, jokes and literature excerpts under /usr/share/games/fortunes; nothing is downloaded).
   Every tenth entry is held out.
2. Prune it to 50% of its parameters with :class:`tg_kernels.integrations.hf.PruningTrainer`
   (``uniform=True``: every layer keeps the same KV groups and MLP units, the residual stream
   prunes, head dims stay whole), so the result is a plain ``LlamaForCausalLM`` that
   ``save_pretrained`` / ``from_pretrained`` round-trip.
3. The same run in skip mode ``"none"`` (every step dense): the tokens/s reference.
4. Baselines, held-out perplexity at the same parameter count:
   - magnitude pruning, Torch-Pruning's LLM recipe: KV groups (with their query heads), MLP units
     and the hidden size ranked per layer by their weights' L2 magnitude (mean over the coupled
     tensors), the same ratio for every group and layer, head dims whole; then fine-tuned on the
     same batches as the pruning run. (torch-pruning 1.6.1's ``MetaPruner`` does not finish building
     its dependency groups for transformers 5.24's Llama, so the recipe is applied here through
     tg_kernels' own gates and export.)
   - a dense Llama of the pruned model's widths trained from scratch with the same total compute
     (training FLOPs ``6 * parameters * tokens`` of the dense pretraining plus the pruning run).

Writes ``results.json``, ``steps.csv`` and ``throughput.png`` to ``--out``
(default ``examples/results/llm``). ``python examples/prune_llama.py --help`` lists the sizes.

On a shared machine the from-scratch baseline can run in a second process beside the rest, its
widths and steps fixed in advance (the steps from the expected compute; ``--report`` records both
runs' training FLOPs). The committed results come from one plain run (3 minutes on a quiet
2-core machine)::

    python examples/prune_llama.py &
    python examples/prune_llama.py --scratch-only 96,232,6,3,796
    python examples/prune_llama.py --report   # once both are done (stop the first at its own scratch stage)
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


def load_corpus(corpus: Path = CORPUS) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(train bytes, held-out bytes) of the fortunes package: every tenth entry is held out."""
    files = sorted(p for p in corpus.glob("*") if p.is_file() and not p.is_symlink() and p.suffix != ".dat")
    if not files:
        return None
    entries = []
    for path in files:
        text = path.read_bytes().decode("latin-1")
        entries += [e.strip() for e in text.split("\n%\n") if e.strip()]
    train = "\n\n".join(e for i, e in enumerate(entries) if i % 10 != 9)
    held = "\n\n".join(e for i, e in enumerate(entries) if i % 10 == 9)
    as_bytes = lambda t: torch.tensor(list(t.encode("latin-1", errors="replace")), dtype=torch.long)  # noqa: E731
    return as_bytes(train), as_bytes(held)


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


def prune_run(transformers, hf, dense, out, args, data, skip):
    """The PruningTrainer run on a copy of ``dense``; returns (trainer, step rows, wall time)."""
    pruning = hf.PruningArguments(target=args.target, metric="params", search=args.search, uniform=True, skip=skip)
    model = copy.deepcopy(dense)
    trainer = hf.PruningTrainer(
        model, training_args(transformers, out, args.prune_steps, args.tune_lr, args.batch, args.seed + 1),
        pruning=pruning, train_dataset=data,
    )  # fmt: skip
    timer = StepTimes(transformers, trainer)
    trainer.add_callback(timer.callback)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer, timer.rows, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# the magnitude baseline (Torch-Pruning's LLM recipe), through tg_kernels' gates and export
# --------------------------------------------------------------------------------------------------


def _rows(w: torch.Tensor, size: int) -> torch.Tensor:
    """Sum of squares of ``w``'s output rows, in ``size`` equal blocks (heads)."""
    return w.detach().float().pow(2).view(size, -1).sum(1)


def _cols(w: torch.Tensor, size: int) -> torch.Tensor:
    return w.detach().float().pow(2).t().reshape(size, -1).sum(1)


def magnitude_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """L2 magnitude per channel of every prunable group, mean over the group's coupled tensors."""
    cfg = model.config
    kv = cfg.num_key_value_heads
    scores = {}
    stream = [_cols(model.model.embed_tokens.weight, cfg.hidden_size), _cols(model.lm_head.weight, cfg.hidden_size)]
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        heads = [_rows(a.q_proj.weight, kv), _rows(a.k_proj.weight, kv), _rows(a.v_proj.weight, kv)]
        scores[f"model_layers_{i}_self_attn_q_proj"] = torch.stack([*heads, _cols(a.o_proj.weight, kv)]).mean(0)
        scores[f"model_layers_{i}_mlp_gate_proj"] = torch.stack(
            [_rows(m.gate_proj.weight, cfg.intermediate_size), _rows(m.up_proj.weight, cfg.intermediate_size),
             _cols(m.down_proj.weight, cfg.intermediate_size)]
        ).mean(0)  # fmt: skip
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            stream.append(_cols(lin.weight, cfg.hidden_size))
        stream += [_rows(a.o_proj.weight, cfg.hidden_size), _rows(m.down_proj.weight, cfg.hidden_size)]
    scores["model_embed_tokens"] = torch.stack(stream).mean(0)
    return scores


def magnitude_prune(tg, dense: nn.Module, target: float, example: dict) -> tuple[nn.Module, float]:
    """Keep the same fraction of every group (per layer, by magnitude), the fraction found by bisection
    so that the exported model has ``target`` of the parameters. Returns (exported model, ratio)."""
    gated, bank = tg.attach_gates(copy.deepcopy(dense), example_kwargs=example)
    scores = magnitude_scores(dense)
    held = set(bank.head_dim_groups())
    missing = set(bank.gates) - held - set(scores)
    if missing:
        raise RuntimeError(f"magnitude baseline: no scores for groups {sorted(missing)}")
    full = n_params(dense)

    def keep(fraction: float) -> int:
        with torch.no_grad():
            for key, gate in bank.gates.items():
                if key in held:
                    gate.weight.fill_(1.0)
                    continue
                k = max(1, round(fraction * gate.num_channels))
                w = torch.full((gate.num_channels,), -1.0)
                w[torch.argsort(scores[key], descending=True)[:k]] = 1.0
                gate.weight.copy_(w)
        return n_params(tg.export(gated))

    lo, hi = 0.05, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if keep(mid) < target * full else (lo, mid)
    fraction = min((lo, hi), key=lambda f: abs(keep(f) / full - target))
    keep(fraction)
    gated.eval()
    return tg.export(gated), fraction


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dense-steps", type=int, default=300)
    parser.add_argument("--prune-steps", type=int, default=160)
    parser.add_argument("--search", type=float, default=0.5, help="fraction of the pruning run that searches")
    parser.add_argument("--target", type=float, default=0.5, help="fraction of the parameters kept")
    parser.add_argument("--lr", type=float, default=2e-3, help="dense pretraining and from-scratch learning rate")
    parser.add_argument("--tune-lr", type=float, default=1e-3, help="pruning run and baseline fine-tuning")
    parser.add_argument("--eval-windows", type=int, default=200)
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
    import tg_kernels as tg
    from tg_kernels.integrations import hf

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*DynamicCache.*")
    args.out.mkdir(parents=True, exist_ok=True)
    train_bytes, held = corpus
    tokens_per_step = args.batch * args.seq
    print(f"corpus: {len(train_bytes):,} train bytes, {len(held):,} held-out bytes; {tokens_per_step} tokens/step")
    results: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}

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
    shape = dict(hidden=args.hidden, inter=args.intermediate, layers=args.layers, heads=args.heads, kv=args.kv_heads)
    torch.manual_seed(args.seed)
    dense = llama(transformers, **shape, head_dim=args.head_dim, seq=args.seq)
    full = n_params(dense)
    pre_data = Windows(train_bytes, args.seq, args.dense_steps * args.batch, seed=args.seed)
    prune_data = Windows(train_bytes, args.seq, args.prune_steps * args.batch, seed=args.seed + 1)

    # 1. dense pretraining (or the model a former run saved: the later stages can be rerun from it)
    saved_dense = args.out / "dense-model"
    if args.reuse_dense and saved_dense.exists():
        dense = transformers.LlamaForCausalLM.from_pretrained(saved_dense)
        seconds = json.loads((args.out / "results.json").read_text())["dense"]["seconds"]
    else:
        seconds = fit(transformers, dense, args.out, args.dense_steps, args.lr, args.batch, pre_data, args.seed)
        dense.save_pretrained(saved_dense)
    results["dense"] = {"params": full, "steps": args.dense_steps, "seconds": seconds, "ppl": ppl(dense)}
    print("dense:", results["dense"])
    save()

    # 2. pruning inside the Trainer, and the same run with every step dense
    trainer, rows, seconds = prune_run(transformers, hf, dense, args.out, args, prune_data, ("exact", "hard"))
    small = trainer.pruned_model
    saved = args.out / "pruned-model"
    trainer.save_pruned(saved)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(saved)
    results["tg"] = {
        "params": n_params(small),
        "ratio": n_params(small) / full,
        "config": {k: getattr(small.config, k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                          "head_dim", "intermediate_size")},
        "seconds": seconds,
        "ppl": ppl(small),
        "ppl_reloaded": ppl(reloaded),
        "settled_flips": trainer.settled_flips,
    }  # fmt: skip
    print("tg:", results["tg"])
    save()
    none_trainer, none_rows, none_seconds = prune_run(
        transformers, hf, dense, args.out, args, prune_data, ("none", "none")
    )
    results["tg_none"] = {"seconds": none_seconds, "ppl": ppl(none_trainer.pruned_model)}
    phases = {}
    for name, table in (("tg", rows), ("none", none_rows)):
        for phase in ("search", "tune"):
            times = sorted(r["seconds"] for r in table if r["phase"] == phase)[2:]  # the first steps warm up
            phases[f"{name}_{phase}"] = tokens_per_step / times[len(times) // 2] if times else float("nan")
    results["tokens_per_s"] = phases
    print("tokens/s (median step):", phases)
    with open(args.out / "steps.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "phase", "params", "seconds", "none_seconds"])
        for r, n in zip(rows, none_rows):
            writer.writerow([r["step"], r["phase"], int(r["params"]), f"{r['seconds']:.4f}", f"{n['seconds']:.4f}"])
    save()

    # 3. magnitude pruning (Torch-Pruning's LLM recipe) at the same parameter count, fine-tuned on the same batches
    example = {"input_ids": prune_data[0]["input_ids"][None]}
    mag, fraction = magnitude_prune(tg, dense, n_params(small) / full, example)
    mag_ppl0 = ppl(mag)
    seconds = fit(transformers, mag, args.out, args.prune_steps, args.tune_lr, args.batch, prune_data, args.seed + 1)
    results["magnitude"] = {
        "params": n_params(mag), "ratio": n_params(mag) / full, "kept_fraction": fraction,
        "ppl_before_tuning": mag_ppl0, "ppl": ppl(mag), "seconds": seconds,
    }  # fmt: skip
    print("magnitude:", results["magnitude"])
    save()

    # 4. a dense model of the pruned widths from scratch, with the same training FLOPs
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
