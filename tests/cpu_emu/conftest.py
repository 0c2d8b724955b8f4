"""The emulated csrc/ tests run as their own CI step (`python -m tests.cpu_emu`), which builds the emulated
library variants and points DBLOCKS_EMU_LIB at each; a plain `pytest` leaves them out (their builds take
minutes). By hand: `DBLOCKS_EMU_LIB=build/cpu_emu/plain/libdblocks_ops_emu.so pytest tests/cpu_emu`."""

import os

collect_ignore_glob = [] if os.environ.get("DBLOCKS_EMU_LIB") else ["test_*.py"]
