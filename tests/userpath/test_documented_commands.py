"""The user-path tier: every ``serray`` command that README.md and docs/ show, run as a user runs it.

Each documented command runs through the installed ``serray`` executable (a new process, as from a
shell) in one working directory that plays the user's checkout: ``configs/`` beside it, corpora in
every release layout under ``data/`` (made by ``serray make-corpus --layout``), runs under ``runs/``.
What a test changes in a documented command is spelled out in its step:

* **sizes**: ``TINY`` is appended to every command that trains (a small corpus, one fold, one seed,
  one epoch); a key the documented command sets itself is kept, unless the step lists it in ``force``
  (e.g. the 1,200 pre-training steps of the budget study);
* **places**: ``/data/<corpus>`` -> ``data/<corpus>`` of the world, ``/mnt/shared`` and ``/tmp`` likewise,
  ``<id>`` -> the id the registry holds, ``clip.wav`` and friends -> clips cut from the corpus;
* **hardware**: the HuBERT-large GPU config runs a random-init HuBERT saved with ``save_pretrained``,
  on the CPU.

``test_every_documented_command_has_a_step`` (fast tier) fails when a document shows a command that no
step runs, or a step names a command no document shows any more. The steps themselves are the
``userpath`` tier: ``python -m pytest -q -m userpath`` (CI runs it). Commands that need a Ray cluster
(``ray job submit``) are run by ``tests/cluster`` and listed in ``ELSEWHERE``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: appended to every command that trains (keys the documented command sets are kept)
TINY = ["synthetic.utterances_per_dialog=3", "synthetic.dialogs_per_session=2", "pretrain.epochs=1",
        "finetune.epochs=1", "finetune.folds=[1]", "adapter.d_model=16", "adapter.ff_dim=32", "adapter.num_layers=1",
        "adapter.num_clusters=4", "finetune.attention_dim=8", "finetune.hidden_dim=8", "ablate.seeds=1",
        "ablate.bootstrap=100", "tune.num_samples=1", "ray.progress_bars=false"]
#: the benchmark preset, small
BENCH = ["synthetic.scale=0.075", "synthetic.unlabelled_factor=0.3", "pretrain.steps=2"]
#: configs/iemocap.yaml (HuBERT-large on GPUs) on this machine: a tiny random-init HuBERT on the CPU
CPU = ["encoder.device=cpu", "features.num_gpus=0", "pretrain.use_gpu=false", "finetune.use_gpu=false",
       "pretrain.cpus_per_worker=1", "finetune.cpus_per_worker=1", "pretrain.bf16=false", "pretrain.steps=2",
       "pretrain.batch_size=4", "finetune.batch_size=4", "finetune.max_concurrent_folds=1", "ablate.max_concurrent=1",
       "encoder.layers=[1,2]"]

CLASSES = {"neu", "hap", "sad", "ang"}


# ----------------------------------------------------------------------------------------------------
# what the documents show

def _normalise(cmd: str) -> str:
    return " ".join(cmd.replace("\\\n", " ").split())


def documented_commands() -> Dict[str, List[str]]:
    """``{command: [documents]}``: every ``serray ...`` line of a fenced block (a ``&&`` chain split into
    its commands) and every inline `` `serray ...` `` with arguments. Bare names (`` `serray tune` ``)
    are prose, checked only in that their subcommand exists."""
    found: Dict[str, List[str]] = {}
    for doc in DOCS:
        text = doc.read_text()
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.split(r"\s#", line)[0].strip()
                for part in line.split("&&"):
                    part = part.strip()
                    m = re.search(r"(?:^|\s)(serray [a-z].*|python jobs/\S+.*)$", part)
                    if m and not part.startswith("#"):
                        cmd = _normalise(m.group(1) if part.startswith(("serray", "python jobs")) else part)
                        found.setdefault(cmd, []).append(doc.name)
        if doc.name == "testing.md":  # its prose quotes commands to tell what the tests found
            continue
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for m in re.findall(r"`(serray [^`]+)`", prose):
            cmd = _normalise(m)
            if re.match(r"serray [a-z][a-z-]*(\s|$)", cmd) and len(cmd.split()) > 2 and not re.fullmatch(r"serray (models (list|show)|predict --onnx)", cmd):
                found.setdefault(cmd, []).append(doc.name)
    return found


# ----------------------------------------------------------------------------------------------------
# the world the commands run in

@dataclass
class World:
    dir: Path
    env: Dict[str, str]
    tiny_hubert: Optional[Path] = None
    s3_port: Optional[int] = None
    src_manifest: Optional[str] = None  # the source run's manifest hash before `evaluate` with its defaults
    log: List[str] = field(default_factory=list)

    def path(self, rel: str) -> Path:
        return self.dir / rel

    def best_id(self, run: str = "runs/default") -> str:
        from serray.config import load_config
        from serray.train.registry import best_entry, wanted_evaluation  # the registry's own rule, as the CLI asks it

        cfg = load_config(None, [f"output_dir={self.dir / run}", *TINY])
        return best_entry(self.dir / run / "registry", wanted_evaluation(cfg))["id"]


def _serray() -> str:
    exe = shutil.which("serray", path=str(Path(sys.executable).parent)) or shutil.which("serray")
    assert exe, "the serray command is not installed (pip install -e .)"
    return exe


def run(world: World, argv: List[str], timeout: float = 900, ok: bool = True) -> subprocess.CompletedProcess:
    """``serray argv`` in the world's directory, as from a shell."""
    t0 = time.monotonic()
    proc = subprocess.run([_serray(), *argv], cwd=world.dir, env=world.env, capture_output=True, text=True,
                          timeout=timeout)
    world.log.append(f"{time.monotonic() - t0:6.1f} s  serray {shlex.join(argv)}")
    print(f"\n[userpath] rc {proc.returncode}: {world.log[-1]}", flush=True)
    if proc.returncode and ok:
        print(f"--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-3000:]}", flush=True)
    if ok:
        assert proc.returncode == 0, (f"serray {shlex.join(argv)} -> rc {proc.returncode}\n"
                                      f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def _write_clips(world: World) -> None:
    """clip.wav / other.flac / some.wav from the built-in corpus's audio, call.wav / call.flac: 20 s with
    three utterances and pauses between them."""
    import soundfile as sf

    from serray.data.synthetic import make_corpus

    src = make_corpus(world.dir / ".clips" / "IEMOCAP_full_release", seed=3, utterances_per_dialog=4,
                      dialogs_per_session=1)
    wavs = sorted(w for w in src.glob("Session1/sentences/wav/*/*.wav") if not w.name.startswith("."))
    audio = [sf.read(w)[0] for w in wavs[:3]]
    sf.write(world.dir / "clip.wav", audio[0], 16000)
    sf.write(world.dir / "other.flac", audio[1], 16000)
    sf.write(world.dir / "some.wav", audio[2], 16000)
    pause = np.zeros(16000 * 3)
    call = np.concatenate([pause, audio[0], pause, audio[1], pause, audio[2], pause])
    call = np.concatenate([call, np.zeros(max(0, 16000 * 20 - len(call)))])
    sf.write(world.dir / "call.wav", call, 16000)
    sf.write(world.dir / "call.flac", call, 16000)


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    reuse = os.environ.get("USERPATH_WORLD")  # development: keep the world between pytest runs
    base = Path(reuse) if reuse else tmp_path_factory.mktemp("userpath")
    base.mkdir(parents=True, exist_ok=True)
    if not (base / "configs").exists():
        (base / "configs").symlink_to(ROOT / "configs")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_DATA_DISABLE_PROGRESS_BARS="1",
               PYTHONUNBUFFERED="1")
    w = World(base, env)
    _write_clips(w)
    yield w
    print("\n".join(["", "user-path commands (wall time):", *w.log]))


