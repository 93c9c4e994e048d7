"""The ablation report: arms' summaries and paired comparisons -> ``ablation.json``, ``.md``, ``.png``.

:func:`build_ablation` turns predictions frames (see :mod:`serray.train.stats`) of every
(arm, mode, label fraction) into the ablation dict; :func:`write_ablation` writes it as JSON, as a
paper-style Markdown report and as a figure. The ablation dict's schema::

    {
      "protocol": str, "folds": [...], "seeds": [...],
      "arms": [{"arm", "mode", "label_fraction",
                "ua": {"mean", "sd", "ci95": [lo, hi]}, "wa": {...}, "macro_f1": {...},
                "val_ua": {"mean", "sd", "ci95"} (when validation UA was given),
                "runs": [{"seed", "fold", "ua", "wa", "macro_f1", "n_test"[, "val_ua"]}]}],
      "comparisons": [{"a", "b", "mode", "label_fraction", "metric", "delta", "ci95", "p_value",
                       "test", "verdict", "wins", "losses", "utterance_ci95", "utterance_p",
                       "wilcoxon_p", "n_boot", "n_runs"}]
    }

``ci95`` / ``p_value`` / ``verdict`` of a comparison are the run-level test, a statement about **these
test groups** (:func:`serray.train.stats.run_level_test`); ``fold_ci95`` / ``fold_p_value`` /
``fold_verdict`` the fold-level test, about **new test groups**
(:func:`serray.train.stats.scoped_inference`); the utterance-only bootstrap and Wilcoxon are secondary.
Every "sd" is the sample standard deviation (n - 1) over the runs.

Metric values, deltas and intervals are fractions (0..1) in the dict and the JSON; the Markdown
and the figure show percent (deltas in percentage points). Undefined values are ``null``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Hashable, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from serray.data.corpora.base import LABELS
from serray.train.stats import FOLD_LEVEL_TEST, METRICS, RUN_LEVEL_TEST, compare, run_metrics, scoped_verdicts, summarise_runs

ARM_ORDER: Tuple[str, ...] = ("classical", "none", "random_init", "no_local", "full", "oracle")
"""Display order of the known arms (unknown arms follow, alphabetically)."""

DEFAULT_COMPARISONS: Tuple[Tuple[str, str], ...] = (("full", "random_init"), ("full", "no_local"),
                                                     ("random_init", "none"), ("full", "none"), ("full", "classical"),
                                                     ("random_init", "classical"))
"""(a, b) pairs compared by default, in every mode x label fraction where both arms exist."""

_METRIC_NAMES = {"ua": "UA", "wa": "WA", "macro_f1": "macro-F1"}


def _arm_key(arm: str) -> Tuple[int, str]:
    return (ARM_ORDER.index(arm), "") if arm in ARM_ORDER else (len(ARM_ORDER), arm)


def _sort_key(arm: str, mode: str, fraction: float) -> Tuple[Any, ...]:
    return (str(mode), float(fraction), _arm_key(arm))


def build_ablation(arm_preds: Mapping[Tuple[str, str, float], pd.DataFrame], protocol: str,
                   folds: Sequence[Hashable], seeds: Sequence[Hashable],
                   comparisons: Iterable[Tuple[str, str]] = DEFAULT_COMPARISONS, metric: str = "ua",
                   n_boot: int = 2000, boot_seed: int = 0, labels: Sequence[str] = LABELS,
                   arm_val: Optional[Mapping[Tuple[str, str, float], Mapping[Tuple[Any, Any], float]]] = None
                   ) -> Dict[str, Any]:
    """Summaries of every arm and paired comparisons, as the ablation dict (module docstring).

    Args:
        arm_preds: ``{(arm, mode, label_fraction): predictions frame}``.
        protocol: A short description of the protocol (e.g. ``"IEMOCAP 4-class, 5-fold LOSO"``).
        folds: The folds of the protocol (recorded; every run's fold must be one of them).
        seeds: The seeds of the protocol (recorded; every run's seed must be one of them). An arm
            may have fewer runs (e.g. a deterministic reference arm with one seed).
        comparisons: ``(a, b)`` arm pairs; each is compared in every (mode, label fraction) where
            both arms exist (pairs with no such cell are skipped).
        metric: The metric compared (``"ua"``, ``"wa"`` or ``"macro_f1"``).
        n_boot: Bootstrap replicates per comparison.
        boot_seed: Bootstrap seed (the same for every comparison).
        labels: The class names in class-index order.
        arm_val: optional ``{(arm, mode, label_fraction): {(seed, fold): validation UA}}`` of the
            selected epochs (what a default may be chosen on; test metrics never are).

    Returns:
        The ablation dict: plain JSON-serialisable values, arms sorted by mode, label fraction and
        :data:`ARM_ORDER`, comparisons in the order of ``comparisons``, then mode and fraction.

    Raises:
        ValueError: If a key is not an (arm, mode, fraction) triple, a run's seed / fold is not
            in ``seeds`` / ``folds``, or a comparison's frames cannot be paired (see
            :func:`serray.train.stats.paired_bootstrap`).
    """
    folds, seeds = [_plain(f) for f in folds], [_plain(s) for s in seeds]
    cells: Dict[Tuple[str, str, float], pd.DataFrame] = {}
    for key, df in arm_preds.items():
        if not (isinstance(key, tuple) and len(key) == 3):
            raise ValueError(f"arm_preds keys must be (arm, mode, label_fraction), got {key!r}")
        arm, mode, fraction = str(key[0]), str(key[1]), float(key[2])
        if (arm, mode, fraction) in cells:
            raise ValueError(f"two entries for arm {arm!r}, mode {mode!r}, label fraction {fraction}")
        cells[(arm, mode, fraction)] = df

    arms = []
    for arm, mode, fraction in sorted(cells, key=lambda k: _sort_key(*k)):
        runs = run_metrics(cells[(arm, mode, fraction)], labels)
        bad = [(r["seed"], r["fold"]) for r in runs if r["seed"] not in seeds or r["fold"] not in folds]
        if bad:
            raise ValueError(f"arm {arm!r} ({mode}, {fraction}): runs {bad[:3]} are outside seeds {seeds} / "
                             f"folds {folds}")
        entry = {"arm": arm, "mode": mode, "label_fraction": fraction, **{m: summarise_runs(runs, m) for m in METRICS}}
        val = (arm_val or {}).get((arm, mode, fraction))
        if val:
            for r in runs:
                r["val_ua"] = val.get((r["seed"], r["fold"]))
            entry["val_ua"] = summarise_runs([{"ua": r["val_ua"]} for r in runs], "ua")
        arms.append({**entry, "runs": runs})

    results = []
    for a, b in comparisons:
        both = sorted({(m, f) for (arm, m, f) in cells if arm == a} & {(m, f) for (arm, m, f) in cells if arm == b},
                      key=lambda mf: (str(mf[0]), mf[1]))
        for mode, fraction in both:
            results.append(compare(cells[(a, mode, fraction)], cells[(b, mode, fraction)], a, b, mode, fraction,
                                   metric=metric, n_boot=n_boot, seed=boot_seed, labels=labels))
    return {"protocol": protocol, "folds": folds, "seeds": seeds, "arms": arms, "comparisons": results}


# -------------------------------------------------------------------------------------- writing


def _plain(x: Any) -> Any:
    """``x`` with numpy scalars / arrays as Python values and NaN / inf as ``None`` (for JSON)."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _pm(summary: Mapping[str, Any]) -> str:
    mean, sd = summary.get("mean"), summary.get("sd")
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f} ± {_pct(sd)}"


