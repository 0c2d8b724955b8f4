"""The emulated csrc/ stage of CI: builds csrc/ for the CPU emulator in several variants, runs
tests/cpu_emu/test_cpu_emu.py on each, then checks that planted faults are caught.

    python -m tests.cpu_emu            # everything (about 10 minutes on 2 cores)
    python -m tests.cpu_emu --quick    # the CI default: fewer shapes under the slow race check and ASan,
                                       # the planted faults that need no second build of adaln.cu

Variants (build/cpu_emu/<name>, cached): plain (the real grid caps, forward schedule), caps (grids of 2
blocks, reverse schedule; --quick leaves it out since asan and race use the same caps), asan (ASan+UBSan,
caps, random schedule), race (the race check, caps). Exits nonzero on the first failure.
"""

import argparse
import os
import subprocess
import sys
import time

from tests.cpu_emu import emu, faults

# variant -> (schedule, quick shape set)
RUNS = {
    "plain": ("forward", False),
    "caps": ("reverse", False),
    "asan": ("random", True),
    "race": ("forward", True),
}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the CI default (see above)")
    parser.add_argument("--only", help="comma-separated variants to run (default: all of the mode)")
    parser.add_argument("--no-faults", action="store_true", help="skip the planted-fault checks")
    args = parser.parse_args(argv)
    variants = [v for v in RUNS if not (args.quick and v == "caps")]
    if args.only:
        variants = [v for v in args.only.split(",") if v]
        unknown = set(variants) - set(RUNS)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; choose from {sorted(RUNS)}")
    start = time.monotonic()

    def step(label, fn):
        t = time.monotonic()
        print(f"== {label}", flush=True)
        out = fn()
        print(f"== {time.monotonic() - t:.0f} s: {label}", flush=True)
        return out

    libraries = {}
    for name in variants:
        libraries[name] = step(f"build {name}", lambda name=name: emu.build(name, emu.VARIANTS[name]))
    for name in variants:
        schedule, quick = RUNS[name]
        env = emu.sanitizer_env("address" in emu.VARIANTS[name].get("DBLOCKS_EMU_SANITIZE", ""))
        env.update(DBLOCKS_EMU_LIB=str(libraries[name]), DBLOCKS_EMU_SCHEDULE=schedule)
        env["DBLOCKS_EMU_QUICK"] = "1" if (args.quick and quick) else "0"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "tests/cpu_emu/test_cpu_emu.py",
        ]
        result = step(
            f"tests on {name} ({schedule} schedule)",
            lambda cmd=cmd, env=env: subprocess.run(cmd, cwd=emu.ROOT, env=env),
        )
        if result.returncode != 0:
            print(f"FAILED: the emulated tests on the {name} build", flush=True)
            return 1

    if not args.no_faults:
        root = emu.BUILD / "faults"
        for fault in faults.FAULTS:
            if args.quick and not fault.quick:
                continue
            if fault.variant not in libraries:  # the clean build to compare with
                libraries[fault.variant] = step(
                    f"build {fault.variant}", lambda v=fault.variant: emu.build(v, emu.VARIANTS[v])
                )

            def one(fault=fault):
                src = faults.source_tree(fault, root)
                options = {**emu.VARIANTS[fault.variant], "DBLOCKS_EMU_ONLY": f"{fault.file};status.cu"}
                library = emu.build(fault.name, options, source=src, build_root=root / fault.name)
                return faults.check(fault, library, libraries[fault.variant])

            try:
                evidence = step(f"planted fault {fault.name} ({fault.variant} build)", one)
            except AssertionError as exc:
                print(f"FAILED: {exc}", flush=True)
                return 1
            for line in evidence:
                print(f"   caught: {line}", flush=True)
    print(f"== cpu_emu stage passed in {time.monotonic() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    os.chdir(emu.ROOT)
    sys.exit(main())
