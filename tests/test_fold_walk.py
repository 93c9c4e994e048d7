"""One fold's walk through the modules (``tools/fold_walk.py``, the figures of docs/code.md): the fold's
module visits each room once where it can, and nothing climbs to a higher floor but the tracking service."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "fold_walk.py"


@pytest.mark.slow
def test_one_fold_walks_each_room_once_where_it_can(tmp_path):
    out = subprocess.run([sys.executable, str(TOOL), "--json"], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout[out.stdout.index("{"):])
    # the figures docs/code.md gives for this tree
    assert (res["hub_stays"], res["hub_rooms"], res["climbs"]) == (12, 9, 3), res["hub_walk"]
    twice = {m for m, n in res["hub_visits"].items() if n > 1}
    # a task's own rooms (its base class, then its kind) and the feature store's hold, entered and left
    assert twice <= {"serray.train.tasks", "serray.train.tasks.categorical", "serray.data.features.featurize"}
    assert "serray.predict" not in res["visits"]  # the test split is scored on the training floor
    assert all(c.split(" -> ")[1].startswith("serray.tracking.") for c in res["climb_calls"])
