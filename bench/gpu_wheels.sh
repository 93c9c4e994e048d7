#!/usr/bin/env bash
# Download the wheels bench/gpu.sh installs on the GPU machine (which reaches no package registry),
# and check that they fit what one device call may carry (working tree + carried paths <= 64 MiB).
#
#   bash bench/gpu_wheels.sh                                  # cp312 wheels into .whl/ (the H200 image: Python 3.12)
#   bash bench/gpu_wheels.sh --python-version 3.11 --dest /tmp/w311   # same set for a local 3.11 rehearsal
#
# Run it here, from the repository root, on a machine that reaches PyPI. `.whl/` is git-ignored.
# What the image lacks (see /work/.library/device/KINDS.md, "Python packages already there"): ray and the
# parts of its data/train/tune/serve/dashboard extras below, omegaconf, soundfile (+ cffi, pycparser).
# Versions are the ones this project's venv runs (ray 2.60.0 is the pyproject pin).
#
# ray's manylinux wheel is 79.3 MB (75.6 MiB): alone it is over the 64 MiB limit. 30.7 MiB of it is
# ray/jars/ray_dist.jar, Ray's Java worker support, which Python never loads (ray/_private/services.py
# only looks for it when a `java` binary exists and catches its absence). This script deletes that jar
# from the downloaded wheel (and its RECORD line), and the dashboard UI's JavaScript source maps (1.5 MiB,
# debugging aids): ~43.5 MiB remain; the whole set is ~58 MiB, so it fits with ~5 MiB spare.
# Nothing else is modified. Prints each wheel's size, the total, and the travelling tree's size.
set -euo pipefail

PYVER=3.12
DEST=.whl
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER="$2"; shift 2 ;;
    --dest) DEST="$2"; shift 2 ;;
    *) echo "usage: $0 [--python-version 3.12] [--dest .whl]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
LIMIT_MIB=64

PKGS=(
  ray==2.60.0
  # serray's own needs the image lacks
  omegaconf==2.4.0 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
  # ray core
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  # pydantic (train, tune, serve, dashboard)
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  # serve (fastapi's annotated-doc, starlette's anyio, uvicorn's h11 and click are in the image)
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 python-multipart==0.0.34
  # ray.serve imports grpc_reflection, whose generated code raises unless grpcio >= 1.85.1 and
  # protobuf >= 7.35.1; the image's grpcio/protobuf versions are not known here, so both travel too
  grpcio-reflection==1.85.1 grpcio==1.85.3 protobuf==7.36.2
  # the dashboard (ray/dashboard/optional_deps.py; without it: no State/Job API, Train V2 logs an error a second)
  aiohttp-cors==0.8.1 colorful==0.5.8 opencensus==0.11.4 opencensus-context==0.1.3
  google-api-core==2.44.0 google-auth==2.63.0 googleapis-common-protos==1.76.0 proto-plus==1.29.0
  pyasn1==0.6.5 pyasn1-modules==0.4.2
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-exporter-prometheus==0.66b2 opentelemetry-semantic-conventions==0.66b2
  # tune's TensorBoard logger (else a warning per run)
  tensorboardX==2.6.5
)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl   # this directory holds exactly this set: two versions of one package stop the install
PLAT=()
for p in manylinux1_x86_64 manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  PLAT+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${PLAT[@]}" -d "$DEST" "${PKGS[@]}"

# drop the Java jar from ray's wheel (and its RECORD entry)
"$PY" - "$DEST" <<'EOF'
import sys, zipfile, glob, os
(whl,) = glob.glob(os.path.join(sys.argv[1], "ray-*.whl"))
tmp = whl + ".tmp"
with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    dropped = 0
    for info in zin.infolist():
        if info.filename.startswith("ray/jars/") or info.filename.endswith(".js.map"):
            dropped += info.compress_size
            continue
        data = zin.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(l for l in data.splitlines(keepends=True)
                            if not (l.startswith(b"ray/jars/") or b".js.map," in l))
        zout.writestr(info, data)
os.replace(tmp, whl)
print(f"stripped ray/jars/ and the dashboard's *.js.map ({dropped / 2**20:.1f} MiB) from {os.path.basename(whl)}")
EOF

echo "wheels in $DEST (Python $PYVER):"
ls -l "$DEST"/*.whl | awk '{printf "  %7.2f MiB  %s\n", $5/1048576, $9}' | sort -rn
whl_b=$(cat "$DEST"/*.whl | wc -c)
tree_b=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 cat 2>/dev/null) | wc -c)
total_b=$((whl_b + tree_b))
printf 'total: wheels %.1f MiB + working tree %.1f MiB = %.1f MiB (limit %d MiB per device call)\n' \
  "$(echo "$whl_b/1048576" | bc -l)" "$(echo "$tree_b/1048576" | bc -l)" "$(echo "$total_b/1048576" | bc -l)" "$LIMIT_MIB"
if [ "$total_b" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "OVER THE LIMIT: carry fewer wheels (drop the dashboard group) or shrink the tree" >&2
  exit 1
fi
echo "fits: run on the device with carry=[\"$DEST\"]: bash bench/gpu.sh"
