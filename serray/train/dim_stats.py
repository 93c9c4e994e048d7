"""Run-level statistics of CCC (dimensional emotion), the same as :mod:`serray.train.stats` gives UA.

A *dimensional predictions frame* has ``seed``, ``fold``, ``utt_id`` and, per dimension ``d``, the
true rating ``d`` and the prediction ``pred_d`` (what a dimensional / multitask fold writes to its
``predictions.csv``). A run is one (seed, fold); its metric is the CCC of one dimension over the
fold's whole test split (``ccc_<d>``), or ``ccc_mean`` over the dimensions.

:func:`run_level_test_ccc` is :func:`serray.train.stats.run_level_test` for these metrics: the
sign-flip permutation p over the runs' paired differences, and a two-level bootstrap interval (runs,
then each drawn run's test utterances, resampled with replacement -- one draw per fold shared by
both arms and every seed, so the pairing holds; no stratification: there are no classes).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
import pandas as pd

from serray.train.stats import FOLD_LEVEL_TEST, RUN_LEVEL_TEST, scoped_inference, summarise_runs  # noqa: F401


def _weighted_ccc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """CCC of ``y``, ``p`` (n,) (or p (S, n)) under utterance counts ``w`` (B, n): (B,) or (B, S)."""
    tot = w.sum(axis=1, keepdims=True)
    wn = w / tot  # (B, n)
    my = wn @ y  # (B,)
    vy = wn @ (y * y) - my**2
    p2 = np.atleast_2d(p)  # (S, n)
    mp = wn @ p2.T  # (B, S)
    vp = wn @ (p2 * p2).T - mp**2
    cov = wn @ (y[:, None] * p2.T) - my[:, None] * mp
    denom = vy[:, None] + vp + (my[:, None] - mp) ** 2
    out = np.where(denom > 0, 2 * cov / np.where(denom > 0, denom, 1.0), np.nan)
    return out if p.ndim == 2 else out[:, 0]


def run_metrics_ccc(preds: pd.DataFrame, names: Sequence[str]) -> List[Dict[str, Any]]:
    """``ccc_<d>`` of every dimension and ``ccc_mean`` for every (seed, fold) run."""
    from serray.train.dim_metrics import ccc

    runs = []
    for (seed, fold), g in preds.groupby(["seed", "fold"], sort=True):
        r = {"seed": int(seed), "fold": int(fold), "n_test": int(len(g))}
        for n in names:
            r[f"ccc_{n}"] = ccc(g[n], g[f"pred_{n}"])
        r["ccc_mean"] = float(np.mean([r[f"ccc_{n}"] for n in names]))
        runs.append(r)
    return runs


def _fold_arrays(preds_a: pd.DataFrame, preds_b: pd.DataFrame, dims: Sequence[str]):
    """Per fold: true ratings (n, K), predictions of both arms (S, n, K), utterances and seeds in one order."""
    out = []
    key = ["seed", "fold", "utt_id"]
    a, b = preds_a.sort_values(key), preds_b.sort_values(key)
    if not a[key].reset_index(drop=True).equals(b[key].reset_index(drop=True)):
        raise ValueError("the two arms do not hold the same (seed, fold, utterance) rows")
    for fold, ga in a.groupby("fold", sort=True):
        gb = b[b["fold"] == fold]
        seeds = sorted(ga["seed"].unique())
        first = ga[ga["seed"] == seeds[0]]
        y = first[list(dims)].to_numpy(float)
        pa = np.stack([ga[ga["seed"] == s][[f"pred_{d}" for d in dims]].to_numpy(float) for s in seeds])
        pb = np.stack([gb[gb["seed"] == s][[f"pred_{d}" for d in dims]].to_numpy(float) for s in seeds])
        out.append((fold, y, pa, pb))
    return out


def run_level_test_ccc(preds_a: pd.DataFrame, preds_b: pd.DataFrame, metric: str, names: Sequence[str],
                       n_boot: int = 2000, seed: int = 0) -> Dict[str, Any]:
    """Arm A minus arm B on ``metric`` (``ccc_<d>`` or ``ccc_mean``): ``{"delta", "ci95", "p_value",
    "test", "n_boot", "n_runs", "wins", "losses"}`` as :func:`serray.train.stats.run_level_test`."""
    dims = list(names) if metric == "ccc_mean" else [metric[len("ccc_"):]]
    if any(d not in names for d in dims):
        raise ValueError(f"unknown metric {metric!r}: ccc_mean or ccc_<dimension> of {list(names)}")
    ra, rb = run_metrics_ccc(preds_a, names), run_metrics_ccc(preds_b, names)
    ka, kb = {(r["seed"], r["fold"]): r[metric] for r in ra}, {(r["seed"], r["fold"]): r[metric] for r in rb}
    if set(ka) != set(kb):
        raise ValueError("the two arms have different (seed, fold) runs")
    rng = np.random.default_rng(seed)
    per_fold = []
    idx = [names.index(d) for d in dims]
    for fold, y, pa, pb in _fold_arrays(preds_a, preds_b, names):
        seeds = sorted(s for s, f in ka if f == fold)
        observed = np.array([ka[(s, fold)] - kb[(s, fold)] for s in seeds])
        w = rng.multinomial(len(y), np.full(len(y), 1.0 / len(y)), size=n_boot).astype(float)  # (B, n)
        da = np.mean([_weighted_ccc(y[:, j], pa[:, :, j], w) for j in idx], axis=0)  # (B, S)
        db = np.mean([_weighted_ccc(y[:, j], pb[:, :, j], w) for j in idx], axis=0)
        per_fold.append((observed, (da - db).T))  # (S,), (S, B)
    return {"metric": metric, **scoped_inference(per_fold, rng, seed), "test": RUN_LEVEL_TEST,
            "fold_test": FOLD_LEVEL_TEST}


# ------------------------------------------------------------------ the ablation on CCC (ablate.metric)


def build_dim_ablation(cells: Dict[Any, pd.DataFrame], protocol: str, folds: Sequence[int], seeds: Sequence[int],
                       metric: str, names: Sequence[str], n_boot: int = 2000, boot_seed: int = 0,
                       arm_val: Dict[Any, Dict[Any, float]] | None = None, comparisons=None) -> Dict[str, Any]:
    """The ablation dict of :func:`serray.train.ablation_report.build_ablation` on a CCC metric:
    per arm the metric's mean / sd / 95 % t-interval over the runs (and the selected epochs'
    validation score), and the paired comparisons by :func:`run_level_test_ccc`."""
    from serray.train.ablation_report import DEFAULT_COMPARISONS, _sort_key
    from serray.train.stats import scoped_verdicts

    arms = []
    for arm, mode, fraction in sorted(cells, key=lambda k: _sort_key(*k)):
        runs = run_metrics_ccc(cells[(arm, mode, fraction)], names)
        entry = {"arm": arm, "mode": mode, "label_fraction": float(fraction),
                 metric: summarise_runs([{"ua": r[metric]} for r in runs], "ua")}
        val = (arm_val or {}).get((arm, mode, fraction))
        if val:
            for r in runs:
                r["val"] = val.get((r["seed"], r["fold"]))
            entry["val"] = summarise_runs([{"ua": r["val"]} for r in runs], "ua")
        arms.append({**entry, "runs": runs})
    results = []
    for a, b in comparisons or DEFAULT_COMPARISONS:
        both = sorted({(m, f) for (arm, m, f) in cells if arm == a} & {(m, f) for (arm, m, f) in cells if arm == b})
        for mode, fraction in both:
            res = run_level_test_ccc(cells[(a, mode, fraction)], cells[(b, mode, fraction)], metric, names, n_boot,
                                     boot_seed)
            results.append({"a": a, "b": b, "mode": mode, "label_fraction": float(fraction), **res,
                            **scoped_verdicts(res)})
    return {"protocol": protocol, "metric": metric, "dimensions": list(names), "folds": [int(f) for f in folds],
            "seeds": [int(s) for s in seeds], "arms": arms, "comparisons": results}


def dim_ablation_markdown(ab: Dict[str, Any]) -> str:
    m = ab["metric"]
    lines = [f"### Ablation on {m} ({ab['protocol']}; seeds {ab['seeds']} x folds {ab['folds']})", "",
             f"| arm | mode | labels | test {m} (mean ± sd over runs) | validation (selected epochs) |",
             "|---|---|---:|---:|---:|"]
    for r in ab["arms"]:
        val = f"{r['val']['mean']:.3f}" if r.get("val") and r["val"]["mean"] is not None else "-"
        lines.append(f"| {r['arm']} | {r['mode']} | x{r['label_fraction']:g} | {r[m]['mean']:.3f} ± {r[m]['sd']:.3f} "
                     f"| {val} |")
    lines += ["", "| comparison | mode | labels | Δ (A − B) | these test groups: 95 % interval | p | runs A > B | reading "
              "| new test groups: 95 % interval | p | folds A > B | reading |",
              "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for c in ab["comparisons"]:
        fci = c.get("fold_ci95") or [float("nan")] * 2
        lines.append(f"| {c['a']} vs {c['b']} | {c['mode']} | x{c['label_fraction']:g} | {c['delta']:+.3f} | "
                     f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | {c['p_value']:.3f} | {c['wins']}/{c['n_runs']} | "
                     f"A {c['verdict']} B | [{fci[0]:+.3f}, {fci[1]:+.3f}] | {c.get('fold_p_value', float('nan')):.3f} | "
                     f"{c.get('folds_ahead', '-')}/{c.get('n_folds', '-')} | {c.get('fold_verdict', '-')} |")
    lines += ["", f"{RUN_LEVEL_TEST}.", f"{FOLD_LEVEL_TEST}."]
    return "\n".join(lines) + "\n"


def write_dim_ablation(ab: Dict[str, Any], out_dir) -> Dict[str, Any]:
    """``ablation.json`` and ``ablation.md`` of a CCC ablation."""
    import json
    from pathlib import Path

    from serray.train.ablation_report import _plain

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "ablation.json", "md": out / "ablation.md"}
    paths["json"].write_text(json.dumps(_plain(ab), indent=2) + "\n")
    paths["md"].write_text(dim_ablation_markdown(ab))
    return paths
