"""Ray job entrypoint: `serray serve` (see README, "Running on a Ray cluster").

    ray job submit --working-dir . -- python jobs/serve.py --config configs/base.yaml key=value ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir of `ray job submit`

from serray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
