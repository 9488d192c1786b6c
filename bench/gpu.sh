#!/usr/bin/env bash
# Runs the benchmarks (and the GPU-relevant tests) on a GPU machine that has
# jax[cuda], torch, flax and equinox installed; seqjax runs from the checkout.
#   bash bench/gpu.sh OUT_DIR STAGE...   stages: env cuda cuda-sweep tests-cuda-auto peers peers-haiku peers-highest levers levers-cmdbuf scan tests memtest flags kernels
set -u
out=${1:?usage: bench/gpu.sh OUT_DIR STAGE...}; shift
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
for stage in "$@"; do
  echo "=== $stage ($(date +%T))"
  case $stage in
    env) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
         $py -c "import jax, torch, flax; print(jax.__version__, jax.devices(), torch.__version__, flax.__version__)";;
    cuda) XLA_PYTHON_CLIENT_PREALLOCATE=false $py -m pytest -q -x -n 4 -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -30;;
    cuda-sweep) XLA_PYTHON_CLIENT_PREALLOCATE=false $py bench/cuda_sweep.py --out "$out" --name cuda_sweep_gpu ${SWEEP_ARGS:-};;
    peers) $py bench/peers.py --variants autodiff,unroll=1 --out "$out" --name peers_gpu;;
    peers-haiku)  # Haiku is not in the GPU image: install wheels carried in out/wheels (pip download dm-haiku jmp tabulate)
           $py -m pip install -q --no-deps --no-index out/wheels/*.whl && \
           $py bench/peers.py --libs seqjax,haiku --out "$out" --name peers_gpu_haiku;;
    peers-highest) $py bench/peers.py --libs seqjax --precision highest --out "$out" --name peers_gpu_highest;;
    levers) $py bench/experiments/levers.py --cells lstm,gru,rnn --reps 15 --out "$out" --name levers_gpu --candidates \
              "fused vjp,fused vjp hoist=True,fused vjp hoist=True unroll=4,fused vjp hoist=True unroll=8,fused vjp hoist=True unroll=16,scan hoist=True,scan hoist=True unroll=8";;
    levers-cmdbuf) XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL ${XLA_FLAGS:-}" \
              $py bench/experiments/levers.py --cells lstm --shapes long,standard --reps 15 --out "$out" --name levers_gpu_cmdbuf \
              --candidates "fused vjp hoist=True,fused vjp hoist=True unroll=8,scan hoist=True" || echo "levers-cmdbuf failed";;
    flags) $py - "$out/xla_gpu_flags.txt" <<'PY'
import glob, os, re, site, sys
names = set()
for root in site.getsitepackages():
    for so in glob.glob(os.path.join(root, "jax*", "**", "*.so*"), recursive=True):
        names |= set(re.findall(rb"xla_gpu_[a-z0-9_]+", open(so, "rb").read()))
open(sys.argv[1], "w").write("\n".join(sorted(n.decode() for n in names)) + "\n")
print(len(names), "xla_gpu_* names")
PY
           ;;
    kernels) for flags in "" ${KERNEL_FLAGS:-}; do
               XLA_FLAGS="${flags//;/ }" $py bench/experiments/loop_kernels.py --cells lstm,gru,rnn --shapes long,standard --out "$out" \
                 --label="${flags:-no flags}" ${KERNEL_ARGS:-} || echo "kernels failed with XLA_FLAGS=$flags"
             done;;
    scan) $py bench/scan_vs_unroll.py --unrolled-max-T 25 --out "$out" --name scan_vs_unroll_gpu;;
    memtest) XLA_PYTHON_CLIENT_PREALLOCATE=false $py -m pytest -q -p no:cacheprovider tests/test_fused.py -k memory 2>&1 | tail -5;;
    tests-cuda-auto)  # the core suite with kernel="auto" routed through seqjax.backends._cuda (tests/cuda_auto.py)
           PYTHONPATH="$PWD/tests:$PYTHONPATH" XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest \
             $py -m pytest -q -n 4 -p no:cacheprovider -p cuda_auto tests/test_cuda.py tests/test_fused.py \
             tests/test_runners.py tests/test_cells_reference.py tests/test_layers.py tests/test_nnx.py 2>&1 | tail -40;;
    tests) XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest $py -m pytest -q -n 4 -p no:cacheprovider \
             tests/test_fused.py tests/test_runners.py tests/test_cells_reference.py tests/test_layers.py \
             2>&1 | tail -40;;
    *) echo "unknown stage $stage"; exit 2;;
  esac
done
echo "=== done ($(date +%T))"
