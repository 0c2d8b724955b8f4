"""The benchmark suite runs end to end on tiny sizes (python -m benchmarks --quick, through dblocks-fast
bench) and every record says where, when and how it was measured, and never invents a GPU figure."""

import json

import pytest
import torch

from benchmarks.__main__ import SCRIPTS
from dblocks_fast.cli import main as cli

PROVENANCE = ("benchmark", "device", "device_type", "versions", "commit", "date", "command")
PNG = b"\x89PNG\r\n\x1a\n"
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    # every script but the crash harness, which CI runs as a step of its own (.ci/run); its logic is below
    assert cli(["bench", "--quick", "--out", str(out), "--only", *NAMES]) == 0
    return out


NAMES = [
    "quality_digits",
    "quality_digits_flow",
    "quality_vit",
    "quality",
    "bench_memory",
    "bench_peers",
    "bench_paging",
    "bench_capacity",
    "bench_peers_capacity",
    "bench_inference",
    "bench_distributed",
    "bench_kernels",
    "bench_block_step",
]


@pytest.mark.parametrize("name", NAMES)
def test_every_benchmark_writes_a_record_a_table_and_a_plot(quick, name):
    record = json.loads((quick / f"{name}-{DEV}.json").read_text())
    for key in PROVENANCE:
        assert record[key], key
    assert record["benchmark"] == name and record["quick"] is True
    assert record["device"] in (quick / f"{name}-{DEV}.md").read_text()
    assert (quick / f"{name}-{DEV}.png").read_bytes()[:8] == PNG


def test_quality_record(quick):
    record = json.loads((quick / f"quality_digits-{DEV}.json").read_text())
    assert [r["num_blocks"] for r in record["summary"]] == [1, 2, 3, 4, 3]
    for r in record["runs"]:
        assert 0.0 <= r["sample_accuracy"] <= 1.0 and r["frechet_distance"] > 0 and r["train_s"] > 0


def test_quality_flow_record_sets_flow_beside_edm(quick):
    record = json.loads((quick / f"quality_digits_flow-{DEV}.json").read_text())
    rows = [(r["process"], r["num_blocks"]) for r in record["summary"]]
    assert rows == [("edm", 1), ("edm", 3), ("flow", 1), ("flow", 3)]
    assert [(r["process"], r["num_blocks"]) for r in record["runs"]] == rows  # --quick: one seed
    table = (quick / f"quality_digits_flow-{DEV}.md").read_text()
    assert "| EDM B=3" in table and "| flow B=3" in table and "Real-data floor" in table
    assert table.count("**not learned**") == 5  # 4 steps a block learn nothing, and the table says so


