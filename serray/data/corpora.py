"""The corpora serray reads, by ``data.corpus`` name, and the manifest of the configured one.

A corpus is a module beside its peers that defines ``CORPUS`` (:class:`serray.data.corpus.Corpus`);
adding one is a module plus a line here.
"""

from __future__ import annotations

import importlib
from typing import Dict, List

from serray.data.corpus import Corpus, ManifestReport, cfg_get
from serray.errors import ConfigError

#: ``data.corpus`` -> the module that defines it.
MODULES: Dict[str, str] = {
    "iemocap": "serray.data.iemocap",
    "crema-d": "serray.data.crema_d",
    "ravdess": "serray.data.ravdess",
    "emodb": "serray.data.emodb",
    "msp-podcast": "serray.data.msp_podcast",
    "csv": "serray.data.labelled_csv",
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
