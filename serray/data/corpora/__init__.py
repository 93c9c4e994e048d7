"""The corpora serray reads, by ``data.corpus`` name, and the manifest of the configured one.

A corpus is a module beside its peers that defines ``CORPUS`` (:class:`serray.data.corpora.base.Corpus`);
adding one is a module plus a line here.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Dict, List, Tuple

from serray.data.corpora.base import LABELS, Corpus, ManifestReport, cfg_get, class_setting
from serray.errors import ConfigError, DataError

#: ``data.corpus`` -> the module that defines it.
MODULES: Dict[str, str] = {
    "iemocap": "serray.data.corpora.iemocap",
    "crema-d": "serray.data.corpora.crema_d",
    "ravdess": "serray.data.corpora.ravdess",
    "emodb": "serray.data.corpora.emodb",
    "msp-podcast": "serray.data.corpora.msp_podcast",
    "csv": "serray.data.corpora.labelled_csv",
    "pooled": "serray.data.corpora.pooled",  # several of the above in one run (data.corpora)
}
NAMES: List[str] = list(MODULES)

#: where the built-in corpus of each layout lives under ``output_dir/synthetic/`` (the default ``data.root``
#: of a run of that corpus, and of a pooled run's members without a root under ``<name>-<i>/``)
RELEASE_DIRS: Dict[str, str] = {"iemocap": "IEMOCAP_full_release", "crema-d": "CREMA-D", "ravdess": "RAVDESS",
                                "emodb": "emodb", "msp-podcast": "MSP-Podcast", "csv": "csv/labels.csv",
                                "pooled": "pooled"}


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
    from serray.data.corpora.base import manifest_classes

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
