#!/usr/bin/env bash
# Builds the extension for a GPU machine whose Python environment is fixed
# and offline (this workplace's device machines: CPython 3.12 with
# torch 2.11.0+cu130, no package index). tch 0.26 is made for torch 2.13, so
# the build links the device's libtorch instead: torch 2.11's headers and
# libraries come from its wheel, and the few generated wrappers of operators
# that 2.11 lacks are patched to raise (grouploss never calls them).
#
#   benchmarks/gpu/build_for_device.sh     # -> .gpu/_native.cpython-312-x86_64-linux-gnu.so
#
# Then, on the device: copy python/ aside, put that file into its grouploss
# folder and run with PYTHONPATH pointing there (benchmarks/gpu/run_checks.sh).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${GPU_BUILD:-/tmp/grouploss-gpu-build}
torch_version=${DEVICE_TORCH:-2.11.0}
pyver=${DEVICE_PYTHON_VERSION:-3.12}
python=${DEVICE_PYTHON:-$(command -v "python$pyver" || true)}
# A pyenv shim exists for every version but only runs the selected one.
if [ -z "$python" ] || ! "$python" -c pass 2>/dev/null; then
    python=$(ls "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$pyver"*/bin/python"$pyver" | head -1)
fi
mkdir -p "$work/bin"
cd "$work"

if [ ! -d torch/lib ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
        --implementation cp --platform manylinux_2_28_x86_64 -d wheels "torch==$torch_version"
    python3 - "$work" <<'EOF'
import glob, sys, zipfile
z = zipfile.ZipFile(glob.glob(sys.argv[1] + "/wheels/torch-*.whl")[0])
z.extractall(sys.argv[1], [n for n in z.namelist() if n.startswith(("torch/include/", "torch/lib/"))])
EOF
fi
if [ ! -d torch-sys-patched ]; then
    cp -r "$(ls -d "$HOME"/.cargo/registry/src/*/torch-sys-0.26.0 | head -1)" torch-sys-patched
fi
ln -sf "$python" bin/python3

rsync -a --delete --exclude target --exclude .git --exclude '*.so' --exclude .gpu \
    --exclude runs "$repo/" src/
rm -f src/.cargo/config.toml
printf '\n[patch.crates-io]\ntorch-sys = { path = "%s/torch-sys-patched" }\n' "$work" >> src/Cargo.toml

export LIBTORCH="$work/torch" LIBTORCH_BYPASS_VERSION_CHECK=1 LIBTORCH_CXX11_ABI=1
export PYO3_PYTHON="$python" CARGO_TARGET_DIR="$work/target" PATH="$work/bin:$PATH"
for attempt in 1 2 3; do
    if (cd src && cargo build --release --features python) >build.log 2>&1; then
        mkdir -p "$repo/.gpu"
        cp target/release/libgrouploss.so "$repo/.gpu/_native.cpython-${pyver/./}-x86_64-linux-gnu.so"
        echo "built $repo/.gpu"
        exit 0
    fi
    python3 "$repo/benchmarks/gpu/patch_torch_sys.py" "$work/torch-sys-patched" build.log || break
done
tail -30 build.log
exit 1