# ----------------------------------------------------------------------------------------------------
# checks

def _metrics(world: World, run_dir: str) -> dict:
    return json.loads((world.dir / run_dir / "finetune" / "metrics.json").read_text())


def _folds_scored(world: World, run_dir: str, folds=(1,)) -> dict:
    m = _metrics(world, run_dir)
    assert [f["fold"] for f in m["folds"]] == list(folds), m["folds"]
    for f in m["folds"]:
        assert f["n_test"] > 0 and 0.0 <= f["ua"] <= 1.0, f
    return m


def _test_speakers(world: World, run_dir: str) -> set:
    import pandas as pd

    # read as a user's pandas reads it; a speaker id is a name ("03" stays "03", as in the manifest)
    return set(pd.read_csv(world.dir / run_dir / "finetune" / "predictions.csv", dtype={"speaker": str})["speaker"])


def _corpus_speakers(world: World, root: str, corpus: str) -> set:
    from serray.config import load_config
    from serray.data import corpora

    cfg = load_config(None, [f"output_dir={world.dir / '.probe'}", f"data.root={world.dir / root}",
                             f"data.corpus={corpus}", *TINY])
    return set(corpora.build_manifest(cfg).kept["speaker"].astype(str))


# ----------------------------------------------------------------------------------------------------
# the steps, in the order a user meets them (README first, then docs/ alphabetically)

@dataclass
class Step:
    doc: str  # the documented command, normalised (several: the same step runs each form)
    argv: Callable[[World], List[str]] | str | None = None  # what runs, when not the documented command itself
    #                                                          (after the substitutions of the module docstring)
    tiny: List[str] = field(default_factory=lambda: list(TINY))
    force: List[str] = field(default_factory=list)  # appended even where the documented command sets the key
    check: Optional[Callable[[World, subprocess.CompletedProcess], None]] = None
    also: tuple = ()  # further documented forms this step runs
    refused: Optional[str] = None  # a documented refusal: exit status 2 and this in the message

    def __post_init__(self):
        if self.argv is None:
            self.argv = self.doc
    serve: bool = False  # a long-running server: started, asked, stopped


