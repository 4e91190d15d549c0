#!/usr/bin/env python3
"""Write the decode side of a release package (decoder, codebooks, LM; no encoder) for neucodec/models/archive/.

Run at a release that replaces the default model, on the outgoing package, so that every file it
wrote keeps decoding with a plain `neucodec decode` (`neucodec.archive`); then add a golden file of
the outgoing model (bin/make_golden.py) and commit both.

    python bin/archive_model.py neucodec/models/neucodec_24khz.json [--out neucodec/models/archive]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from neucodec import archive  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("package", type=Path, help="the release package's .json")
    p.add_argument("--out", type=Path, default=archive.ARCHIVE_DIR)
    args = p.parse_args(argv)
    path = archive.write_decode_side(args.package, args.out)
    size = path.with_suffix(".safetensors").stat().st_size
    print(f"{path} ({size / 1e6:.1f} MB of weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
