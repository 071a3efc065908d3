#!/usr/bin/env bash
# The CUDA tests and GPU benchmarks, in one go, on a machine with a GPU whose
# Python already has torch (see build_for_device.sh for the extension).
# Results go to $OUT (default ./gpu-results): logs and JSON figures.
#
#   benchmarks/gpu/run_checks.sh
#
# Expects .gpu/_native.cpython-3XY-x86_64-linux-gnu.so built for that Python
# and torch, and the glyphs dataset in .gpu/glyphs.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# One log (the device tool returns few files), plus JSON figures.
exec > >(tee "$out/log.txt") 2>&1

site=$(mktemp -d)
cp -r python/grouploss "$site/"
rm -f "$site"/grouploss/_native*.so
cp .gpu/_native.cpython-*.so "$site/grouploss/"
export PYTHONPATH="$site:$PWD/tests"
step() { echo "=== $* ($(date +%T))"; }

step environment
nvidia-smi | head -15
python3 -c "import torch, grouploss; print('torch', torch.__version__, torch.cuda.get_device_name(), 'grouploss', grouploss.__version__)" 2>&1

step CUDA tests
timeout 200 python3 -m pytest -q -rs -p no:cacheprovider -k "cuda or device" \
    tests/test_loss.py tests/test_metrics.py tests/test_data.py tests/test_training.py 2>&1 | tail -25

step loss benchmark
timeout 120 python3 benchmarks/bench_loss.py --device cuda --seconds 2 --json "$out/bench_loss_cuda.json" \
    2>&1 | grep -v -e USDT -e "^ERROR"

step evaluation at SOP scale
timeout 240 python3 - <<'EOF' 2>&1
import time, numpy as np, torch
from grouploss import metrics
rng = np.random.default_rng(0)
sizes = rng.integers(2, 13, size=11316)
labels = np.repeat(np.arange(len(sizes)), sizes)[:60502]
centres = rng.standard_normal((len(sizes), 512)).astype(np.float32)
x = torch.from_numpy(centres[labels] + 1.2 * rng.standard_normal((len(labels), 512)).astype(np.float32)).cuda()
y = torch.from_numpy(labels).cuda()
for include in (("recall", "map@r", "r_precision"), ("nmi",)):
    metrics.evaluate(x[:2000], y[:2000], ks=(1, 10), include=include)
    torch.cuda.synchronize()
    t = time.perf_counter()
    r = metrics.evaluate(x, y, ks=(1, 10, 100, 1000), include=include)
    torch.cuda.synchronize()
    print(f"{include}: {time.perf_counter() - t:.2f} s, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, {r}")
EOF

step training on glyphs
for bf16 in --no-bf16 --bf16; do
    timeout 150 python3 -m grouploss.cli train --preset glyphs --data-root .gpu/glyphs --device cuda \
        --epochs 2 --num-workers 8 --quiet $bf16 --out-dir "$out/run-glyphs$bf16" 2>&1 | tail -12
done
cp "$out"/run-glyphs--bf16/metrics.jsonl "$out/train_glyphs_bf16_metrics.jsonl" 2>/dev/null
cp "$out"/run-glyphs--no-bf16/metrics.jsonl "$out/train_glyphs_fp32_metrics.jsonl" 2>/dev/null
rm -rf "$out"/run-glyphs*

if [ -f benchmarks/bench_ddp.py ]; then
    step data-parallel scaling
    timeout 150 python3 benchmarks/bench_ddp.py --device cuda --json "$out/bench_ddp_cuda.json" 2>&1 | tail -20
fi
step done