def _pts(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f}"


def _p(p: Optional[float]) -> str:
    if p is None:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _frac(f: float) -> str:
    return f"{float(f):g}"


def reading(ablation: Mapping[str, Any]) -> str:
    """A plain-language paragraph on the comparisons plus a caution line, from the numbers.

    A difference is called established ("beats" / "is worse than") only when the primary, run-level
    test says so (p < 0.05 and a 95 % interval that excludes 0, :func:`serray.train.stats.verdict`);
    the utterance bootstrap never decides.

    Args:
        ablation: The ablation dict.

    Returns:
        Markdown text (a paragraph, a blank line, the caution line).
    """
    clear, unclear = [], []
    for c in ablation.get("comparisons", []):
        name = _METRIC_NAMES.get(c["metric"], c["metric"])
        where = f"{c['mode']}, label fraction {_frac(c['label_fraction'])}"
        ci = c.get("ci95") or [None, None]
        said = c.get("verdict") or scoped_verdicts(c)["verdict"]
        runs = f"{c['wins']} of {c['n_runs']} runs ahead" if c.get("wins") is not None else ""
        new = _new_groups_text(c)
        if said != "not established":
            clear.append(f"**{c['a']}** {said} **{c['b']}** on these test groups ({where}) by {abs(100 * c['delta']):.2f} "
                         f"points of {name} (95% CI {_pts(ci[0])} to {_pts(ci[1])}, p {_p_text(c.get('p_value'))}, {runs}); "
                         f"{new}")
        else:
            unclear.append(f"{c['a']} vs {c['b']} ({where}: {_pts(c.get('delta'))} points, "
                           f"95% CI {_pts(ci[0])} to {_pts(ci[1])}, p {_p_text(c.get('p_value'))}, {runs}; {new})")
    if not clear and not unclear:
        text = "No paired comparisons were made."
    else:
        parts = []
        if clear:
            parts.append("By the run-level test (p < 0.05 and a 95% CI that excludes 0): " + "; ".join(clear) + ".")
        else:
            parts.append("No paired difference is established by the run-level test (p < 0.05 and a 95% CI that "
                         "excludes 0).")
        if unclear:
            parts.append("Not established: " + "; ".join(unclear) + ".")
        text = " ".join(parts)
    n_tests = [r["n_test"] for arm in ablation.get("arms", []) for r in arm.get("runs", []) if r.get("n_test")]
    size = ""
    if n_tests:
        lo_n, hi_n = min(n_tests), max(n_tests)
        size = f" ({lo_n} utterances per run)" if lo_n == hi_n else f" ({lo_n}-{hi_n} utterances per run)"
    caution = (f"Caution: the test sets are small{size} and training is noisy. The run-level test treats every "
               "(seed, fold) run as a unit, so a difference carried by a few lucky runs is not established; it holds "
               "for these test groups only. A claim about new sessions or speakers rests on the fold-level test, whose "
               "units are the folds. The utterance-bootstrap column holds the trained models fixed and is shown for "
               "comparison only. Runs share training data across folds, so the intervals are approximate.")
    return text + "\n\n" + caution


