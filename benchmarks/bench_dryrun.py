"""dryrun: seconds of ``snakemake -n`` on the repository's config.yaml building the demo and
depth studies (``--config run=[demo,depth]``), over the seconds of ``snakemake --version``
(starting Python and importing Snakemake: the least any snakemake command costs).

Both run as subprocesses of ``.venv/bin/snakemake`` from the repository root, alternately,
best of REPEATS each. The dry run parses the Snakefile, validates the config, expands the
grids and builds the job DAG; its job count is printed before the ratio.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from _bench import report

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
DRY = [SNAKEMAKE, "-n", "--config", "run=[demo,depth]"]
VERSION = [SNAKEMAKE, "--version"]
REPEATS = 3


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return seconds, r.stdout + r.stderr


def main() -> None:
    dry = base = float("inf")
    out = ""
    for _ in range(REPEATS):
        t, out = timed(DRY)
        dry = min(dry, t)
        base = min(base, timed(VERSION)[0])
    totals = re.findall(r"^total\s+(\d+)\s*$", out, flags=re.MULTILINE)
    if not totals:
        raise SystemExit(f"no job count in the dry run's output:\n{out}")
    print(f"snakemake --version: {base:.2f} s")
    print(f"snakemake -n --config run=[demo,depth]: {dry:.2f} s")
    print(f"jobs: {totals[-1]}")
    report("dryrun", dry / base, "dry-run seconds over snakemake --version seconds")


if __name__ == "__main__":
    main()
