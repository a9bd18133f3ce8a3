"""Curvature for language models: a small causal transformer on ``pydoc_data.topics`` bytes.

Data: the standard library's documentation topics (:func:`curvlab.data.load_pydoc_topics`,
byte level, vocabulary 256, fixed document split, non-overlapping windows), loss
``nn.CrossEntropyLoss()`` (mean nats per token). Model: :func:`curvlab.problems.causal_transformer`
(pre-LN, learned positions, untied head, attention from ``nn.Linear`` q/k/v/out projections).

Part 1, optimizers (equal steps, random mini-batches, one seed in quick mode): AdamW (lr grid,
the reference), ``torch.optim.Muon`` on the 2-D hidden matrices with AdamW on the rest (Muon lr
grid), ``curvlab.KFACPreconditioner`` under AdamW and under SGD-momentum (lr grids; the
parameters it does not register keep the plain gradient), CurveBall with its defaults. Best
setting = lowest final training loss. The reference AdamW run at lr 3e-3 is probed at
checkpoints (:func:`.transformer_lm_parts.curvature_probe`: top Hessian/GGN eigenvalues,
Hutchinson traces, GGN diagonal grouped by block) on a fixed batch.

Part 2, edge of stability: full-batch GD at fixed learning rates on a fixed batch, the top
Hessian eigenvalue of that loss against ``2/lr`` (Cohen et al. 2021).

Quick mode (CPU, one intra-op thread): context 32, width 64, 2 layers, batch 32, 100 steps.
Full mode (GPU): context 128, width 128, 4 layers, batch 64, 2000 steps, 3 seeds, wider grids.

Example:
    >>> [m.label for m in lm_methods()][:2]
    ['AdamW', 'Muon + AdamW']
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import pandas as pd
from torch import nn

from curvlab.data import Dataset, load_pydoc_topics
from curvlab.experiments.harness.registry import Claim, Context, Outcome, register
from curvlab.experiments.harness.runner import Run, RunResult, run_all
from curvlab.experiments.harness.selection import first_crossing, select_best
from curvlab.experiments.harness.threads import quick_mode_threads
from curvlab.experiments.studies.transformer_lm_figures import draw_figures
from curvlab.experiments.studies.transformer_lm_parts import (
    LMMethod,
    LMSettings,
    build_stepper,
    edge_of_stability,
    train_lm,
)
from curvlab.problems import causal_transformer

__all__ = ["FULL", "NAME", "QUICK", "REFERENCE", "lm_methods", "run_transformer_lm",
           "tiny_settings", "transformer_lm"]

NAME = "transformer-lm"
QUICK = LMSettings()
FULL = LMSettings(context=128, width=128, depth=4, heads=4, batch=64, iterations=2000,
                  eval_every=100, eval_train=1024, eval_val=None, curv_batch=32,
                  curv_at=(0.0, 0.1, 0.25, 0.5, 1.0), lanczos_iter=30, probes=64, eos_batch=64,
                  eos_steps=2000, eos_every=50, eos_lrs=(0.01, 0.02, 0.05), eos_lanczos_iter=10)
#: The run probed for curvature over training: (method label, learning rate).
REFERENCE = ("AdamW", 3e-3)


def lm_methods(full: bool = False) -> list[LMMethod]:
    """The compared methods and grids (AdamW, Muon + AdamW, K-FAC under AdamW/SGD, CurveBall)."""
    adamw = [3e-4, 1e-3, 3e-3, 1e-2] if full else [1e-3, 3e-3, 1e-2]
    muon = [0.01, 0.02, 0.05, 0.1] if full else [0.02, 0.05]
    damping = [1e-3, 1e-2, 1e-1] if full else [1e-2]
    return [
        LMMethod("AdamW", "adamw", {"weight_decay": 0.0}, {"lr": adamw}),
        LMMethod("Muon + AdamW", "muon", {"weight_decay": 0.0, "adamw_lr": 3e-3},
                 {"lr": muon}),
        LMMethod("K-FAC + AdamW", "kfac-adamw", {"weight_decay": 0.0},
                 {"lr": [1e-3, 3e-3, 1e-2] if full else [3e-3, 1e-2], "damping": damping}),
        LMMethod("K-FAC + SGD-momentum", "kfac-sgd", {"momentum": 0.9, "kl_clip": 1e-3},
                 {"lr": [0.03, 0.1, 0.3] if full else [0.1, 0.3], "damping": damping}),
        LMMethod("CurveBall (default)", "curveball"),
    ]


@functools.lru_cache(maxsize=4)
def _load(context: int, device: str) -> Dataset:
    return load_pydoc_topics(context, level="byte", device=device)


def _model_factory(s: LMSettings, vocab: int) -> Any:
    return functools.partial(causal_transformer, vocab, s.context, width=s.width, depth=s.depth,
                             heads=s.heads)


def _settings_key(s: LMSettings) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}


def _optimizer_runs(ctx: Context, s: LMSettings, methods: Sequence[LMMethod],
                    seeds: Sequence[int], data: Dataset) -> tuple[pd.DataFrame, pd.DataFrame]:
    loss_fn = nn.CrossEntropyLoss()
    by_label = {m.label: m for m in methods}
    runs = [Run(NAME, {"part": "optimizers", "size": "full" if ctx.full else "quick",
                       "method": m.label, "kind": m.kind, "hp": hp, "fixed": dict(m.fixed),
                       "settings": _settings_key(s),
                       "track": ctx.full or (m.label, hp.get("lr")) == REFERENCE}, seed=seed)
            for m in methods for hp in m.grid_points() for seed in seeds]

    def fn(run: Run) -> RunResult:
        m = by_label[run.config["method"]]
        hp = {**run.config["fixed"], **run.config["hp"]}
        summary, trace, curv = train_lm(
            lambda model: build_stepper(m.kind, model, loss_fn, hp),
            _model_factory(s, data.num_classes), data, loss_fn, s, seed=run.seed,
            curvature=run.config["track"])
        at = {row["iteration"]: row for row in curv}
        return RunResult(summary, [{**r, **at.get(r["iteration"], {})} for r in trace])

    return run_all(runs, fn, ctx.out_dir, desc=NAME, progress=ctx.progress, device=ctx.device)


def _eos_runs(ctx: Context, s: LMSettings, data: Dataset) -> pd.DataFrame:
    loss_fn = nn.CrossEntropyLoss()
    runs = [Run(NAME, {"part": "eos", "size": "full" if ctx.full else "quick", "lr": lr,
                       "settings": _settings_key(s)}, seed=0) for lr in s.eos_lrs]

    def fn(run: Run) -> RunResult:
        rows = edge_of_stability(_model_factory(s, data.num_classes), data, loss_fn, s,
                                 run.config["lr"], seed=run.seed)
        late = [r["hessian_top"] for r in rows[len(rows) // 2:]]
        ratio = float(pd.Series(late).median()) / (2.0 / run.config["lr"])
        return RunResult({"initial_hessian_top": rows[0]["hessian_top"],
                          "max_hessian_top": max(r["hessian_top"] for r in rows),
                          "late_median_ratio": ratio, "final_loss": rows[-1]["loss"],
                          "steps": rows[-1]["step"]}, rows)

    _, trace = run_all(runs, fn, ctx.out_dir, desc=f"{NAME}-eos", progress=ctx.progress,
                       device=ctx.device)
    return trace


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _best_table(summary: pd.DataFrame, trace: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    best = select_best(summary, ["method"], score="final_train_loss")
    rows = []
    for method, grp in best.groupby("method", sort=False):
        hp = [c for c in grp.columns if c.startswith("hp.") and pd.notna(grp[c].iloc[0])
              and grp[c].iloc[0] != "-"]
        rows.append({"method": method, "setting": ", ".join(f"{c[3:]}={grp[c].iloc[0]}"
                                                            for c in hp),
                     **{c: float(pd.to_numeric(grp[c]).mean()) for c in (
                         "final_train_loss", "final_val_loss", "best_val_loss", "iterations",
                         "train_time_s")},
                     "diverged": bool(grp["diverged"].astype(bool).any()), "seeds": len(grp),
                     "first_warning": _text(grp["first_warning"].iloc[0])})
    table = pd.DataFrame(rows)
    ref = table.loc[table["method"] == "AdamW", "final_train_loss"]
    target = float(ref.iloc[0]) if len(ref) else math.nan
    best_trace = trace[trace["key"].isin(set(best["key"]))]
    to_target = {m: (first_crossing(g.sort_values("iteration"), target, at="iteration"),
                     first_crossing(g.sort_values("iteration"), target, at="time_s"))
                 for m, g in best_trace.groupby("method")}
    table["iters_to_adamw"] = table["method"].map(lambda m: to_target.get(m, (math.nan,) * 2)[0])
    table["time_to_adamw_s"] = table["method"].map(lambda m: to_target.get(m, (math.nan,) * 2)[1])
    return table.sort_values("final_train_loss", kind="stable").reset_index(drop=True), best_trace


def _claims(table: pd.DataFrame, curv: pd.DataFrame, eos: pd.DataFrame) -> list[Claim]:
    t = table.set_index("method")
    claims: list[Claim] = []

    def get(method: str, col: str) -> float:
        return float(t.loc[method, col]) if method in t.index and not t.loc[
            method, "diverged"] else math.inf

    adamw = get("AdamW", "final_train_loss")
    claims.append(Claim(
        "Muon on the hidden matrices (+ AdamW elsewhere) reaches a lower validation loss than "
        "tuned AdamW after equal steps (Jordan et al. 2024; Liu et al. 2025)",
        get("Muon + AdamW", "final_val_loss") < get("AdamW", "final_val_loss"),
        f"Muon {get('Muon + AdamW', 'final_val_loss'):.4f} vs AdamW "
        f"{get('AdamW', 'final_val_loss'):.4f}"))
    for kfac in ("K-FAC + AdamW", "K-FAC + SGD-momentum"):
        claims.append(Claim(
            f"{kfac} reaches a lower training loss than tuned AdamW after equal steps",
            get(kfac, "final_train_loss") < adamw,
            f"{kfac} {get(kfac, 'final_train_loss'):.4f} vs AdamW {adamw:.4f}"))
        tt, ta = get(kfac, "time_to_adamw_s"), get("AdamW", "train_time_s")
        claims.append(Claim(
            f"(wall-clock) {kfac} reaches tuned AdamW's final training loss in less optimizer "
            "time than AdamW", math.isfinite(tt) and tt < ta,
            f"{kfac} {tt:.2f} s vs AdamW {ta:.2f} s (NaN/inf: never reached)"))
    cb = get("CurveBall (default)", "final_train_loss")
    claims.append(Claim("Untuned CurveBall reaches a training loss no higher than tuned AdamW "
                        "after equal steps (CurveBall paper's claim for CNNs)", cb <= adamw,
                        f"CurveBall {cb:.4f} vs AdamW {adamw:.4f}"))
    if not curv.empty:
        later = curv[curv["iteration"] > 0]
        rel = (later["ggn_top"] / later["hessian_top"])
        claims.append(Claim(
            "after initialization the GGN's top eigenvalue is within 50% of the Hessian's "
            "(the outliers of the Hessian come from the GGN: Sagun et al. 2018, Papyan 2019)",
            bool(len(rel)) and bool(((rel > 0.5) & (rel < 1.5)).all()),
            "GGN/Hessian top ratio at checkpoints " + ", ".join(f"{v:.2f}" for v in rel)))
    for lr, grp in eos.groupby("lr"):
        grp = grp.sort_values("step")
        late = grp["hessian_top"].iloc[len(grp) // 2:]
        ratio = float(late.median()) * float(lr) / 2.0
        claims.append(Claim(
            f"[GD lr={lr:g}] the top Hessian eigenvalue settles near 2/lr = {2 / lr:.0f} "
            "(edge of stability, Cohen et al. 2021; 'near' = within ±25%)",
            0.75 <= ratio <= 1.25,
            f"median λ_max over the second half = {late.median():.1f} = {ratio:.2f} × 2/lr; "
            f"initial {grp['hessian_top'].iloc[0]:.1f}, max {grp['hessian_top'].max():.1f}"))
        claims.append(Claim(
            f"[GD lr={lr:g}] GD trains beyond the classical stability bound: λ_max exceeds "
            "2/lr while the loss still decreases (progressive sharpening past 2/lr)",
            bool(late.min() > 2 / lr) and bool(grp["loss"].iloc[-1] < grp["loss"].iloc[0]),
            f"min λ_max over the second half {late.min():.1f} vs 2/lr {2 / lr:.0f}; loss "
            f"{grp['loss'].iloc[0]:.3f} → {grp['loss'].iloc[-1]:.3f}"))
    if eos["lr"].nunique() > 1:
        scaled = {lr: float(g.sort_values("step")["hessian_top"].iloc[len(g) // 2:].median())
                  * float(lr) / 2 for lr, g in eos.groupby("lr")}
        spread = max(scaled.values()) / min(scaled.values())
        claims.append(Claim(
            "the learning rate sets the sharpness GD settles at: λ_max · lr / 2 agrees within "
            "a factor 1.5 across the learning rates", spread <= 1.5,
            ", ".join(f"lr {lr:g}: {v:.2f}" for lr, v in scaled.items())
            + f" (spread {spread:.2f}×)"))
    return claims


def run_transformer_lm(ctx: Context, settings: LMSettings | None = None,
                       methods: Sequence[LMMethod] | None = None, *,
                       seeds: Sequence[int] | None = None) -> Outcome:
    """Run both parts at ``settings`` (default :data:`QUICK` / :data:`FULL` by ``ctx.full``)."""
    s = settings if settings is not None else (FULL if ctx.full else QUICK)
    methods = list(methods) if methods is not None else lm_methods(ctx.full)
    seeds = list(seeds) if seeds is not None else ctx.seed_list(1, full_default=3)
    data = _load(s.context, str(ctx.device))
    summary, trace = _optimizer_runs(ctx, s, methods, seeds, data)
    eos = _eos_runs(ctx, s, data) if s.eos_lrs else pd.DataFrame(columns=["lr", "step"])
    table, best_trace = _best_table(summary, trace)
    tracked = trace[trace["track"].eq(True) & trace["method"].eq(REFERENCE[0])
                    & trace["hp.lr"].eq(REFERENCE[1])] if "hessian_top" in trace else trace[:0]
    curv = tracked.dropna(subset=["hessian_top"]) if not tracked.empty else tracked
    figures = draw_figures(best_trace, curv, eos, ctx.experiment_dir(NAME))
    notes = "; ".join(f"{r.method}: {r.first_warning}" for r in table.itertuples()
                      if r.first_warning)
    best = table.iloc[0]
    return Outcome(table, _claims(table, curv, eos), figures, notes=notes,
                   key_numbers={"best train loss": f"{best['method']} "
                                                   f"{best['final_train_loss']:.3f}"})


@register(NAME, title="Causal transformer on pydoc topics: AdamW, Muon, K-FAC, CurveBall; "
                      "curvature over training and the edge of stability",
          paper="Martens & Grosse 2015; Jordan et al. 2024 (Muon); Cohen et al. 2021 (EoS)")
def transformer_lm(ctx: Context) -> Outcome:
    """Registered entry point: both parts at ctx's size."""
    with quick_mode_threads(ctx.full):  # same numbers as the notebook
        return run_transformer_lm(ctx)


def tiny_settings() -> LMSettings:
    """A seconds-long configuration for tests (not registered)."""
    return replace(QUICK, context=8, width=16, depth=1, heads=2, batch=4, iterations=4,
                   eval_every=2, eval_train=16, eval_val=16, curv_batch=2, lanczos_iter=4,
                   probes=2, eos_batch=2, eos_steps=4, eos_every=2, eos_lrs=(0.1,),
                   eos_lanczos_iter=3)
