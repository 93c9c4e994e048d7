"""Long recordings (``serray predict --segments``): streaming decode, VAD, segments, labels, bounded memory.

The recordings are synthetic: clips of the synthetic corpus joined by silence, with white background
noise over the whole recording (:func:`serray.serve.demo.synthetic_recording`), so every clip's span is
known. Boundaries must be found within :data:`TOLERANCE_S` of the clip's first and last sample (a clip
starts and ends with a few tens of ms of its own near-silence, and the pad is 0.1 s).
"""

import json

import numpy as np
import pytest
import soundfile as sf

from serray.config import load_config
from serray.data.audio import resample
from serray.data.audio_stream import StreamResampler, open_stream
from serray.data.vad import EnergyVAD, Segmenter, build_vad
from serray.errors import AudioError
from serray.segment import format_table, segment_file, segment_stream, settings_of
from serray.serve.demo import LevelModel as LoudnessModel, synthetic_recording

#: Largest |found - true| boundary accepted, seconds.
TOLERANCE_S = 0.4
N_CLIPS = 8


@pytest.fixture(scope="module")
def clips(synthetic_root):
    wavs = sorted(w for w in synthetic_root.glob("Session1/sentences/wav/*/*.wav") if not w.name.startswith("._"))
    return [sf.read(w, dtype="float32")[0] for w in wavs[:N_CLIPS]]


def _seg(**over):
    seg = settings_of(load_config())
    seg.update(over)
    return seg


def _cut(rec, seg, block=32000, sr=16000):
    vad = build_vad(seg["vad"], sr, seg)
    s = Segmenter(vad, sr, seg["window_s"], seg["hop_s"], seg["threshold"], seg["min_speech_s"],
                  seg["min_silence_s"], seg["pad_s"])
    pieces = []
    for i in range(0, len(rec), block):
        pieces += s.feed(rec[i:i + block])
    return pieces + s.finish(), s


def _by_clip(pieces, spans, sr=16000):
    """Every piece overlaps exactly one clip; returns {clip index: [(start_s, end_s), ...]}."""
    out = {}
    for a, b, _ in pieces:
        hit = [i for i, (s, e) in enumerate(spans) if a / sr < e and b / sr > s]
        assert len(hit) == 1, f"segment {a / sr:.2f}-{b / sr:.2f} s overlaps clips {hit} of {spans}"
        out.setdefault(hit[0], []).append((a / sr, b / sr))
    return out


