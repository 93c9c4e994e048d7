"""Storage helpers without a server: credential redaction, public names, "done" markers uploaded last, locks."""

from __future__ import annotations

import pytest

from serray import storage


def test_redact_masks_credentials_and_query_values():
    uri = "s3://AKID:SECRET@bucket/run/x?access_key=AKID&secret_key=SECRET&region=eu-west-1"
    assert storage.redact(uri) == "s3://***@bucket/run/x?access_key=***&secret_key=***&region=eu-west-1"
    assert storage.redact("/local/path") == "/local/path"
    text = "cannot open s3://AK:SK@b/p?session_token=TOK: denied (also gs://u@b2/x)"
    out = storage.redact_text(text)
    assert "SK" not in out and "TOK" not in out and "AK:" not in out
    assert "s3://***@b/p?session_token=***" in out and "gs://***@b2/x" in out


@pytest.mark.parametrize("secret", ["SECRET/WITH/SLASHES", "SE:CR:ET", "SEC?RET=x&y", "SEC#RET", "S E/C"])
def test_redaction_parses_the_uri_and_holds_for_any_character_in_a_secret(secret):
    """`serray config data.root=s3://KEY:SECRET/WITH/SLASHES@bucket/p` printed the secret: a pattern
    stopped at the first '/'. The URI is now split at the last '@' of its authority and path."""
    uri = f"s3://KEYID:{secret}@bucket/p?secret_key={secret}&region=eu&unknown={secret}"
    in_text = [storage.redact_text(f"at {uri} x")] if " " not in secret else []  # free text ends a URI at a space
    for shown in (storage.redact(uri), storage.describe(uri), storage.public_name(uri), *in_text,
                  storage.without_credentials(uri)):
        assert "KEYID" not in shown and not any(part in shown for part in secret.replace("/", " ").split() if len(part) > 1), shown
    assert storage.describe(uri) == storage.public_name(uri) == "s3://bucket/p"
    assert storage.without_credentials(uri) == "s3://bucket/p?region=eu"
    assert storage.redact("s3://bucket/p?region=eu") == "s3://bucket/p?region=eu"


def test_saved_configs_and_the_config_command_hold_no_credentials(tmp_path, capsys):
    from serray.cli import main
    from serray.config import load_config, save_config

    uri = "s3://AKIDX:SECRET/X@bucket/f?secret_key=SECRETY&region=eu"
    cfg = load_config(None, [f"output_dir={tmp_path}", f"features.dir={uri}",
                             "registry.dir=s3://AKIDX:SECRET/X@bucket/reg?secret_key=SECRETY"])
    text = save_config(cfg, tmp_path).read_text()
    assert "SECRET" not in text and "AKIDX" not in text and "s3://bucket/f?region=eu" in text
    assert main(["config", f"output_dir={tmp_path}", f"features.dir={uri}"]) == 0
    out = capsys.readouterr().out
    assert "SECRET" not in out and "AKIDX" not in out
    assert main(["config", "data.root=s3://KEY:SECRET/WITH/SLASHES@bucket/p"]) == 2
    err = capsys.readouterr().err
    assert "SECRET" not in err and "SLASHES" not in err and "KEY" not in err and "data.root=s3://***@bucket/p" in err


def test_log_lines_are_redacted():
    import logging

    record = logging.LogRecord("serray.x", logging.INFO, __file__, 1, "reading %s now", ("s3://AK:SK/Z@b/p",), None)
    assert storage.RedactingFilter().filter(record)
    assert record.getMessage() == "reading s3://***@b/p now"


def test_info_shows_no_cluster_address():
    from serray.serve.service import _without_cluster_address

    cfg = {"ray": {"address": "ray://10.0.0.5:10001", "num_cpus": 2}, "seed": 0}
    assert _without_cluster_address(cfg) == {"ray": {"address": "(hidden)", "num_cpus": 2}, "seed": 0}
    assert cfg["ray"]["address"] == "ray://10.0.0.5:10001"  # the replica's own copy is untouched


def test_public_name():
    assert storage.public_name("/home/me/models/hubert-large/") == ".../hubert-large"
    assert storage.public_name("s3://AK:SK@bucket/reg?secret_key=SK") == "s3://bucket/reg"
    assert storage.public_name("facebook/hubert-large-ll60k") == "facebook/hubert-large-ll60k"  # a hub name
    assert storage.public_name("fbank") == "fbank"


def test_storage_uri_errors_carry_no_credentials():
    from serray.errors import DataError

    storage._filesystem.cache_clear()
    with pytest.raises(DataError) as e:
        storage.resolve("nosuchscheme://AKIDX:SECRETX@bucket/p?secret_key=SECRETX")
    assert "SECRETX" not in str(e.value) and "AKIDX" not in str(e.value)


def test_upload_sends_done_markers_last(tmp_path, monkeypatch):
    """On object storage a marker (meta.json, fold_result.json, entry.json, _serray_features.json)
    must not exist before what it vouches for: it is uploaded after every other file."""
    src = tmp_path / "src"
    (src / "model").mkdir(parents=True)
    for name in ("model/meta.json", "model/state.pt", "entry.json", "config.yaml", "fold_result.json", "a.csv"):
        (src / name).write_text(name)
    order = []
    real = storage.pafs.copy_files

    def spy(source, destination, **kw):
        order.append(destination.rsplit("/dest/", 1)[-1])
        return real(source, destination, **kw)

    monkeypatch.setattr(storage.pafs, "copy_files", spy)
    storage.upload(src, f"file://{tmp_path}/dest")
    markers = [i for i, n in enumerate(order) if n.rsplit("/", 1)[-1] in storage.DONE_MARKERS]
    others = [i for i, n in enumerate(order) if n.rsplit("/", 1)[-1] not in storage.DONE_MARKERS]
    assert len(order) == 6 and max(others) < min(markers), order
    assert order.index("model/meta.json") < order.index("entry.json")  # deeper markers before the top one
    assert (tmp_path / "dest" / "model" / "state.pt").read_text() == "model/state.pt"


def test_lock_without_waiting_names_the_holder(tmp_path):
    target = tmp_path / "features"
    with storage.lock(target, wait=False, what="another `serray featurize`"):
        with pytest.raises(storage.Busy) as e:
            with storage.lock(target, wait=False, what="another `serray featurize`"):
                pass
        assert "is in use by another `serray featurize`" in str(e.value) and "pid" in str(e.value)
    with storage.lock(target, wait=False):  # released
        pass


def test_readers_share_the_lock_and_a_writer_is_refused_while_they_read(tmp_path):
    target = tmp_path / "features"
    with storage.lock(target, wait=False, shared=True), storage.lock(target, wait=False, shared=True):
        with pytest.raises(storage.Busy, match="is in use by a writer"):
            with storage.lock(target, wait=False, what="a writer"):
                pass
    with storage.lock(target, wait=False, what="a writer"):
        with pytest.raises(storage.Busy, match="is in use by a reader"):
            with storage.lock(target, wait=False, shared=True, what="a reader"):
                pass
