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


def test_every_subpackage_is_listed_for_the_wheel():
    # setuptools installs only the packages pyproject.toml lists: a missing subpackage works in the
    # editable install of a checkout and is absent from a wheel
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import pytest

        pytest.skip("tomllib needs Python 3.11")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {"fastrank." + os.path.relpath(d, os.path.join(ROOT, "fastrank")).replace(os.sep, ".")
             for d, _, files in os.walk(os.path.join(ROOT, "fastrank")) if "__init__.py" in files}
    found = {"fastrank" if f == "fastrank.." else f for f in found} | {"fastrank.triton_kernels"}
    assert found - {"fastrank.triton_kernels"} <= listed and "fastrank.triton_kernels" in listed, found - listed


def test_the_repository_refers_to_nothing_outside_itself():
    # the design lives in docs/design.md; comments once cited a specification kept elsewhere
    bad = []
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x not in ("build", "results", "__pycache__")]
        for name in files:
            if name.endswith((".py", ".h", ".cpp", ".cu", ".cuh", ".md", ".sh", ".toml", ".txt")) or name == "Makefile":
                path = os.path.join(d, name)
                with open(path, errors="replace") as f:
                    text = f.read()
                for needle in ("SPEC" + " §", "SPEC" + ".md", "../" + "shared"):
                    if needle in text:
                        bad.append(f"{os.path.relpath(path, ROOT)}: {needle}")
    assert not bad, bad
    assert os.path.exists(os.path.join(ROOT, "docs", "design.md"))
