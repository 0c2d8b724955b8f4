"""csrc/: the C library builds with nvcc, its header works from plain C, and dblocks_fast._C works.

CI runs this on a machine with nvcc and no GPU: nothing here skips there. Only the numeric check
needs a GPU. A missing nvcc or an unbuilt _C is a failure that says why, not a skip.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dblocks_fast import _C_loader

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "include" / "dblocks" / "ops.h"
# What the CUDA runtime reports when a machine has no usable GPU or no driver at all.
NO_GPU_ERRORS = r"cudaErrorNoDevice|cudaErrorInsufficientDriver|cudaErrorStubLibrary|cudaErrorNotSupported"
HAS_GPU = torch.cuda.is_available() or os.path.exists("/dev/nvidiactl")

C_PROGRAM = Path(__file__).with_name("c_api_check.c").read_text()


def run(*cmd, cwd=None):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def tool(name):
    # The venv's bin/ may not be on PATH (pytest run by path); its cmake and ninja live there.
    return shutil.which(name, path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))


@pytest.fixture(scope="module")
def c_library(tmp_path_factory):
    """Builds and installs csrc/ as the C library alone (one real arch, to stay fast)."""
    nvcc, cmake = tool("nvcc"), tool("cmake")
    if not nvcc or not cmake:
        pytest.fail(f"this test needs nvcc and cmake on PATH (nvcc={nvcc}, cmake={cmake})")
    work = tmp_path_factory.mktemp("csrc")
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}"] if tool("ninja") else []
    run(
        cmake,
        "-S",
        ROOT,
        "-B",
        work / "build",
        *generator,
        "-DDBLOCKS_BUILD_PYTHON=OFF",
        f"-DCMAKE_CUDA_COMPILER={nvcc}",
        "-DCMAKE_CUDA_ARCHITECTURES=80-real",
    )
    run(cmake, "--build", work / "build", "-j", str(os.cpu_count() or 1))
    run(cmake, "--install", work / "build", "--prefix", work / "install")
    return work


def test_c_library_builds_and_installs(c_library):
    lib = list((c_library / "install").glob("lib*/libdblocks_ops.a"))
    assert len(lib) == 1, "the static library was not installed"
    assert (c_library / "install" / "include" / "dblocks" / "ops.h").read_text() == HEADER.read_text()


def test_header_works_from_plain_c(c_library):
    install = c_library / "install"
    (c_library / "prog.c").write_text(C_PROGRAM)
    # Compiled by the C compiler with no CUDA include path; nvcc only links the CUDA runtime.
    run(
        "cc",
        "-std=c99",
        "-Wall",
        "-Wextra",
        "-pedantic",
        "-Werror",
        f"-I{install / 'include'}",
        "-c",
        "prog.c",
        "-o",
        "prog.o",
        cwd=c_library,
    )
    lib = next(install.glob("lib*/libdblocks_ops.a"))
    run(tool("nvcc"), "prog.o", lib, "-o", "prog", cwd=c_library)
    assert "version=100 cudart=" in run(c_library / "prog")


def test_header_functions_are_exported(c_library):
    declared = set(re.findall(r"\b(dblocks_\w+)\s*\(", HEADER.read_text()))
    lib = next((c_library / "install").glob("lib*/libdblocks_ops.a"))
    exported = set(re.findall(r" T (dblocks_\w+)$", run("nm", "-g", "--defined-only", lib), re.M))
    public = ["version", "error_string", "edm_coefficients_f32", "adaln_forward", "adaln_backward",
              "edm_l2_loss_forward", "edm_l2_loss_backward", "fused_adamw_f32"]  # fmt: skip
    assert {f"dblocks_{name}" for name in public} <= declared
    assert declared == exported


@pytest.fixture(scope="module")
def ext():
    module = _C_loader.load()
    if module is None:
        pytest.fail(f"dblocks_fast._C does not import: {_C_loader.why_unavailable()}")
    return module


@pytest.mark.parametrize(
    "call",
    [
        lambda ext: ext.adaln_forward(16, 0, 0, 16, 16, 0, 16, 0, 0, 0, 1, 4, 4, ext.FLOAT32, ext.FLOAT32,
                                      1e-6, 0),
        lambda ext: ext.adaln_backward(16, 0, 16, 0, 0, 16, 16, 16, 16, 0, 16, 16, 0, 0, 1, 1, 4, 4,
                                       ext.FLOAT32, ext.FLOAT32, 0),
        lambda ext: ext.edm_l2_loss_forward(16, 16, 16, 16, 16, 16, 0, 16, 2, 0, 0.5, ext.BFLOAT16, 0),
        lambda ext: ext.edm_l2_loss_backward(16, 16, 0, 0, 0, 16, 0, 0, 2, 4, 0.5, 9, 0),
        lambda ext: ext.fused_adamw_f32(16, 16, 16, 16, 0, 4, -1.0, 0.9, 0.999, 1e-8, 0.0, 1, 0, 0, 0),
    ],
    ids=["adaln_forward", "adaln_backward", "edm_l2_loss_forward", "edm_l2_loss_backward", "fused_adamw_f32"],
)  # fmt: skip
def test_new_entry_points_check_arguments_before_cuda(ext, call):
    with pytest.raises(RuntimeError, match=": invalid argument$"):
        call(ext)


@pytest.mark.skipif(HAS_GPU, reason="checks the error reported on a machine without a GPU")
def test_kernel_launch_without_gpu_reports_the_cuda_error(ext):
    with pytest.raises(RuntimeError, match=f"fused_adamw_f32: CUDA error: ({NO_GPU_ERRORS}): "):
        ext.fused_adamw_f32(16, 32, 48, 64, 0, 4, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, 0, 0, 0)
    with pytest.raises(RuntimeError, match=f"edm_l2_loss_forward: CUDA error: ({NO_GPU_ERRORS}): "):
        ext.edm_l2_loss_forward(16, 32, 48, 64, 80, 96, 0, 112, 2, 4, 0.5, ext.FLOAT32, 0)


def test_extension_imports(ext):
    assert _C_loader.why_unavailable() == ""
    assert ext.version() == 100
    assert ext.cuda_runtime_version() >= 12000


def test_extension_functions_are_documented(ext):
    assert ext.__doc__ and "dblocks" in ext.__doc__
    functions = {name: f for name, f in vars(ext).items() if callable(f) and not name.startswith("_")}
    assert {"edm_coefficients_f32", "version", "cuda_runtime_version", "adaln_forward", "adaln_backward",
            "edm_l2_loss_forward", "edm_l2_loss_backward", "fused_adamw_f32"} <= set(functions)  # fmt: skip
    for name, function in functions.items():
        signature, _, text = function.__doc__.partition("\n")
        assert signature.startswith(name + "("), name
        assert len(text.strip()) > 20, f"_C.{name} has no docstring"


@pytest.mark.parametrize(
    "sigma_ptr, n, sigma_data",
    [(16, -1, 0.5), (0, 4, 0.5), (16, 4, 0.0), (16, 4, -1.0), (16, 4, float("nan")), (0, 0, 0.0)],
)
def test_invalid_arguments_raise_before_cuda(ext, sigma_ptr, n, sigma_data):
    # The fake pointer 16 is never dereferenced: argument checks come before any CUDA call.
    with pytest.raises(RuntimeError, match="edm_coefficients_f32: invalid argument$"):
        ext.edm_coefficients_f32(sigma_ptr, n, sigma_data, 32, 0, 0, 0, 0, 0)


def test_empty_input_is_a_no_op(ext):
    ext.edm_coefficients_f32(0, 0, 0.5, 0, 0, 0, 0, 0, 0)


@pytest.mark.skipif(HAS_GPU, reason="checks the error reported on a machine without a GPU")
def test_cuda_error_without_gpu(ext):
    with pytest.raises(RuntimeError, match=f"edm_coefficients_f32: CUDA error: ({NO_GPU_ERRORS}): "):
        ext.edm_coefficients_f32(16, 4, 0.5, 32, 48, 64, 80, 96, 0)


def test_torch_wrapper_rejects_bad_input():
    with pytest.raises(ValueError, match="CUDA tensor"):
        _C_loader.edm_coefficients_cuda(torch.rand(4), 0.5)
    with pytest.raises(TypeError):
        _C_loader.edm_coefficients_cuda([1.0], 0.5)


def reference(sigma, sd):
    s = sigma.double()
    total = s**2 + sd**2
    return sd**2 / total, s * sd / total.sqrt(), total.rsqrt(), 0.25 * s.log(), total / (s * sd) ** 2


NAMES = ("c_skip", "c_out", "c_in", "c_noise", "weight")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n", [1, 37, 1000003])
def test_edm_coefficients_match_float64(n):
    gen = torch.Generator(device="cuda").manual_seed(n)
    sigma = torch.empty(n, device="cuda").uniform_(0.002, 80.0, generator=gen)
    outputs = _C_loader.edm_coefficients_cuda(sigma, 0.5)
    for name, got, want in zip(NAMES, outputs, reference(sigma, 0.5), strict=True):
        assert got.dtype == torch.float32 and got.shape == sigma.shape, name
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0, msg=lambda m, k=name: f"{k}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_null_outputs_are_skipped_and_in_place_works():
    ext = _C_loader.load()
    sigma = torch.linspace(0.002, 80.0, 1001, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    c_noise = torch.empty_like(sigma)
    ext.edm_coefficients_f32(sigma.data_ptr(), 1001, 0.5, 0, 0, 0, c_noise.data_ptr(), 0, stream)
    torch.testing.assert_close(c_noise.double(), reference(sigma, 0.5)[3], rtol=2e-6, atol=0)
    c_in = sigma.clone()  # written over its own input
    ext.edm_coefficients_f32(c_in.data_ptr(), 1001, 0.5, 0, 0, c_in.data_ptr(), 0, 0, stream)
    torch.testing.assert_close(c_in.double(), reference(sigma, 0.5)[2], rtol=2e-6, atol=0)
