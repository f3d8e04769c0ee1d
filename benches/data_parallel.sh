#!/usr/bin/env bash
# Data parallel on this machine: the same GRPO run (same global batch, same steps) as one
# process and as N MPI ranks side by side, with each phase's mean seconds per step (the first
# step left out as warm-up) and the ratio. Needs `make mpi` (Open MPI) and the mpi build.
#
#   benches/data_parallel.sh [MODEL] [RANKS] [STEPS] [PROMPTS]
#   benches/data_parallel.sh models/tiny 2 6 8              (the default)
#   benches/data_parallel.sh real/f32-3b-l2 2 3 4           (3B widths, 2 layers)
#
# The rank count and prompts per step are free; each rank runs ONNX Runtime on its share of the
# machine's cores (RANKS processes on a 2-core machine share those 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/tiny}
ranks=${2:-2}
steps=${3:-6}
prompts=${4:-8}
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/vendor/ort/libonnxruntime.so}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cargo build --release --locked --features mpi -q
ssrl=$PWD/target/release/ssrl
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$ssrl tasks --images fixtures/photos --rgbd fixtures/rgbd --out "$work/data" --per-image 2 \
    --seed 0 >/dev/null 2>&1
lora=$(python3 -c "import json,sys; m=json.load(open('$model/manifest.json'))['lora']; \
print(m['rank'], m['alpha'], ','.join(m['targets']))")
for how in one dp; do
    cat > "$work/$how.toml" <<EOF
model = "$PWD/$model"
out = "$work/$how"
[data]
train_files = ["$work/data"]
rollout_batch_size = $prompts
max_response_length = 32
min_pixels = 3136
max_pixels = 200704
[rollout]
n = 4
[actor]
global_batch_size = $((prompts / 2))
micro_batch_size_per_device_for_update = 4
micro_batch_size_per_device_for_experience = 8
[trainer]
max_steps = $steps
val_before_train = false
val_freq = 0
save_freq = 0
kernels = "cpu"
EOF
done
echo "model $model (LoRA rank/alpha/targets: $lora), $prompts prompts × 4 samples a step, $steps steps"
/usr/bin/time -f "one process: %e s, peak RSS %M KB" $ssrl train --config "$work/one.toml" \
    >/dev/null 2>"$work/one.err" || { cat "$work/one.err"; exit 1; }
tail -1 "$work/one.err"
/usr/bin/time -f "$ranks ranks: %e s, peak RSS %M KB (the largest rank)" \
    mpirun -np "$ranks" --oversubscribe "$ssrl" train --config "$work/dp.toml" \
    >/dev/null 2>"$work/dp.err" || { cat "$work/dp.err"; exit 1; }
tail -1 "$work/dp.err"
python3 - "$work/one/metrics.jsonl" "$work/dp/metrics.jsonl" "$ranks" <<'EOF'
import json, sys
def phases(path):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    rows = [r for r in rows if "timing_s/step" in r][1:]  # the first step warms up
    keys = sorted({k for r in rows for k in r if k.startswith("timing_s/")})
    return {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in keys}, rows
one, r1 = phases(sys.argv[1])
dp, r2 = phases(sys.argv[2])
print(f"{'s/step (mean of ' + str(len(r1)) + ')':<24} {'1 process':>10} {sys.argv[3] + ' ranks':>10} {'ratio':>7}")
for k in sorted(set(one) | set(dp)):
    a, b = one.get(k), dp.get(k)
    ratio = f"{a / b:.2f}×" if a and b else "-"
    fa = f"{a:.3f}" if a is not None else "-"
    fb = f"{b:.3f}" if b is not None else "-"
    print(f"{k[9:]:<24} {fa:>10} {fb:>10} {ratio:>7}")
same = all(abs(x["reward/overall"] - y["reward/overall"]) < 1e-12 for x, y in zip(r1, r2))
print("rewards step by step equal:", same)
EOF
