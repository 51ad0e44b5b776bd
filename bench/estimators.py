"""Sample efficiency of the gradient estimators on SmolLM2-135M (real weights, CPU).

Two measurements at the same token budget per step (K samples x B sequences x T tokens):

1. Gradient noise at the initial keep-probabilities (wanda-sp, sigmap): each estimator's estimates
   over ``--steps`` fresh batches; total variance tr Var(g). The expectations differ only by a
   known scale c times ``E[L·z]`` (z the standardised score): c = K/(K-1) for loo and antithetic
   (policy.py) and about (K - 1/W)/(K-1) for the authors' EMA baseline, whose current-batch share
   1/W shrinks it. ``tr Var / c²`` is the noise at equal expected step; its ratio to the authors'
   is the number of authors' steps that buy the noise level of one step of estimator x (same
   tokens per step). Independent-sample estimators (authors, loo) share samples and losses.
2. Short searches from the same init, one per estimator, with the same data order and seed:
   held-out perplexity of the global top-k hard mask after ``--search-steps`` steps. With
   ``--trace-every N`` the hard mask is also evaluated every N steps, and each row records the
   sample forwards it took to first reach each ``--target-ppl``; ``--seeds`` repeats every search.

Both parts are rows of one JSON record (``--json``; ``part`` is ``noise`` or ``search``).

    python bench/estimators.py --json docs/results/estimators.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from _common import ResultFile, command_line, masked_perplexity, settings_of

from pg_pruning_plugin import PolicyGradientSearch, SearchConfig, SearchSpace, UnitValues, hard_masks
from pg_pruning_plugin.resources.models import load_model
from pg_pruning_plugin.resources.text import calibration_blocks, source_blocks
from pg_pruning_plugin.search.loop import sample_losses
from pg_pruning_plugin.search.policy import ema_baseline, policy_gradient, sample_masks

# (sampling, K, B, estimators computed from those samples)
SAMPLINGS = [("independent", 2, 4, ("authors", "loo")), ("antithetic", 2, 4, ("antithetic",)),
             ("independent", 4, 2, ("authors", "loo")), ("antithetic", 4, 2, ("antithetic",))]
SEARCHES = [("authors", 2, 4), ("antithetic", 2, 4), ("loo", 4, 2)]


def heldout_ppl(model, space, masks, blocks) -> float:
    return masked_perplexity(model, space, masks, blocks, execution="gather")


@torch.no_grad()
def gradient_noise(model, space, probs, calib, steps: int, window: int, seed: int) -> list[dict]:
    rows = []
    for sampling, k, b, estimators in SAMPLINGS:
        gen = torch.Generator().manual_seed(seed)
        grads = {e: {"attn": [], "mlp": []} for e in estimators}
        baseline = None
        start = time.perf_counter()
        for t in range(steps):
            batch = {"input_ids": calib[4 * t:4 * t + b]}
            antithetic = sampling == "antithetic"
            m_attn = sample_masks(probs.attn, k, gen, antithetic)
            m_mlp = sample_masks(probs.mlp, k, gen, antithetic)
            losses = sample_losses(model, space, batch, UnitValues(m_attn, m_mlp).as_masks(), execution="gather")
            baseline = ema_baseline(baseline, float(losses.mean()), window)
            for e in estimators:
                grads[e]["attn"].append(policy_gradient(e, losses, m_attn, probs.attn, baseline))
                grads[e]["mlp"].append(policy_gradient(e, losses, m_mlp, probs.mlp, baseline))
        seconds = time.perf_counter() - start
        for e in estimators:
            scale = (k - 1 / window) / (k - 1) if e == "authors" else k / (k - 1)
            row = {"part": "noise", "estimator": e, "K": k, "B": b, "steps": steps, "seconds": seconds, "scale": scale}
            for kind in ("attn", "mlp"):
                g = torch.stack(grads[e][kind]).double()  # [steps, n]
                row[f"{kind}_var"] = float(g.var(0, unbiased=True).sum())
                row[f"{kind}_var_scaled"] = row[f"{kind}_var"] / scale ** 2
                row[f"{kind}_sq_norm"] = float((g ** 2).sum(1).mean())
                row[f"{kind}_mean"] = g.mean(0)
            rows.append(row)
            logging.info("noise %s K=%d: mlp var %.4g attn var %.4g", e, k, row["mlp_var"], row["attn_var"])
    return rows


def direction_agreement(rows: list[dict]) -> None:
    """Cosine between each estimator's mean and the mean of all other unbiased (loo/antithetic) rows."""
    for kind in ("attn", "mlp"):
        for r in rows:
            others = [o[f"{kind}_mean"] for o in rows if o is not r and o["estimator"] != "authors"]
            ref = torch.stack(others).mean(0)
            r[f"{kind}_cos"] = float(torch.nn.functional.cosine_similarity(r[f"{kind}_mean"], ref, dim=0))
    for r in rows:
        del r["attn_mean"], r["mlp_mean"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=20, help="steps per sampling scheme in the noise measurement")
    p.add_argument("--search-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.02, help="search learning rate (cosine to 0)")
    p.add_argument("--init-batches", type=int, default=2)
    p.add_argument("--eval-windows", type=int, default=32, help="held-out 128-token windows (wiki-vital eval)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--searches", nargs="*", default=[f"{e}:{k}:{b}" for e, k, b in SEARCHES],
                   help="searches to run, as estimator:K:B or estimator:K:B:lr")
    p.add_argument("--init-mapping", default="sigmap", help="metric -> initial probabilities (search.init)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="search seeds (default: --seed)")
    p.add_argument("--trace-every", type=int, default=0,
                   help="evaluate the hard mask every N steps (0: only at the end)")
    p.add_argument("--target-ppl", type=float, nargs="*", default=[],
                   help="report the sample forwards to first reach each held-out PPL (needs --trace-every)")
    p.add_argument("--skip-noise", action="store_true", help="only run the searches")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", type=Path, required=True, help="JSON record of the measurements")
    args = p.parse_args(argv)
    if args.target_ppl and not args.trace_every:
        p.error("--target-ppl needs --trace-every N (the hard mask is only evaluated every N steps)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    results = ResultFile(args.json, settings_of(args, "json"), command_line(argv))

    model, tok = load_model(args.model)
    space = SearchSpace.from_model(model)
    n_blocks = 4 * max(args.steps, args.search_steps)
    calib = calibration_blocks(tok, seq_len=128, num_blocks=n_blocks, seed=args.seed)
    held_out = source_blocks(tok, "wiki-vital", "eval", 128, max_blocks=args.eval_windows)
    base = SearchConfig(preset="authors",
                        sparsity=args.sparsity, steps=1, init_batches=args.init_batches, seed=args.seed, batch_size=4,
                        init_mapping=args.init_mapping)
    probs = PolicyGradientSearch(model, calib, base).initial_probabilities(progress=False)
    results.data["init_ppl"] = heldout_ppl(model, space, hard_masks(probs, space, base), held_out)
    logging.info("init hard-mask held-out ppl %.2f", results.data["init_ppl"])
    results.save()

    if not args.skip_noise:
        noise = gradient_noise(model, space, probs, calib, args.steps, base.baseline_window, args.seed)
        direction_agreement(noise)
        for row in noise:
            results.add(row)

    for spec, seed in ((s, seed) for s in args.searches for seed in args.seeds or [args.seed]):
        results.add(estimator_search(model, space, probs, calib, held_out, spec, seed, args))
    logging.info("done in %.0f s; raw numbers in %s", results.data["wall_seconds"], args.json)


def estimator_search(model, space, probs, calib, held_out, spec: str, seed: int, args) -> dict:
    """One search of ``spec`` (``estimator:K:B[:lr]``) from ``probs``, with the held-out PPL of its hard mask."""
    estimator, k, b, *lr = spec.split(":")
    k, b, lr = int(k), int(b), float(lr[0]) if lr else args.lr
    config = SearchConfig(preset="authors", sparsity=args.sparsity, steps=args.search_steps, lr=lr, batch_size=b,
                          samples_per_step=k, estimator=estimator, execution="gather", seed=seed)
    blocks = torch.cat([calib[4 * t:4 * t + b] for t in range(args.search_steps)])  # same data order
    trace = []  # (sample forwards so far, held-out PPL of the current hard mask)
    eval_seconds = 0.0

    def evaluate(step: int, state) -> None:
        nonlocal eval_seconds
        if args.trace_every and (step + 1) % args.trace_every == 0:
            tic = time.perf_counter()
            trace.append(((step + 1) * k, heldout_ppl(model, space, hard_masks(state.probs, space, config), held_out)))
            eval_seconds += time.perf_counter() - tic

    result = PolicyGradientSearch(model, blocks, config, init_scores=probs).run(progress=False, on_step=evaluate)
    row = {"part": "search", "estimator": estimator, "K": k, "B": b, "steps": args.search_steps, "lr": lr,
           "seed": seed, "forwards": args.search_steps * k, "ppl": heldout_ppl(model, space, result.masks, held_out),
           "flipped_mlp": int((result.masks.mlp != hard_masks(probs, space, config).mlp).sum()),
           "first_loss": sum(result.history["loss"][:5]) / 5, "last_loss": sum(result.history["loss"][-5:]) / 5,
           "seconds": result.seconds - eval_seconds, "trace": trace,
           "forwards_to_target": {str(target): next((f for f, ppl in trace if ppl <= target), None)
                                  for target in args.target_ppl}}
    logging.info("search %s", json.dumps(row))
    return row


if __name__ == "__main__":
    main()
