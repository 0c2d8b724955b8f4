"""Wheels for the GPU machine, which has no package index: the optional extras' pure-Python packages and
their dependencies, for its Python (3.12, x86-64 Linux), into .wheels/ (ignored by git; the device run
carries it).

    python benchmarks/gpu_wheels.py                 # diffusers, peft, accelerate and what they need
    python benchmarks/gpu_wheels.py tensorboard     # other requirements

What the machine has already (torch and its CUDA libraries, triton, numpy, Pillow: the stack
`pip install --no-deps -e .` runs on) is left out; there `benchmarks/gpu_session.py` installs the rest with
`pip install --no-index --find-links .wheels ...`, so pip takes from the folder only what is missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ("diffusers>=0.30", "peft>=0.12", "accelerate>=0.26")
# on the GPU machine already (its torch stack and our base requirements), or too large to carry
SKIP = {
    "torch",
    "triton",
    "numpy",
    "pillow",
    "sympy",
    "mpmath",
    "networkx",
    "jinja2",
    "markupsafe",
    "setuptools",
}
SKIP_PREFIX = ("nvidia-", "cuda-")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")


def closure(requirements: list[str]) -> list[tuple[str, str]]:
    """(name, version) of everything pip would install for `requirements` here, less SKIP."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
             "--report", str(report), *requirements],
            check=True,
        )  # fmt: skip
        items = json.loads(report.read_text())["install"]
    out = []
    for item in items:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if name.lower() in SKIP or name.lower().startswith(SKIP_PREFIX):
            continue
        out.append((name, version))
    return out


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("requirements", nargs="*", default=list(DEFAULT))
    ap.add_argument("--out", type=Path, default=ROOT / ".wheels")
    ap.add_argument("--python-version", default="3.12")
    args = ap.parse_args(argv)
    pins = [f"{n}=={v}" for n, v in closure(args.requirements)]
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", args.python_version, *platforms, "-d", str(args.out), *pins],
        check=True,
    )  # fmt: skip
    size = sum(f.stat().st_size for f in args.out.glob("*.whl"))
    print(f"{len(pins)} packages, {size / 2**20:.1f} MiB in {args.out}")
    return args.out


if __name__ == "__main__":
    main()
