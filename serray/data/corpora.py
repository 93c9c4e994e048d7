"""The corpora serray reads, by ``data.corpus`` name, and the manifest of the configured one.

A corpus is a module beside its peers that defines ``CORPUS`` (:class:`serray.data.corpus.Corpus`);
adding one is a module plus a line here.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Dict, List, Tuple

from serray.data.corpus import LABELS, Corpus, ManifestReport, cfg_get, class_setting
from serray.errors import ConfigError, DataError

#: ``data.corpus`` -> the module that defines it.
MODULES: Dict[str, str] = {
    "iemocap": "serray.data.iemocap",
    "crema-d": "serray.data.crema_d",
    "ravdess": "serray.data.ravdess",
    "emodb": "serray.data.emodb",
    "msp-podcast": "serray.data.msp_podcast",
    "csv": "serray.data.labelled_csv",
    "pooled": "serray.data.pooled",  # several of the above in one run (data.corpora)
}
NAMES: List[str] = list(MODULES)


def get(name: str) -> Corpus:
    """The corpus called ``name``; a ConfigError listing the known ones otherwise."""
    if name not in MODULES:
        raise ConfigError(f"data.corpus: unknown corpus {name!r}; known: {', '.join(NAMES)}")
    return importlib.import_module(MODULES[name]).CORPUS


def of(cfg) -> Corpus:
    """The corpus of a run's config."""
    return get(str(cfg_get(cfg.data, "corpus", "iemocap") or "iemocap"))


def build_manifest(cfg, root=None) -> ManifestReport:
    """Parse ``data.root`` (or ``root``) as ``data.corpus`` into a manifest report (unlabelled rows
    kept when ``pretrain.use_unlabelled``)."""
    return of(cfg).build(root or cfg.data.root, cfg.data, keep_unlabelled=bool(cfg.pretrain.use_unlabelled))


def classes_of(cfg) -> Tuple[str, ...]:
    """The run's classes in index order (``data.classes``): those its manifest was built with.

    Raises:
        DataError: the manifest was built for another ``data.classes`` than the config asks for (run
            ``serray manifest`` or the pipeline again).
    """
    from serray.data.iemocap import manifest_classes

    setting = class_setting(cfg.data)
    path = Path(str(cfg.data.manifest))
    if not path.is_file():
        if setting == "four":
            return LABELS
        raise DataError(f"manifest not found: {path} (run `serray manifest` first)")
    classes, built = manifest_classes(path)
    wanted = setting if isinstance(setting, str) else "list"
    if built != wanted or (wanted == "list" and tuple(setting) != classes):
        asked = setting if isinstance(setting, str) else list(setting)
        raise DataError(f"the manifest {path} holds the classes of data.classes={built} ({list(classes)}); this "
                        f"config asks for data.classes={asked}: build it again (`serray manifest`, or the pipeline)")
    return classes
