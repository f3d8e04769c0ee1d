#!/bin/bash
# The official generators' per-sample timings that benches/official-tasks.json holds, on one core.
#   ROOT=/scratch/ob bash benches/official/run.sh
# ROOT gets: repo/ (InternLM/Spatial-SSRL at b313fed, cloned here if absent, with fixes.diff: the
# scripts name source_img/ where the folder is source_imgs/, and Flip.py's split_and_flip_one_patch
# needs direction=0), venv/ (opencv-python-headless numpy pillow matplotlib h5py ipython),
# results/*.json (one per task and input). Runs one at a time; about 5 minutes, position excluded
# (POSITION=1 adds it: ~4 minutes more).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
FIX=$(cd "$HERE/../../fixtures" && pwd)
: "${ROOT:?set ROOT to a scratch folder}"
mkdir -p "$ROOT/bench" "$ROOT/results"
cp "$HERE"/bench_main.py "$HERE"/common.py "$ROOT/bench/"
cd "$ROOT"
if [ ! -d repo ]; then
    git clone -q https://github.com/InternLM/Spatial-SSRL repo
    git -C repo checkout -q b313fed
    patch -p0 < "$HERE/fixes.diff"
fi
[ -x venv/bin/python ] || { python3 -m venv venv && venv/bin/pip install -q opencv-python-headless numpy pillow matplotlib h5py ipython; }
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 OFFICIAL_BENCH_ROOT="$ROOT"
PY=venv/bin/python; B=bench/bench_main.py; S=repo/data_process/source_imgs
for t in shuffle flip crop; do
    for f in "$S/RGB_img.png" "$FIX"/photos/{astronaut.png,camera.png,chelsea.png,coffee.png,rocket.jpg}; do
        n=$(basename "$f"); $PY $B $t "${t}__${n%.*}" --rgb "$f" --min-time 8 --warmup 2
    done
done
$PY $B depth depth__RGB-D_img3 --rgb $S/RGB-D_img3.png --depth $S/RGB-D_depth3.npy --mask $S/RGB-D_depth_mask3.npy --min-time 10 --warmup 2
if [ "${POSITION:-0}" = 1 ]; then
    $PY $B pos_far posfar__img1 --rgb $S/RGB-D_img1.jpg --depth $S/RGB-D_depth1.h5 --min-time 0 --min-n 5 --warmup 1
    $PY $B pos_near posnear__img2 --rgb $S/RGB-D_img2.jpg --depth $S/RGB-D_depth2.h5 --min-time 0 --min-n 5 --warmup 1
fi
