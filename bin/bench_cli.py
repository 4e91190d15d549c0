#!/usr/bin/env python3
"""Wall time of the `neucodec` command as a user runs it: start-up (`--help`, `--version`, `info`,
`models`) and one 7 s clip (encode and decode, with and without `--lm`), each a fresh process.

    python bin/bench_cli.py                    # this checkout, a Markdown table on stdout
    python bin/bench_cli.py --tree /tmp/old    # another checkout (e.g. a `git worktree` of a release)

Each figure is the best of --runs runs (default 5 for start-up, 3 for the clip), with the default
model and settings and torch's default thread count; the clip is the first 7 s of
docs/examples/speech.flac. The load average is printed with the table: other work on the machine
slows every figure.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict[str, str], runs: int, cwd: str) -> float:
    """Best wall seconds of `cmd` in `runs`; a failing run stops the benchmark with its error."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
        times.append(time.perf_counter() - t0)
        if r.returncode:
            sys.exit(f"{' '.join(cmd)} failed: {r.stderr.strip()[-300:]}")
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=REPO, help="checkout whose neucodec to run [this one]")
    ap.add_argument("--runs", type=int, default=5, help="runs per start-up figure (the clip gets 3 at most)")
    ap.add_argument("--seconds", type=float, default=7.0, help="length of the clip")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(args.tree.resolve()) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cli = [sys.executable, "-m", "neucodec"]
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        x, sr = sf.read(str(REPO / "docs/examples/speech.flac"), dtype="float32")
        clip = Path(tmp) / "clip.wav"
        sf.write(str(clip), x[: int(args.seconds * sr)], sr)
        ecdc, lm, wav = Path(tmp) / "clip.ecdc", Path(tmp) / "clip_lm.ecdc", Path(tmp) / "out.wav"
        # run outside any checkout, so that PYTHONPATH, not the current folder, decides which neucodec runs
        subprocess.run([*cli, "encode", str(clip), str(ecdc), "-q"], env=env, check=True, cwd=tmp)
        rows.append(("python -c pass (the interpreter alone)",
                     timed([sys.executable, "-c", "pass"], env, args.runs, tmp)))
        rows.append(("python -c 'import torch'", timed([sys.executable, "-c", "import torch"], env, args.runs, tmp)))
        for words in (["--help"], ["--version"], ["info", "clip.ecdc"], ["models"]):
            cmd = [*cli, *[str(ecdc) if w == "clip.ecdc" else w for w in words]]
            rows.append((f"neucodec {' '.join(words)}", timed(cmd, env, args.runs, tmp)))
        clip_runs = min(args.runs, 3)
        for words, extra in ((["encode", "clip.wav", "clip.ecdc", "-f"], []),
                             (["decode", "clip.ecdc", "out.wav", "-f"], []),
                             (["encode", "clip.wav", "clip_lm.ecdc", "-f", "--lm"], []),
                             (["decode", "clip_lm.ecdc", "out.wav", "-f"], [])):
            paths = {"clip.wav": clip, "clip.ecdc": ecdc, "clip_lm.ecdc": lm, "out.wav": wav}
            cmd = [*cli, *[str(paths.get(w, w)) for w in words], "-q", *extra]
            rows.append((f"neucodec {' '.join(words)}", timed(cmd, env, clip_runs, tmp)))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"`python bin/bench_cli.py{'' if args.tree == REPO else ' --tree ' + str(args.tree)}` ({when}, "
          f"load {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores; clip: {args.seconds:g} s of speech.flac)\n")
    print(f"| command | wall time (best of {args.runs}; the clip's of {min(args.runs, 3)}) |\n|---|---|")
    for name, t in rows:
        print(f"| `{name}` | {t:.2f} s |")


if __name__ == "__main__":
    main()
