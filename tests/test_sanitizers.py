"""Proof that the sanitizer stage (scripts/sanitize.sh, `make sanitize`) can fail: the emulated CUDA kernels with a
bug put in on purpose, each built with the sanitizer that must report it, run on a case that reaches the bug.

* a cluster reduction without the cluster_sync between each block publishing its value and every block reading all
  of them: ThreadSanitizer reports a data race (the write and the other blocks' reads are unordered);
* the held-row loader reading one pack past the row (`j <= npacks`): AddressSanitizer reports a heap-buffer-overflow
  on the last row.

Each mutant is a copy of csrc/ with the one change, built as the sanitizer stage builds the emulator and run in a fresh Python that preloads the sanitizer's runtime. Run by scripts/sanitize.sh
(KL_EXT_SANITIZE_MUTANTS=1); skipped in `make test`, whose Python has no sanitizer runtime to spare the build time.
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(os.environ.get("KL_EXT_SANITIZE_MUTANTS") != "1",
                                reason="sanitizer mutants run in `make sanitize` (KL_EXT_SANITIZE_MUTANTS=1)")

RUNTIME = {"address": "libasan.so", "thread": "libtsan.so"}
MUTANTS = {
    "no-cluster-barrier": dict(
        sanitizer="thread", file="csrc/cuda/kl_div_with_logits.cuh",
        change=("  if (threadIdx.x == 0) mine[0] = v;\n  cluster_sync();\n", "  if (threadIdx.x == 0) mine[0] = v;\n"),
        # fp32 V = 9000: eight packs per thread over a cluster of two blocks (tests/test_cuda_emulated.py's shapes)
        case=(2, 9000), call='divergence_with_logits_fwd(x, t, None, "logits", 1.0, "jsd", 0.5, True, False, None)',
        expect="ThreadSanitizer: data race"),
    "read-past-the-row": dict(
        sanitizer="address", file="csrc/cuda/kl_div_with_logits.cuh",
        change=("    if (j < npacks) {\n      px[k] = xr[j];", "    if (j <= npacks) {\n      px[k] = xr[j];"),
        # fp32 V = 1000: 250 packs held one per thread by 256 threads; thread 250 reads the pack after the last row
        case=(2, 1000), call='kl_div_with_logits_fwd(x, t, None, "logits", 1.0, "forward", True, False, None)',
        expect="AddressSanitizer: heap-buffer-overflow"),
}

RUN = """
import os, sys, torch
sys.path.insert(0, os.path.join({root!r}, "tests"))
import conftest
ops = conftest.build_emulator({sanitizer!r}, source={source!r}, name="kl_ext_emu_mutant")
ops.set_device(1, True)
x, t = torch.randn({rows}, {V}), torch.randn({rows}, {V})
ops.{call}
print("the mutant ran without a report")
"""


def runtime(sanitizer):
    path = subprocess.run(["gcc", f"-print-file-name={RUNTIME[sanitizer]}"], capture_output=True, text=True).stdout
    path = path.strip()
    if not os.path.isabs(path):
        pytest.skip(f"gcc has no {RUNTIME[sanitizer]}")
    return path


@pytest.mark.parametrize("name", list(MUTANTS))
def test_sanitizer_reports_the_mutant(name, tmp_path):
    m = MUTANTS[name]
    source = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "csrc"), source / "csrc")
    old, new = m["change"]
    text = (source / m["file"]).read_text()
    assert text.count(old) == 1, f"{m['file']} no longer has the line the mutant changes: update {name}"
    (source / m["file"]).write_text(text.replace(old, new))
    rows, V = m["case"]
    code = RUN.format(root=ROOT, sanitizer=m["sanitizer"], source=str(source), rows=rows, V=V,
                       call=m["call"])
    env = {**os.environ, "LD_PRELOAD": runtime(m["sanitizer"]), "ASAN_OPTIONS": "detect_leaks=0",
           "TSAN_OPTIONS": "halt_on_error=1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = r.stdout + r.stderr
    assert r.returncode != 0 and m["expect"] in report, f"{name} not reported:\n{report[-3000:]}"
    # The report names the code the mutant changed.
    assert "kl_div_with_logits.cuh" in report, report[-3000:]
    print(report[report.index(m["expect"]) - 100:][:1500])
