"""Tests for serray.data.features.featurize (Ray Data): layout, dtype, metadata, resumability, bad audio, extra audio.

Every Ray Data run costs several seconds, so the modifying tests work on *copies* of the shared
``featurized`` output and only recompute one partition / one session.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from serray.cli import main
from serray.data.features.encoders import FbankEncoder
from serray.data.features.featurize import (FEATURE_COLUMNS, META_FILE, SKIPPED_FILE, decode_feature, feature_stats,
                                   featurize, parquet_files, read_meta, stored_utterances)
from serray.data.audio import load_audio
from serray.data.corpora.base import MANIFEST_COLUMNS, read_manifest, write_manifest
from serray.data.corpora.iemocap import build_manifest
from serray.errors import ConfigError, DataError


def load_features(features_dir) -> pd.DataFrame:
    """Every stored row, with ``session`` taken from the partition directory."""
    frames = []
    for f in parquet_files(features_dir):
        t = pq.read_table(f).to_pandas()
        t["session"] = int(Path(f).parent.name.split("=", 1)[1])
        t["file"] = str(f)
        frames.append(t)
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def manifest(featurized) -> pd.DataFrame:
    return read_manifest(featurized.data.manifest)


@pytest.fixture(scope="module")
def stored(featurized) -> pd.DataFrame:
    return load_features(featurized.features.dir)


def copy_features(featurized, tmp_path) -> Path:
    dest = tmp_path / "features"
    shutil.copytree(featurized.features.dir, dest)
    return dest


# ---------------------------------------------------------------- the shared fbank output


@pytest.mark.ray
def test_rows_match_manifest(manifest, stored):
    assert len(stored) == len(manifest)
    assert stored["utt_id"].is_unique
    assert set(stored["utt_id"]) == set(manifest["utt_id"])
    m = manifest.set_index("utt_id")
    s = stored.set_index("utt_id").loc[m.index]
    assert (s["session"] == m["session"]).all()
    for c in ("label", "raw_label", "speaker", "path", "dialog"):
        assert (s[c] == m[c]).all(), c
    assert set(MANIFEST_COLUMNS + FEATURE_COLUMNS) <= set(stored.columns)


@pytest.mark.ray
def test_float16_bytes(stored):
    assert (stored["dim"] == 80).all() and (stored["num_layers"] == 1).all()
    for row in stored.itertuples():
        assert len(row.feat) == row.num_frames * row.dim * 2
        f = decode_feature(row.feat, row.num_frames, row.dim, row.num_layers)
        assert f.dtype == np.float16 and f.shape == (row.num_frames, 80)
        assert np.isfinite(f).all()


@pytest.mark.ray
def test_num_frames_match_duration(stored):
    fb = FbankEncoder()
    for row in stored.itertuples():
        # Kaldi frames (snip_edges): T = 1 + (n - 400) // 160 = duration * 100 - 1.5 - [0, 1)
        assert abs(row.num_frames - (row.duration * fb.frame_rate - 1.5)) <= 1, row.utt_id
        assert abs(row.num_frames - row.duration * fb.frame_rate) <= 2.5, row.utt_id
        n = sf.info(row.path).frames
        assert row.num_frames == 1 + (n - 400) // 160


@pytest.mark.ray
def test_features_equal_direct_encoding(stored):
    """A stored row is the float16 of what the encoder computes in-process."""
    fb = FbankEncoder()
    for row in stored.sample(3, random_state=0).itertuples():
        direct = fb.encode([load_audio(row.path)])[0]
        got = decode_feature(row.feat, row.num_frames, row.dim)
        np.testing.assert_array_equal(got, direct.astype(np.float16))


@pytest.mark.ray
def test_partitions(featurized, manifest):
    out = Path(featurized.features.dir)
    parts = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert parts == [f"session={s}" for s in range(1, 6)]
    for s in range(1, 6):
        files = list((out / f"session={s}").glob("*.parquet"))
        assert files
        assert sum(pq.read_metadata(f).num_rows for f in files) == int((manifest["session"] == s).sum())
    # "session" is the partition key, not a column inside the files
    assert "session" not in pq.read_schema(files[0]).names


@pytest.mark.ray
def test_metadata(featurized, manifest):
    out = Path(featurized.features.dir)
    meta = json.loads((out / META_FILE).read_text())
    assert meta == read_meta(out)
    assert meta["encoder"] == "fbank" and meta["layers"] == [] and meta["dim"] == 80
    assert meta["num_layers"] == 1 and meta["frame_rate"] == 100.0 and meta["dtype"] == "float16"
    assert isinstance(meta["config_hash"], str) and len(meta["config_hash"]) == 16
    assert meta["num_rows"] == len(manifest)
    assert meta["rows_per_session"] == {str(k): int(v) for k, v in manifest.groupby("session").size().items()}
    assert (out / "_config.yaml").is_file()
    assert not (out / SKIPPED_FILE).exists()


@pytest.mark.ray
def test_rerun_is_noop(featurized, manifest):
    before = sorted(str(p) for p in parquet_files(featurized.features.dir))
    s = featurize(featurized)
    assert s["written"] == 0 and s["stored"] == len(manifest) and s["skipped"] == 0
    assert s["removed_broken_files"] == 0
    assert sorted(str(p) for p in parquet_files(featurized.features.dir)) == before


# ---------------------------------------------------------------- resuming (on copies)


@pytest.mark.slow
@pytest.mark.ray
def test_deleted_partition_is_restored(featurized, make_cfg, stored, tmp_path):
    feats = copy_features(featurized, tmp_path)
    cfg = make_cfg(tmp_path, f"data.manifest={featurized.data.manifest}", f"features.dir={feats}")
    shutil.rmtree(feats / "session=3")
    n3 = int((stored["session"] == 3).sum())
    s = featurize(cfg)
    assert s["written"] == n3 and s["stored"] == len(stored) and s["skipped"] == 0
    again = load_features(feats)
    assert again["utt_id"].is_unique and len(again) == len(stored)
    assert int((again["session"] == 3).sum()) == n3
    old = stored[stored["session"] == 3].set_index("utt_id")
    new = again[again["session"] == 3].set_index("utt_id")
    for utt in old.index[:3]:
        assert new.loc[utt, "feat"] == old.loc[utt, "feat"]
        assert new.loc[utt, "num_frames"] == old.loc[utt, "num_frames"]
    assert read_meta(feats)["num_rows"] == len(stored)


@pytest.mark.slow
@pytest.mark.ray
def test_half_written_file_is_replaced(featurized, make_cfg, stored, tmp_path):
    feats = copy_features(featurized, tmp_path)
    cfg = make_cfg(tmp_path, f"data.manifest={featurized.data.manifest}", f"features.dir={feats}")
    victim = sorted((feats / "session=2").glob("*.parquet"))[0]
    lost = set(pq.read_table(victim, columns=["utt_id"]).column("utt_id").to_pylist())
    assert lost
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # no footer any more
    s = featurize(cfg)
    assert s["removed_broken_files"] == 1
    assert s["written"] == len(lost) and s["stored"] == len(stored)
    assert not victim.exists()
    again = load_features(feats)
    assert again["utt_id"].is_unique and set(again["utt_id"]) == set(stored["utt_id"])
    for f in parquet_files(feats):
        pq.read_metadata(f)  # every file is readable now


@pytest.mark.slow
@pytest.mark.ray
def test_unreadable_audio_is_skipped(synthetic_root, featurized, make_cfg, sessions_overrides, tmp_path, capsys):
    """A wav that turned to junk after the manifest was built: skipped, listed, counted; no crash."""
    root = tmp_path / "IEMOCAP_full_release"
    shutil.copytree(synthetic_root / "Session1", root / "Session1")
    cfg = make_cfg(tmp_path, f"data.root={root}", *sessions_overrides([1]))
    report = build_manifest(root, [1])
    write_manifest(report.kept, cfg.data.manifest)
    victim = report.kept.iloc[5]
    Path(victim["path"]).write_bytes(b"\x00\x01junk, not a RIFF header" * 50)

    rc = main(["featurize", f"output_dir={tmp_path}", f"data.root={root}", *sessions_overrides([1]),
               "ray.progress_bars=false"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"features: {len(report.kept) - 1} utterances" in out
    assert "1 skipped" in out

    feats = Path(cfg.features.dir)
    skipped = pd.read_csv(feats / SKIPPED_FILE)
    assert list(skipped["utt_id"]) == [victim["utt_id"]]
    assert list(skipped.columns) == ["utt_id", "session", "path", "reason"]
    assert "cannot decode" in skipped["reason"].iloc[0]
    assert victim["utt_id"] not in set(stored_utterances(feats)["utt_id"])
    assert read_meta(feats)["num_rows"] == len(report.kept) - 1


# ---------------------------------------------------------------- encoder identity


@pytest.mark.ray
def test_other_encoder_on_same_dir_is_refused(featurized, make_cfg, tiny_hubert, tmp_path):
    cfg = make_cfg(tmp_path, f"data.manifest={featurized.data.manifest}",
                   f"features.dir={featurized.features.dir}", f"encoder.name={tiny_hubert}",
                   "encoder.local_files_only=true")
    before = sorted(str(p) for p in parquet_files(featurized.features.dir))
    with pytest.raises(DataError) as e:
        featurize(cfg)
    msg = str(e.value)
    assert "'fbank'" in msg and str(tiny_hubert) in msg and "--overwrite" in msg
    assert sorted(str(p) for p in parquet_files(featurized.features.dir)) == before

    other_bins = make_cfg(tmp_path, f"data.manifest={featurized.data.manifest}",
                          f"features.dir={featurized.features.dir}", "encoder.num_mel_bins=40")
    with pytest.raises(DataError, match="config hash"):
        featurize(other_bins)


@pytest.mark.slow
@pytest.mark.ray
def test_hf_encoder_two_layers(featurized, make_cfg, sessions_overrides, tiny_hubert, tmp_path):
    from transformers import HubertConfig

    cfg = make_cfg(tmp_path, f"data.manifest={featurized.data.manifest}", *sessions_overrides([1]),
                   f"encoder.name={tiny_hubert}", "encoder.layers=[0,2]", "encoder.local_files_only=true",
                   "encoder.device=cpu")
    s = featurize(cfg)
    manifest = read_manifest(featurized.data.manifest)
    n1 = int((manifest["session"] == 1).sum())
    assert s["written"] == n1 and s["skipped"] == 0
    meta = read_meta(cfg.features.dir)
    assert meta["encoder"] == str(tiny_hubert)
    assert meta["layers"] == [0, 2] and meta["num_layers"] == 2 and meta["dim"] == 32
    assert meta["frame_rate"] == 50.0 and meta["num_rows"] == n1
    rows = load_features(cfg.features.dir)
    assert set(rows["session"]) == {1}
    assert (rows["num_layers"] == 2).all() and (rows["dim"] == 32).all()
    stride = int(np.prod(HubertConfig.from_pretrained(str(tiny_hubert)).conv_stride))
    assert stride == 320
    for row in rows.itertuples():
        assert len(row.feat) == 2 * row.num_frames * 32 * 2
        f = decode_feature(row.feat, row.num_frames, row.dim, row.num_layers)
        assert f.shape == (2, row.num_frames, 32) and f.dtype == np.float16
        assert abs(row.num_frames - row.duration * 50) <= 2


# ---------------------------------------------------------------- user errors (no Ray job starts)


def test_missing_manifest(make_cfg, tmp_path):
    cfg = make_cfg(tmp_path)
    with pytest.raises(DataError, match="manifest not found"):
        featurize(cfg)


def test_manifest_without_the_sessions(synthetic_root, make_cfg, sessions_overrides, tmp_path):
    cfg = make_cfg(tmp_path, *sessions_overrides([2]))
    write_manifest(build_manifest(synthetic_root, [1]).kept, cfg.data.manifest)
    with pytest.raises(DataError, match="no utterances in sessions"):
        featurize(cfg)


def test_read_meta_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_meta(tmp_path / "nope")
    with pytest.raises(DataError, match=META_FILE):
        read_meta(tmp_path)


# ---------------------------------------------------------------- the main job, end to end


@pytest.mark.ray
def test_cli_corpus_manifest_featurize(ray_session, tmp_path, capsys):
    """The first stages of the main job through the CLI (the whole pipeline runs in tests/cluster)."""
    common = [f"output_dir={tmp_path}", "synthetic.dialogs_per_session=1", "synthetic.utterances_per_dialog=2",
              "synthetic.max_duration=1.2", "ray.progress_bars=false"]
    assert main(["make-corpus", *common]) == 0
    assert main(["manifest", *common]) == 0
    assert main(["featurize", *common]) == 0
    out = capsys.readouterr().out
    assert "features:" in out and "float16" in out
    assert (tmp_path / "synthetic" / "IEMOCAP_full_release" / "Session5").is_dir()
    meta = read_meta(tmp_path / "features")
    manifest = read_manifest(tmp_path / "manifest.parquet")
    assert meta["num_rows"] == len(manifest) == 10
    assert sorted(meta["rows_per_session"]) == ["1", "2", "3", "4", "5"]
    assert sorted(meta["stats"]) == ["1", "2", "3", "4", "5"]  # per-session CMVN statistics


# ---------------------------------------------------------------- unlabelled rows and extra audio (session 0)


def _tone_tree(root: Path, files: dict) -> Path:
    """Audio files ``{relative path: seconds}`` (16 kHz tones) under ``root``."""
    for i, (rel, seconds) in enumerate(files.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        t = np.arange(int(seconds * 16000)) / 16000
        sf.write(root / rel, (0.1 * np.sin(2 * np.pi * (150 + 40 * i) * t)).astype(np.float32), 16000)
    return root


@pytest.mark.ray
def test_shared_features_hold_unlabelled_rows(featurized, manifest, stored):
    unlabelled = manifest[manifest["label"] == ""]
    assert len(unlabelled) > 0 and set(unlabelled["raw_label"]).isdisjoint({"neu", "hap", "exc", "sad", "ang"})
    assert set(unlabelled["utt_id"]) <= set(stored["utt_id"])
    assert (stored.set_index("utt_id").loc[unlabelled["utt_id"], "label"] == "").all()
    meta = read_meta(featurized.features.dir)
    labelled = manifest[manifest["label"] != ""].groupby("session").size()
    assert meta["labelled_rows_per_session"] == {str(k): int(v) for k, v in labelled.items()}
    assert meta["extra_audio"] == [] and "0" not in meta["rows_per_session"]
    assert meta["hashed"]["pretrain.use_unlabelled"] is True
    # no extra audio: session 0 adds nothing to the statistics
    for a, b in zip(feature_stats(meta, [0, 2]), feature_stats(meta, [2])):
        np.testing.assert_array_equal(a, b)


def _expected_stats(rows: pd.DataFrame) -> dict:
    x = np.concatenate([decode_feature(r.feat, r.num_frames, r.dim).astype(np.float64) for r in rows.itertuples()])
    return {"frames": len(x), "sum": x.sum(0), "sumsq": (x * x).sum(0)}


@pytest.mark.slow
@pytest.mark.ray
def test_extra_audio_session0_incremental(featurized, make_cfg, stored, tmp_path):
    """Extra audio goes to session=0; adding a source computes only its files, removing one drops its rows."""
    feats = copy_features(featurized, tmp_path)
    a = _tone_tree(tmp_path / "libri_a", {"19/198/19-198-0000.flac": 0.6, "19/198/19-198-0001.flac": 0.9,
                                           "26/495/26-495-0000.flac": 0.5, "26/495/26-495-0001.wav": 0.05})  # < min_seconds
    b = _tone_tree(tmp_path / "libri_b", {"32/21/32-21-0000.flac": 0.7, "32/21/32-21-0001.flac": 0.4})

    def run(*sources):
        cfg = make_cfg(tmp_path, f"data.manifest={featurized.data.manifest}", f"features.dir={feats}",
                       f"pretrain.extra_audio=[{','.join(str(s) for s in sources)}]")
        return featurize(cfg), read_meta(feats), load_features(feats)

    old_meta = read_meta(featurized.features.dir)
    s, meta, rows = run(a)
    extra = rows[rows["session"] == 0]
    assert s["written"] == 3 and s["skipped"] == 1 and s["extra_rows"] == 3 and s["removed_extra_rows"] == 0
    assert sorted(extra["path"]) == sorted(str(p) for p in a.rglob("*.flac"))
    assert extra["utt_id"].str.startswith("extra/libri_a-").all() and (extra["label"] == "").all()
    assert sorted(set(extra["speaker"])) == ["extra:19", "extra:26"]
    assert rows["utt_id"].is_unique and len(rows) == len(stored) + 3
    skipped = pd.read_csv(feats / SKIPPED_FILE)
    assert list(skipped["session"]) == [0] and "too short" in skipped["reason"].iloc[0]
    assert skipped["path"].iloc[0].endswith("26-495-0001.wav")
    assert meta["rows_per_session"]["0"] == 3 and meta["labelled_rows_per_session"]["0"] == 0
    assert {k: v for k, v in meta["labelled_rows_per_session"].items() if k != "0"} == old_meta["labelled_rows_per_session"]
    assert meta["extra_audio"] == [str(a)] and meta["num_rows"] == len(stored) + 3
    exp = _expected_stats(extra)
    assert meta["stats"]["0"]["frames"] == exp["frames"] == int(extra["num_frames"].sum())
    np.testing.assert_allclose(np.asarray(meta["stats"]["0"]["sum"])[0], exp["sum"], rtol=1e-9)
    np.testing.assert_allclose(np.asarray(meta["stats"]["0"]["sumsq"])[0], exp["sumsq"], rtol=1e-9)
    assert all(meta["stats"][k] == old_meta["stats"][k] for k in old_meta["stats"])  # sessions 1-5 reused
    mean, std = feature_stats(meta, [0, 1])
    both = _expected_stats(rows[rows["session"].isin([0, 1])])
    np.testing.assert_allclose(mean[0], both["sum"] / both["frames"], rtol=1e-5, atol=1e-5)
    assert std.shape == (1, 80) and (std > 0).all()
    files_a = {str(f): f.read_bytes() for f in (feats / "session=0").glob("*.parquet")}

    # another source later: only its 2 files are computed, the stored rows are untouched
    s, meta, rows = run(a, b)
    assert s["written"] == 2 and s["extra_rows"] == 5 and s["skipped"] == 1 and s["removed_extra_rows"] == 0
    assert all(Path(f).read_bytes() == data for f, data in files_a.items())
    assert sorted(rows.loc[rows["session"] == 0, "path"]) == sorted(str(p) for p in [*a.rglob("*.flac"), *b.rglob("*.flac")])
    assert meta["rows_per_session"]["0"] == 5 and meta["extra_audio"] == [str(a), str(b)]
    assert meta["stats"]["0"]["frames"] == int(rows.loc[rows["session"] == 0, "num_frames"].sum())

    # a source removed: its rows leave session 0 (no Ray job), the statistics follow
    s, meta, rows = run(b)
    assert s["written"] == 0 and s["removed_extra_rows"] == 3 and s["extra_rows"] == 2 and s["skipped"] == 0
    extra = rows[rows["session"] == 0]
    assert sorted(extra["path"]) == sorted(str(p) for p in b.rglob("*.flac")) and rows["utt_id"].is_unique
    assert meta["rows_per_session"]["0"] == 2 and meta["stats"]["0"]["frames"] == int(extra["num_frames"].sum())
    assert not list(feats.rglob("*.pruning"))
    assert len(rows) == len(stored) + 2 and set(rows.loc[rows["session"] > 0, "utt_id"]) == set(stored["utt_id"])


def test_extra_audio_checked_before_any_work(synthetic_root, make_cfg, sessions_overrides, tmp_path):
    src = _tone_tree(tmp_path / "extra", {"s/1.flac": 0.5})
    cfg = make_cfg(tmp_path, *sessions_overrides([1]), f"pretrain.extra_audio=[{src}]")
    write_manifest(build_manifest(synthetic_root, [1], keep_unlabelled=True).kept, cfg.data.manifest)
    (src / "s" / "1.flac").unlink()  # valid when the config was loaded, empty now
    with pytest.raises(ConfigError, match="holds no audio files"):
        featurize(cfg)
    assert not Path(cfg.features.dir).exists()


def test_use_unlabelled_changes_the_config_hash(featurized, make_cfg, tmp_path):
    cfg = make_cfg(tmp_path, f"data.manifest={featurized.data.manifest}", f"features.dir={featurized.features.dir}",
                   "pretrain.use_unlabelled=false")
    before = sorted(str(p) for p in parquet_files(featurized.features.dir))
    with pytest.raises(DataError, match="they differ in pretrain.use_unlabelled; .* --overwrite"):
        featurize(cfg)
    assert sorted(str(p) for p in parquet_files(featurized.features.dir)) == before


@pytest.mark.parametrize("conc, max_conc, num_gpus, cluster, expected", [
    (1, None, 0.0, {"CPU": 16.0}, (1, 16)),              # CPU encoder: up to one actor per CPU
    (1, None, 0.0, {"CPU": 15.0}, (1, 15)),
    (1, None, 0.0, {"CPU": 2.0}, (1, 2)),
    (2, None, 0.0, {}, (2, 2)),                          # no node yet (autoscaler): the minimum
    (1, None, 1.0, {"CPU": 64.0, "GPU": 8.0}, (1, 8)),   # one actor per GPU present
    (1, None, 0.5, {"CPU": 8.0, "GPU": 2.0}, (1, 4)),    # half a GPU each
    (2, None, 1.0, {"CPU": 8.0}, (2, 2)),                # no GPU yet (autoscaler): the minimum
    (1, 3, 0.0, {"CPU": 16.0}, (1, 3)),                  # an explicit maximum
])
def test_actor_pool_bounds(conc, max_conc, num_gpus, cluster, expected):
    from types import SimpleNamespace

    from serray.data.features.featurize import actor_pool_bounds

    fcfg = SimpleNamespace(concurrency=conc, max_concurrency=max_conc, num_gpus=num_gpus, num_cpus=1.0)
    assert actor_pool_bounds(fcfg, cluster) == expected


def test_a_cpu_pool_counts_actors_by_their_cpus():
    from types import SimpleNamespace

    from serray.data.features.featurize import actor_pool_bounds

    fcfg = SimpleNamespace(concurrency=1, max_concurrency=None, num_gpus=0.0, num_cpus=4.0)
    assert actor_pool_bounds(fcfg, {"CPU": 18.0}) == (1, 4)   # four 4-thread actors, not 18
    fcfg.num_cpus = 0.5
    assert actor_pool_bounds(fcfg, {"CPU": 2.0}) == (1, 4)


def test_writes_beside_cpu_actors_ask_for_no_cpu():
    """CPU actors may hold every CPU: a 1-CPU write task would wait for the end of encoding."""
    from types import SimpleNamespace

    from serray.data.features.featurize import write_remote_args

    cpu = SimpleNamespace(num_gpus=0.0)
    assert write_remote_args(cpu, (1, 2), 8) == {"ray_remote_args": {"num_cpus": 0}, "concurrency": 2}
    assert write_remote_args(cpu, (1, 2), 1)["concurrency"] == 1  # no more writers than blocks (Ray Data warns)
    assert write_remote_args(SimpleNamespace(num_gpus=1.0), (1, 8), 32) == {}  # GPU actors leave the CPUs free


def test_bucketed_blocks_hold_whole_batches_of_similar_length_longest_block_first():
    from serray.data.features.featurize import _bucketed_blocks

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"utt_id": [f"u{i:03d}" for i in range(101)], "duration": rng.uniform(0.5, 20.0, 101)})
    blocks = _bucketed_blocks(df, batch_size=4, min_blocks=8)
    assert sorted(pd.concat(blocks)["utt_id"]) == sorted(df["utt_id"])       # every row once
    assert all(len(b) % 4 == 0 for b in blocks[1:])                         # whole batches (the remainder leads)
    assert len(blocks) == 7                                                 # 26 batches, 4 per block
    starts = [b["duration"].min() for b in blocks]
    assert starts == sorted(starts, reverse=True)                           # longest block first
    for longer, shorter in zip(blocks, blocks[1:]):                         # buckets do not overlap
        assert shorter["duration"].max() <= longer["duration"].min()


@pytest.mark.slow
@pytest.mark.ray
def test_writes_run_while_cpu_actors_hold_every_cpu(ray_session, tmp_path):
    """Two actors hold every free CPU. Blocks 0-1 encode at once; every later block keeps its actor (and CPU)
    busy until a Parquet file is on disk or a shared 60 s deadline passes. With featurize's write arguments
    the first blocks are written meanwhile; with Ray Data's default 1-CPU writes nothing can be written while
    both actors are busy, so every later block gives up at the deadline (measured before the fix)."""
    import time
    from types import SimpleNamespace

    from serray.data.features.featurize import write_remote_args

    out = str(tmp_path / "out")
    n, deadline = 12, time.time() + 60.0

    class _Encode:  # a stand-in encoder actor (local: the workers get it by value)
        def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
            import glob
            import time

            if int(batch["i"].iloc[0]) >= 2:
                while not glob.glob(f"{out}/*.parquet") and time.time() < deadline:
                    time.sleep(0.05)
            return batch.assign(saw_a_file=bool(glob.glob(f"{out}/*.parquet")))

    ray = ray_session
    cpus = float(ray.available_resources().get("CPU", 0.0))
    if cpus < 0.5:
        pytest.skip("no free CPU in the test cluster")
    blocks = [pd.DataFrame({"i": [k]}) for k in range(n)]
    ds = ray.data.from_pandas(blocks).map_batches(_Encode, batch_size=None, batch_format="pandas",
                                                 compute=ray.data.ActorPoolStrategy(size=2), num_cpus=cpus / 2)
    ds.write_parquet(out, **write_remote_args(SimpleNamespace(num_gpus=0.0), (2, 2), len(blocks)))
    rows = pd.concat([pd.read_parquet(f) for f in sorted(Path(out).glob("*.parquet"))])
    assert sorted(rows["i"]) == list(range(n))
    late = rows[rows["i"] >= 2]
    assert late["saw_a_file"].all(), f"blocks {sorted(late.loc[~late['saw_a_file'], 'i'])} waited 60 s for a write"


def test_max_concurrency_below_the_minimum_is_a_config_error(tmp_path):
    from serray.config import load_config

    with pytest.raises(ConfigError, match=r"features.concurrency \(2\) must be <= features.max_concurrency \(1\)"):
        load_config(None, [f"output_dir={tmp_path}", "features.concurrency=2", "features.max_concurrency=1"])


@pytest.mark.ray
def test_session_statistics_equal_a_direct_computation(featurized, stored):
    """The statistics in the metadata (a Ray Data map + sum) equal numpy over the stored frames, and
    the in-process path gives the same numbers."""
    from serray.data.features.featurize import session_stats_local

    stats = read_meta(featurized.features.dir)["stats"]
    assert set(stats) == {str(s) for s in stored["session"].unique()}
    for s, st in stats.items():
        rows = stored[stored["session"] == int(s)]
        x = np.concatenate([decode_feature(r.feat, r.num_frames, r.dim, r.num_layers).astype(np.float64)
                            .reshape(r.num_layers, r.num_frames, r.dim) for r in rows.itertuples()], axis=1)
        assert st["frames"] == x.shape[1] == int(rows["num_frames"].sum())
        np.testing.assert_allclose(st["sum"], x.sum(1), rtol=1e-9)
        np.testing.assert_allclose(st["sumsq"], (x * x).sum(1), rtol=1e-9)
    local = session_stats_local(featurized.features.dir, [int(s) for s in stats])
    for s, st in stats.items():
        assert local[s]["frames"] == st["frames"]
        np.testing.assert_allclose(local[s]["sum"], st["sum"], rtol=1e-12)


# ---------------------------------------------------------------- nothing half-done looks done; bounded retries and waits


def _parquet_bytes(feats: Path) -> dict:
    return {str(p): p.read_bytes() for p in sorted(feats.rglob("*.parquet"))}


@pytest.mark.ray
def test_identity_is_written_before_the_first_partition(featurized, make_cfg, tmp_path, monkeypatch):
    """Interrupt a run at its first partition: the encoder identity is already there and the old
    metadata no longer vouches for the directory; a rerun with another encoder is then refused."""
    import serray.data.features.featurize as fz
    from serray.data.features.featurize import IDENTITY_FILE

    feats = copy_features(featurized, tmp_path)
    shutil.rmtree(feats / "session=4")
    cfg = make_cfg(tmp_path, f"data.manifest={featurized.data.manifest}", f"features.dir={feats}")
    seen = {}

    def interrupted(*args, **kwargs):
        seen["identity"] = json.loads((feats / IDENTITY_FILE).read_text())
        seen["meta"] = (feats / META_FILE).exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(fz, "_encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        featurize(cfg)
    assert seen["identity"]["encoder"] == "fbank" and seen["identity"]["dim"] == 80 and not seen["meta"]
    with pytest.raises(DataError, match=r"no features in .* holds no _serray_features.json"):
        read_meta(feats)  # training refuses the unfinished directory
    monkeypatch.undo()
    before = _parquet_bytes(feats)
    other = make_cfg(tmp_path, f"data.manifest={featurized.data.manifest}", f"features.dir={feats}",
                     "encoder.num_mel_bins=40")
    with pytest.raises(DataError, match=r"holds features \(an unfinished run\) made with encoder 'fbank'.*--overwrite"):
        featurize(other)
    assert _parquet_bytes(feats) == before  # nothing mixed in


def test_rows_without_any_identity_are_refused(featurized, make_cfg, tmp_path):
    """Parquet files with neither metadata nor identity (e.g. an older serray interrupted): their
    encoder is unknown, so nothing is added to them."""
    from serray.data.features.featurize import IDENTITY_FILE

    feats = copy_features(featurized, tmp_path)
    (feats / META_FILE).unlink()
    (feats / IDENTITY_FILE).unlink()
    cfg = make_cfg(tmp_path, f"data.manifest={featurized.data.manifest}", f"features.dir={feats}")
    with pytest.raises(DataError, match="no record of the encoder that made them.*--overwrite"):
        featurize(cfg)


def test_overwrite_removes_only_features_and_refuses_a_directory_with_anything_else(featurized, make_cfg, tmp_path):
    """`serray featurize --overwrite` with features.dir = output_dir and another encoder removed
    registry/, finetune/ and the manifest. Now features.dir cannot be output_dir (or above another
    output), and --overwrite refuses a directory holding anything serray did not write as features."""
    from serray.data.features.featurize import clear_features
    from serray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"features.dir \(.*\) must not be output_dir or a directory above it"):
        make_cfg(tmp_path, f"features.dir={tmp_path}")
    with pytest.raises(ConfigError, match="must not be registry.dir or a directory above it"):
        make_cfg(tmp_path, f"features.dir={tmp_path}/shared", f"registry.dir={tmp_path}/shared/registry")
    feats = copy_features(featurized, tmp_path)
    (feats / "notes.txt").write_text("my notes")
    (feats / "registry").mkdir()
    (feats / "session=1" / "README").write_text("x")
    before = _parquet_bytes(feats)
    other = make_cfg(tmp_path, f"data.manifest={featurized.data.manifest}", f"features.dir={feats}",
                     "encoder.num_mel_bins=40")
    with pytest.raises(DataError) as e:
        featurize(other, overwrite=True)
    msg = str(e.value)
    assert "holds more than serray's features" in msg and "notes.txt" in msg and "registry/" in msg and "README" in msg
    assert "nothing was removed" in msg and _parquet_bytes(feats) == before and (feats / "notes.txt").exists()
    for extra in ("notes.txt", "session=1/README"):
        (feats / extra).unlink()
    (feats / "registry").rmdir()
    removed = clear_features(str(feats))
    names = {Path(p).name for p in removed}
    assert {"_config.yaml", "_serray_features.json", "_serray_identity.json"} <= names
    assert {n for n in names if n.startswith("session=")} == {f"session={s}" for s in range(1, 6)}
    assert list(feats.iterdir()) == []


def test_a_transient_read_error_never_deletes_a_partition(featurized, make_cfg, tmp_path, monkeypatch):
    import pyarrow as pa

    import serray.data.features.featurize as fz
    from serray import storage

    feats = copy_features(featurized, tmp_path)
    cfg = make_cfg(tmp_path, f"data.manifest={featurized.data.manifest}", f"features.dir={feats}")
    victim = str(sorted((feats / "session=2").glob("*.parquet"))[0])
    real = storage.parquet_file

    def flaky(path):
        if str(path) == victim:
            raise OSError("Connection reset by peer (a storage hiccup)")
        return real(path)

    monkeypatch.setattr(storage, "parquet_file", flaky)
    before = _parquet_bytes(feats)
    with pytest.raises(DataError, match="cannot read the feature file .* left in place"):
        featurize(cfg)
    assert _parquet_bytes(feats) == before
    # a footer that is missing once and there on the second look (a file still being copied in) is kept
    calls = {"n": 0}

    def once_invalid(path):
        if str(path) == victim and calls["n"] == 0:
            calls["n"] += 1
            raise pa.ArrowInvalid("Parquet magic bytes not found in footer")
        return real(path)

    monkeypatch.setattr(storage, "parquet_file", once_invalid)
    monkeypatch.setattr(fz.time, "sleep", lambda s: None)
    assert fz._is_broken(victim) is False and calls["n"] == 1


def test_two_runs_on_the_same_directory_are_refused(featurized, make_cfg, tmp_path):
    from serray import storage

    feats = copy_features(featurized, tmp_path)
    cfg = make_cfg(tmp_path, f"data.manifest={featurized.data.manifest}", f"features.dir={feats}")
    with storage.lock(str(feats), wait=False, what="another `serray featurize`"):
        with pytest.raises(DataError, match=r"is in use by another `serray featurize`, or training that reads it \(pid \d+"):
            featurize(cfg)


@pytest.mark.ray
def test_unsatisfiable_encoder_resources_end_with_a_clear_error(featurized, make_cfg, tmp_path):
    feats = copy_features(featurized, tmp_path)
    shutil.rmtree(feats / "session=5")
    cfg = make_cfg(tmp_path, f"data.manifest={featurized.data.manifest}", f"features.dir={feats}",
                   "features.num_gpus=1", "features.resource_timeout_s=1")
    import time

    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"GPU: 1.*features.resource_timeout_s"):
        featurize(cfg)
    assert time.perf_counter() - t0 < 15


@pytest.mark.ray
@pytest.mark.slow
def test_a_file_that_kills_its_actor_is_reported_and_skipped(featurized, manifest, make_cfg, tmp_path):
    """The encoder actor dies on one utterance (fault injection: os._exit). Its batch is retried
    features.max_restarts times, then its rows are retried one by one: the culprit is skipped and
    reported, every other utterance is stored; no endless restart loop."""
    feats = copy_features(featurized, tmp_path)
    shutil.rmtree(feats / "session=2")
    rows = manifest[manifest["session"] == 2].sort_values("utt_id")
    victim = rows["utt_id"].iloc[len(rows) // 2]
    cfg = make_cfg(tmp_path, f"data.manifest={featurized.data.manifest}", f"features.dir={feats}",
                   f"features.fault_utt={victim}", "features.max_restarts=1")
    s = featurize(cfg)
    assert s["skipped"] == 1 and s["written"] == len(rows) - 1
    skipped = pd.read_csv(feats / SKIPPED_FILE)
    assert list(skipped["utt_id"]) == [victim]
    assert "actor died on this file, 2 times" in skipped["reason"].iloc[0]
    stored_now = set(stored_utterances(feats)["utt_id"])
    assert victim not in stored_now and set(rows["utt_id"]) - {victim} <= stored_now
    assert read_meta(feats)["num_rows"] == len(manifest) - 1


def test_a_file_that_cannot_be_read_is_skipped_and_reported_not_fatal(synthetic_root, monkeypatch):
    """An I/O error reading one corpus file (not a decode error) aborted the whole featurization: it
    is now an AudioError like an undecodable file, so the encoder drops that row (and the driver lists
    it in _skipped.csv) while the others are encoded."""
    import errno

    import serray.data.audio as audio
    from serray.data.features.featurize import EncodeBatch, _skip_reason
    from serray.errors import AudioError

    wavs = sorted(p for p in synthetic_root.glob("Session1/sentences/wav/*/*.wav") if not p.name.startswith("._"))[:3]
    bad = str(wavs[1])
    real_open = open

    def flaky_open(path, *a, **k):
        if str(path) == bad:
            raise OSError(errno.EIO, "Input/output error")
        return real_open(path, *a, **k)

    monkeypatch.setattr(audio, "open", flaky_open, raising=False)
    with pytest.raises(AudioError, match="cannot read .*Input/output error"):
        audio.load_audio(bad)
    assert "Input/output error" in _skip_reason(bad, 16000, 0.1, 60)
    enc = EncodeBatch({"name": "fbank", "layers": [], "sample_rate": 16000, "num_mel_bins": 80,
                       "local_files_only": True, "device": "cpu"}, 0.1, 60.0)
    out = enc._encode(pd.DataFrame({"utt_id": ["a", "b", "c"], "path": [str(p) for p in wavs]}))
    assert list(out["utt_id"]) == ["a", "c"] and (out["num_frames"] > 0).all()


def test_statistics_leave_out_missing_values_and_the_normalisation_maps_them_to_the_mean():
    """A descriptor an utterance does not have is stored as NaN (an LLD encoder's F0 where nothing is
    voiced); the session statistics count only the defined values per dimension, the pooled mean and sd
    are those of the defined values, and FeatureNorm turns a NaN into 0 (the mean) instead of NaN."""
    import torch

    from serray.data.features.stored import partial_sums, reduce_partials
    from serray.models.wap import FeatureNorm

    a = np.array([[1.0, 10.0], [3.0, 12.0]], dtype=np.float16)
    b = np.array([[5.0, np.nan], [7.0, np.nan], [9.0, np.nan]], dtype=np.float16)  # no value in column 1
    batch = {"path": np.array(["f/session=1/a.parquet", "f/session=1/b.parquet"], dtype=object),
             "feat": np.array([a.tobytes(), b.tobytes()], dtype=object), "num_frames": np.array([2, 3]),
             "dim": np.array([2, 2]), "num_layers": np.array([1, 1])}
    stats = reduce_partials([{k: v[0] for k, v in partial_sums(batch).items()}])
    assert stats["1"]["frames"] == 5 and stats["1"]["count"] == [[5, 2]]
    mean, std = feature_stats({"stats": stats}, [1])
    np.testing.assert_allclose(mean, [[5.0, 11.0]])
    np.testing.assert_allclose(std, [[np.sqrt(8.0) + 1e-5, 1.0 + 1e-5]], rtol=1e-6)
    # statistics written before the per-dimension count: every frame counts (the old behaviour)
    legacy = {"1": {k: v for k, v in stats["1"].items() if k != "count"}}
    np.testing.assert_allclose(feature_stats({"stats": legacy}, [1])[0], [[5.0, 22.0 / 5]])
    norm = FeatureNorm(2)
    norm.set_stats(mean, std)
    y = norm(torch.tensor(b.astype(np.float32))[None])
    assert torch.isfinite(y).all() and (y[0, :, 1] == 0).all()
    np.testing.assert_allclose(y[0, :, 0].numpy(), (b[:, 0] - 5.0) / std[0, 0], rtol=1e-5)
