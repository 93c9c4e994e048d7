#!/usr/bin/env python
"""Make a Python environment here that has only what the GPU image has, to rehearse ``bench/gpu.sh``'s
offline install and every part with ``--cpu-smoke`` before spending device time.

    python bench/gpu_imagelike.py /tmp/imgtest          # a venv + a symlink farm of the image's packages
    bash bench/gpu_wheels.sh --python-version 3.11 --dest /tmp/imgtest/wheels
    PYTHON=/tmp/imgtest/venv/bin/python SITE=/tmp/imgtest/site OUT=/tmp/imgtest/out \\
        bash bench/gpu.sh --cpu-smoke --wheels /tmp/imgtest/wheels --work /tmp/imgtest/work --budget 3000

The farm links, from this project's venv (the interpreter running this script), every distribution whose
name is in the GPU image's package list (``/work/.library/device/KINDS.md``, "Python packages already
there"), plus this venv's own names for httpx/httpcore (``httpx2``, ``httpcore2``, ``truststore``). A new
venv (no system site-packages) sees the farm through a ``.pth`` file. So ``ray``, ``omegaconf``,
``soundfile``, ``pydantic``, ``fastapi``... are missing exactly as on the GPU machine, and only the wheels
that ``gpu_wheels.sh`` downloads can supply them. What it cannot show: version clashes with the image's own
versions (the farm has this venv's versions), and anything CUDA.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

KINDS = Path("/work/.library/device/KINDS.md")
ALIASES = {"httpx2", "httpcore2", "truststore"}  # this venv's httpx / httpcore and their needs


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> int:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    out = Path(sys.argv[1]).resolve()
    farm, venv = out / "imagelike", out / "venv"
    site = Path(sysconfig.get_paths()["purelib"])
    listed = KINDS.read_text().split("Packages:", 1)[1].strip().split("\n")[0].strip().rstrip(".")
    image = {norm(x.strip()) for x in listed.split(",")} | ALIASES
    owners: dict = {}
    included = set()
    for d in md.distributions(path=[str(site)]):
        name = norm(d.metadata["Name"])
        if name in image:
            included.add(name)
        for f in d.files or []:
            parts = Path(f).parts
            if parts and parts[0] != "..":
                for depth in (1, 2):
                    if len(parts) >= depth:
                        owners.setdefault(parts[:depth], set()).add(name)

    def link(parts) -> None:
        dst = farm.joinpath(*parts)
        if not (dst.exists() or dst.is_symlink()):
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(site.joinpath(*parts), dst)

    farm.mkdir(parents=True, exist_ok=True)
    left_out = set()
    for key, names in owners.items():
        if len(key) != 1:
            continue
        if names <= included:
            link(key)
        elif names & included:  # a namespace folder shared with packages the image lacks (google/...)
            for k2, n2 in owners.items():
                if len(k2) == 2 and k2[0] == key[0] and n2 <= included:
                    link(k2)
        else:
            left_out |= names
    if not venv.exists():
        subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", str(venv)], check=True)
    pth = next(venv.glob("lib/python3*/site-packages")) / "imagelike.pth"
    pth.write_text(str(farm) + "\n")
    print(f"{venv}/bin/python sees {len(included)} of the image's distributions; missing there as on the GPU "
          f"machine: {', '.join(sorted(left_out - included))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