@pytest.mark.parametrize("sr", [44100, 48000, 8000, 4001])
def test_block_resampling_equals_whole_file_resampling(sr):
    x = np.random.default_rng(0).standard_normal(int(sr * 3.3)).astype(np.float32) * 0.1
    rs, out, i = StreamResampler(sr, 16000), [], 0
    for n in [1, 7, sr // 3, 5000, sr, 333] * 10:
        out.append(rs.push(x[i:i + n]))
        i += n
    out.append(rs.finish())
    y, whole = np.concatenate(out), resample(x, sr, 16000)
    assert len(y) == len(whole) and np.abs(y - whole).max() < 1e-6


@pytest.mark.parametrize("vad,noise_db", [("silero", -50.0), ("silero", -40.0), ("energy", -60.0), ("energy", None)])
def test_vad_finds_every_clip_within_tolerance(clips, vad, noise_db):
    rec, spans = synthetic_recording(clips, gap_s=1.5, noise_db=noise_db, seed=1)
    pieces, _ = _cut(rec, _seg(vad=vad))
    found = _by_clip(pieces, spans)
    assert sorted(found) == list(range(len(spans))), f"clips without a segment: {set(range(len(spans))) - set(found)}"
    for i, (s, e) in enumerate(spans):
        first, last = found[i][0][0], found[i][-1][1]
        assert abs(first - s) <= TOLERANCE_S and abs(last - e) <= TOLERANCE_S, (i, (s, e), found[i])
    if vad == "silero":  # one segment per clip (the energy detector may split a clip at a pause)
        assert all(len(v) == 1 for v in found.values()), found


def test_energy_vad_scores_level_above_the_tracked_floor():
    v = EnergyVAD(16000, margin_db=12.0, min_db=-60.0, floor_s=5.0)
    quiet = 10 ** (-50 / 20) * np.ones((10, 512), np.float32)
    loud = 10 ** (-30 / 20) * np.ones((3, 512), np.float32)
    mid = 10 ** (-45 / 20) * np.ones((3, 512), np.float32)
    assert v.scores(quiet).tolist() == [0.0] * 10
    assert v.scores(loud).tolist() == [1.0] * 3  # 20 dB above the floor
    assert v.scores(mid).tolist() == [0.0] * 3  # 5 dB above


class AlwaysSpeech:
    """A detector that hears speech everywhere (the segmenter's worst case: one endless region)."""

    def scores(self, frames):
        return np.ones(len(frames), np.float32)


def test_long_speech_is_split_into_equal_windows_and_memory_stays_bounded():
    """10 minutes of uninterrupted voice: pieces of at most window_s, contiguous, and never more than
    two windows + a block of audio held (the memory bound does not grow with the recording)."""
    sr, minutes = 16000, 10
    t = np.arange(minutes * 60 * sr) / sr
    rec = (0.1 * np.sin(2 * np.pi * 150 * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    s = Segmenter(AlwaysSpeech(), sr, window_s=4.0, hop_s=4.0)
    pieces = []
    for i in range(0, len(rec), 40000):
        pieces += s.feed(rec[i:i + 40000])
    pieces += s.finish()
    assert s.n == len(rec)
    lengths = np.array([b - a for a, b, _ in pieces]) / sr
    assert len(pieces) == 150 and lengths.max() <= 4.0 + 1e-9 and lengths.min() >= 2.0
    assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:])), "pieces of one region are contiguous"
    assert pieces[0][0] == 0 and pieces[-1][1] == len(rec)
    assert s.max_kept <= 2 * 4.0 * sr + 40000 + 2 * 512, s.max_kept / sr


def test_sliding_window_covers_the_recording():
    rec = np.zeros(int(16000 * 10.5), np.float32)
    pieces, s = _cut(rec, _seg(vad="none", window_s=4.0, hop_s=2.0), block=7000)
    assert [(a / 16000, b / 16000) for a, b, _ in pieces] == [(0, 4), (2, 6), (4, 8), (6, 10), (6.5, 10.5)]
    assert s.max_kept <= 4 * 16000 + 2 * 7000


def _at_level(clip, db):
    return clip * (10 ** (db / 20) / np.sqrt(np.mean(np.square(clip))))


def test_segment_labels_follow_the_clips(clips, tmp_path):
    """Each segment gets the label of the audio it spans: clips at three levels, a model that labels by
    level, the segments' labels in the clips' order; the aggregate weighs them by duration."""
    levels = [-12, -22, -32, -12, -32, -22]
    want = ["ang", "hap", "sad", "ang", "sad", "hap"]
    rec, spans = synthetic_recording([_at_level(c, d) for c, d in zip(clips, levels)], gap_s=1.2, noise_db=-60.0)
    path = tmp_path / "rec.flac"
    sf.write(path, np.stack([rec, rec], axis=1), 16000, format="FLAC")
    res = segment_file(LoudnessModel(), path, _seg(vad="silero"), min_seconds=0.25)
    assert [s["label"] for s in res["segments"]] == want
    for s, (a, b) in zip(res["segments"], spans):
        assert abs(s["start"] - a) <= TOLERANCE_S and abs(s["end"] - b) <= TOLERANCE_S
    agg = res["aggregate"]
    durations = {k: sum(s["end"] - s["start"] for s in res["segments"] if s["label"] == k) for k in ("ang", "hap", "sad")}
    total = sum(durations.values())
    for k, d in durations.items():
        assert agg["distribution"][k] == pytest.approx(d / total, abs=1e-3)
    assert agg["dominant"] == max(durations, key=durations.get) and agg["num_segments"] == 6
    assert res["duration_s"] == pytest.approx(len(rec) / 16000, abs=1e-3)


