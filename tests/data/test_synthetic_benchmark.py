"""Tests for the ``benchmark`` preset of the synthetic corpus (serray.data.synthetic.benchmark).

One reduced corpus (``scale=0.25``: 40 four-class utterances per session, 335 in the release, a pool of
half their duration) serves most tests; the determinism and pool-size tests make tinier ones.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from serray.data.corpora.iemocap import build_manifest
from serray.data.synthetic import PRESETS, benchmark_paths, make_corpus
from serray.data.synthetic.benchmark import (CLASS_SHARES, EVENT_RATES, EVENTS, ORACLE_FEATURES,
                                             session_label_counts)
from serray.errors import ConfigError

SCALE, FACTOR = 0.25, 0.5
CLASS_INDEX = {"neu": 0, "hap": 1, "sad": 2, "ang": 3}
UTT_LINE = re.compile(r"^\[(\d+\.\d+) - (\d+\.\d+)\]\t(\S+)\t(\S+)\t\[(.+)\]$")
EVAL_LINE = re.compile(r"^(C-(E\d|F1|M1):\t.+;\t\(.*\)|A-(E\d|F1|M1):\tval \d; act \d; dom  \d;\t\(.*\))$")
POOL_FILE = re.compile(r"^(\d+)/(\d+)/(\d+)-(\d+)-(\d{4})\.flac$")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("bench")
    root = make_corpus(base / "IEMOCAP_full_release", preset="benchmark", seed=0, scale=SCALE,
                       unlabelled_factor=FACTOR)
    assert root == base / "IEMOCAP_full_release"
    return root


@pytest.fixture(scope="module")
def manifest(bench) -> pd.DataFrame:
    return build_manifest(bench).kept


@pytest.fixture(scope="module")
def oracle(bench) -> pd.DataFrame:
    return pd.read_csv(benchmark_paths(bench).oracle)


# ---------------------------------------------------------------------------------------------
# layout, sizes, labels


def test_presets_and_bad_arguments(tmp_path):
    assert PRESETS == ("demo", "benchmark")
    with pytest.raises(ConfigError, match="demo, benchmark"):
        make_corpus(tmp_path / "x", preset="Benchmark")
    with pytest.raises(ConfigError, match="benchmark preset only"):
        make_corpus(tmp_path / "x", scale=0.5)                     # demo + a benchmark-only size
    with pytest.raises(ConfigError, match="scale"):
        make_corpus(tmp_path / "x", preset="benchmark", scale=0.0)
    assert not (tmp_path / "x").exists()


def test_full_scale_sizes_and_imbalance():
    counts = session_label_counts(1.0)
    assert counts == {"neu": 50, "hap": 17, "exc": 30, "sad": 31, "ang": 32}
    four = {"neu": counts["neu"], "hap": counts["hap"] + counts["exc"], "sad": counts["sad"],
            "ang": counts["ang"]}
    assert sum(four.values()) == 160 >= 100                       # per session, hence per LOSO test fold
    total = sum(CLASS_SHARES.values())
    for c, n in four.items():                                     # IEMOCAP's shares, to one utterance
        assert abs(n - 160 * CLASS_SHARES[c] / total) < 1.0


def test_release_layout_and_manifest(bench, manifest):
    kept = manifest
    # per-session four-class counts exactly as configured (exc merged into hap by the parser)
    want = session_label_counts(SCALE)
    assert sum(want.values()) == 40
    table = pd.crosstab(kept["session"], kept["raw_label"])
    for s in range(1, 6):
        assert table.loc[s].to_dict() == {k: v for k, v in want.items() if v}
    assert kept["label"].value_counts().to_dict() == {
        "neu": 5 * want["neu"], "hap": 5 * (want["hap"] + want["exc"]), "sad": 5 * want["sad"],
        "ang": 5 * want["ang"]}
    report = build_manifest(bench)
    n_dropped = sum(report.dropped.values())
    assert n_dropped == 5 * 67 - len(kept) == 135                  # 40 % of the release is unlabelled
    dropped = Counter()
    for (_, lab), c in report.dropped.items():
        dropped[lab] += c
    assert set(dropped) <= {"xxx", "fru", "sur", "fea", "oth", "dis"}
    assert dropped["xxx"] > dropped["sur"] and dropped["fru"] > dropped["sur"]
    assert not report.missing_wav and not report.malformed
    # IEMOCAP structure: both actors in every dialog, annotation blocks, audio matching annotations
    for dialog, rows in kept.groupby("dialog"):
        assert set(rows["gender"]) == {"F", "M"}
    emo = sorted((bench / "Session3" / "dialog" / "EmoEvaluation").glob("Ses*.txt"))
    assert len(emo) == 2
    lines = emo[0].read_text(encoding="utf-8").splitlines()
    assert lines[0] == "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]"
    n_utt = 0
    for i, line in enumerate(lines):
        if UTT_LINE.match(line):
            n_utt += 1
            j = i + 1
            while lines[j]:
                assert EVAL_LINE.match(lines[j]), lines[j]
                j += 1
    assert n_utt in (33, 34)
    for r in kept.sample(40, random_state=0).itertuples():
        info = sf.info(r.path)
        assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
        assert abs(info.frames / 16000 - r.duration) < 1e-3 and 1.5 - 1e-3 <= r.duration <= 8.0 + 1e-3
    for sess in range(1, 6):
        d = bench / f"Session{sess}"
        assert list(d.rglob("._*")) and list((d / "dialog" / "wav").glob("Ses*.wav"))
        assert len(list((d / "dialog" / "transcriptions").glob("*.txt"))) == 2


def test_oracle_has_exactly_the_labelled_utterances(manifest, oracle):
    assert sorted(oracle["utt_id"]) == sorted(manifest["utt_id"])
    m = manifest.set_index("utt_id")
    o = oracle.set_index("utt_id").loc[m.index]
    assert (o["label"].replace({"exc": "hap"}) == m["label"]).all()
    assert np.allclose(o["duration"], m["duration"], atol=1e-3)
    assert (o["session"] == m["session"]).all() and (o["channel_id"] == m["session"]).all()
    assert set(ORACLE_FEATURES) <= set(oracle.columns)
    assert o[list(ORACLE_FEATURES)].notna().all().all()
    # one channel per session, different between sessions
    ch = oracle.groupby("session")[["ch_hp_hz", "ch_lp_hz", "ch_rt60", "ch_floor_db"]].nunique()
    assert (ch == 1).all().all()
    assert oracle.groupby("session")["ch_rt60"].first().nunique() == 5


# ---------------------------------------------------------------------------------------------
# local events


def test_event_rates_match_the_configuration(oracle):
    """Realised events per second of exposure (duration x speaker expressiveness) = configured rate."""
    o = oracle.assign(exposure=oracle["duration"] * oracle["spk_expressive"])
    checked = 0
    for label, rows in o.groupby("label"):
        exposure = rows["exposure"].sum()
        for e in EVENTS:
            expected = EVENT_RATES[label][e] * exposure
            got = rows[f"n_{e}"].sum()
            if expected >= 25:
                assert 0.7 * expected <= got <= 1.3 * expected, (label, e, got, expected)
                checked += 1
            else:                        # rare events are rare: within Poisson noise of a low rate
                assert got <= expected + 3 * np.sqrt(expected) + 3, (label, e, got, expected)
    assert checked >= 7
    # a class is a distribution over events: every event type occurs in every 4-class label
    four = o.assign(label=o["label"].replace({"exc": "hap"}))
    present = four.groupby("label")[[f"n_{e}" for e in EVENTS]].sum()
    assert (present > 0).sum().sum() >= 22                        # of 24 (class, event) cells
    assert (present > 0).sum(axis=0).min() >= 3                   # every event in >= 3 classes
    # no single event type gives the class away; all of them together nearly do
    from serray.train.baselines import fit_predict
    from serray.train.metrics import classification_metrics

    y = four["label"].map(CLASS_INDEX).to_numpy()

    def ua(cols):
        X = four[cols + ["exposure"]].to_numpy(dtype=float)
        return classification_metrics(y, fit_predict(X, y, X)[0])["ua"]

    single = {e: ua([f"n_{e}"]) for e in EVENTS}
    print("UA from one event type's count:", {e: round(v, 3) for e, v in single.items()})
    assert max(single.values()) <= 0.5
    assert ua([f"n_{e}" for e in EVENTS]) >= max(single.values()) + 0.15


def yin_track(x: np.ndarray, sr: int = 16000, hop: float = 0.01, win: float = 0.032,
              fmin: float = 35.0, fmax: float = 600.0):
    """Frame-wise log energy (dB), aperiodicity (YIN's CMNDF minimum) and f0 (Hz)."""
    W, tmax, tmin, H = int(win * sr), int(sr / fmin), int(sr / fmax), int(hop * sr)
    L = W + tmax
    x = np.concatenate([x, np.zeros(L)])
    n = max(1, (len(x) - L) // H)
    fr = x[np.arange(L)[None, :] + H * np.arange(n)[:, None]]
    nfft = 1 << int(np.ceil(np.log2(2 * L)))
    r = np.fft.irfft(np.fft.rfft(fr, nfft, axis=1) * np.conj(np.fft.rfft(fr[:, :W], nfft, axis=1)),
                     nfft, axis=1)[:, :tmax + 1]
    c = np.concatenate([np.zeros((n, 1)), np.cumsum(fr ** 2, axis=1)], axis=1)
    d = c[:, W][:, None] + (c[:, W:W + tmax + 1] - c[:, :tmax + 1]) - 2 * r
    cmndf = d[:, 1:] / (np.cumsum(d[:, 1:], axis=1) / np.arange(1, tmax + 1) + 1e-12)
    seg = cmndf[:, tmin - 1:]
    below = seg < 0.2
    k = np.where(below.any(axis=1), np.argmax(below, axis=1), np.argmin(seg, axis=1))
    rows = np.arange(n)
    for _ in range(20):                                            # walk down to the local minimum
        nxt = np.minimum(k + 1, seg.shape[1] - 1)
        k = np.where(seg[rows, nxt] < seg[rows, k], nxt, k)
    energy = 10 * np.log10(np.mean(fr[:, :W] ** 2, axis=1) + 1e-12)
    return energy, seg[rows, k], sr / (k + tmin)


def _spans(events) -> list:
    if not isinstance(events, str) or not events:
        return []
    out = []
    for ev in events.split(";"):
        kind, rest = ev.split("@")
        a, length = map(float, rest.split("+"))
        out.append((kind, a, length))
    return out


@pytest.fixture(scope="module")
def tracks(manifest, oracle):
    paths = manifest.set_index("utt_id")["path"]
    out = {}
    for r in oracle.itertuples():
        x, sr = sf.read(paths[r.utt_id])
        out[r.utt_id] = yin_track(x, sr)
    return out


def _span_features(track, mask, spk_f0):
    energy, aper, f0 = track
    ref = np.percentile(energy, 95)
    active = mask & (energy > ref - 30)
    voiced = active & (aper < 0.25)
    st = 12 * np.log2(f0 / spk_f0)
    n = max(1, mask.sum())
    return {"high": np.sum(voiced & (st > 6)) / n,               # voiced far above the speaker's f0
            "aperiodic": np.sum(active & (aper > 0.35)) / n,     # noisy / irregular voice
            "level": np.mean(energy[mask]) - ref}


def test_events_are_visible_in_the_waveform(oracle, tracks):
    """At the oracle's event spans the audio shows the event (vs random event-free spans alike long)."""
    from sklearn.metrics import roc_auc_score

    detector = {"laugh": "high", "accent": "level", "risefall": "high", "sigh": "aperiodic",
                "sob": "aperiodic", "creak": "aperiodic"}
    rng = np.random.default_rng(0)
    pos, neg = {e: [] for e in EVENTS}, {e: [] for e in EVENTS}
    for r in oracle.itertuples():
        energy = tracks[r.utt_id][0]
        t = np.arange(len(energy)) * 0.01 + 0.016
        spans = _spans(r.events)
        for kind, a, length in spans:
            pos[kind].append(_span_features(tracks[r.utt_id], (t >= a) & (t < a + length), r.spk_f0))
            for _ in range(50):                   # an event-free span of the same length
                b = rng.uniform(0.05, max(0.06, r.duration - length - 0.05))
                if all(b + length <= a2 or b >= a2 + l2 for _, a2, l2 in spans):
                    neg[kind].append(_span_features(tracks[r.utt_id], (t >= b) & (t < b + length), r.spk_f0))
                    break
    aucs = {}
    for e in EVENTS:
        assert len(pos[e]) >= 20 and len(neg[e]) >= 10, e
        p = [f[detector[e]] for f in pos[e]]
        q = [f[detector[e]] for f in neg[e]]
        aucs[e] = roc_auc_score(np.r_[np.ones(len(p)), np.zeros(len(q))], np.r_[p, q])
    print("event-span detector AUC:", {e: round(a, 3) for e, a in aucs.items()})
    assert min(aucs.values()) >= 0.7, aucs


def test_blind_detector_follows_the_configured_rates(oracle, tracks):
    """A blind detector of long aperiodic stretches (sighs, sobs, creak) finds them at their rates."""
    rows = []
    for r in oracle.itertuples():
        energy, aper, _ = tracks[r.utt_id]
        flag = (energy > np.percentile(energy, 95) - 30) & (aper > 0.35)
        flag[1:-1] |= flag[:-2] & flag[2:]                        # bridge one-frame gaps
        edges = np.diff(np.r_[0, flag.astype(int), 0])
        runs = (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)) * 0.01
        rows.append({"label": r.label.replace("exc", "hap"), "exposure": r.duration * r.spk_expressive,
                     "detected": int(np.sum(runs >= 0.15)), "true": r.n_sigh + r.n_sob + r.n_creak})
    df = pd.DataFrame(rows)
    per_class = df.groupby("label")[["detected", "true", "exposure"]].sum()
    detected = per_class["detected"] / per_class["exposure"]
    configured = pd.Series({c: sum(EVENT_RATES[c][e] for e in ("sigh", "sob", "creak"))
                            for c in ("neu", "hap", "sad", "ang")})
    print("aperiodic events per second, detected:", detected.round(3).to_dict(),
          "configured:", configured.round(3).to_dict())
    # every class within tolerance (30 % + 0.1 / s of false alarms) of its configured rate, and
    # the classes rich in these events (sad, ang) stand out as configured
    for c in configured.index:
        assert abs(detected[c] - configured[c]) <= 0.3 * configured[c] + 0.1, (c, detected[c])
    assert min(detected["sad"], detected["ang"]) > 2 * max(detected["neu"], detected["hap"])
    # utterance by utterance, more true events -> more detections
    from scipy.stats import spearmanr

    assert spearmanr(df["detected"], df["true"]).statistic >= 0.4


# ---------------------------------------------------------------------------------------------
# what a classifier can learn


def test_learnable_from_audio_not_from_metadata(manifest, bench):
    from serray.train.baselines import classical_features, loso_ua, metadata_features, oracle_features

    y = manifest["label"].map(CLASS_INDEX).to_numpy()
    sessions = manifest["session"].to_numpy()
    classical = loso_ua(classical_features(manifest["path"].tolist()), y, sessions)
    metadata = loso_ua(metadata_features(manifest), y, sessions)
    oracle = loso_ua(oracle_features(benchmark_paths(bench).oracle, manifest["utt_id"]), y, sessions)
    mean = {k: float(np.mean(list(v.values())))
            for k, v in (("classical", classical), ("metadata", metadata), ("oracle", oracle))}
    print("LOSO UA:", {k: round(v, 3) for k, v in mean.items()})
    assert mean["metadata"] <= 0.32                          # chance is 0.25
    assert mean["classical"] >= 0.36 and min(classical.values()) >= 0.3
    assert mean["oracle"] >= 0.72 and mean["oracle"] >= mean["classical"] + 0.2


# ---------------------------------------------------------------------------------------------
# the unlabelled pool


def test_unlabelled_pool(bench, manifest, oracle):
    paths = benchmark_paths(bench)
    assert paths.unlabelled == bench.parent / "synthetic_unlabelled"
    files = sorted(p.relative_to(paths.unlabelled).as_posix() for p in paths.unlabelled.rglob("*.flac"))
    assert files
    speakers = set()
    total = 0.0
    for f in files:
        m = POOL_FILE.match(f)
        assert m and m[1] == m[3] and m[2] == m[4], f               # <spk>/<chap>/<spk>-<chap>-<nnnn>.flac
        speakers.add(int(m[1]))
        info = sf.info(str(paths.unlabelled / f))
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
        total += info.frames / info.samplerate
    assert total >= FACTOR * manifest["duration"].sum()
    assert len(speakers) >= 4
    spk_lines = (paths.unlabelled / "SPEAKERS.TXT").read_text().splitlines()
    assert {int(line.split("|")[0]) for line in spk_lines if not line.startswith(";")} == speakers
    for chap in {f.rsplit("/", 1)[0] for f in files}:
        spk, ch = chap.split("/")
        trans = (paths.unlabelled / chap / f"{spk}-{ch}.trans.txt").read_text().splitlines()
        assert len(trans) == sum(1 for f in files if f.startswith(chap + "/"))
    # no IEMOCAP actor among the pool's voices, and a mixture of styles with the same local events
    pool = pd.read_csv(paths.unlabelled_oracle)
    assert len(pool) == len(files)
    actors = oracle.groupby("speaker")[["spk_f0", "spk_vt"]].first().to_numpy()
    voices = pool.groupby("speaker")[["spk_f0", "spk_vt"]].first().to_numpy()
    assert (np.abs(voices[:, None, :] - actors[None, :, :]).max(axis=2) > 1e-6).all()
    assert not (set(pool["speaker"].astype(str)) & set(oracle["speaker"]))
    assert 0.2 <= (pool["style"] == "neu").mean() <= 0.8 and pool["style"].nunique() >= 3
    assert (pool[[f"n_{e}" for e in EVENTS]].sum() > 0).all()
    assert pool["channel_id"].nunique() >= 4 and not set(pool["channel_id"]) & set(range(1, 6))


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic(tmp_path):
    kw = dict(preset="benchmark", scale=0.075, unlabelled_factor=0.3)
    a = _tree(make_corpus(tmp_path / "a" / "IEMOCAP_full_release", seed=3, processes=2, **kw).parent)
    b = _tree(make_corpus(tmp_path / "b" / "IEMOCAP_full_release", seed=3, processes=1, **kw).parent)
    c = _tree(make_corpus(tmp_path / "c" / "IEMOCAP_full_release", seed=4, processes=2, **kw).parent)
    assert a == b                                                  # whatever the number of processes
    wavs = [k for k in a if k.endswith(".wav") and "/sentences/" in k and "/._" not in k]
    assert len(wavs) == 5 * 20
    assert any(k.endswith(".flac") for k in a)
    assert a["synthetic_oracle.csv"] != c["synthetic_oracle.csv"]
    assert all(a[k] != c[k] for k in wavs if k in c)


@pytest.mark.slow
def test_pool_is_ten_times_the_labelled_audio(tmp_path):
    """The default pool (unlabelled_factor=10) of a tiny release: 60 four-class utterances."""
    root = make_corpus(tmp_path / "IEMOCAP_full_release", preset="benchmark", seed=1, scale=0.075)
    labelled = build_manifest(root).kept["duration"].sum()
    pool = benchmark_paths(root).unlabelled
    total = sum(sf.info(str(p)).duration for p in pool.rglob("*.flac"))
    assert labelled > 60 * 3.0 and total >= 10.0 * labelled


def test_config_and_cli(tmp_path, monkeypatch):
    from serray.cli import main
    from serray.config import load_config
    from serray.data import synthetic
    from serray.data.prepare import synthetic_kwargs

    cfg = load_config(None, [f"output_dir={tmp_path}"])
    assert cfg.synthetic.preset == "demo" and synthetic_kwargs(cfg)["preset"] == "demo"
    cfg = load_config(None, [f"output_dir={tmp_path}", "synthetic.preset=benchmark"])
    assert synthetic_kwargs(cfg)["preset"] == "benchmark"
    real = synthetic.make_corpus
    calls = []

    def spy(out_dir, **kw):
        calls.append((kw["preset"], kw["scale"], kw["unlabelled_factor"]))
        return real(out_dir, **kw)

    monkeypatch.setattr(synthetic, "make_corpus", spy)
    out = tmp_path / "corpus" / "IEMOCAP_full_release"
    # the full size takes minutes: the config keys make it small
    assert main(["make-corpus", "--out", str(out), "synthetic.preset=benchmark", "synthetic.scale=0.075",
                 "synthetic.unlabelled_factor=0.1"]) == 0
    assert calls == [("benchmark", 0.075, 0.1)]
    assert benchmark_paths(out).oracle.is_file() and benchmark_paths(out).unlabelled.is_dir()
    assert len(build_manifest(out).kept) == 60
    yaml = tmp_path / "small-benchmark.yaml"  # the same keys from a YAML file
    yaml.write_text("synthetic:\n  preset: benchmark\n  scale: 0.075\n  unlabelled_factor: 0.1\n")
    assert main(["make-corpus", "--config", str(yaml), "--out", str(tmp_path / "from-yaml" / "IEMOCAP_full_release")]) == 0
    assert calls[-1] == ("benchmark", 0.075, 0.1)
    assert main(["make-corpus", "--out", str(tmp_path / "bad"), "synthetic.preset=nope"]) == 2
