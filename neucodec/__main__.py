"""`python -m neucodec`: the command-line tool (see neucodec.cli)."""
from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main()