def _place(cmd: str, world: World) -> str:
    for a, b in (("/data/", "data/"), ("/mnt/shared/", "mnt/shared/"), ("/tmp/", "tmp/"), ("$PWD", str(world.dir))):
        cmd = cmd.replace(a, b)
    if "export/<id>.onnx" in cmd:  # the graph `serray export` wrote last
        graphs = sorted((world.dir / "runs/fbank/export").glob("*.onnx"), key=lambda p: p.stat().st_mtime)
        graphs = [g for g in graphs if "int8" not in g.name]
        assert graphs, "no exported graph in runs/fbank/export"
        cmd = cmd.replace("runs/fbank/export/<id>.onnx", str(graphs[-1].relative_to(world.dir)))
    if "<id>" in cmd or "20261203-101500-ab12cd" in cmd:
        run_dir = "runs/fbank" if "runs/fbank" in cmd else "runs/default"
        cmd = cmd.replace("<id>", world.best_id(run_dir)).replace("20261203-101500-ab12cd", world.best_id(run_dir))
    return cmd


def _argv(step: Step, world: World) -> List[str]:
    words = ["serray", *step.argv(world)] if callable(step.argv) else shlex.split(_place(step.argv, world))
    assert words[0] == "serray"
    words = words[1:]
    if words[0] == "reproduce" or "--onnx" in words:  # the recorded config / the graph is what runs
        return words
    # every other command gets the sizes, as a user passes the same keys to every command of a run
    # (`predict`, `serve` and `export` choose the registry's best among entries evaluated on the folds asked)
    set_keys = {w.split("=", 1)[0] for w in words if re.match(r"^[a-z_]+(\.[a-z_0-9]+)*=", w)}
    extra = [t for t in step.tiny if t.split("=", 1)[0] not in set_keys]
    return [*words, *extra, *step.force]


def _ok_table(world, proc):
    assert "| fold (test session) |" in proc.stdout or "UA %" in proc.stdout, proc.stdout[-2000:]


def _check_default(world, proc):
    _folds_scored(world, "runs/default")
    assert "encoder=egemaps" in proc.stdout, proc.stdout[-2000:]  # the shipped front end
    assert list((world.dir / "runs/default/registry").glob("*/entry.json"))


def _check_predict(world, proc):
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert any(any(c in ln for c in CLASSES) for ln in lines), proc.stdout


def _check_evaluate(out: str, source: str = "runs/default"):
    def check(world, proc):
        res = world.dir / out
        assert res.is_dir() and res.resolve() != (world.dir / source).resolve()
        js = list(res.rglob("*.json"))
        assert js, f"evaluate wrote nothing under {out}"
        assert "UA" in proc.stdout, proc.stdout[-2000:]
    return check


def _check_evaluate_defaults(world, proc):
    """`serray evaluate` with its defaults: its own directory, never the source run's."""
    src = world.dir / "runs/default"
    before = world.src_manifest  # taken before the step
    import hashlib

    assert hashlib.sha256((src / "manifest.parquet").read_bytes()).hexdigest() == before, \
        "evaluate changed the source run's manifest"
    assert "UA" in proc.stdout, proc.stdout[-2000:]


def _check_native(run_dir: str, classes: List[str]):
    """A run over a corpus's own classes: the model, its registry entry and its results hold them all."""
    def check(world, proc):
        run = world.dir / run_dir
        metrics = json.loads((run / "finetune" / "metrics.json").read_text())
        assert metrics["classes"] == classes and list(metrics["per_class"]) == classes
        entry = json.loads(next((run / "registry").glob("*/entry.json")).read_text())
        assert entry["labels"] == classes and entry["classes"] == "native"
        assert "| class | n | recall % |" in (run / "finetune" / "results.md").read_text()
    return check


def _check_loco(run_dir: str, names: List[str]):
    """Leave-one-corpus-out: each tested fold holds one corpus, and its model never trained or validated on it."""
    def check(world, proc):
        run = world.dir / run_dir
        metrics = json.loads((run / "finetune" / "metrics.json").read_text())
        assert metrics["evaluation"] == "leave-one-corpus-out"
        assert metrics["group_labels"] == {str(i + 1): n for i, n in enumerate(names)}
        for f in metrics["folds"]:
            split = json.loads((run / "finetune" / f"fold{f['fold']}" / "split.json").read_text())
            tested = {u.split("__")[0] for u in split["test"]}
            assert tested == {names[f["fold"] - 1]}
            assert not tested & {u.split("__")[0] for u in split["train"] + split["val"]}
    return check


def _check_second_corpus(corpus_root: str, corpus: str, run_dir: str = "runs/default"):
    def check(world, proc):
        _folds_scored(world, run_dir)
        speakers = _test_speakers(world, run_dir)
        own = _corpus_speakers(world, corpus_root, corpus)
        assert speakers and speakers <= own, f"{corpus} run tested on other corpora's speakers: {speakers - own}"
    return check


