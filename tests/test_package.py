"""neucodec/__init__.py: every public name and submodule is reachable from `import neucodec`, loaded on first use."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import neucodec

PACKAGE = Path(neucodec.__file__).parent


def test_every_submodule_and_name_is_an_attribute() -> None:
    stems = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_"))
    for stem in stems:
        assert getattr(neucodec, stem).__name__ == f"neucodec.{stem}", stem
    for name in neucodec.__all__:
        assert getattr(neucodec, name) is not None, name
    assert set(stems) | set(neucodec.__all__) <= set(dir(neucodec))


def test_import_is_light_and_what_the_readme_names_works() -> None:
    """A fresh interpreter: `import neucodec` loads no torch; `neucodec.ecdc.encode_bytes` (named in the
    docs) and the README's names load their modules when first used."""
    script = """
import sys
import neucodec
assert "torch" not in sys.modules, "import neucodec loaded torch"
assert callable(neucodec.ecdc.encode_bytes) and callable(neucodec.ecdc.decode_bytes)
assert callable(neucodec.load_codec) and callable(neucodec.encode_file) and callable(neucodec.decode_file)
try:
    neucodec.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
else:
    raise AssertionError("no AttributeError")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       cwd=PACKAGE.parent)
    assert r.returncode == 0, r.stderr[-800:]
