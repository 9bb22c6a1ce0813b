"""Build layout: the extension's sources must compile to distinct object files.

torch's ninja builder names each object after its source's directory and stem, so
`csrc/cuda/x.cu` and `csrc/cuda/x.cpp` would both become `csrc/cuda/x.o` and ninja refuses
the build ("multiple rules generate ..."): this is what broke the first CUDA build, which no
CPU-only machine runs.
"""
import glob
import os
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_source_has_its_own_object_file():
    sources = [os.path.relpath(p, ROOT) for pattern in ("csrc/*.cpp", "csrc/cpu/*.cpp", "csrc/cuda/*.cu", "csrc/cuda/*.cpp")
               for p in glob.glob(os.path.join(ROOT, pattern))]
    assert any(s.endswith(".cu") for s in sources) and any(s.startswith(os.path.join("csrc", "cpu")) for s in sources)
    objects = Counter(os.path.splitext(s)[0] for s in sources)
    clashes = sorted(o for o, c in objects.items() if c > 1)
    assert not clashes, f"sources that compile to the same object file: {clashes}"