def test_resampled_stereo_file_gives_the_same_segments(clips, tmp_path):
    rec, spans = synthetic_recording(clips[:4], gap_s=1.0, noise_db=-55.0)
    p16, p44 = tmp_path / "a.wav", tmp_path / "b.wav"
    sf.write(p16, rec, 16000, subtype="FLOAT")
    x44 = StreamResampler(16000, 44100).push(rec)
    sf.write(p44, np.stack([x44, x44], axis=1), 44100, subtype="FLOAT")
    a = segment_file(LoudnessModel(), p16, _seg(), min_seconds=0.25)["segments"]
    b = segment_file(LoudnessModel(), p44, _seg(), min_seconds=0.25)["segments"]
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x["start"] - y["start"]) <= TOLERANCE_S / 2 and abs(x["end"] - y["end"]) <= TOLERANCE_S / 2


def test_no_speech_and_bad_input(tmp_path):
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000 * 6, np.float32), 16000)
    for vad in ("silero", "energy"):
        res = segment_file(LoudnessModel(), silent, _seg(vad=vad))
        assert res["segments"] == [] and res["aggregate"]["dominant"] is None
        assert res["message"].startswith("no speech found") and "no segments" in res["message"]
    ogg = tmp_path / "x.ogg"
    ogg.write_bytes(b"OggS" + bytes(200))
    with pytest.raises(AudioError, match="unsupported audio format: Ogg"):
        segment_file(LoudnessModel(), ogg, _seg())
    with pytest.raises(AudioError, match="not found"):
        segment_file(LoudnessModel(), tmp_path / "missing.wav", _seg())
    bad = tmp_path / "nan.wav"
    x = np.zeros(16000 * 3, np.float32)
    x[30000] = np.nan
    sf.write(bad, x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        segment_file(LoudnessModel(), bad, _seg(vad="energy"))


def test_file_object_source_matches_the_path(clips, tmp_path):
    rec, _ = synthetic_recording(clips[:3], gap_s=1.0, noise_db=-55.0)
    path = tmp_path / "r.wav"
    sf.write(path, rec, 16000)
    with open(path, "rb") as f:
        stream = open_stream(f, 16000, total=path.stat().st_size, what="the upload")
        via_file = segment_stream(LoudnessModel(), stream, _seg(), name="the upload")
    via_path = segment_file(LoudnessModel(), path, _seg())
    assert via_file["segments"] == via_path["segments"] and via_file["file"] == "the upload"


def test_registered_model_cli_segments_match_the_clips_alone(clips, tmp_path, capsys):
    """`serray predict --segments` with a registered (random-init) model: one segment per clip, each with
    the label and (nearly) the probabilities the same model gives the clip alone."""
    from serray.cli import main
    from serray.predict import Predictor
    from serray.train.registry import get_entry, model_dir, register
    from serray.serve.demo import make_demo_checkpoint

    ck = make_demo_checkpoint(tmp_path / "ck", seed=0)
    extra = {"protocol": "inductive", "folds": [1, 2, 3, 4, 5], "val_split": "speaker", "val_fraction": 0.15,
             "label_fraction": 1.0, "selection": "fixed"}
    entry = register(tmp_path / "reg", ck, metrics={"ua": 0.5, "val_ua": 0.5}, config_yaml="{}\n", source="test",
                     extra=extra)
    rec, spans = synthetic_recording(clips[:5], gap_s=1.5, noise_db=-55.0)
    path = tmp_path / "call.wav"
    sf.write(path, rec, 16000)
    assert main(["predict", "--segments", str(path), f"registry.dir={tmp_path / 'reg'}", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["segments"]) == 5
    alone = Predictor.from_checkpoint(model_dir(get_entry(tmp_path / "reg", entry["id"]))).predict_waveforms(clips[:5])
    labels = ["neu", "hap", "sad", "ang"]
    for s, (a, b), p in zip(res["segments"], spans, alone):
        assert abs(s["start"] - a) <= TOLERANCE_S and abs(s["end"] - b) <= TOLERANCE_S
        got = np.array([s["probabilities"][k] for k in labels])
        assert np.abs(got - p).max() < 0.15
        top2 = np.sort(p)[-2:]
        if top2[1] - top2[0] > 0.2:  # a clear choice on the clip alone is the segment's choice
            assert s["label"] == labels[int(np.argmax(p))]
    assert main(["predict", "--segments", str(path), f"registry.dir={tmp_path / 'reg'}"]) == 0
    table = capsys.readouterr().out
    assert "5 segments" in table and "dominant:" in table
    (tmp_path / "x.mp3").write_bytes(b"ID3" + bytes(100))
    assert main(["predict", "--segments", str(tmp_path / "x.mp3"), f"registry.dir={tmp_path / 'reg'}"]) == 2
    assert "unsupported audio format: MP3" in capsys.readouterr().err
    assert main(["predict", f"registry.dir={tmp_path / 'reg'}"]) == 2
    assert "--segments" in capsys.readouterr().err


@pytest.mark.parametrize("override,needle", [("segment.vad=webrtc", "segment.vad must be energy, silero or none"),
                                             ("segment.hop_s=8", "segment.hop_s (8.0) must be <= segment.window_s"),
                                             ("segment.window_s=0", "segment.window_s must be > 0"),
                                             ("serve.segments_max_body_mb=-1", "serve.segments_max_body_mb must be > 0")])
def test_segment_keys_are_checked_at_load(override, needle):
    from serray.errors import ConfigError

    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


class Pattern:
    """A detector that replays given frame scores (1 = speech), then silence."""

    def __init__(self, scores):
        self.left = list(scores)

    def scores(self, frames):
        out, self.left = self.left[:len(frames)], self.left[len(frames):]
        return np.array(out + [0.0] * (len(frames) - len(out)), np.float32)


def test_a_blip_too_short_to_keep_leaves_nothing_behind():
    """A 2-frame blip (dropped: under min_speech_s) must not move the next region's start nor keep audio."""
    frame = 512
    scores = [0] * 50 + [1, 1] + [0] * 200 + [1] * 60 + [0] * 30  # blip at frame 50, speech at 252..311
    s = Segmenter(Pattern(scores), 16000, window_s=4.0, hop_s=4.0, min_speech_s=0.25, min_silence_s=0.3, pad_s=0.1)
    rec = np.zeros(len(scores) * frame, np.float32)
    pieces = []
    for i in range(0, len(rec), frame * 7):
        pieces += s.feed(rec[i:i + frame * 7])
    pieces += s.finish()
    assert [(a, b) for a, b, _ in pieces] == [(252 * frame - 1600, 312 * frame + 1600)]
    assert s.max_kept < 100 * frame


def test_a_dimensional_only_model_reports_no_dominant_class(clips, tmp_path):
    """A model that rates dimensions and predicts no class: the aggregate averages the ratings and says
    no class (before: an all-zero distribution with ``dominant: "neu"``)."""

    class RatingsOnly(LoudnessModel):
        def predict_records(self, wavs):
            return [{"label": None, "probabilities": {},
                     "dimensions": {"arousal": float(10 * np.log10(np.mean(np.square(w)) + 1e-12)), "valence": 3.0}}
                    for w in wavs]

    rec, spans = synthetic_recording(clips[:3], gap_s=1.0, noise_db=-60.0)
    path = tmp_path / "rec.wav"
    sf.write(path, rec, 16000)
    res = segment_file(RatingsOnly(), path, _seg(vad="energy"), min_seconds=0.25)
    agg = res["aggregate"]
    assert agg["num_segments"] == len(res["segments"]) == 3
    assert agg["dominant"] is None and agg["distribution"] == {} and agg["label_s"] == {}
    assert agg["dimensions"]["valence"] == pytest.approx(3.0)
    assert "dominant: None" in format_table(res)


def test_a_detector_that_cannot_close_a_region_is_refused_at_load():
    """The segmenter holds two windows of an open region: min_speech_s + min_silence_s beyond 2 x window_s
    made it emit windows of the silence after a region (classified as speech). Refused, naming the keys."""
    from serray.config import load_config
    from serray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"segment.min_speech_s \+ segment.min_silence_s \(2.5\) must be <= "
                                          r"2 x segment.window_s \(2\)"):
        load_config(None, ["segment.window_s=1.0", "segment.hop_s=0.5", "segment.min_speech_s=0.5",
                           "segment.min_silence_s=2.0"])
    load_config(None, ["segment.window_s=1.0", "segment.hop_s=0.5", "segment.min_speech_s=0.5",
                       "segment.min_silence_s=1.5"])
