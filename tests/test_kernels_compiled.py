"""The sm_90 compile check (benchmarks/kernels_compiled.py) covers every Triton kernel with the launchers'
own specialisations, and catches what it is there to catch: a kernel that does not compile, a kernel that
spills, a csrc/ kernel that spills. No GPU: Triton compiles for sm_90 here and ships ptxas and cuobjdump."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import kernels_compiled as kc

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled():
    """tests/planted_kernels.compile_all() in a process without the Triton interpreter."""
    code = "from tests.planted_kernels import compile_all; print(compile_all())"
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_every_triton_kernel_is_launched_at_the_sizes_of_the_table(compiled):
    defined = set(compiled["defined"])
    assert len(defined) >= 5 and defined <= set(compiled["launched"]), defined - set(compiled["launched"])


def test_specialisation_follows_the_launcher(compiled):
    # DiT-XL/2: D = 1152 in rows of 1024 + 128 lanes (none idle), bf16 pointers, T = 256 divisible by 16
    fwd = compiled["adaln_fwd"]
    sig, consts = fwd["signature"], fwd["constexprs"]
    assert sig["x_ptr"] == "*bf16" and sig["mean_ptr"] == "*fp32" and sig["eps"] == "fp32"
    assert (consts["BLOCK_D"], consts["TAIL"]) == (1024, 128) and consts["GATED"] is False
    assert fwd["options"]["num_warps"] >= 1
    assert "T" in fwd["divisible_by_16"] and "x_ptr" in fwd["divisible_by_16"]
    assert sig["sxd"] == "constexpr" and consts["sxd"] == 1  # Triton makes an integer 1 a constant


def test_the_adaln_backward_grid_is_one_wave_of_what_the_compiled_kernel_fits(compiled):
    """N = 32 samples: chunks a sample = the programs 132 SMs hold at the compiled kernel's occupancy / 32."""
    bwd = compiled["adaln_bwd"]
    assert bwd["status"] == "ok", bwd
    resident = bwd["occupancy_warps"] // bwd["num_warps"]
    assert resident >= 1
    assert bwd["grid"] == [32, resident * kc.SMS // 32], (bwd["grid"], resident)


def test_a_real_kernel_compiles_without_spills_and_with_16_byte_accesses(compiled):
    row = compiled["real"]
    assert row["status"] == "ok", row
    assert 0 < row["registers"] <= 255 and row["local_stores"] == row["local_loads"] == 0
    assert row["global_load_bits"] == 128 and row["global_store_bits"] == 128
    assert 0 < row["occupancy_warps"] <= 64
    assert kc.failures({"triton": [row], "nvcc": []}) == []


def test_a_spilling_kernel_is_caught(compiled):
    row = compiled["spill"]
    assert row["status"] == "spills" and row["local_stores"] > 0 and row["stack_bytes"] > 0, row
    assert kc.failures({"triton": [row], "nvcc": []}) == [f"planted {row['kernel']}: spills"]
    # reported, not failed, off the benchmark sizes
    assert kc.failures({"triton": [{**row, "gated": False}], "nvcc": []}) == []


def test_a_kernel_that_does_not_compile_is_caught(compiled):
    row = compiled["bad"]
    assert row["status"] == "compile error" and "power of 2" in row["error"], row
    for gated in (True, False):
        assert kc.failures({"triton": [{**row, "gated": gated}], "nvcc": []})


def test_occupancy_counts_registers_and_shared_memory():
    assert kc.occupancy(32, 8, 0) == 64  # 32 registers: the whole SM
    assert kc.occupancy(255, 4, 0) == 8  # 256 a thread: 8 warps of 64K registers
    assert kc.occupancy(128, 4, 0) == 16
    assert kc.occupancy(32, 4, 100 * 1024) == 8  # two blocks' shared memory fit in 228 KiB


PLANTED_CU = r"""
__global__ void planted_spill(const float4* x, float4* y) {  // 64 live floats, capped at 32 registers
    float4 a[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) a[i] = x[i * blockDim.x + threadIdx.x];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        float4 b = a[15 - i];
        y[i * blockDim.x + threadIdx.x] = make_float4(a[i].x * b.w, a[i].y * b.z, a[i].z * b.y, a[i].w * b.x);
    }
}
__global__ void planted_clean(const float* x, float* y) { y[threadIdx.x] = 2.f * x[threadIdx.x]; }
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed on this machine")
def test_nvcc_check_reads_ptxas_and_catches_a_spilling_csrc_kernel(tmp_path):
    (tmp_path / "planted.cu").write_text(PLANTED_CU)
    rows, why = kc.nvcc_rows(tmp_path, maxrregcount=32)
    assert why is None
    by = {r["kernel"].split("(")[0]: r for r in rows}
    assert set(by) == {"planted_spill", "planted_clean"}, rows
    assert by["planted_clean"]["status"] == "ok" and by["planted_clean"]["registers"] > 0
    assert by["planted_spill"]["status"] == "spills" and by["planted_spill"]["stack_bytes"] > 0
    assert kc.failures({"triton": [], "nvcc": rows}) == [
        f"csrc/planted.cu {by['planted_spill']['kernel']}: spills"
    ]
    (tmp_path / "broken.cu").write_text("__global__ void broken() { undeclared(); }\n")
    rows, _ = kc.nvcc_rows(tmp_path)
    assert any(r["status"] == "compile error" and r["file"] == "broken.cu" for r in rows)


def test_ptxas_log_parser():
    log = """ptxas info    : Compiling entry function '_Z1fPf' for 'sm_90'
ptxas info    : Function properties for _Z1fPf
    8 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 360 bytes cmem[0]
"""
    (row,) = kc.parse_ptxas_log(log, "a.cu")
    assert row == {
        "file": "a.cu",
        "kernel": "_Z1fPf",
        "stack_bytes": 8,
        "spill_store_bytes": 4,
        "spill_load_bytes": 8,
        "registers": 255,
        "static_shared_bytes": 1024,
        "status": "spills",
    }


def test_only_the_listed_csrc_spills_are_allowed_and_only_up_to_their_bytes():
    name = "void (anonymous namespace)::adaln_backward_kernel<__half, float, 8, 1, true>(__half const*)"
    rows = [
        {
            "file": "adaln.cu",
            "kernel": name,
            "spill_store_bytes": 4,
            "spill_load_bytes": 8,
            "status": "spills",
        },
        {
            "file": "adaln.cu",
            "kernel": name,
            "spill_store_bytes": 16,
            "spill_load_bytes": 8,
            "status": "spills",
        },
        {"file": "x.cu", "kernel": "void other(float*)", "spill_store_bytes": 4, "status": "spills"},
    ]
    kc.allow_known_spills(rows)
    assert [r["status"] for r in rows] == ["known spill", "spills", "spills"]
    assert len(kc.failures({"triton": [], "nvcc": rows})) == 2


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed on this machine")
def test_the_loss_backward_vector_path_stores_128_bits_at_a_time(tmp_path):
    """csrc/edm_loss.cu's backward writes dz, df, dy: on its vector path (16 bytes a thread: fp32 x 4,
    bf16/fp16 x 8) every global store in the sm_90 SASS is a 128-bit one (they were 16-bit for bf16/fp16)."""
    import re

    cubin = tmp_path / "edm_loss.cubin"
    csrc = ROOT / "csrc"
    cmd = ["nvcc", "-arch=sm_90", "-O3", "-std=c++17", f"-I{csrc}", f"-I{csrc / 'include'}", "-cubin",
           "-o", str(cubin), str(csrc / "edm_loss.cu")]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    sass = subprocess.run([kc._tool("cuobjdump"), "--dump-sass", str(cubin)], capture_output=True, text=True)
    kernels = {}
    for body in re.split(r"\n\s*Function : ", sass.stdout)[1:]:
        name = body.split("\n", 1)[0]
        if "loss_backward_kernel" in name:
            kernels[name] = re.findall(r"STG\.E[.\w]*", body)
    vector = {n: s for n, s in kernels.items() if "Li4E" in n or "Li8E" in n}
    assert len(vector) == 3 and len(kernels) == 6, list(kernels)
    assert all(s and set(s) == {"STG.E.128"} for s in vector.values()), vector
