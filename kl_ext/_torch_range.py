"""The torch versions kl_ext supports, stated once: setup.py and .ci/run read MIN and MAX (CI tests both
ends), and importing kl_ext checks them. Outside the range compiled gradients are not known to be right (torch
2.11 needed a workaround to give nonzero ones), so the import refuses rather than risk silently wrong training."""
import os
import re

import torch

MIN = (2, 11)
MAX = (2, 14)
REQUIREMENT = f"torch>={MIN[0]}.{MIN[1]},<{MAX[0]}.{MAX[1] + 1}"
OVERRIDE = "KL_EXT_ALLOW_UNTESTED_TORCH"


def check(version: str) -> None:
    """Raise ImportError unless torch `version` (e.g. "2.11.0+cu130") is in [MIN, MAX] or OVERRIDE=1 is set."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or os.environ.get(OVERRIDE) == "1":
        return
    if not MIN <= (int(m.group(1)), int(m.group(2))) <= MAX:
        raise ImportError(
            f"kl_ext supports torch {MIN[0]}.{MIN[1]} - {MAX[0]}.{MAX[1]}, and this is torch {version}. Install a "
            f"supported torch (pip install '{REQUIREMENT}') and rebuild kl_ext against it, or set {OVERRIDE}=1 to "
            f"try this one untested (check compiled gradients against eager: tests/test_compile.py).")


check(torch.__version__)