def _check_export(run_dir: str, int8: bool = False):
    def check(world, proc):
        files = sorted((world.dir / run_dir / "export").glob("*.onnx"))
        assert files, proc.stdout
        if int8:
            assert any("int8" in f.name for f in files), files
    return check


def _check_ablation(run_dir: str):
    def check(world, proc):
        abl = json.loads((world.dir / run_dir / "ablation" / "ablation.json").read_text())
        assert abl, "empty ablation.json"
        assert "| arm |" in proc.stdout or "| arm " in proc.stdout, proc.stdout[-2000:]
        _check_reference_runs(world.dir / run_dir, abl)
    return check


def _check_reference_runs(out: Path, abl: dict) -> None:
    """Every reference arm's run is on disk beside the neural runs (docs/protocol.md), and scores as
    ``ablation.json`` says: its test predictions give the run's UA, its record the recipe's CV estimate."""
    import pandas as pd

    from serray.train.stats import run_metrics

    for entry in abl["arms"]:
        if entry["arm"] not in ("classical", "oracle") or entry["mode"] != abl["modes"][0]:
            continue
        for run in entry["runs"]:
            d = out / "ablation" / entry["arm"] / f"frac{entry['label_fraction']:g}" / f"seed{run['seed']}" / f"fold{run['fold']}"
            preds = pd.read_csv(d / "predictions.csv", dtype={"utt_id": str}).assign(seed=run["seed"], fold=run["fold"])
            classes = sorted(set(preds["label"]) | set(preds["pred"]))
            assert abs(run_metrics(preds, classes)[0]["ua"] - run["ua"]) < 1e-9, (d, run)
            assert json.loads((d / "reference.json").read_text())["arm"] == entry["arm"]


def _check_json_segments(out: str):
    record, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])
    assert record["segments"] and all(s["label"] in CLASSES for s in record["segments"]), record
    assert record["duration_s"] == 20.0, record


def _check_sweep(world, proc):
    assert list((world.dir / "runs/default/tune").rglob("*")), "the sweep wrote nothing"


