"""`make setup`'s build step: `pip install -v --no-build-isolation -e .` with a line per compiled unit instead of
minutes of silence (pip -q) or pages of compiler command lines (pip -v). The whole log goes to build/install.log;
on failure its end is printed.

    python scripts/build.py            # from the repository root, with the venv's python
"""
import os
import re
import subprocess
import sys
import time

LOG = os.path.join("build", "install.log")
# ninja's progress: "[3/7] c++ -MMD ... -c /abs/csrc/x.cpp -o /tmp/.../kl_ext._cpu_avx2/csrc/x.o ..." (nvcc alike)
UNIT = re.compile(r"^\s*\[(\d+)/(\d+)\] .*?-c (\S+) -o (\S+)")
MODULE = re.compile(r"(kl_ext\._\w+)")


def main() -> int:
    os.makedirs("build", exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "-e", "."]
    start, said = time.monotonic(), set()
    print(f"kl_ext build: {' '.join(cmd[2:])} (log: {LOG})", flush=True)
    with open(LOG, "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                 bufsize=1) as proc:
        for line in proc.stdout:
            log.write(line)
            unit = UNIT.match(line)
            if unit:
                done, total, src, obj = unit.groups()
                module = MODULE.search(obj)
                print(f"  {time.monotonic() - start:5.0f} s  {module.group(1) if module else ''} [{done}/{total}] "
                      f"{os.path.relpath(src)}", flush=True)
            elif line.lstrip().startswith("kl_ext:") and line.strip() not in said:
                # setup.py's own lines (what is built, and why), once: pip runs setup.py twice
                said.add(line.strip())
                print(f"  {line.strip()}", flush=True)
    took = time.monotonic() - start
    if proc.returncode != 0:
        with open(LOG) as f:
            sys.stdout.write("".join(f.readlines()[-60:]))
        print(f"kl_ext build: FAILED after {took:.0f} s (pip exit {proc.returncode}); the whole log: {LOG}")
        return proc.returncode
    print(f"kl_ext build: done in {took:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
