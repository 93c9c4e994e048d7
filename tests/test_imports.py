"""Imports run one way, from the CLI and the pipeline down to the models: no module of serray imports,
directly or through others, a module that imports it back -- counting imports inside functions, which
hide a circle from Python but not from a reader."""

import ast
from pathlib import Path

import serray

ROOT = Path(serray.__file__).parent


def _module_graph() -> dict:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = ("serray",) + f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f

    def resolve(name: str):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("serray"):
                targets = [resolve(f"{node.module}.{a.name}") for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names if a.name.startswith("serray")]
            else:
                continue
            graph[m].update(t for t in targets if t and t != m and not m.startswith(t + ".") and t != "serray")
    return graph


def _cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_a_circle_through_a_function_level_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_serray_has_no_import_circle():
    graph = _module_graph()
    assert "serray.train.finetune" in graph and "serray.train.tasks" in graph["serray.train.finetune"]
    assert _cycles(graph) == []


#: the floors of the house, bottom up; a module imports (at module level or inside a function) only its
#: own floor, the floors below it and the services every floor uses
FLOORS = ("serray.models", "serray.data", "serray.train")
SERVICES = ("serray.config", "serray.storage", "serray.errors", "serray.progress", "serray.provenance",
            "serray.ray_utils", "serray.tracking")


def _floor(module: str) -> int:
    return next((i for i, f in enumerate(FLOORS) if module == f or module.startswith(f + ".")), len(FLOORS))


def test_imports_never_climb_to_a_higher_floor():
    """models < data < train < the stages (pipeline, predict, evaluate, serve, ...): scoring a fold's test
    split does not climb to serray.predict, the feature rows do not reach up into the training loop, and
    the evaluation protocol lives with training."""
    graph = _module_graph()
    climbs = sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts
                    if t not in SERVICES and m not in SERVICES and _floor(t) > _floor(m))
    assert climbs == []


def test_data_is_grouped_into_corpora_synthetic_and_features():
    data = ROOT / "data"
    assert {p.name for p in data.iterdir() if p.is_dir() and not p.name.startswith("__")} == {"corpora", "features", "synthetic"}
    corpora = {p.stem for p in (data / "corpora").glob("*.py")}
    assert {"iemocap", "crema_d", "emodb", "ravdess", "msp_podcast", "labelled_csv", "pooled"} <= corpora
    assert not any(p.stem.startswith("synthetic") for p in data.glob("*.py"))  # every generator is in synthetic/