STEPS: List[Step] = [
    # --- README.md
    Step("serray pipeline", check=_check_default),
    Step("serray config", check=lambda w, p: "encoder" in p.stdout and "egemaps" in p.stdout),
    Step("serray make-corpus --out DIR [--layout L]", "serray make-corpus --out data/IEMOCAP_full_release --layout iemocap",
         check=lambda w, p: (w.dir / "data/IEMOCAP_full_release/Session5").is_dir(),
         also=("serray make-corpus --layout crema-d --out DIR",)),
    Step("(make-corpus: the other layouts)", lambda w: ["make-corpus", "--layout", "crema-d", "--out", "data/CREMA-D"]),
    Step("(make-corpus: ravdess)", lambda w: ["make-corpus", "--layout", "ravdess", "--out", "data/RAVDESS"]),
    Step("(make-corpus: emodb)", lambda w: ["make-corpus", "--layout", "emodb", "--out", "data/emodb"]),
    Step("(make-corpus: msp-podcast)", lambda w: ["make-corpus", "--layout", "msp-podcast", "--out", "data/MSP-Podcast"]),
    Step("(make-corpus: csv)", lambda w: ["make-corpus", "--layout", "csv", "--out", "data/mine"],
         check=lambda w, p: (w.dir / "data/mine/labels.csv").is_file()),
    Step("serray manifest --root DIR --out FILE.parquet [data.corpus=NAME]",
         "serray manifest --root data/emodb --out emodb.parquet data.corpus=emodb",
         check=lambda w, p: (w.dir / "emodb.parquet").is_file(),
         also=("serray manifest --root DIR --out FILE data.corpus=NAME",)),
    Step("serray pipeline --config configs/iemocap.yaml data.root=/data/IEMOCAP_full_release output_dir=runs/hubert",
         lambda w: shlex.split(_place("pipeline --config configs/iemocap.yaml data.root=/data/IEMOCAP_full_release "
                                      "output_dir=runs/hubert", w)) + [f"encoder.name={w.tiny_hubert}"] + CPU,
         check=lambda w, p: _folds_scored(w, "runs/hubert")),
    Step("serray pipeline data.corpus=crema-d data.root=/data/CREMA-D output_dir=runs/cremad",
         check=_check_second_corpus("data/CREMA-D", "crema-d", "runs/cremad")),
    Step("serray evaluate registry.dir=runs/default/registry data.corpus=emodb data.root=/data/emodb output_dir=runs/on-emodb",
         check=_check_evaluate("runs/on-emodb")),
    Step("serray evaluate [--model ID] data.corpus=NAME data.root=DIR",
         lambda w: ["evaluate", "--model", w.best_id(), "data.corpus=ravdess", "data.root=data/RAVDESS"],
         check=_check_evaluate_defaults),
    Step("serray pipeline finetune.task=dimensional output_dir=runs/dim",
         check=lambda w, p: "ccc" in json.dumps(_metrics(w, "runs/dim")).lower()),
    Step("serray pipeline finetune.task=multitask output_dir=runs/mt",
         check=lambda w, p: _folds_scored(w, "runs/mt")),
    Step("serray predict clip.wav output_dir=runs/mt",
         check=lambda w, p: _check_predict(w, p) or ("valence" in p.stdout or "arousal" in p.stdout)),
    Step("serray tune output_dir=runs/default", check=_check_sweep),
    Step("serray models list output_dir=runs/default",
         check=lambda w, p: w.best_id() in p.stdout),
    Step("serray models show [ID]", lambda w: ["models", "show", w.best_id(), "output_dir=runs/default"],
         check=lambda w, p: w.best_id() in p.stdout, also=("serray models show ID",)),
    Step("serray serve output_dir=runs/default", serve=True),
    Step("serray pipeline tracking.uri=http://mlflow.internal:5000",
         check=lambda w, p: _folds_scored(w, "runs/default")),
    Step("serray pipeline tracking.enabled=false",
         check=lambda w, p: _folds_scored(w, "runs/default")),
    Step("serray predict --segments call.wav output_dir=runs/default",
         check=lambda w, p: _check_predict(w, p), also=("serray predict --segments FILE",)),
    Step("serray export --format onnx --no-encoder output_dir=runs/default", check=_check_export("runs/default")),
    Step("serray pipeline encoder.name=fbank output_dir=runs/fbank",
         check=lambda w, p: _folds_scored(w, "runs/fbank")),
    Step("serray export --format onnx --int8 output_dir=runs/fbank",
         check=_check_export("runs/fbank", int8=True)),
    Step("serray predict --onnx runs/fbank/export/<id>.onnx clip.wav",
         check=_check_predict, also=("serray predict --onnx MODEL.onnx FILE...",)),
    Step("serray export --format onnx [ID]", lambda w: ["export", "--format", "onnx", w.best_id("runs/fbank"),
                                                        "output_dir=runs/fbank"], check=_check_export("runs/fbank")),
    Step("serray predict FILE...", "serray predict clip.wav other.flac", check=_check_predict),
    # --- docs/corpora.md
    Step("serray pipeline data.root=/data/IEMOCAP_full_release output_dir=runs/iemocap",
         check=_check_second_corpus("data/IEMOCAP_full_release", "iemocap", "runs/iemocap")),
    Step("serray pipeline data.corpus=crema-d data.root=/data/CREMA-D",
         refused="holds features of data.corpus=iemocap"),
    Step("serray pipeline data.corpus=ravdess data.root=/data/RAVDESS \"data.label_map={calm: neu}\" output_dir=runs/ravdess",
         check=_check_second_corpus("data/RAVDESS", "ravdess", "runs/ravdess"),
         also=("serray pipeline data.corpus=ravdess data.root=/data/RAVDESS output_dir=runs/ravdess",)),
    Step("serray pipeline data.corpus=crema-d output_dir=runs/cremad-synthetic",
         check=_check_second_corpus("runs/cremad-synthetic/synthetic/CREMA-D", "crema-d", "runs/cremad-synthetic")),
    Step("serray pipeline data.corpus=emodb data.root=/data/emodb output_dir=runs/emodb",
         check=_check_second_corpus("data/emodb", "emodb", "runs/emodb")),
    Step("serray pipeline --config configs/msp-podcast.yaml data.root=/data/MSP-Podcast",
         check=lambda w, p: _folds_scored(w, "runs/msp-podcast")),
    Step("serray pipeline data.corpus=csv data.root=/data/mine/labels.csv output_dir=runs/mine",
         check=_check_second_corpus("data/mine/labels.csv", "csv", "runs/mine")),
    Step("serray evaluate registry.dir=runs/default/registry data.corpus=crema-d data.root=/data/CREMA-D output_dir=runs/on-cremad",
         check=_check_evaluate("runs/on-cremad")),
    Step("serray pipeline data.corpus=crema-d data.classes=native output_dir=runs/crema-native",
         check=_check_native("runs/crema-native", ["neu", "hap", "sad", "ang", "fea", "dis"])),
    Step("serray evaluate registry.dir=runs/crema-native/registry data.corpus=emodb \"data.classes=[neu,hap,sad,ang,fea,dis]\" "
         "synthetic.seed=1 output_dir=runs/crema-on-emodb", check=_check_evaluate("runs/crema-on-emodb", "runs/crema-native")),
    Step("serray pipeline data.corpus=pooled \"data.corpora=[{corpus: crema-d}, {corpus: emodb}, {corpus: ravdess}]\" "
         "data.protocol=leave_one_corpus_out output_dir=runs/loco",
         check=_check_loco("runs/loco", ["crema-d", "emodb", "ravdess"])),
    Step("serray evaluate registry.dir=runs/default/registry data.corpus=iemocap synthetic.seed=1 output_dir=runs/on-voices",
         check=_check_evaluate("runs/on-voices"),
         also=("serray evaluate registry.dir=runs/default/registry data.corpus=<layout> synthetic.seed=1 output_dir=...",)),
    # --- docs/dimensional.md
    Step("serray pipeline finetune.task=dimensional",
         check=lambda w, p: "ccc" in json.dumps(_metrics(w, "runs/default")).lower()),
    Step("serray finetune finetune.task=dimensional finetune.dimensions=[arousal] finetune.dir=runs/default/finetune-arousal",
         check=lambda w, p: (w.dir / "runs/default/finetune-arousal/metrics.json").is_file()),
    Step("serray ablate finetune.task=dimensional ablate.metric=ccc_mean",
         force=["ablate.arms=[none,full]"], check=_check_ablation("runs/default")),
    Step("serray tune finetune.task=dimensional tune.name=dimensional tune.metric=val_ccc_arousal tune.scheduler_metric=val_ccc_mean",
         check=_check_sweep),
    # --- docs/export.md
    Step("serray export --format onnx output_dir=runs/fbank",
         check=_check_export("runs/fbank")),
    Step("serray export --format onnx 20261203-101500-ab12cd --int8 output_dir=runs/fbank",
         check=_check_export("runs/fbank", int8=True)),
    Step("serray predict --onnx runs/fbank/export/<id>.onnx clip.wav other.flac", check=_check_predict),
    Step("serray pipeline finetune.folds=[1]", check=_check_default),
    Step("serray reproduce runs/default --out runs/default-again",
         check=lambda w, p: (w.dir / "runs/default-again").is_dir(),
         also=("serray reproduce RUN_DIR [--out DIR]", "serray reproduce RUN_DIR [--out DIR] [--tolerance X] [key=value ...]")),
    # --- docs/results.md
    Step("serray make-corpus --out data/voices/IEMOCAP_full_release synthetic.seed=1",
         check=lambda w, p: (w.dir / "data/voices/IEMOCAP_full_release/Session1").is_dir()),
    Step("serray ablate data.root=data/voices/IEMOCAP_full_release synthetic.enabled=false encoder.name=fbank_pitch "
         "ablate.arms=[none,random_init,full] output_dir=runs/voices-fbank-pitch", check=_check_ablation("runs/voices-fbank-pitch")),
    Step("serray ablate ablate.arms=[none,random_init,full,classical] ablate.classical_features=egemaps "
         "ablate.label_fractions=[0.1,0.25,1.0] output_dir=runs/labels", check=_check_ablation("runs/labels")),
    Step("serray ablate output_dir=runs/labels-8x data.root=runs/labels/synthetic/IEMOCAP_full_release "
         "features.dir=runs/labels/features data.manifest=runs/labels/manifest.parquet ablate.arms=[full] "
         "ablate.label_fractions=[1.0] ablate.seeds=2 pretrain.epochs=80",
         force=["pretrain.epochs=2", "ablate.seeds=1"], check=_check_ablation("runs/labels-8x")),
    Step("serray ablate ablate.arms=[none,random_init,classical] ablate.classical_features=egemaps "
         "finetune.epoch_selection=inner_cv output_dir=runs/select-cv", check=_check_ablation("runs/select-cv")),
    Step("serray ablate ablate.arms=[full] finetune.epoch_selection=inner_cv output_dir=runs/select-cv-full",
         check=_check_ablation("runs/select-cv-full")),
    Step("serray ablate ablate.arms=[random_init] finetune.epoch_selection=inner_cv finetune.inner_cv_lrs=[0.001,0.003] "
         "output_dir=runs/select-lr", check=_check_ablation("runs/select-lr")),
    Step("serray ablate data.protocol=leave_one_speaker_out ablate.arms=[none,random_init,full,classical] "
         "ablate.classical_features=egemaps output_dir=runs/loso", check=_check_ablation("runs/loso")),
    Step("serray make-corpus --config configs/benchmark.yaml",
         tiny=TINY + BENCH, check=lambda w, p: (w.dir / "runs/benchmark/synthetic/synthetic_unlabelled").is_dir()),
    Step("serray ablate --config configs/benchmark.yaml ablate.arms=[none,random_init,full,classical,oracle] "
         "ablate.classical_features=egemaps pretrain.steps=150", tiny=TINY + BENCH,
         force=["ablate.label_fractions=[1.0]", "pretrain.steps=2"],
         check=_check_ablation("runs/benchmark")),
    Step("serray ablate --config configs/benchmark.yaml output_dir=runs/benchmark-lld-1200 "
         "data.root=runs/benchmark/synthetic/IEMOCAP_full_release features.dir=runs/benchmark/features "
         "data.manifest=runs/benchmark/manifest.parquet ablate.arms=[full] "
         "ablate.modes=[finetune,frozen] ablate.label_fractions=[1.0]",
         tiny=TINY + BENCH, force=["pretrain.steps=2", "ablate.seeds=1"], check=_check_ablation("runs/benchmark-lld-1200")),
    Step("serray ablate --config configs/benchmark.yaml output_dir=runs/benchmark-lld-1200 "
         "data.root=runs/benchmark/synthetic/IEMOCAP_full_release features.dir=runs/benchmark/features "
         "data.manifest=runs/benchmark/manifest.parquet ablate.arms=[random_init,full,classical] "
         "ablate.classical_features=egemaps ablate.modes=[finetune] ablate.label_fractions=[0.1,0.25]",
         tiny=TINY + BENCH, force=["pretrain.steps=2", "ablate.seeds=1"], check=_check_ablation("runs/benchmark-lld-1200")),
    Step("serray ablate --config configs/benchmark.yaml output_dir=runs/benchmark-lld-nolocal "
         "data.root=runs/benchmark/synthetic/IEMOCAP_full_release features.dir=runs/benchmark/features "
         "data.manifest=runs/benchmark/manifest.parquet ablate.arms=[no_local] "
         "ablate.modes=[finetune,frozen] ablate.label_fractions=[1.0]",
         tiny=TINY + BENCH, force=["pretrain.steps=2", "ablate.seeds=1"], check=_check_ablation("runs/benchmark-lld-nolocal")),
    Step("serray ablate --config configs/benchmark.yaml encoder.name=fbank pretrain.steps=150 output_dir=runs/benchmark-fbank",
         tiny=TINY + BENCH, force=["ablate.label_fractions=[1.0]", "pretrain.steps=2"], check=_check_ablation("runs/benchmark-fbank")),
    Step("serray ablate --config configs/benchmark.yaml encoder.name=fbank pretrain.steps=1200 ablate.arms=[random_init,full] "
         "ablate.modes=[finetune,frozen] ablate.label_fractions=[1.0] ablate.seeds=2 output_dir=runs/benchmark-1200",
         tiny=TINY + BENCH, force=["pretrain.steps=2", "ablate.seeds=1"], check=_check_ablation("runs/benchmark-1200")),
    Step("serray ablate --config configs/benchmark.yaml encoder.name=fbank pretrain.steps=150 ablate.arms=[full,classical] "
         "ablate.classical_features=egemaps ablate.modes=[finetune] output_dir=runs/benchmark-fbank", tiny=TINY + BENCH,
         force=["ablate.label_fractions=[1.0]", "pretrain.steps=2"],
         check=_check_ablation("runs/benchmark-fbank")),
    Step("serray ablate ablate.arms=[full] adapter.ema_decay=... adapter.ema_decay_end=... [adapter.ema_half_life=0.05]",
         "serray ablate ablate.arms=[full] adapter.ema_decay=0.99 adapter.ema_decay_end=0.999 adapter.ema_half_life=0.05",
         check=_check_ablation("runs/default")),
    Step("serray ablate ablate.arms=[full] finetune.body_lr_scale=...", "serray ablate ablate.arms=[full] finetune.body_lr_scale=0.1",
         check=_check_ablation("runs/default"), also=("serray ablate ablate.arms=[full]",)),
    Step("serray ablate ablate.arms=[none,full,classical] ablate.classical_features=egemaps",
         check=_check_ablation("runs/default")),
    # --- docs/segments.md
    Step("serray predict --segments call.flac --json segment.vad=energy",
         check=lambda w, p: _check_json_segments(p.stdout)),
    # --- docs/serving.md
    Step("serray serve output_dir=runs/default serve.model=<id> serve.port=8080", serve=True),
    # --- docs/sweeps.md
    Step("serray tune output_dir=runs/default tune.name=lr tune.num_samples=8 tune.search_space.finetune.lr.loguniform=[0.0001,0.01]",
         force=["tune.num_samples=1"], check=_check_sweep),
    Step("serray tune output_dir=runs/default tune.name=two-folds tune.folds=[1,2]",
         force=["finetune.folds=[1,2]"], check=_check_sweep),
    Step("serray models show output_dir=runs/default",
         check=lambda w, p: w.best_id() in p.stdout),
    Step("serray predict some.wav other.flac output_dir=runs/default",
         check=_check_predict),
    # --- docs/tracking.md
    Step("serray tune --config space.yaml output_dir=/tmp/sweepdemo/run2 synthetic.utterances_per_dialog=6 pretrain.epochs=2 "
         "finetune.epochs=4 adapter.d_model=32 adapter.ff_dim=64 adapter.num_layers=1 finetune.attention_dim=16 "
         "finetune.hidden_dim=16 \"tune.folds=[1,2]\" tune.num_samples=1",
         force=["synthetic.utterances_per_dialog=3", "pretrain.epochs=1", "finetune.epochs=1"],
         check=lambda w, p: list((w.dir / "tmp/sweepdemo/run2/tune").rglob("*"))),
    # --- docs/cluster.md: the shared-storage pipeline against an S3-compatible server (moto)
    Step("serray pipeline output_dir=/mnt/shared/runs/hubert data.root=/mnt/shared/IEMOCAP_full_release "
         "features.dir=s3://my-bucket/runs/hubert/features pretrain.dir=s3://my-bucket/runs/hubert/pretrain "
         "finetune.dir=s3://my-bucket/runs/hubert/finetune registry.dir=s3://my-bucket/registry", check=lambda w, p: "UA" in p.stdout),
]
STEPS_BY_DOC = {s.doc: s for s in STEPS}

