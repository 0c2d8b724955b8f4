# Included by the top-level CMakeLists.txt when DBLOCKS_CPU_EMULATION is ON: csrc/*.cu compiled as C++ (the CUDA
# headers in host mode) with the emulator's runtime into one shared library for ctypes.
#   cmake -S . -B build/cpu_emu/plain -G Ninja -DDBLOCKS_CPU_EMULATION=ON && cmake --build build/cpu_emu/plain
# Options: DBLOCKS_EMU_SANITIZE = "" | "address,undefined" | "thread" (the race check: the kernels are
# instrumented, the emulator serves the hooks, libtsan is not linked); DBLOCKS_GRID_CAP and
# DBLOCKS_BWD_TARGET_BLOCKS lower the grid caps so that small inputs run the grid-stride loops.
find_package(CUDAToolkit REQUIRED)  # headers only: no CUDA compiler, no device, no driver
set(CMAKE_CXX_STANDARD 17)
set(CMAKE_CXX_STANDARD_REQUIRED ON)
set(DBLOCKS_EMU_SANITIZE "" CACHE STRING "address,undefined | thread | empty")
set(DBLOCKS_GRID_CAP "" CACHE STRING "lower every kernel's maximum grid to this many blocks")
set(DBLOCKS_BWD_TARGET_BLOCKS "" CACHE STRING "the AdaLN backward's target block count")

set(DBLOCKS_EMU_ONLY "" CACHE STRING "build only these csrc/ files (names, ';'-separated; planted-fault builds)")
if(DBLOCKS_EMU_ONLY)
  list(TRANSFORM DBLOCKS_EMU_ONLY PREPEND "${CMAKE_CURRENT_SOURCE_DIR}/csrc/" OUTPUT_VARIABLE emu_kernel_sources)
else()
  file(GLOB emu_kernel_sources CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/*.cu")
endif()
set_source_files_properties(${emu_kernel_sources} PROPERTIES LANGUAGE CXX)  # CMP0119: compiled with -x c++
add_library(dblocks_ops_emu SHARED ${emu_kernel_sources} tests/cpu_emu/emu_runtime.cpp tests/cpu_emu/emu_race.cpp)
target_include_directories(dblocks_ops_emu PRIVATE csrc csrc/include tests/cpu_emu ${CUDAToolkit_INCLUDE_DIRS})
target_compile_definitions(dblocks_ops_emu PRIVATE DBLOCKS_CPU_EMULATION)
foreach(cap DBLOCKS_GRID_CAP DBLOCKS_BWD_TARGET_BLOCKS)
  if(${cap})
    target_compile_definitions(dblocks_ops_emu PRIVATE ${cap}=${${cap}})
  endif()
endforeach()
# -O0 by default: the build is most of the stage's time (adaln.cu: 4 s of CPU at -O0, 12 s at -O1);
# -g: sanitizer reports and the race check name source lines.
set(DBLOCKS_EMU_OPT "-O0" CACHE STRING "optimization flag of the emulated build")
target_compile_options(dblocks_ops_emu PRIVATE ${DBLOCKS_EMU_OPT} -g -fno-omit-frame-pointer -Wall -Wno-unknown-pragmas)
if(DBLOCKS_EMU_SANITIZE STREQUAL "thread")
  set_source_files_properties(${emu_kernel_sources} PROPERTIES COMPILE_OPTIONS "-fsanitize=thread")
elseif(DBLOCKS_EMU_SANITIZE)
  target_compile_options(dblocks_ops_emu PRIVATE -fsanitize=${DBLOCKS_EMU_SANITIZE} -fno-sanitize-recover=all)
  target_link_options(dblocks_ops_emu PRIVATE -fsanitize=${DBLOCKS_EMU_SANITIZE})
endif()
