"""Run every benchmark in bench/ in turn and print their numbers (what `make bench` runs).

Results worth keeping go into docs/benchmarks.md together with this command.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHES = ("allocator_bench.py", "plugin_bench.py", "gfd_bench.py")


def main() -> int:
    """Run each benchmark script with this interpreter; return non-zero if any failed."""
    here = Path(__file__).resolve().parent
    failed = []
    for name in BENCHES:
        print(f"=== {name}", flush=True)
        result = subprocess.run([sys.executable, str(here / name)], check=False)
        if result.returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