def _new_groups_text(c: Mapping[str, Any]) -> str:
    """What a comparison says about new test groups (the fold-level test), in words."""
    if c.get("fold_p_value") is None:
        return "new test groups: not tested"
    fv = c.get("fold_verdict") or scoped_verdicts(c).get("fold_verdict")
    fci = c.get("fold_ci95") or [None, None]
    k = c.get("n_folds")
    detail = (f"fold-level p {_p_text(c.get('fold_p_value'))}, the smallest {k} folds allow is {_p(c.get('fold_p_min'))}, "
              f"95% CI {_pts(fci[0])} to {_pts(fci[1])}, {c.get('folds_ahead')} of {k} folds ahead")
    if fv and fv.startswith("not testable"):
        return f"for new test groups it cannot be established with {k} folds ({detail})"
    return f"for new test groups: {fv} ({detail})"


def _p_text(p: Optional[float]) -> str:
    s = _p(p)
    return s if s.startswith("<") or s == "n/a" else f"= {s}"


def ablation_markdown(ablation: Mapping[str, Any]) -> str:
    """The Markdown report: the arms table, the comparisons table and the reading.

    Args:
        ablation: The ablation dict.

    Returns:
        Markdown text.
    """
    arms = ablation.get("arms", [])
    with_val = any(r.get("val_ua") for r in arms)
    lines = [f"### Ablation: {ablation.get('protocol', '')}", "",
             f"Folds {list(ablation.get('folds', []))}, seeds {list(ablation.get('seeds', []))}. "
             "Metrics in percent, mean ± sd over seed × fold runs (sd: sample standard deviation, n − 1)"
             + ("; val UA: the selected epochs' validation UA (held-out training speakers)." if with_val else "."), "",
             "| arm | mode | label fraction | UA % | WA % | macro-F1 % |" + (" val UA % |" if with_val else "") + " n runs |",
             "|---|---|---:|---:|---:|---:|" + ("---:|" if with_val else "") + "---:|"]
    for r in arms:
        val = (f" {_pm(r['val_ua'])} |" if r.get("val_ua") else " - |") if with_val else ""
        lines.append(f"| {r['arm']} | {r['mode']} | {_frac(r['label_fraction'])} | {_pm(r['ua'])} | {_pm(r['wa'])} | "
                     f"{_pm(r['macro_f1'])} |{val} {len(r.get('runs', []))} |")
    comps = ablation.get("comparisons", [])
    if comps:
        lines += ["", "#### Paired comparisons (A − B)", "",
                  f"These test groups (the primary test): {RUN_LEVEL_TEST}. New test groups: {FOLD_LEVEL_TEST}. "
                  "Secondary: the bootstrap over test utterances with the trained models fixed, and a Wilcoxon "
                  "signed-rank test over runs.", "",
                  "| A | B | mode | label fraction | metric | Δ (points) | these test groups: 95% CI | p | runs A > B | "
                  "verdict | new test groups: 95% CI | p (floor) | folds A > B | verdict | utterance-bootstrap CI | "
                  "utterance p | Wilcoxon p |",
                  "|---|---|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|"]
        for c in comps:
            ci = c.get("ci95") or [None, None]
            fci = c.get("fold_ci95") or [None, None]
            uci = c.get("utterance_ci95") or [None, None]
            wins = f"{c['wins']}/{c['n_runs']}" if c.get("wins") is not None else "n/a"
            folds = f"{c['folds_ahead']}/{c['n_folds']}" if c.get("folds_ahead") is not None else "n/a"
            said = {**scoped_verdicts(c), **{k: c[k] for k in ("verdict", "fold_verdict") if c.get(k)}}
            lines.append(f"| {c['a']} | {c['b']} | {c['mode']} | {_frac(c['label_fraction'])} | "
                         f"{_METRIC_NAMES.get(c['metric'], c['metric'])} | {_pts(c.get('delta'))} | "
                         f"[{_pts(ci[0])}, {_pts(ci[1])}] | {_p(c.get('p_value'))} | {wins} | {said['verdict']} | "
                         f"[{_pts(fci[0])}, {_pts(fci[1])}] | {_p(c.get('fold_p_value'))} ({_p(c.get('fold_p_min'))}) | "
                         f"{folds} | {said.get('fold_verdict', 'n/a')} | "
                         f"[{_pts(uci[0])}, {_pts(uci[1])}] | {_p(c.get('utterance_p'))} | {_p(c.get('wilcoxon_p'))} |")
    lines += ["", reading(ablation), ""]
    return "\n".join(lines)


