"""Builds the optional CUDA extension dblocks_fast._C from csrc/ through CMake.

Metadata lives in pyproject.toml. DBLOCKS_BUILD_CUDA: 0 = skip, 1 = required (any failure is an
error), unset = build when nvcc is found, else warn once and install pure Python.
DBLOCKS_CUDA_ARCHS overrides CMAKE_CUDA_ARCHITECTURES (default 80-real;90-real;90-virtual).
"""

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
MODE = os.environ.get("DBLOCKS_BUILD_CUDA", "").strip()


class BuildFailed(Exception):
    pass


def find_tool(name):
    # The interpreter's own bin/ comes first: `venv/bin/pip install` does not put it on PATH,
    # and that is where the pip-installed cmake and ninja live.
    search = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return shutil.which(name, path=search)


def cmake_step(what, cmd):
    sys.stdout.flush()  # keep our log lines in order with CMake's
    if subprocess.run(cmd).returncode != 0:
        raise BuildFailed(f"CMake {what} failed, see its output above")


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME")
    path = shutil.which("nvcc") or (cuda_home and shutil.which("nvcc", path=os.path.join(cuda_home, "bin")))
    if not path:
        raise BuildFailed("nvcc not found on PATH or in $CUDA_HOME/bin")
    return path


class CMakeBuild(build_ext):
    def build_extensions(self):
        try:
            for ext in self.extensions:
                self.build_cmake(ext)
        except (BuildFailed, OSError) as exc:
            if MODE == "1":
                sys.exit(f"error: DBLOCKS_BUILD_CUDA=1 but building dblocks_fast._C failed: {exc}")
            print(
                f"WARNING: dblocks_fast._C not built ({exc}); installing pure Python. "
                "Set DBLOCKS_BUILD_CUDA=1 to make this an error.",
                file=sys.stderr,
            )
            self.extensions = []  # nothing for setuptools to copy or record

    def build_cmake(self, ext):
        nvcc = find_nvcc()
        cmake = find_tool("cmake")
        if not cmake:
            raise BuildFailed("cmake not found")
        try:
            import pybind11
        except ImportError as exc:
            raise BuildFailed("pybind11 is not installed") from exc

        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("DBLOCKS_CUDA_ARCHS", "80-real;90-real;90-virtual")
        config = [
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-DDBLOCKS_BUILD_PYTHON=ON",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
        ]
        ninja = find_tool("ninja")
        if ninja:
            config += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        cmake_step("configure", [cmake, "-S", str(ROOT), "-B", str(build_dir), *config])
        jobs = str(os.cpu_count() or 1)
        cmake_step("build", [cmake, "--build", str(build_dir), "--target", "_C", "-j", jobs])

        # CMake names the module after the Python it found; setuptools decides where it goes.
        built = glob.glob(str(build_dir / "_C*.so")) + glob.glob(str(build_dir / "_C*.pyd"))
        if len(built) != 1:
            raise BuildFailed(f"expected one _C module in {build_dir}, found {built}")
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], target)


# Listing csrc/ as sources puts it in the sdist; CMake, not setuptools, compiles it.
sources = ["CMakeLists.txt", *sorted(glob.glob("csrc/**/*.*", root_dir=ROOT, recursive=True))]
ext_modules = [] if MODE == "0" else [Extension("dblocks_fast._C", sources=sources)]
setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
