"""The corpus a run reads: the built-in synthetic corpus made when the config asks for it (in the
layout of ``data.corpus``, or of each member of a pooled run), and the manifest written.

Every stage that reads a corpus (``serray pipeline``, ``ablate``, ``tune``, ``evaluate``) starts here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from serray import storage
from serray.config import as_dict
from serray.data import corpora
from serray.data.corpora.base import class_setting, write_manifest
from serray.data.features.featurize import check_corpus, stored_identity
from serray.errors import DataError


def synthetic_kwargs(cfg, layout: Optional[str] = None) -> dict:
    """``make_corpus`` keyword arguments from the ``synthetic`` section (``layout``: the corpus it is written
    as, default ``data.corpus``)."""
    from serray.data.synthetic.layouts import native_classes

    kw = as_dict(cfg.synthetic)
    kw.pop("enabled", None)
    if kw.get("classes") is None:  # the four, unless the run asks for more: then every class its layout has
        kw.pop("classes", None)
        if class_setting(cfg.data) != "four" and kw.get("preset", "demo") == "demo":
            kw["classes"] = native_classes(layout or str(cfg.data.corpus))
    return kw


def make_synthetic(cfg, root: Path, layout: str) -> Path:
    """The synthetic corpus in ``layout`` at ``root`` (a ``csv`` root names the CSV inside the folder)."""
    if layout == "iemocap":
        from serray.data.synthetic import make_corpus

        return make_corpus(root, **synthetic_kwargs(cfg), progress=True)
    from serray.data.synthetic.layouts import make_layout

    return make_layout(root.parent if layout == "csv" and root.suffix == ".csv" else root, layout,
                       **synthetic_kwargs(cfg))


def is_builtin_root(cfg, root: Path) -> bool:
    """Whether ``root`` is where the built-in synthetic corpus lives: under ``output_dir/synthetic``
    (the default ``data.root`` and the shipped configs'); a corpus a config names elsewhere is never
    replaced by a synthetic one."""
    base = (Path(cfg.output_dir) / "synthetic").resolve()
    return root.resolve() == base or base in root.resolve().parents


def makes_synthetic(cfg) -> bool:
    """Whether :func:`prepare_corpus` will make the built-in corpus (enabled, missing, under
    ``output_dir/synthetic``): its oracle and unlabelled pool do not exist yet."""
    root = Path(cfg.data.root)
    return str(cfg.data.corpus) != "pooled" and bool(cfg.synthetic.enabled) and not root.exists() and is_builtin_root(cfg, root)


def prepare_corpus(cfg, echo: Callable[[str], Any] = print):
    """Make the synthetic corpus (in ``data.corpus``'s layout) when enabled and missing; build and
    write the manifest."""
    stored = stored_identity(cfg.features.dir)  # another corpus's store: refused before its manifest is replaced
    if stored is not None:
        check_corpus(stored, cfg, f"features.dir {storage.describe(cfg.features.dir)}")
    root = Path(cfg.data.root)
    if str(cfg.data.corpus) == "pooled":
        _make_pooled_synthetic(cfg, echo)
    elif cfg.synthetic.enabled and not root.exists():
        if not makes_synthetic(cfg):
            raise DataError(f"{corpora.of(cfg).title} root not found: {root} (data.root). serray makes its synthetic "
                            f"corpus only under output_dir/synthetic/ ({Path(cfg.output_dir) / 'synthetic'}), never in "
                            "place of a corpus a config names: check the path, or run `serray make-corpus --out DIR`")
        echo(f"making the synthetic corpus in {root} ({cfg.data.corpus} layout)")
        make_synthetic(cfg, root, str(cfg.data.corpus))
    report = corpora.build_manifest(cfg, root)
    write_manifest(report.kept, cfg.data.manifest, report.classes, report.class_setting)
    echo(f"manifest: {len(report.kept)} utterances -> {cfg.data.manifest}")
    echo(report.summary())
    return report


def _make_pooled_synthetic(cfg, echo: Callable[[str], Any]) -> None:
    """The built-in corpus of each member of a pooled run that is missing (under ``output_dir/synthetic``), in
    its layout and with its own voices (``synthetic.seed`` + the member's position): no two members share
    a speaker or a recording."""
    from serray.data.corpora.pooled import members
    from serray.data.synthetic.layouts import make_layout

    for m in members(cfg.data):
        root = Path(m["root"])
        if root.exists():
            continue
        if not (cfg.synthetic.enabled and is_builtin_root(cfg, root)):
            raise DataError(f"{m['corpus']} root not found: {root} (data.corpora[{m['index'] - 1}].root)")
        if cfg.synthetic.preset != "demo":
            raise DataError("a pooled run makes its built-in corpora with the demo preset only (synthetic.preset=demo)")
        echo(f"making the synthetic corpus in {root} ({m['corpus']} layout, synthetic.seed={cfg.synthetic.seed + m['index']})")
        kw = {**synthetic_kwargs(cfg, m["corpus"]), "seed": int(cfg.synthetic.seed) + m["index"]}
        make_layout(root.parent if m["corpus"] == "csv" else root, m["corpus"], **kw)
