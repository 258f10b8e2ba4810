"""Every benchmark, one after the other (peers only with --peers): `python benchmarks/all.py [--quick] [--peers]`.

Each script also runs alone; see benchmarks/README.md. Flags other than --peers are passed to every script.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bare.py", "throughput.py", "ratelimit.py", "cached.py", "startup.py", "memory.py"]


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--peers"]
    scripts = SCRIPTS + (["peers.py"] if "--peers" in sys.argv[1:] else [])
    failed = []
    for name in scripts:
        print(f"\n# {name} {' '.join(args)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / name), *args], check=False).returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
