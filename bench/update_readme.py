"""Regenerate the README's "Measured on a GPU" section from the newest run under bench/results/ (never typed by
hand; tests/test_acceptance.py fails when the README and this script disagree).

    python bench/update_readme.py           # rewrite README.md
    python bench/update_readme.py --check   # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vivit_kernels.tools.acceptance import update_readme  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when README.md is out of date")
    args = parser.parse_args()
    current = update_readme(ROOT / "README.md", ROOT / "bench" / "results", check=args.check)
    if not current:
        print("README.md is out of date with bench/results/: run `python bench/update_readme.py`", file=sys.stderr)
    return 0 if current else 1


if __name__ == "__main__":
    sys.exit(main())
