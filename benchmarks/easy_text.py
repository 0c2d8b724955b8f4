"""Issue 21's easy text: three sentences of odd lengths picked at random, 20,000 times (393,244 bytes,
sha256 a7b66472...). The language-model rows named `@easy.txt` on the results page were trained on it:

    python benchmarks/easy_text.py easy.txt
    python benchmarks/quality.py --task mdm --data easy.txt --steps-per-block 300 --seeds 0 1 \
        --eval-windows 256
"""

from __future__ import annotations

import hashlib
import random
import sys
from pathlib import Path

SENTENCES = ("one red fox jumps. ", "two blue birds sing. ", "a cold wind blows. ")


def easy_text(picks: int = 20_000, seed: int = 0) -> bytes:
    pick = random.Random(seed)
    return "".join(pick.choice(SENTENCES) for _ in range(picks)).encode()


def main(argv=None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit(__doc__)
    out, text = Path(argv[0]), easy_text()
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(text)
    tmp.replace(out)
    print(f"wrote {out}: {len(text)} bytes, sha256 {hashlib.sha256(text).hexdigest()[:16]}")
    return out


if __name__ == "__main__":
    main()