def test_quality_configs_run_a_subset_under_a_name_of_its_own(tmp_path):
    from benchmarks import quality_digits as qd

    assert qd.selected(qd.parse_args([]).configs) == qd.PRESETS["edm"]  # the default run is unchanged
    assert qd.selected(qd.parse_args(["--flow"]).configs) == qd.PRESETS["flow"]
    assert qd.PRESETS["flow"][1] == "quality_digits_flow"
    assert qd.selected(["flow-b3", "edm", "b3"]) == (
        ["flow-b3", *qd.PRESETS["edm"][0]],
        "quality_digits_subset",
    )
    with pytest.raises(SystemExit):
        qd.parse_args(["--configs", "b5"])
    record = qd.main(["--quick", "--configs", "flow-b1", "--out", str(tmp_path)])
    assert [(r["name"], r["process"], r["num_blocks"]) for r in record["runs"]] == [("flow-b1", "flow", 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"quality_digits_subset-{DEV}.{e}" for e in ("json", "md", "png")
    ]

    # the results page's table: each row against the B = 1 row of its own process; learned rows unmarked
    row = dict(sample_accuracy=0.9, real_frechet=3.0, learned=True)
    summary = [
        dict(row, config="B=1 (end to end)", num_blocks=1, process="edm", frechet_distance=10.0),
        dict(row, config="flow B=1 (end to end)", num_blocks=1, process="flow", frechet_distance=8.0),
        dict(row, config="flow B=3", num_blocks=3, process="flow", frechet_distance=6.0, learned=False),
    ]
    lines = qd.table({"summary": summary})
    assert lines[2].startswith("| EDM B=1 (end to end) | 1.00 |")
    assert lines[3].startswith("| flow B=1 (end to end) | 1.00 |")
    assert lines[4].startswith("| flow B=3 **not learned** | 0.75 |")


def test_quality_summary_has_a_row_per_task(quick):
    record = json.loads((quick / f"quality-{DEV}.json").read_text())
    assert [r["task"] for r in record["rows"]] == ["dit", "vit", "ar", "mdm", "recurrent"]
    for r in record["rows"]:
        assert r["baseline"] > 0 and r["blocks"] > 0 and r["commit"] and r["device"], r["task"]
        assert r["better"] in ("lower", "higher")
    ar = record["rows"][2]
    assert ar["num_blocks"] == 4 and len(ar["runs"][0]["generative"]) == 6
    for score in ar["runs"][0]["generative"].values():
        assert 0.0 <= score["tokenize_fraction"] <= 1.0 and score["bits_per_byte_under_baseline"] > 0
        assert score["bits_per_byte_under_ngram"] > 0
    # the row's figure is block 0 alone (a likelihood); the chain's last step is kept beside it
    run = ar["runs"][0]
    assert ar["blocks"] == run["blocks_first_block"] and run["blocks_last_step"] > 0
    assert all(0.0 <= a <= 1.0 for a in run["accuracy"].values()) and len(run["accuracy"]) == 4
    assert record["rows"][4]["num_blocks"] == 1
    rec = record["rows"][4]["runs"][0]
    assert rec["baseline_token_layers_forward"] > rec["blocks_token_layers"] > 0
    table = (quick / f"quality-{DEV}.md").read_text()
    assert table.count("| mdm (pystdlib-mdm) |") == 1 and "| dit (digits-dit) |" in table


def test_inference_record(quick):
    record = json.loads((quick / f"bench_inference-{DEV}.json").read_text())
    configs = {(r["batch"], r["num_blocks"]) for r in record["rows"]}
    assert configs == {(n, b) for n in (1, 8) for b in (2, 3, 6)}
    for r in record["rows"]:
        assert r["speedup"] == pytest.approx(r["blocks_images_per_s"] / r["end_to_end_images_per_s"])
        assert r["blocks_images_per_s"] > 0 and len(r["blocks_s_all"]) == 1
    if DEV == "cpu":
        assert "not applicable" in record["streamed"] and "streamed_over_resident" not in record["rows"][0]


def test_distributed_record(quick):
    record = json.loads((quick / f"bench_distributed-{DEV}.json").read_text())
    assert [r["world_size"] for r in record["rows"]] == [1, 2]
    assert [len(b) for b in record["rows"][1]["blocks_per_rank"]] == [2, 2]
    for r in record["rows"]:
        assert r["steps_per_s"] > 0 and r["bytes_sent"]["between_groups"] == 0
    assert record["rows"][1]["bytes_sent"]["control"] > 0  # the checkpoint's file names did travel


def test_kernel_record_never_invents_a_gpu_figure(quick):
    record = json.loads((quick / f"bench_kernels-{DEV}.json").read_text())
    assert {r["op"] for r in record["rows"]} == {
        "adaln_modulate",
        "gated_residual_adaln",
        "edm_l2_loss",
        "weighted_linear_cross_entropy",
    }
    if DEV == "cpu":
        assert record["copy_GBps"] is None
        assert all("pending" in r["status"] and not any(k.endswith("_ms") for k in r) for r in record["rows"])
        assert "GPU figures are pending" in (quick / "bench_kernels-cpu.md").read_text()


def test_results_page_answers_every_question_and_marks_what_is_pending(quick):
    page = (quick / "README.md").read_text()
    questions = ("How good", "How much memory", "How fast is sampling", "How does training scale", "kernels")
    for question in questions:
        assert question in page, question
    assert "--quick: a pipeline check" in page
    for name in NAMES:
        assert f"]({name}-{DEV}.png)" in page
    if DEV == "cpu":  # bench_crash did not run here: it is pending on both
        assert page.count("**GPU: pending**") == len(SCRIPTS) and "speed figures pending" in page


def test_results_page_reports_a_failed_script_and_pending_figures(tmp_path):
    from benchmarks.__main__ import report

    page = report(tmp_path, [{"script": "bench_kernels", "exit": 1, "seconds": 1.0, "stderr_tail": ""}])
    assert "failed in the last run: bench_kernels" in page
    assert page.count("**CPU: pending**") == len(SCRIPTS) and page.count("**GPU: pending**") == len(SCRIPTS)
    (tmp_path / "bench_inference-cpu.json").write_text(json.dumps({"device": "x", "quick": False}))
    assert "does not have the fields this page reads" in report(tmp_path, [])


def test_memory_record(quick):
    record = json.loads((quick / f"bench_memory-{DEV}.json").read_text())
    configs = [(r["num_blocks"], r["offload"]) for r in record["rows"]]
    assert configs == [(1, "none")] + [(b, t) for b in (2, 4) for t in ("none", "host", "disk")]
    for r in record["rows"]:
        assert r["peak_bytes"] > 0 and r["ratio_end_to_end_over_this"] > 0 and r["params"] > 0


def test_peers_record_has_every_method_and_says_what_needs_cuda(quick):
    from benchmarks.bench_peers import METHODS

    record = json.loads((quick / f"bench_peers-{DEV}.json").read_text())
    assert [r["method"] for r in record["rows"]] == list(METHODS) and record["complete"]
    for r in record["rows"]:
        if DEV == "cpu" and r["method"].startswith("e2e-offload"):  # torchao's offload needs CUDA
            assert r["status"].startswith(("not applicable without CUDA", "not run: No module named"))
            continue
        assert r["status"] == "ok" and r["pass_s"] > 0 and r["step_mean_s"] > 0 and r["params"] > 0
        blocks = 1 if r["method"].startswith("e2e") else record["settings"]["num_blocks"]
        assert len(r["step_s"]) == record["settings"]["steps"] * blocks + (blocks == 1)
        assert r["pass_s"] == pytest.approx(r["step_mean_s"] * blocks)
    assert record["rows"][0]["memory_e2e_over_this"] == 1.0
    table = (quick / f"bench_peers-{DEV}.md").read_text()
    assert "| DiffusionBlocks B=2, disk-paged |" in table and "| end to end + checkpointing |" in table


def test_gpu_only_records_say_why_they_have_no_figure_without_a_gpu(quick):
    paging = json.loads((quick / f"bench_paging-{DEV}.json").read_text())
    capacity = json.loads((quick / f"bench_capacity-{DEV}.json").read_text())
    peers = json.loads((quick / f"bench_peers_capacity-{DEV}.json").read_text())
    if DEV == "cpu":
        assert "not applicable without CUDA" in paging["status"] and "not applicable" in capacity["status"]
        assert "bandwidth" not in paging and "steps" not in paging and "cells" not in capacity
        assert "not applicable" in peers["status"] and "cells" not in peers
    else:
        assert paging["bandwidth"]["paging_GBps"]["swap_both_directions"] > 0
        assert capacity["cells"][0]["largest"] is not None


def _fits(limits):
    """A fake capacity try: width w fits (mode, cap) when w <= limits[mode, cap]."""
    calls = []

    def attempt(mode, cap, w):
        calls.append((mode, cap, w))
        if w <= limits[mode, cap]:
            return {"mode": mode, "cap_gb": cap, "width": w, "ok": True, "params": w}
        return {"mode": mode, "cap_gb": cap, "width": w, "ok": False, "why": "CUDA out of memory: fake"}

    return attempt, calls


def test_capacity_search_bisects_the_ladder_whole_gpu_first():
    from benchmarks.bench_capacity import WIDTHS, search

    limits = {("e2e", 0): 3072, ("host", 0): 5120, ("e2e", 24): 1536, ("host", 24): 4096}
    limits |= {("e2e", 12): 0, ("host", 12): 2048}  # nothing fits end to end under 12 GB
    attempt, calls = _fits(limits)
    cells, tries = search(attempt, WIDTHS, [12, 0, 24], ["e2e", "host"])
    got = {(c["mode"], c["cap_gb"]): (c["largest"] or {}).get("width", 0) for c in cells}
    assert got == limits
    assert [(c["cap_gb"], c["mode"]) for c in cells][:2] == [(0, "e2e"), (0, "host")]
    assert len(tries) == len(calls) <= 4 * len(cells)  # a bisection, not a walk up an 11-rung ladder
    for c in cells:  # the stop reason is the failure just above the answer, or the ladder's end
        big = c["largest"]["width"] if c["largest"] else None
        assert c["stopped_by"] == ("end of the ladder" if big == WIDTHS[-1] else "CUDA out of memory: fake")
    # under a smaller cap nothing above what fitted a larger one is tried
    assert all(w <= 5120 for m, cap, w in calls if m == "host" and cap in (12, 24))


def test_capacity_search_stops_on_the_budget_and_on_errors_that_are_not_memory():
    from benchmarks.bench_capacity import WIDTHS, search

    attempt, calls = _fits({("e2e", 0): 2048})

    def two_then_out(mode, cap, w):
        return attempt(mode, cap, w) if len(calls) < 2 else None

    cells, tries = search(two_then_out, WIDTHS, [0], ["e2e"])
    assert len(tries) == 2 and "time budget spent" in cells[0]["stopped_by"]
    assert "undecided" in cells[0]["stopped_by"]

    def crash(mode, cap, w):
        return {"mode": mode, "cap_gb": cap, "width": w, "ok": False, "why": "exit 1: Traceback ..."}

    cells, tries = search(crash, WIDTHS, [0, 24], ["e2e"])
    assert cells[0]["largest"] is None and cells[0]["stopped_by"].startswith("width 2560 failed: exit 1")
    assert len(tries) == 2  # the crash decides nothing, so the 24 GB cell still tries the same middle once


def test_gpu_session_runs_stages_under_their_limits_and_packs_what_they_wrote(tmp_path, monkeypatch):
    import sys
    import tarfile

    from benchmarks import gpu_session

    results = tmp_path / "results"
    results.mkdir()
    (results / "old-cpu.json").write_text("{}")  # written before the session: not packed
    monkeypatch.setattr(gpu_session, "RESULTS", results)
    monkeypatch.setattr(gpu_session, "GPUBUILD", tmp_path / "gpubuild")
    write = f"open({str(results / 'new-cuda.json')!r}, 'w').write('{{}}'); print('wrote it')"
    stages = {
        "writes": (60, [sys.executable, "-c", write]),
        "fails": (60, [sys.executable, "-c", "raise SystemExit(3)"]),
        "hangs": (2, [sys.executable, "-c", "import time; time.sleep(60)"]),
        "late": (60, [sys.executable, "-c", "print({left})"]),
    }
    monkeypatch.setattr(gpu_session, "STAGES", stages)
    monkeypatch.setattr(gpu_session, "RESERVE", 0)
    out = tmp_path / "out"
    # the hang first: nothing is banked yet, so it gets its own 2 s
    rows = gpu_session.run_session(["hangs", "writes", "fails", "late"], budget=300, out=out)
    assert [(r["stage"], r["status"], r["rc"]) for r in rows] == [
        ("hangs", "timed out", None),
        ("writes", "ok", 0),
        ("fails", "failed", 3),
        ("late", "ok", 0),
    ]
    assert rows[1]["tail"][-1] == "wrote it" and rows[0]["seconds"] < 30
    # {left}: the stage's own limit plus what writes and fails left unused (most of 2 x 60 s), less a margin
    assert 60 - 15 + 60 < int(rows[3]["tail"][-1]) <= 60 - 15 + 120
    rows = gpu_session.run_session(["late"], budget=300, out=tmp_path / "alone", limits={"late": 40})
    assert int(rows[0]["tail"][-1]) == 40 - 15  # a call's own limit for the stage
    summary = json.loads((out / "summary.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == ["hangs", "writes", "fails", "late"]
    with tarfile.open(out / "session.tgz") as tar:
        names = set(tar.getnames())
    assert {"results/new-cuda.json", "logs/writes.log", "logs/hangs.log", "logs/summary.json"} <= names
    assert "results/old-cpu.json" not in names
    assert sorted(p.name for p in out.iterdir()) == [
        "session.tgz",
        "summary.json",
    ]  # 8 files at most come back

    # a budget spent leaves the later stages unrun, and says so
    monkeypatch.setattr(gpu_session, "MIN_STAGE", 5)
    monkeypatch.setattr(gpu_session, "environment", lambda log, env: None)  # nvidia-smi etc. take seconds
    rows = gpu_session.run_session(["hangs", "writes"], budget=6, out=tmp_path / "out2")
    assert [r["status"] for r in rows] == ["timed out", "not run: no time left"]

    # here again: the results go to benchmarks/results
    (results / "new-cuda.json").unlink()
    assert gpu_session.unpack(out) == [str(results / "new-cuda.json")]
    assert (results / "new-cuda.json").read_text() == "{}"


def test_gpu_session_command_line():
    from benchmarks import gpu_session

    cmd = gpu_session.command_for(["build", "tests"], 570)
    assert cmd.startswith("DBLOCKS_COMMIT=") and cmd.endswith("gpu_session.py build tests --budget 570")
    assert len(cmd) < 2000  # the device tool's limit on a command
    assert gpu_session.command_for([], 0, call=1).endswith("gpu_session.py --call 1")
    with pytest.raises(SystemExit):
        gpu_session.parse_args(["build", "nosuchstage"])
    with pytest.raises(SystemExit):
        gpu_session.parse_args([])
    with pytest.raises(SystemExit):
        gpu_session.parse_args(["build", "--call", "1"])
    args = gpu_session.parse_args(["--call", "1"])
    first = gpu_session.PLAN[0]
    assert args.stages == [s for s, _ in first.stages] and args.budget == first.budget
    assert args.limits == first.limits


def test_gpu_session_plan_adds_up_to_the_device_budget():
    """Each call's stage limits and the reserve fill its budget exactly; the calls, a machine start for each
    that needs one, fit the session's device time; one call fits the device tool's 10 minutes a command."""
    from benchmarks import gpu_session as gs

    for call in gs.PLAN:
        assert all(stage in gs.STAGES for stage, _ in call.stages)
        assert sum(limit for _, limit in call.stages) + gs.RESERVE == call.budget, call
        assert all(limit >= gs.MIN_STAGE for _, limit in call.stages)
        assert call.budget + 30 <= 600  # the run's timeout_s, with the environment read and the packing
    spent = sum(call.budget + gs.MACHINE_START * call.needs_start for call in gs.PLAN)
    assert spent <= gs.DEVICE_BUDGET, spent
    first = [stage for stage, _ in gs.PLAN[0].stages]
    # the first call brings the most valuable evidence first, in this order
    assert first == ["build", "tests", "triton", "kernels", "step", "memory", "sanitizer"]
    assert gs.PLAN[0].needs_start and not gs.PLAN[1].needs_start
    assert {"paging", "capacity"} <= {stage for stage, _ in gs.PLAN[1].stages}


def test_paging_benchmark_logic_runs_on_the_cpu():
    """bench_paging's GPU figures need CUDA; its logic (which runs it times, its table) is checked here."""
    from benchmarks import bench_paging, common

    cpu = torch.device("cpu")
    bw = bench_paging.bandwidth(4096, cpu)
    assert set(bw["paging_GBps"]) == {"page_in", "page_out", "swap_out_then_in"}
    assert all(v > 0 for v in [*bw["paging_GBps"].values(), *bw["plain_pinned_GBps"].values()])
    seen = []
    rows = bench_paging.step_times("tiny", 1, cpu, on_row=lambda rows: seen.append(len(rows)))
    assert seen == list(range(1, len(bench_paging.RUNS) + 1))
    assert [(r["schedule"], r["offload"], r["prefetch"]) for r in rows] == bench_paging.RUNS
    assert all(r["step_ms"] > 0 for r in rows)
    assert [r["over_resident"] for r in rows if r["offload"] == "none"] == [1.0, 1.0]
    record = {"quick": True, "settings": {"model": "tiny", "num_blocks": 8}, "bandwidth": bw, "steps": rows}
    md = bench_paging._markdown(common.provenance(cpu), {**record, "complete": False})
    assert "page-in" in md and "**Partial**" in md and md.count("| random |") == 4


def test_gpu_session_build_reuses_a_carried_module_only_when_built_from_these_sources(tmp_path, monkeypatch):
    from benchmarks import gpu_session

    pkg, carried = tmp_path / "pkg", tmp_path / "gpubuild"
    pkg.mkdir()
    monkeypatch.setattr(gpu_session, "PKG", pkg)
    monkeypatch.setattr(gpu_session, "GPUBUILD", carried)
    calls = []

    def fake_run(cmd, log, limit, env):  # pip builds _C into the package when DBLOCKS_BUILD_CUDA=1
        calls.append((cmd[:4], env.get("DBLOCKS_BUILD_CUDA")))
        if env.get("DBLOCKS_BUILD_CUDA") == "1" and "pip" in cmd:
            (pkg / "_C.cpython-312-x86_64-linux-gnu.so").write_bytes(b"built here")
        return "ok", 0

    monkeypatch.setattr(gpu_session, "_run", fake_run)
    assert gpu_session.build(tmp_path / "build.log", 100, {}) == ("ok", 0)
    assert calls[0][1] == "1"  # nothing carried: build
    assert (carried / "_C.cpython-312-x86_64-linux-gnu.so").read_bytes() == b"built here"
    assert (carried / "csrc.sha256").read_text().strip() == gpu_session.sources_hash()

    # the next call carries it: reused, nothing built
    (pkg / "_C.cpython-312-x86_64-linux-gnu.so").unlink()
    calls.clear()
    assert gpu_session.build(tmp_path / "build.log", 100, {}) == ("ok", 0)
    assert calls[0][1] == "0" and (pkg / "_C.cpython-312-x86_64-linux-gnu.so").read_bytes() == b"built here"

    # sources changed since: built again
    (carried / "csrc.sha256").write_text("0" * 64 + "\n")
    calls.clear()
    gpu_session.build(tmp_path / "build.log", 100, {})
    assert calls[0][1] == "1"


# --- the crash harness's logic (the harness itself runs in CI as its own step: it takes minutes) -----------
def _fake_child(ready=True, done=False):
    from types import SimpleNamespace

    return SimpleNamespace(ready=ready, done=done)


def test_crash_harness_names_the_moment_of_a_kill_from_what_it_left(tmp_path):
    from benchmarks.crashkit import leftovers, listing, phase

    run = tmp_path / "run"
    (run / "blocks").mkdir(parents=True)
    (run / "paged").mkdir()
    old = "blocks/block000-step000000003.safetensors"
    (run / old).write_bytes(b"x")
    manifest = {"blocks": [{"steps": 3, "file": old}, {"steps": 0}]}
    (run / "manifest.json").write_text(json.dumps(manifest))
    before = listing(run)
    assert phase(run, before, _fake_child(ready=False)) == "start-up"
    assert phase(run, before, _fake_child()) == "training steps"
    assert phase(run, before, _fake_child(done=True)) == "exit (work finished)"
    (run / "paged/.paged-block001.safetensors.ab12.tmp").write_bytes(b"x")
    assert phase(run, before, _fake_child()) == "paging write"
    (run / "blocks/block001-step000000006.safetensors").write_bytes(b"x")  # written, not in the manifest yet
    assert phase(run, before, _fake_child()) == "block files written, manifest not yet"
    (run / ".manifest.json.cd34.tmp").write_bytes(b"x")
    assert phase(run, before, _fake_child()) == "manifest write"
    (run / "blocks/.block000-step000000006.safetensors.ef56.tmp").write_bytes(b"x")
    assert phase(run, before, _fake_child()) == "block file write"
    # what was there before the start is not this kill's doing
    assert phase(run, listing(run), _fake_child()) == "block files written, manifest not yet"
    new = "blocks/block001-step000000006.safetensors"
    manifest["blocks"][1] = {"steps": 6, "file": new}
    (run / "manifest.json").write_text(json.dumps({"blocks": [manifest["blocks"][1], manifest["blocks"][1]]}))
    assert phase(run, listing(run), _fake_child()) == "manifest written, old files not yet deleted"
    (run / ".lock").write_text("pid")
    assert leftovers(run) == sorted(
        [old, ".manifest.json.cd34.tmp", "blocks/.block000-step000000006.safetensors.ef56.tmp",
         "paged/.paged-block001.safetensors.ab12.tmp"]
    )  # fmt: skip


def test_crash_harness_tells_survived_diverged_and_lost_runs_apart(tiny_task, digits, tiny_config, tmp_path):
    import dblocks_fast as dbf
    from benchmarks.crashkit import compare, metrics_diff

    def train(name, **kw):
        dbf.Trainer(tiny_task, digits, tiny_config(out_dir=str(tmp_path / name), **kw)).fit()
        return tmp_path / name

    ref, same, other = train("ref"), train("same"), train("other", seed=1)
    assert compare(same, ref) == ("survived", "") and metrics_diff(same, ref) == ""
    outcome, why = compare(other, ref)
    assert outcome == "diverged" and why.startswith("block 0, ") and "max |difference|" in why
    assert compare(tmp_path / "none", ref)[0] == "lost"
    f = next((same / "blocks").iterdir())
    f.write_bytes(f.read_bytes()[:-4])
    assert compare(same, ref)[0] == "lost" and "corrupt" in compare(same, ref)[1]
    lines = (ref / "metrics.jsonl").read_text().splitlines()
    (other / "metrics.jsonl").write_text("\n".join(lines + lines[:1]) + "\n")  # a step logged twice
    first = json.loads(lines[0])
    assert f"twice: (block, step) [({first['block']}, {first['step']})]" in metrics_diff(other, ref)


def test_crash_harness_kills_every_process_of_a_run_even_in_a_session_of_its_own(tmp_path):
    import os
    import sys
    import time

    from benchmarks import crashkit

    crashkit.become_subreaper()
    grandchild = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "sleep = [sys.executable, '-c', 'import time; time.sleep(60)']\n"
        "p = subprocess.Popen(sleep, start_new_session=True)\n"
        f"open({str(grandchild)!r}, 'w').write(str(p.pid))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )  # as torchrun starts its workers: a new session, out of reach of a kill of the process group
    c = crashkit.Child([sys.executable, "-c", code], tmp_path / "log")
    assert c.wait_ready(60) and c.alive() and not c.done
    pid = int(grandchild.read_text())
    start = time.monotonic()
    c.kill()
    assert not c.alive() and c.proc.returncode == -9 and time.monotonic() - start < 10
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # dead and reaped


def test_kernel_table_shows_cuda_graph_times_beside_eager_and_what_could_not_be_captured():
    from benchmarks import bench_kernels, common
    from benchmarks.__main__ import _kernels

    row = {"op": "adaln_modulate", "size": "DiT-XL/2 layer"}
    for key in ("forward", "forward_backward"):
        row |= {f"{key}_ours_ms": 0.05, f"{key}_eager_ms": 0.2, f"{key}_compile_ms": 0.08}
        row |= {f"{key}_ours_graph_ms": 0.02, f"{key}_compile_graph_ms": 0.03}
        row[f"{key}_eager_graph_error"] = "RuntimeError: operation not permitted when stream is capturing"
        row |= {f"{key}_speedup_vs_compile": 1.6, f"{key}_speedup_vs_eager": 4.0, f"{key}_ours_GBps": 900.0}
        row |= {f"{key}_fraction_of_copy": 0.25, f"{key}_graph_speedup_vs_compile": 1.5}
        row |= {f"{key}_ours_graph_GBps": 3000.0, f"{key}_graph_fraction_of_copy": 0.75}
    prov = common.provenance(torch.device("cpu"))
    md = bench_kernels._markdown([row], [], prov, 4000.0)
    graph_part = md.split("Under CUDA graphs")[1]
    assert (
        "| adaln_modulate | DiT-XL/2 layer | fwd | 0.020 | - | not capturable | 0.030 | 1.50x | 3000 (75%) |"
        in (graph_part)
    )
    page = "\n".join(_kernels({"copy_GBps": 4000.0, "rows": [row]}))
    assert "| 1.50x | 3000 (75%) |" in page


def test_block_step_record_never_invents_a_gpu_figure(quick):
    record = json.loads((quick / f"bench_block_step-{DEV}.json").read_text())
    assert [r["variant"] for r in record["rows"]] == ["eager", "torch.compile", "ours", "ours + compile"]
    if DEV == "cpu":
        assert all("pending" in r["status"] and "ms" not in r for r in record["rows"])
        assert "GPU figures pending" in (quick / "bench_block_step-cpu.md").read_text()


def test_emulator_record_reaches_the_results_page_and_a_full_run_starts_with_it(tmp_path, monkeypatch):
    """`python -m tests.cpu_emu --record` writes what ran; the page shows each build and planted fault, and a
    failure; `python -m benchmarks` without --quick/--only runs the full emulated stage first."""
    from benchmarks import __main__ as runner
    from tests.cpu_emu.__main__ import write_record

    record = {"mode": "full", "commit": "abc1234", "ok": True, "seconds": 412.0,
              "variants": [{"name": "race", "schedule": "forward", "options": {"DBLOCKS_EMU_RACE": "ON"},
                            "ok": True, "tests_passed": 57, "seconds": 80.0}],
              "faults": [{"name": "missing_barrier", "variant": "race",
                          "caught": ["cpu_emu: race at x.cu:12"]}]}  # fmt: skip
    write_record(tmp_path / "cpu_emu.json", record)
    assert not list(tmp_path.glob("*.tmp"))
    page = runner.report(tmp_path, [])
    assert "full stage **passed** in 412 s" in page and "commit abc1234" in page
    assert "| race | forward | DBLOCKS_EMU_RACE=ON | 57 | 80 |" in page
    assert "| missing_barrier | race | cpu_emu: race at x.cu:12 |" in page
    write_record(tmp_path / "cpu_emu.json", {**record, "ok": False, "failure": "the tests on the race build"})
    assert "**FAILED**: the tests on the race build" in runner.report(tmp_path, [])
    assert "No record here yet" in runner.report(tmp_path / "empty", [])

    ran = []
    monkeypatch.setattr(runner, "run_emulator", lambda out: ran.append("emu") or {"exit": 0})
    monkeypatch.setattr(runner, "run_script", lambda name, quick, out: ran.append(name) or {"exit": 0})
    monkeypatch.setattr(runner, "report", lambda out, runs: "")
    assert runner.main(["--out", str(tmp_path)]) == 0
    assert ran[0] == "emu" and ran[1:] == [name for name, _ in SCRIPTS]
    for flags in (["--quick"], ["--no-emulator"], ["--only", "bench_kernels"]):
        ran.clear()
        runner.main(["--out", str(tmp_path), *flags])
        assert "emu" not in ran, flags


def test_quality_batch_size_flag_sets_both_models_batch():
    """--batch-size (issue 21's easy text needs 128 sequences a step for masked diffusion to get under 1 bit
    per byte in 300 steps) reaches the TrainConfig that both the baseline and the blocks train with."""
    import torch

    from benchmarks import quality
    from dblocks_fast.tasks import PRESETS

    preset = PRESETS["pystdlib-mdm"]
    args = quality.parse_args(["--task", "mdm", "--batch-size", "128", "--steps-per-block", "7"])
    cfg = quality._config(preset, args, 0, torch.device("cpu"), {})
    assert cfg.batch_size == 128 and cfg.steps_per_block == 7
    default = quality._config(preset, quality.parse_args(["--task", "mdm"]), 0, torch.device("cpu"), {})
    assert default.batch_size == preset.train_defaults["batch_size"] == 32
    row = {"preset": "pystdlib-mdm", "train": {"batch_size": 128}}
    assert quality._batch(row) == " (128 a step)"  # the results table says so beside the steps
    assert quality._batch({**row, "train": {"batch_size": 32}}) == ""
    assert quality._batch({"preset": "x"}) == ""


def test_quality_render_only_rewrites_the_page_from_the_record(tmp_path):
    """quality.py --render-only: a record whose rows were merged by hand gets its markdown from its rows."""
    from benchmarks import quality

    row = dict(task="mdm@x.txt", preset="pystdlib-mdm", metric="ELBO", better="lower", baseline=0.75,
               baseline_std=0.05, blocks=0.54, blocks_std=0.01, num_blocks=3,
               steps_per_block=300, baseline_train_s=1.0, blocks_train_s=2.0, commit="abc1234",
               floor=4.048, train={"batch_size": 128})  # fmt: skip
    prov = dict(device="cpu box", device_type="cpu", commit="abc1234", date="today", command="python q",
                versions={"torch": "x"})  # fmt: skip
    (tmp_path / "quality-cpu.json").write_text(json.dumps({"benchmark": "quality", **prov, "quick": False,
                                                           "rows": [row]}))  # fmt: skip
    quality.main(["--render-only", "--out", str(tmp_path)])
    md = (tmp_path / "quality-cpu.md").read_text()
    assert "| mdm@x.txt (pystdlib-mdm) |" in md and "| 0.750 ± 0.050 | 0.540 ± 0.010 |" in md
    assert "| 0.210 | 4.048 | 300 (128 a step) |" in md and "`python q`" in md
    assert (tmp_path / "quality-cpu.png").is_file()
    with pytest.raises(SystemExit, match="no record"):
        quality.main(["--render-only", "--out", str(tmp_path / "none")])