#: documented commands another test runs (a cluster, a shell), and which
ELSEWHERE = {
    "python3 -m venv .venv": ".ci/run installs exactly so",
    "python jobs/pipeline.py": "tests/cluster/test_jobs.py (ray job submit to a private head)",
    "pip install": ".ci/run",
    "RAY_AUTH_MODE=token ray job submit": "tests/cluster/test_jobs.py (a private head; the mask_ration typo fails there too)",
}


def test_every_documented_command_has_a_step():
    documented = documented_commands()
    covered = {s.doc for s in STEPS} | {a for s in STEPS for a in s.also}
    missing = sorted(c for c in documented if c not in covered
                     and not any(c.startswith(k) for k in ELSEWHERE))
    assert not missing, "documented commands no user-path step runs:\n" + "\n".join(
        f"  {c}   ({', '.join(sorted(set(documented[c])))})" for c in missing)
    stale = sorted(c for c in covered if not c.startswith("(") and len(c.split()) > 2 and c not in documented)
    assert not stale, "steps for commands no document shows any more:\n" + "\n".join(stale)


# ----------------------------------------------------------------------------------------------------
# running them

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(world: World, argv: List[str]) -> None:
    port = int(next((a.split("=", 1)[1] for a in argv if a.startswith("serve.port=")), 8000))
    if port_in_use(port):
        argv = [*argv, f"serve.port={_free_port()}"]
        port = int(argv[-1].split("=")[1])
    proc = subprocess.Popen([_serray(), *argv], cwd=world.dir, env=world.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, f"serray serve exited: {proc.stdout.read()[-4000:]}"
            assert time.monotonic() < deadline, "serray serve did not become healthy in 300 s"
            time.sleep(1)
        body = (world.dir / "clip.wav").read_bytes()
        req = urllib.request.Request(url + "/predict", data=body, headers={"Content-Type": "audio/wav"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        assert answer.get("label") in CLASSES, answer
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _prepare(step: Step, world: World) -> None:
    if "configs/iemocap.yaml" in step.doc and world.tiny_hubert is None:
        from conftest import _save_tiny_hubert

        world.tiny_hubert = _save_tiny_hubert(world.dir / "tiny-hubert", "layer")
    if "space.yaml" in step.doc and not (world.dir / "space.yaml").exists():
        (world.dir / "space.yaml").write_text(
            "tune:\n  search_space:\n    adapter:\n      mask_ratio: {grid: [0.3, 0.6]}\n"
            "      num_clusters: {grid: [4, 8]}\n")
    if "s3://" in step.doc and world.s3_port is None:
        moto_server = pytest.importorskip("moto.server")
        import pyarrow.fs as pafs

        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        world.s3_port = port
        world.env.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="testing",
                         AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")
        pafs.S3FileSystem(access_key="testing", secret_key="testing", endpoint_override=f"{host}:{port}",
                          scheme="http", region="us-east-1", allow_bucket_creation=True).create_dir("my-bucket")
        shutil.copytree(world.dir / "data/IEMOCAP_full_release", world.dir / "mnt/shared/IEMOCAP_full_release")
    if step.check is _check_evaluate_defaults:
        import hashlib

        world.src_manifest = hashlib.sha256((world.dir / "runs/default/manifest.parquet").read_bytes()).hexdigest()


@pytest.mark.userpath
@pytest.mark.parametrize("step", STEPS, ids=[re.sub(r"\s+", "_", s.doc)[:90] for s in STEPS])
def test_documented_command(step: Step, world: World):
    if os.environ.get("USERPATH_WORLD") and "make-corpus" in step.doc + str(step.argv) and "--out" in str(
            _argv(step, world)):
        out = _argv(step, world)[_argv(step, world).index("--out") + 1]
        if (world.dir / out).exists():
            pytest.skip(f"{out} exists (USERPATH_WORLD reuse)")
    _prepare(step, world)
    argv = _argv(step, world)
    if step.serve:
        _serve(world, argv)
        world.log.append(f"  (served) serray {shlex.join(argv)}")
        return
    proc = run(world, argv, ok=step.refused is None)
    if step.refused is not None:
        assert proc.returncode == 2 and step.refused in proc.stderr and "Traceback" not in proc.stderr, \
            f"rc {proc.returncode}\n{proc.stderr[-3000:]}"
    if step.check is not None:
        result = step.check(world, proc)
        assert result is None or result, f"check failed for: serray {shlex.join(argv)}\n{proc.stdout[-3000:]}"
