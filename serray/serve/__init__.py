"""Ray Serve HTTP endpoint (``serray serve``): see :mod:`serray.serve.app`.

``build_app``, ``run_server`` and ``app_builder`` are imported lazily, so importing
``serray.serve.parsing`` or ``serray.serve.service`` does not import Ray Serve.
"""

from __future__ import annotations

__all__ = ["app_builder", "build_app", "run_server"]


def __getattr__(name):
    if name in __all__:
        from serray.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'serray.serve' has no attribute {name!r}")