def _plot(ablation: Mapping[str, Any], path: Path) -> Path:
    """Per-arm mean UA with 95% CI per mode / fraction; the label-efficiency curve when several fractions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [r for r in ablation.get("arms", []) if r["ua"].get("mean") is not None]
    names = sorted({r["arm"] for r in arms}, key=_arm_key)
    groups = sorted({(r["mode"], float(r["label_fraction"])) for r in arms}, key=lambda g: (str(g[0]), g[1]))
    fractions = sorted({g[1] for g in groups})
    modes = sorted({g[0] for g in groups}, key=str)
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(names)}
    curve = len(fractions) > 1
    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(12 if curve else 7, 4.2), squeeze=False)

    def err(r):
        lo, hi = (list(r["ua"].get("ci95") or []) + [None, None])[:2]
        m = r["ua"]["mean"]
        return (0.0 if lo is None else 100 * (m - lo)), (0.0 if hi is None else 100 * (hi - m))

    ax = axes[0][0]
    width = 0.8 / max(1, len(names))
    for i, a in enumerate(names):
        xs, ys, lo_e, hi_e = [], [], [], []
        for gi, g in enumerate(groups):
            for r in arms:
                if r["arm"] == a and (r["mode"], float(r["label_fraction"])) == g:
                    e = err(r)
                    xs.append(gi - 0.4 + width * (i + 0.5))
                    ys.append(100 * r["ua"]["mean"])
                    lo_e.append(e[0])
                    hi_e.append(e[1])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo_e, hi_e], fmt="o", color=colors[a], ms=6, capsize=4, lw=1.5, label=a)
    for gi in range(1, len(groups)):
        ax.axvline(gi - 0.5, color="0.85", lw=0.8)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{m}\nfraction {_frac(f)}" for m, f in groups], fontsize=8)
    ax.set_ylabel("UA % (mean, 95% CI over runs)")
    lows = [100 * (r["ua"]["mean"]) - err(r)[0] for r in arms]
    if lows:
        ax.set_ylim(max(0.0, min(lows) - 10), min(100.0, max(100 * r["ua"]["mean"] + err(r)[1] for r in arms) + 5))
    ax.set_title("UA per arm", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)

    if curve:
        ax = axes[0][1]
        styles = ["-", "--", ":", "-."]
        for mi, mode in enumerate(modes):
            for a in names:
                pts = sorted((float(r["label_fraction"]), r) for r in arms if r["arm"] == a and r["mode"] == mode)
                if not pts:
                    continue
                xs = [f for f, _ in pts]
                ys = [100 * r["ua"]["mean"] for _, r in pts]
                e = [err(r) for _, r in pts]
                ax.errorbar(xs, ys, yerr=[[x[0] for x in e], [x[1] for x in e]], color=colors[a],
                            ls=styles[mi % len(styles)], marker="o", ms=4, capsize=3, lw=1.2,
                            label=f"{a} ({mode})" if len(modes) > 1 else a)
        ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.set_xticklabels([_frac(f) for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("label fraction (log scale)")
        ax.set_ylabel("UA %")
        ax.set_title("Label efficiency", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)

    fig.suptitle(f"Ablation: {ablation.get('protocol', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_ablation(ablation: Mapping[str, Any], out_dir: str | Path) -> Dict[str, Path]:
    """Write ``ablation.json``, ``ablation.md`` and ``ablation.png`` into ``out_dir`` (a local path).

    Args:
        ablation: The ablation dict (module docstring), e.g. from :func:`build_ablation`.
        out_dir: Output directory (created if missing).

    Returns:
        ``{"json": path, "md": path, "png": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _plain(ablation)
    paths = {"json": out / "ablation.json", "md": out / "ablation.md", "png": out / "ablation.png"}
    paths["json"].write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    paths["md"].write_text(ablation_markdown(data))
    _plot(data, paths["png"])
    return paths
