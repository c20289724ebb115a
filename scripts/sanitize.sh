#!/usr/bin/env bash
# memcheck and racecheck without a GPU (`make sanitize`): what compute-sanitizer checks on a GPU, without one.
#   1. the C++ CPU kernels built with AddressSanitizer + UndefinedBehaviorSanitizer (a copy of the tree, portable
#      kernels): their float64-reference tests (every op, dtype pair, strided and mixed inputs, empty and V = 1 rows,
#      masks, opcheck);
#   2. the CUDA kernels in the emulator (tests/cuda_emu) built with ASan + UBSan, then with ThreadSanitizer: the
#      emulated-kernel tests (every launch path: held in 1 - 8 packs, clusters of 2 - 16 blocks and their
#      distributed-shared-memory reductions, streamed, vocab-parallel modes, the sparse teacher, Bernoulli / BCE);
#   3. proof that it can fail: two mutants (a removed cluster barrier, a read past the row) must be reported
#      (tests/test_sanitizers.py).
# Each sanitizer's runtime is preloaded into an ordinary Python; leak checking is off (CPython and torch keep
# their allocations to exit). Suppressions: none are needed today.
set -euo pipefail
cd "$(dirname "$0")/.."
py="$(pwd)/.venv/bin/python"
# libstdc++ preloaded after libasan: ASan's __cxa_throw interceptor needs it present at start (python does not link
# it), or the first C++ exception (a TORCH_CHECK) aborts.
asan="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
tsan="$(gcc -print-file-name=libtsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export TSAN_OPTIONS=halt_on_error=1
# A sanitizer's report ends the process; pytest's capture (and xdist's workers) would swallow it: logs under build/.
export ASAN_OPTIONS="$ASAN_OPTIONS:log_path=$(pwd)/build/sanitize-asan" TSAN_OPTIONS="$TSAN_OPTIONS log_path=$(pwd)/build/sanitize-tsan"
export UBSAN_OPTIONS="$UBSAN_OPTIONS:log_path=$(pwd)/build/sanitize-ubsan"
rm -f build/sanitize-asan.* build/sanitize-tsan.* build/sanitize-ubsan.*
trap 'for f in build/sanitize-asan.* build/sanitize-tsan.* build/sanitize-ubsan.*; do [ -e "$f" ] && { echo "--- $f"; head -60 "$f"; }; done' EXIT
start=$SECONDS
say() { echo "sanitize: $1 ($((SECONDS - start)) s)"; }
mkdir -p build

# Builds, side by side on the two cores: the CPU kernels (two compilers) and the two emulator builds.
cpu=build/sanitize-cpu
rm -rf "$cpu" && mkdir -p "$cpu"
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$cpu"
(cd "$cpu" && KL_EXT_NO_CUDA=1 KL_EXT_CPU_CAPABILITIES=default KL_EXT_CXX_OPT=-O0 KL_EXT_SANITIZE=address,undefined \
    MAX_JOBS=2 "$py" setup.py -q build_ext --inplace) > build/sanitize-cpu.log 2>&1 &
cpu_build=$!
emulator() {  # build (and load, so under its runtime) the emulated kernels with sanitizer $1
    LD_PRELOAD="$2" KL_EXT_EMU_SANITIZE="$1" "$py" -c \
        "import sys; sys.path[:0] = ['tests', '.']; import conftest; conftest.build_emulator('$1')"
}
emulator address "$asan" > build/sanitize-emu-address.log 2>&1 || { tail -30 build/sanitize-emu-address.log; exit 1; }
say "emulated kernels built with ASan + UBSan"
emulator thread "$tsan" > build/sanitize-emu-thread.log 2>&1 || { tail -30 build/sanitize-emu-thread.log; exit 1; }
say "emulated kernels built with TSan"
wait "$cpu_build" || { tail -30 build/sanitize-cpu.log; echo "sanitize: the CPU build failed" >&2; exit 1; }
say "CPU kernels built with ASan + UBSan"

CPU_TESTS="tests/test_kl_div_with_logits.py tests/test_jsd_with_logits.py tests/test_sparse_kl_div_with_logits.py
  tests/test_bernoulli_kl_div_with_logits.py tests/test_tvd_and_skew_kl.py tests/test_mixed_dtypes.py
  tests/test_row_layouts.py tests/test_zero_targets.py tests/test_scale_grad.py tests/test_opcheck.py"
# The emulated kernels: each kernel and launch path once (a CUDA thread is an OS thread, so a block is hundreds of
# threads under the sanitizer, 3 - 10x slower than plain: the whole emulated suite would take an hour). Both
# sanitizers: the row engine's launch paths for the KL's policy and the divergences' (held in 1 - 8 packs, clusters
# of 2 - 16 blocks and their distributed-shared-memory reductions, streamed, 1-element packs, blocks looping over
# rows: test_each_launch_path, float32), edge rows, the sparse teacher, a vocab-parallel mode, Bernoulli / BCE (rows
# per warp lane group and streamed). ASan also the bfloat16 packs (8 per 16 bytes) and the widest cluster (8 blocks
# of 512 threads). Races do not depend on the pack width: TSan runs float32 only.
E=tests/test_cuda_emulated.py
EMU_TESTS=(
    "$E::test_each_launch_path[kl_div_with_logits_fwd-torch.float32]"
    "$E::test_each_launch_path[divergence_with_logits_fwd-torch.float32]"
    "$E::test_kl_kernels_edge_rows"
    "$E::test_sparse_kernels_forward_only_bad_indices_and_determinism"
    "$E::test_vocab_parallel_modes_match_cpu[resident-logits-divergence_with_logits_fwd]"
    "$E::test_bernoulli_kernels_match_reference[17-37-bce_pos_weight-torch.float32]"
    "$E::test_bernoulli_kernels_match_reference[4-1000-bce_pos_weight-torch.float32]"
)
ASAN_ONLY=(
    "$E::test_each_launch_path[kl_div_with_logits_fwd-torch.bfloat16]"
    "$E::test_each_launch_path[divergence_with_logits_fwd-torch.bfloat16]"
    "$E::test_kl_kernels_widest_cluster"
)
# Inductor would run its compiler under the runtime: the torch.compile tests stay in the ordinary suite.
(cd "$cpu" && LD_PRELOAD="$asan" "$py" -m pytest -q -n 2 $CPU_TESTS \
    -k "cpu and not triton and not compile and not emu and not cuda")
say "CPU kernels under ASan + UBSan"
LD_PRELOAD="$asan" KL_EXT_EMU_SANITIZE=address "$py" -m pytest -q -n 2 "${EMU_TESTS[@]}" "${ASAN_ONLY[@]}"
say "emulated CUDA kernels under ASan + UBSan"
# torch's own OpenMP threads (the reference's ops) are not instrumented: TSan cannot see libgomp's barriers and
# would report torch's internals; one thread there, the emulator's threads are std::threads.
OMP_NUM_THREADS=1 LD_PRELOAD="$tsan" KL_EXT_EMU_SANITIZE=thread "$py" -m pytest -q -n 2 "${EMU_TESTS[@]}"
say "emulated CUDA kernels under TSan"
KL_EXT_SANITIZE_MUTANTS=1 "$py" -m pytest -q -n 2 tests/test_sanitizers.py
say "the mutants reported"
