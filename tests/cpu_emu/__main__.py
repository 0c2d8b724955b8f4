"""The emulated csrc/ stage of CI: builds csrc/ for the CPU emulator in several variants, runs
tests/cpu_emu/test_cpu_emu.py on each, then checks that planted faults are caught.

    python -m tests.cpu_emu            # everything (about 10 minutes on 2 cores)
    python -m tests.cpu_emu --quick    # the CI default: fewer shapes under the slow race check and ASan,
                                       # the planted faults that need no second build of adaln.cu
    python -m tests.cpu_emu --record benchmarks/results/cpu_emu.json   # and keep what ran (the results
                                       # page shows it; `python -m benchmarks` runs the full stage so)

Variants (build/cpu_emu/<name>, cached): plain (the real grid caps, forward schedule), caps (grids of 2
blocks, reverse schedule; --quick leaves it out since asan and race use the same caps), asan (ASan+UBSan,
caps, random schedule), race (the race check, caps). Exits nonzero on the first failure.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.cpu_emu import emu, faults

PASSED = re.compile(r"(\d+) passed")

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
    parser.add_argument("--record", type=Path, help="write what ran, passed and was caught to this JSON file")
    args = parser.parse_args(argv)
    variants = [v for v in RUNS if not (args.quick and v == "caps")]
    if args.only:
        variants = [v for v in args.only.split(",") if v]
        unknown = set(variants) - set(RUNS)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; choose from {sorted(RUNS)}")
    start = time.monotonic()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=emu.ROOT, capture_output=True, text=True
    ).stdout.strip()  # the code that runs
    record = {"mode": "quick" if args.quick else "full", "commit": commit or "unknown", "variants": [],
              "faults": [], "ok": False}  # fmt: skip

    def step(label, fn):
        t = time.monotonic()
        print(f"== {label}", flush=True)
        out = fn()
        print(f"== {time.monotonic() - t:.0f} s: {label}", flush=True)
        return out

    def finish(ok: bool, failure: str = "") -> int:
        record.update(ok=ok, failure=failure, seconds=round(time.monotonic() - start, 1))
        if args.record:
            write_record(args.record, record)
        if ok:
            print(f"== cpu_emu stage passed in {record['seconds']:.0f} s", flush=True)
        else:
            print(f"FAILED: {failure}", flush=True)
        return 0 if ok else 1

    libraries = {}
    for name in variants:
        libraries[name] = step(f"build {name}", lambda name=name: emu.build(name, emu.VARIANTS[name]))
    for name in variants:
        schedule, quick = RUNS[name]
        env = emu.sanitizer_env("address" in emu.VARIANTS[name].get("DBLOCKS_EMU_SANITIZE", ""))
        env.update(DBLOCKS_EMU_LIB=str(libraries[name]), DBLOCKS_EMU_SCHEDULE=schedule)
        env["DBLOCKS_EMU_QUICK"] = "1" if (args.quick and quick) else "0"
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               "tests/cpu_emu/test_cpu_emu.py"]  # fmt: skip
        t = time.monotonic()
        code, output = step(f"tests on {name} ({schedule} schedule)", lambda cmd=cmd, env=env: _tee(cmd, env))
        passed = PASSED.findall(output)
        record["variants"].append({
            "name": name, "schedule": schedule, "options": emu.VARIANTS[name], "ok": code == 0,
            "tests_passed": int(passed[-1]) if passed else 0, "seconds": round(time.monotonic() - t, 1),
        })  # fmt: skip
        if code != 0:
            return finish(False, f"the emulated tests on the {name} build")

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
                return finish(False, str(exc))
            for line in evidence:
                print(f"   caught: {line}", flush=True)
            record["faults"].append({"name": fault.name, "variant": fault.variant, "caught": evidence[:3]})
    return finish(True)


def _tee(cmd: list, env: dict) -> tuple[int, str]:
    """Runs cmd, printing its output as it comes; (exit code, the output)."""
    proc = subprocess.Popen(cmd, cwd=emu.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    return proc.wait(), "".join(lines)


def write_record(path: Path, record: dict) -> None:
    """The stage's JSON record, with where and when it ran; written to a temporary file, then renamed."""
    import platform
    from datetime import datetime, timezone

    full = {"benchmark": "cpu_emu", "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m tests.cpu_emu" + " --quick" * (record["mode"] == "quick"),
            **record}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(full, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    os.chdir(emu.ROOT)
    sys.exit(main())
