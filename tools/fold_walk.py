"""The walk of one fold through serray's modules: which rooms ``run_fold`` visits, in what order, and
how often it climbs back up the import order.

Runs one fold (pre-training and fine-tuning, one epoch each) of the built-in corpus in a temporary
directory with ``sys.setprofile`` (what runs inside the shared training loop, ``serray.train.loop.fit``,
is one stay in the loop: the walk is the fold's orchestration, not its epochs) and prints:

- **stays**: the serray modules of the functions the fold calls, each function counted at its first
  call, in order, consecutive calls in the same module merged (a loop over batches is one stay);
- **rooms**: the distinct modules among them;
- **trips from the fold's module** (``serray.train.finetune``): the rooms of every call it makes into
  another module, in order, consecutive ones merged (``hub_stays``, ``hub_rooms``);
- **climbs**: the calls (each callee function once) from a module into one on a higher floor (models,
  data, train, then the rest: pipeline, predict, evaluate, tracking, ...), the helpers every floor uses
  (configuration, storage, errors, progress, provenance, Ray start-up) left out as corridors.

Usage: ``python tools/fold_walk.py [--json]``. The figures of ``docs/code.md`` come from it; it also runs
on the tree before ``serray/data/`` was grouped, for the "before" figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


#: the floors of the house, bottom up: a call from a floor to a higher one is a climb
FLOORS = ("serray.models", "serray.data", "serray.train")


def floor(module: str) -> int:
    """0 models, 1 data, 2 train, 3 the stages above them (pipeline, predict, evaluate, tracking, ...)."""
    return next((i for i, f in enumerate(FLOORS) if module == f or module.startswith(f + ".")), len(FLOORS))


#: functions whose insides are not the fold's walk: the shared training loop (entered, counted as one
#: stay in serray.train.loop; its epochs and the task's callbacks run inside it)
ENTERED_NOT_WALKED = {("serray.train.loop", "fit")}

#: the fold's own module: its trips are the calls it makes into other modules
HUB = "serray.train.finetune"

#: modules every layer uses (configuration, storage, errors, progress, provenance): corridors, not rooms
CORRIDORS = ("serray.config", "serray.storage", "serray.errors", "serray.progress", "serray.provenance",
             "serray.ray_utils")


def trace_fold():
    """``[(caller_module, callee_module, function)]`` at each serray function's first call in one fold,
    and ``[(module, function)]`` of every call the fold's own module (:data:`HUB`) makes into another."""
    import ray

    from serray.config import load_config
    try:
        from serray.data.features.featurize import featurize
        from serray.data.prepare import prepare_corpus
    except ImportError:  # the tree before serray/data/ was grouped (212b8a8 and earlier): for the "before" figure
        from serray.data.featurize import featurize
        from serray.pipeline import prepare_corpus
    from serray.data.synthetic import make_corpus
    from serray.train.finetune import run_fold

    tmp = Path(tempfile.mkdtemp(prefix="fold_walk-"))
    root = make_corpus(tmp / "IEMOCAP_full_release", seed=0, utterances_per_dialog=6)
    cfg = load_config(None, [f"output_dir={tmp / 'run'}", f"data.root={root}", "ray.progress_bars=false",
                             "encoder.name=fbank", "pretrain.epochs=1", "finetune.epochs=1"])
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    prepare_corpus(cfg, echo=lambda s: None)
    featurize(cfg)
    seen, calls, trips, inside = set(), [], [], []

    def profile(frame, event, arg):
        if inside:  # within a training run: the loop's room, not the fold's walk
            if event == "return" and frame is inside[-1]:
                inside.pop()
            return
        if event != "call":
            return
        mod = frame.f_globals.get("__name__", "")
        if not mod.startswith("serray"):
            return
        name = frame.f_code.co_qualname
        if (mod, name) in ENTERED_NOT_WALKED:
            inside.append(frame)
        caller = frame.f_back
        while caller is not None and not caller.f_globals.get("__name__", "").startswith("serray"):
            caller = caller.f_back
        caller_mod = caller.f_globals["__name__"] if caller is not None else ""
        if caller_mod == HUB and mod != HUB:
            trips.append((mod, name))
        if (mod, name) in seen:
            return
        seen.add((mod, name))
        calls.append((caller_mod, mod, name))

    sys.setprofile(profile)
    try:
        run_fold(cfg, 1)
    finally:
        sys.setprofile(None)
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return calls[1:], trips  # (the first call is run_fold itself, called from here)


def _merged(mods: list) -> list:
    out = []
    for m in mods:
        if not out or out[-1] != m:
            out.append(m)
    return out


def walk(calls: list, trips: list) -> dict:
    calls = [(c, m, f) for c, m, f in calls if m not in CORRIDORS]
    stays = _merged([m for _, m, _ in calls])
    hub = _merged([m for m, _ in trips if m not in CORRIDORS])
    climbs = [(c, m, f) for c, m, f in calls if c and c != m and floor(m) > floor(c)]
    return {"stays": len(stays), "rooms": len(set(stays)), "climbs": len(climbs),
            "hub_stays": len(hub), "hub_rooms": len(set(hub)), "walk": stays, "hub_walk": hub,
            "visits": {m: stays.count(m) for m in dict.fromkeys(stays)},
            "hub_visits": {m: hub.count(m) for m in dict.fromkeys(hub)},
            "climb_calls": [f"{c} -> {m}.{f}" for c, m, f in climbs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the whole record as JSON")
    args = ap.parse_args()
    res = walk(*trace_fold())
    if args.json:
        print(json.dumps(res, indent=2))
        return
    short = lambda ms: " -> ".join(m.removeprefix("serray.") for m in ms)  # noqa: E731
    print("walk:", short(res["walk"]))
    print("visits:", ", ".join(f"{m.removeprefix('serray.')} {n}" for m, n in res["visits"].items() if n > 1))
    print(f"trips from {HUB}:", short(res["hub_walk"]))
    for c in res["climb_calls"]:
        print("climb:", c)
    print(f"FOLD_WALK stays={res['stays']} rooms={res['rooms']} climbs={res['climbs']} "
          f"hub_stays={res['hub_stays']} hub_rooms={res['hub_rooms']}")


if __name__ == "__main__":
    main()
