#!/usr/bin/env python3
"""Build neucodec's training corpus from the Debian packages in docs/audio-sources.md.

The script downloads the 36 packages of the shared audio-sources document with
``apt-get download`` (no root needed) and unpacks them with ``dpkg -x``, plus the
``.pk3`` zips of nexuiz-music and openarena-data (§2.2). It then selects files with
the exact include/exclude rules of §4.1 and the asterisk G.722 prompts of §4.2, and
nothing else. Finally it converts them to int16 mono 24 kHz arrays split into
train and a held-out dev set, ``corpus/{train,dev}/{speech,music,sfx}.npy`` with a
JSON entry table each, writes ``corpus/manifest.json`` and builds 10 s dev
evaluation clips under ``corpus/dev/clips/``. Each step is resumable: it is skipped
when its output exists and matches its input, and every output file is written to
a temporary name first and renamed, so a crash leaves nothing half-written.

Each ``{category}.json`` lists ``{"source", "path", "tier", "native_sr", "offset", "length",
"start"}`` per entry: ``offset``/``length`` locate it in the .npy (samples at 24 kHz), ``path``
is ``<inventory>/<path in package>`` under ``unpacked/`` and ``start`` is where the entry
begins inside that file (non-zero only for the pieces around a 60 s dev excerpt). Samples
are clipped to [-1, 1] and stored as ``round(x * 32767)``, without normalisation.

Usage::

    python bin/build_corpus.py [--root DIR] [--steps download,unpack,index,convert,clips]
                               [--jobs 2] [--only-packages PKG,...] [--force]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import urllib.parse
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 24000
CATEGORIES = ("speech", "music", "sfx")
SPLITS = ("train", "dev")
STEPS = ("download", "unpack", "index", "convert", "clips")
AUDIO_EXTENSIONS = frozenset(
    ".wav .ogg .oga .flac .mp3 .opus .spx .au .aif .aiff .wv .m4a .aac .caf .voc .snd"
    " .mid .midi .mod .xm .it .s3m".split()
)
MIN_SECONDS = 0.1
INT16_SCALE = 32767.0
DEV_FRACTION = 0.03
DEV_MIN_FILES = 4  # sources with at least this many files get at least one dev file
EXCERPT_SECONDS = 60.0
CLIP_SECONDS = 10.0
CLIP_GAP_SECONDS = 0.2
CLIP_COUNTS = {"speech": 8, "music": 8, "sfx": 4}
NPY_HEADER_BYTES = 128
FFMPEG_TIMEOUT_S = 300
G722_BYTES_PER_SECOND = 8000  # 64 kbit/s
INDEX_VERSION = 1
CONVERT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Rule:
    """One line of the rule table in audio-sources.md §4.1."""

    category: str
    source: str
    inventory: str
    include: str
    exclude: str | None


RULES: tuple[Rule, ...] = (
    Rule("speech", "tuxpaint-desc", "tuxpaint-stamps-default", r"_desc(_[A-Za-z_]+)?\.ogg$", r"_desc_(be|da|ru)\.ogg$"),
    Rule("speech", "fillets-cs", "fillets-ng-data-cs", r"/cs/", None),
    Rule("speech", "fillets-nl", "fillets-ng-data-nl", r"/nl/", None),
    Rule("speech", "klettres", "klettres-data", r"\.ogg$", r"/klettres/(en|it|ru|da)/"),
    Rule("speech", "ktuberling", "ktuberling-data", r"/sounds/[a-z@_]+/", r"/sounds/(ru|da|it|en)/"),
    Rule("speech", "hedgewars-voices", "hedgewars-data", r"/voices/", None),
    Rule("speech", "kajongg", "kajongg", r"/voices/(de/)?(male1|female1)/", None),
    Rule("speech", "megaglest-unit-voices", "megaglest-data", r"/units/.*/sounds/", None),
    Rule("music", "warzone2100-music", "warzone2100-music", r"\.opus$", None),
    Rule("music", "planetblupi-music-ogg", "planetblupi-music-ogg", r"", None),
    Rule("music", "wesnoth-1.16-music", "wesnoth-1.16-music", r"", None),
    Rule("music", "nexuiz-music", "nexuiz-music-x", r"", None),
    Rule("music", "colobot-music", "colobot-common-sounds", r"/music/", None),
    Rule("music", "drascula-music", "drascula-music", r"", None),
    Rule("music", "flare-music", "flare-game", r"/music/", None),
    Rule("music", "megaglest-music", "megaglest-data", r"/music/", None),
    Rule("music", "pushover", "pushover-data", r"", None),
    Rule("music", "fillets-music", "fillets-ng-data", r"/fillets-ng/music/", None),
    Rule("music", "fof-sectoid-stems", "fretsonfire-songs-sectoid", r"", None),
    Rule("music", "wordwarvi-music", "wordwarvi-sound", r"(mix|music|facedown)", None),
    Rule("music", "extremetuxracer-music", "extremetuxracer-data", r"/music/", None),
    Rule("music", "lincity-music", "lincity-ng-data", r"/music/", None),
    Rule("music", "lomiri-ringtones", "lomiri-sounds", r"/ringtones/", None),
    Rule("music", "asc-music(22k)", "asc-music", r"", None),
    Rule("sfx", "tuxpaint-sfx", "tuxpaint-stamps-default", r"\.(ogg|wav)$", r"_desc(_[A-Za-z_]+)?\.(ogg|wav)$"),
    Rule("sfx", "megaglest-ambience", "megaglest-data", r"/tilesets/", None),
    Rule("sfx", "hydrogen-drumkits", "hydrogen-drumkits", r"", None),
    Rule("sfx", "openarena-sfx", "openarena-data-x", r"", r"(festivox|/voices/|/player/)"),
    Rule("sfx", "hedgewars-sfx", "hedgewars-data", r"/Data/Sounds/[^/]+$", None),
    Rule("sfx", "wesnoth-sfx", "wesnoth-1.16-data", r"", None),
    Rule("sfx", "flare-sfx", "flare-game", r"", r"/music/"),
    Rule("sfx", "colobot-sfx", "colobot-common-sounds", r"/sounds/", None),
    Rule("sfx", "wordwarvi-sfx", "wordwarvi-sound", r"", r"(mix|music|facedown)"),
    Rule("sfx", "extremetuxracer-sfx", "extremetuxracer-data", r"/sounds/", None),
    Rule("sfx", "lincity-sfx", "lincity-ng-data", r"", r"/music/"),
    Rule("sfx", "theme-sounds", "oxygen-sounds", r"", None),
    Rule("sfx", "theme-sounds", "deepin-sound-theme", r"", None),
    Rule("sfx", "theme-sounds", "yaru-theme-sound", r"", None),
    Rule("sfx", "theme-sounds", "lomiri-sounds", r"", r"/ringtones/"),
    Rule("sfx", "misc-edu", "libreoffice-common", r"", None),
    Rule("sfx", "misc-edu", "tuxpaint-data", r"", None),
    Rule("sfx", "misc-edu", "tuxtype-data", r"", None),
)

# §4.2: every .g722 file of these four packages is speech, tier "wide".
ASTERISK_PACKAGES: dict[str, str] = {
    "asterisk-core-sounds-en-g722": "asterisk-g722-en",
    "asterisk-core-sounds-es-g722": "asterisk-g722-es",
    "asterisk-core-sounds-fr-g722": "asterisk-g722-fr",
    "asterisk-core-sounds-ru-g722": "asterisk-g722-ru",
}

# §2.2: inventory folders filled from zip archives inside another package.
PK3_INVENTORIES: dict[str, tuple[str, str]] = {
    # inventory name: (package, folder holding the .pk3 files, relative to the package)
    "nexuiz-music-x": ("nexuiz-music", "usr/share/games/nexuiz/data"),
    "openarena-data-x": ("openarena-data", "usr/share/games/openarena"),
}
PK3_NAMES: dict[str, str | None] = {"nexuiz-music-x": "music.pk3", "openarena-data-x": None}

# Files / minutes per source from audio-sources.md §3, used only to report mismatches.
EXPECTED: dict[str, tuple[int, float]] = {
    "tuxpaint-desc": (5481, 132.8), "fillets-cs": (1882, 105.7), "fillets-nl": (1616, 95.8),
    "asterisk-g722-en": (568, 25.5), "asterisk-g722-es": (527, 31.0),
    "asterisk-g722-fr": (561, 26.0), "asterisk-g722-ru": (576, 24.8),
    "klettres": (1540, 44.8), "ktuberling": (1476, 24.6), "megaglest-unit-voices": (891, 16.1),
    "hedgewars-voices": (839, 14.9), "kajongg": (168, 2.2),
    "warzone2100-music": (30, 243.2), "planetblupi-music-ogg": (10, 162.9),
    "wesnoth-1.16-music": (41, 128.2), "nexuiz-music": (18, 84.1), "colobot-music": (21, 65.9),
    "drascula-music": (31, 46.8), "flare-music": (12, 37.8), "pushover": (10, 31.1),
    "megaglest-music": (9, 31.0), "fof-sectoid-stems": (8, 27.1), "fillets-music": (15, 24.5),
    "asc-music(22k)": (3, 17.6), "wordwarvi-music": (4, 10.4), "extremetuxracer-music": (10, 9.5),
    "lincity-music": (3, 9.4), "lomiri-ringtones": (29, 6.8),
    "hydrogen-drumkits": (754, 19.6), "megaglest-ambience": (28, 13.2), "lincity-sfx": (141, 8.3),
    "tuxpaint-sfx": (441, 7.9), "openarena-sfx": (158, 6.4), "misc-edu": (89, 5.7),
    "wordwarvi-sfx": (57, 5.7), "wesnoth-sfx": (291, 5.6), "flare-sfx": (111, 5.4),
    "theme-sounds": (105, 3.1), "hedgewars-sfx": (104, 2.1), "colobot-sfx": (83, 1.7),
    "extremetuxracer-sfx": (10, 0.4),
}

STEMS_SOURCE = "fof-sectoid-stems"
STEMS_MIX_SOURCE = "fof-sectoid-stems-mix"
STEM_NAMES = ("song.ogg", "guitar.ogg")

# Held out on purpose: evaluation.md §4.1 uses this prompt as test clip B.
FORCED_DEV = frozenset({
    "asterisk-core-sounds-en-g722/usr/share/asterisk/sounds/en_US_f_Allison/demo-congrats.g722",
})

# Dev clip preferences: sources in order, cycled until the clip count is reached.
SPEECH_CLIP_SOURCES = (
    "tuxpaint-desc", "fillets-cs", "asterisk-g722-en", "hedgewars-voices", "fillets-nl",
    "asterisk-g722-fr", "klettres", "asterisk-g722-ru", "ktuberling", "asterisk-g722-es",
    "megaglest-unit-voices", "kajongg",
)
MUSIC_CLIP_SOURCES = (
    "warzone2100-music", "planetblupi-music-ogg", "wesnoth-1.16-music", "nexuiz-music",
    STEMS_MIX_SOURCE, "colobot-music", "drascula-music", "flare-music", "pushover",
    "megaglest-music", "wordwarvi-music", "extremetuxracer-music", "lincity-music",
)
SFX_CLIP_SOURCES = (
    "hydrogen-drumkits", "megaglest-ambience", "tuxpaint-sfx", "openarena-sfx",
    "wesnoth-sfx", "flare-sfx", "theme-sounds", "wordwarvi-sfx",
)
CLIP_SKIP_SOURCES = (STEMS_SOURCE,)  # the stem mix already stands for these songs
# How to name the voice/language of a speech file, per source (first group of the match).
VOICE_PATTERNS: dict[str, str] = {
    "tuxpaint-desc": r"_desc(?:_([A-Za-z_]+))?\.ogg$",
    "klettres": r"/klettres/([^/]+)/",
    "ktuberling": r"/sounds/([^/]+)/",
    "hedgewars-voices": r"/voices/([^/]+)/",
    "kajongg": r"/voices/(?:(de)/)?",
}


# ---------------------------------------------------------------------------- utilities


def log(message: str) -> None:
    """Print one timestamped progress line and flush it (the run is usually logged to a file)."""
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    """Return the parsed JSON at ``path``, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_audio_name(name: str) -> bool:
    """True when the file name has one of the audio extensions of §2.3 (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS


def tier_of(sample_rate: int) -> str:
    """Tier of §4.1 from the native sample rate: full ≥ 32 kHz, wide ≥ 16 kHz, else narrow."""
    if sample_rate >= 32000:
        return "full"
    if sample_rate >= 16000:
        return "wide"
    return "narrow"


def hash_fraction(key: str) -> float:
    """Deterministic pseudo-random number in [0, 1) from the sha1 of ``key``."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:12], 16) / float(16**12)


def all_packages() -> list[str]:
    """The 36 Debian packages the rules need, sorted."""
    packages = {PK3_INVENTORIES[r.inventory][0] if r.inventory in PK3_INVENTORIES else r.inventory for r in RULES}
    return sorted(packages | set(ASTERISK_PACKAGES))


def inventories_of(packages: Iterable[str]) -> list[str]:
    """Inventory folders (package names plus the ``-x`` zip extractions) for ``packages``."""
    wanted = set(packages)
    names = {r.inventory for r in RULES} | set(ASTERISK_PACKAGES)
    return sorted(n for n in names if (PK3_INVENTORIES[n][0] if n in PK3_INVENTORIES else n) in wanted)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Folders under the work root."""

    root: Path

    @property
    def debs(self) -> Path:
        """Downloaded .deb files."""
        return self.root / "debs"

    @property
    def unpacked(self) -> Path:
        """One folder per package or zip inventory."""
        return self.root / "unpacked"

    @property
    def corpus(self) -> Path:
        """The converted corpus."""
        return self.root / "corpus"

    @property
    def index(self) -> Path:
        """Selected files with their metadata."""
        return self.root / "index.json"

    @property
    def manifest(self) -> Path:
        """Totals, versions and licences; written last by the convert step."""
        return self.corpus / "manifest.json"

    @property
    def clips(self) -> Path:
        """The 10 s dev evaluation clips."""
        return self.corpus / "dev" / "clips"


# ---------------------------------------------------------------------------- download


def find_deb(debs: Path, package: str) -> Path | None:
    """The downloaded ``PKG_VERSION_ARCH.deb`` of ``package``, or None."""
    hits = sorted(debs.glob(f"{package}_*.deb"))
    return hits[-1] if hits else None


def deb_version(deb: Path) -> str:
    """Package version from a .deb file name (``%3a`` is the epoch colon)."""
    return urllib.parse.unquote(deb.name.split("_")[1])


def download_package(debs: Path, package: str) -> bool:
    """Run ``apt-get download`` for one package unless its .deb is already there."""
    if find_deb(debs, package) is not None:
        return True
    partial = debs / ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    proc = subprocess.run(["apt-get", "download", package], cwd=partial, capture_output=True, text=True)
    got = sorted(partial.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not got:
        log(f"[download] FAILED {package}: {proc.stderr.strip()[-500:]}")
        return False
    for deb in got:
        os.replace(deb, debs / deb.name)
    shutil.rmtree(partial, ignore_errors=True)
    return True


def step_download(layout: Layout, packages: list[str]) -> None:
    """Download every package's .deb into ``debs/``."""
    layout.debs.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    failed = []
    for i, package in enumerate(packages, 1):
        had = find_deb(layout.debs, package) is not None
        ok = download_package(layout.debs, package)
        if not ok:
            failed.append(package)
            continue
        deb = find_deb(layout.debs, package)
        assert deb is not None
        state = "present" if had else "downloaded"
        log(f"[download] {i}/{len(packages)} {state} {deb.name} ({deb.stat().st_size / 1e6:.1f} MB)")
    total = sum(d.stat().st_size for d in layout.debs.glob("*.deb"))
    log(f"[download] done in {time.monotonic() - start:.0f} s; {total / 1e9:.2f} GB of .deb files; "
        f"failed: {failed or 'none'}")


# ---------------------------------------------------------------------------- unpack


def unpack_package(layout: Layout, package: str) -> bool:
    """``dpkg -x`` one .deb into ``unpacked/PKG`` (through a temporary folder)."""
    dest = layout.unpacked / package
    if dest.is_dir():
        return True
    deb = find_deb(layout.debs, package)
    if deb is None:
        log(f"[unpack] missing .deb for {package}; run the download step")
        return False
    partial = layout.unpacked / f".{package}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    proc = subprocess.run(["dpkg", "-x", str(deb), str(partial)], capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"[unpack] FAILED {package}: {proc.stderr.strip()[-500:]}")
        shutil.rmtree(partial, ignore_errors=True)
        return False
    os.replace(partial, dest)
    log(f"[unpack] {package}")
    return True


def safe_member_path(name: str) -> Path | None:
    """A zip member name as a relative path, or None when it would escape the target folder."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return Path(*parts)


def extract_pk3_audio(archives: list[Path], dest: Path) -> int:
    """Extract the audio members of ``archives`` into ``dest``, keeping their internal paths."""
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    count = 0
    for archive in archives:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                rel = safe_member_path(info.filename)
                if info.is_dir() or rel is None or not is_audio_name(rel.name):
                    continue
                target = partial / rel
                if target.exists():
                    log(f"[unpack] {archive.name}: {rel} also in an earlier archive; the later one wins")
                else:
                    count += 1
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    os.replace(partial, dest)
    return count


def unpack_pk3_inventory(layout: Layout, inventory: str) -> bool:
    """Fill ``unpacked/<inventory>`` from the .pk3 zips of its package (§2.2)."""
    dest = layout.unpacked / inventory
    if dest.is_dir():
        return True
    package, folder = PK3_INVENTORIES[inventory]
    base = layout.unpacked / package / folder
    name = PK3_NAMES[inventory]
    archives = [base / name] if name else sorted(base.rglob("*.pk3"))
    archives = [a for a in archives if a.is_file() and not a.is_symlink()]
    if not archives:
        log(f"[unpack] no .pk3 found under {base}")
        return False
    try:
        count = extract_pk3_audio(archives, dest)
    except (OSError, zipfile.BadZipFile) as exc:
        log(f"[unpack] FAILED {inventory}: {exc}")
        return False
    log(f"[unpack] {inventory}: {count} audio files from {', '.join(a.name for a in archives)}")
    return True


def step_unpack(layout: Layout, packages: list[str]) -> None:
    """Unpack every package, then the zip-based inventories."""
    layout.unpacked.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    ok = {p: unpack_package(layout, p) for p in packages}
    for inventory, (package, _) in PK3_INVENTORIES.items():
        if ok.get(package):
            unpack_pk3_inventory(layout, inventory)
    log(f"[unpack] done in {time.monotonic() - start:.0f} s; failed: {[p for p, v in ok.items() if not v] or 'none'}")


# ---------------------------------------------------------------------------- index


def walk_files(folder: Path, suffixes: frozenset[str]) -> Iterator[Path]:
    """Regular files under ``folder`` with one of ``suffixes``, in sorted order; symlinks skipped."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if os.path.splitext(name)[1].lower() in suffixes and not path.is_symlink() and path.is_file():
                yield path


def matching_rules(rel: str, rules: list[Rule]) -> list[Rule]:
    """The rules of §4.1 that select the path ``rel`` (``<inventory>/<path in package>``)."""
    return [
        r for r in rules
        if re.search(r.include, rel) and (r.exclude is None or not re.search(r.exclude, rel))
    ]


def probe_soundfile(path: str) -> tuple[int, int, int] | str:
    """(sample rate, channels, frames) from ``sf.info``, or an error message."""
    try:
        info = sf.info(path)
        return int(info.samplerate), int(info.channels), int(info.frames)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is simply dropped
        return f"{type(exc).__name__}: {exc}"


def candidates_for(layout: Layout, inventory: str, rules: list[Rule]) -> tuple[list[tuple[str, Rule]], list[str]]:
    """Selected (relative path, rule) pairs of one inventory folder, plus overlap notes."""
    folder = layout.unpacked / inventory
    selected: list[tuple[str, Rule]] = []
    overlaps: list[str] = []
    for path in walk_files(folder, AUDIO_EXTENSIONS):
        rel = f"{inventory}/{path.relative_to(folder).as_posix()}"
        hits = matching_rules(rel, rules)
        if len(hits) > 1:
            overlaps.append(f"{rel}: {[h.source for h in hits]}")
        if hits:
            selected.append((rel, hits[0]))
    return selected, overlaps


def asterisk_items(layout: Layout, package: str) -> list[dict[str, Any]]:
    """Index items for every .g722 file of one asterisk package (§4.2)."""
    folder = layout.unpacked / package
    items = []
    for path in walk_files(folder, frozenset({".g722"})):
        seconds = path.stat().st_size / G722_BYTES_PER_SECOND
        items.append({
            "path": f"{package}/{path.relative_to(folder).as_posix()}",
            "source": ASTERISK_PACKAGES[package], "category": "speech", "tier": "wide",
            "native_sr": 16000, "channels": 1, "seconds": round(seconds, 4), "decoder": "g722",
        })
    return items


def summarize(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Files and minutes per source."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        s = out.setdefault(item["source"], {"category": item["category"], "files": 0, "minutes": 0.0})
        s["files"] += 1
        s["minutes"] += item["seconds"] / 60
    for s in out.values():
        s["minutes"] = round(s["minutes"], 2)
    return out


def report_against_doc(summary: dict[str, dict[str, Any]], sources: set[str]) -> None:
    """Log the index counts next to the figures of audio-sources.md and flag differences."""
    log(f"[index] {'source':24s} {'files':>6s} {'doc':>6s} {'min':>7s} {'doc':>7s}")
    for category in CATEGORIES:
        files = minutes = 0.0
        for source in sorted(s for s in sources if EXPECTED_CATEGORY.get(s) == category):
            got = summary.get(source, {"files": 0, "minutes": 0.0})
            exp_files, exp_min = EXPECTED[source]
            off = got["files"] != exp_files or abs(got["minutes"] - exp_min) > max(0.2, 0.02 * exp_min)
            flag = "  <-- differs from doc" if off else ""
            log(f"[index] {source:24s} {got['files']:6d} {exp_files:6d} {got['minutes']:7.1f} {exp_min:7.1f}{flag}")
            files += got["files"]
            minutes += got["minutes"]
        log(f"[index] {'= ' + category:24s} {int(files):6d} {'':6s} {minutes:7.1f} ({minutes / 60:.2f} h)")


EXPECTED_CATEGORY: dict[str, str] = {r.source: r.category for r in RULES} | {
    s: "speech" for s in ASTERISK_PACKAGES.values()
}


def step_index(layout: Layout, packages: list[str], jobs: int, force: bool) -> None:
    """Select the training files with the §4.1 rules and §4.2 list; write ``index.json``."""
    existing = read_json(layout.index)
    if not force and existing and existing.get("packages") == packages and existing.get("version") == INDEX_VERSION:
        log(f"[index] up to date: {len(existing['items'])} files in {layout.index}")
        return
    start = time.monotonic()
    inventories = inventories_of(packages)
    selected: list[tuple[str, Rule]] = []
    overlaps: list[str] = []
    for inventory in inventories:
        if inventory in ASTERISK_PACKAGES:
            continue
        if not (layout.unpacked / inventory).is_dir():
            log(f"[index] WARNING: {inventory} is not unpacked; its rules select nothing")
            continue
        got, over = candidates_for(layout, inventory, [r for r in RULES if r.inventory == inventory])
        selected += got
        overlaps += over
        log(f"[index] {inventory}: {len(got)} files matched")
    for line in overlaps:
        log(f"[index] WARNING overlap (first rule kept): {line}")
    log(f"[index] probing {len(selected)} files with soundfile ...")
    with multiprocessing.Pool(jobs) as pool:
        probes = pool.map(probe_soundfile, [str(layout.unpacked / rel) for rel, _ in selected], chunksize=64)
    items: list[dict[str, Any]] = []
    unreadable: list[dict[str, str]] = []
    for (rel, rule), probe in zip(selected, probes):
        if isinstance(probe, str):
            unreadable.append({"path": rel, "source": rule.source, "error": probe})
            continue
        sr, channels, frames = probe
        if sr <= 0:
            unreadable.append({"path": rel, "source": rule.source, "error": f"sample rate {sr}"})
            continue
        items.append({
            "path": rel, "source": rule.source, "category": rule.category, "tier": tier_of(sr),
            "native_sr": sr, "channels": channels, "seconds": round(frames / sr, 4), "decoder": "soundfile",
        })
    for package in ASTERISK_PACKAGES:
        if package in packages and (layout.unpacked / package).is_dir():
            items += asterisk_items(layout, package)
    summary = summarize(items)
    unreadable_by_source: dict[str, int] = defaultdict(int)
    for u in unreadable:
        unreadable_by_source[u["source"]] += 1
    write_json_atomic(layout.index, {
        "version": INDEX_VERSION, "packages": packages, "summary": summary, "items": items,
        "unreadable": unreadable, "overlaps": overlaps,
    })
    log(f"[index] {len(items)} files selected, {len(unreadable)} matched but unreadable "
        f"({dict(unreadable_by_source) or 'none'}), in {time.monotonic() - start:.0f} s")
    sources = {r.source for r in RULES if r.inventory in inventories} | {
        v for k, v in ASTERISK_PACKAGES.items() if k in packages
    }
    report_against_doc(summary, sources)


# ---------------------------------------------------------------------------- split


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Where a split group goes: wholly to train or dev, or a 60 s dev excerpt cut out of it."""

    split: str  # "train", "dev" or "excerpt"
    excerpt_start_s: float = 0.0


def group_key(item: dict[str, Any]) -> str:
    """Files that must land on the same side of the split share a key (stems: the song folder)."""
    if item["source"] == STEMS_SOURCE:
        return os.path.dirname(item["path"])
    return item["path"]


def plan_music_source(groups: dict[str, list[dict[str, Any]]], target_s: float) -> dict[str, Assignment]:
    """At most one track of a music source goes to dev.

    In hash order, the first track of at least 20 s that is no longer than twice the dev target
    goes to dev whole (only when the source has at least four tracks). Otherwise a 60 s excerpt
    from the middle of the first long track goes to dev and is cut out of its train copy; for
    stems the same excerpt is cut from every stem of the song and from their mix.
    """
    order = sorted(groups, key=hash_fraction)
    shortest = {k: min(i["seconds"] for i in groups[k]) for k in order}
    group_s = {k: sum(i["seconds"] for i in groups[k]) for k in order}
    usable = [k for k in order if shortest[k] >= 2 * CLIP_SECONDS] or order
    plan = {k: Assignment("train") for k in order}
    whole = [k for k in usable if group_s[k] <= 2 * target_s]
    long_enough = [k for k in usable if shortest[k] >= EXCERPT_SECONDS + 2 * CLIP_SECONDS]
    if len(groups) >= DEV_MIN_FILES and whole:
        plan[whole[0]] = Assignment("dev")
    elif long_enough:
        pick = long_enough[0]
        plan[pick] = Assignment("excerpt", round((shortest[pick] - EXCERPT_SECONDS) / 2, 3))
    elif len(groups) >= DEV_MIN_FILES:
        plan[usable[0]] = Assignment("dev")
    return plan


def plan_other_source(groups: dict[str, list[dict[str, Any]]], target_s: float) -> dict[str, Assignment]:
    """Speech and sfx: files in hash order go to dev until ~``target_s``, never past twice that."""
    order = sorted(groups, key=hash_fraction)
    seconds = {k: sum(i["seconds"] for i in groups[k]) for k in order}
    plan = {k: Assignment("train") for k in order}
    if len(groups) < DEV_MIN_FILES:
        return plan
    dev_s = 0.0
    for k in order:
        if dev_s >= target_s:
            break
        if dev_s + seconds[k] <= 2 * target_s:
            plan[k] = Assignment("dev")
            dev_s += seconds[k]
    if dev_s == 0.0:
        plan[min(order, key=lambda k: (seconds[k], hash_fraction(k)))] = Assignment("dev")
    return plan


def plan_split(items: list[dict[str, Any]], fraction: float) -> dict[str, Assignment]:
    """Deterministic dev/train assignment per group key, decided per source.

    Groups (files; for stems, song folders) are ordered by the sha1 of their key. Speech and
    sfx sources with at least four files hold out whole files in that order until about
    ``fraction`` of the source's duration (see ``plan_other_source``); music sources hold out
    one track or one 60 s excerpt (see ``plan_music_source``). FORCED_DEV files always go to dev
    and count towards the target.
    """
    by_source: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for item in items:
        by_source[item["source"]][group_key(item)].append(item)
    plan: dict[str, Assignment] = {}
    for _source, groups in sorted(by_source.items()):
        forced = {k: Assignment("dev") for k in groups if k in FORCED_DEV}
        rest = {k: v for k, v in groups.items() if k not in forced}
        total_s = sum(i["seconds"] for g in groups.values() for i in g)
        target_s = max(0.0, fraction * total_s - sum(i["seconds"] for k in forced for i in groups[k]))
        category = next(iter(groups.values()))[0]["category"]
        if rest and category == "music":
            plan.update(plan_music_source(rest, target_s))
        elif rest:
            plan.update(plan_other_source(rest, target_s))
        plan.update(forced)
    return plan


# ---------------------------------------------------------------------------- convert


@dataclasses.dataclass(frozen=True)
class Job:
    """One conversion unit: one file, or the stems of one song summed (× 0.5)."""

    path: str  # entry path; for a stem mix "<song folder>/song.ogg+guitar.ogg"
    files: tuple[str, ...]
    decoder: str
    source: str
    category: str
    tier: str
    native_sr: int
    group: str
    seconds: float  # duration from the index (for progress only)


def jobs_from_index(items: list[dict[str, Any]]) -> list[Job]:
    """Conversion jobs for the index items, plus one stem mix per complete song folder."""
    jobs = [
        Job(i["path"], (i["path"],), i["decoder"], i["source"], i["category"], i["tier"], i["native_sr"],
            group_key(i), i["seconds"])
        for i in items
    ]
    stems: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for i in items:
        if i["source"] == STEMS_SOURCE and os.path.basename(i["path"]) in STEM_NAMES:
            stems[os.path.dirname(i["path"])][os.path.basename(i["path"])] = i
    for folder, found in sorted(stems.items()):
        if len(found) == len(STEM_NAMES):
            parts = [found[n] for n in STEM_NAMES]
            jobs.append(Job(
                f"{folder}/{'+'.join(STEM_NAMES)}", tuple(p["path"] for p in parts), "mix",
                STEMS_MIX_SOURCE, "music", min((p["tier"] for p in parts), key=["narrow", "wide", "full"].index),
                min(p["native_sr"] for p in parts), folder, max(p["seconds"] for p in parts),
            ))
    order = {c: n for n, c in enumerate(CATEGORIES)}
    return sorted(jobs, key=lambda j: (order[j.category], j.source, j.path))


def decode_soundfile(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the native rate, via soundfile."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return data.mean(axis=1, dtype=np.float32), int(sr)


def decode_g722(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples at 16 kHz from a raw G.722 file, via ffmpeg."""
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-f", "g722", "-i", str(path),
           "-f", "f32le", "-ac", "1", "-ar", "16000", "-"]
    proc = subprocess.run(cmd, capture_output=True, timeout=FFMPEG_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg exit {proc.returncode}: {proc.stderr.decode(errors='replace').strip()[-300:]}")
    return np.frombuffer(proc.stdout, dtype="<f4").astype(np.float32), 16000


def to_model_rate(samples: np.ndarray, sr: int) -> np.ndarray:
    """Resample mono float32 audio to 24 kHz with soxr HQ."""
    samples = np.nan_to_num(samples, nan=0.0, posinf=0.0, neginf=0.0)
    if sr == SAMPLE_RATE:
        return samples
    return soxr.resample(samples, sr, SAMPLE_RATE, quality="HQ")


def load_file_24k(path: Path, decoder: str) -> np.ndarray:
    """One file decoded, mixed to mono and resampled to 24 kHz (float32)."""
    samples, sr = decode_g722(path) if decoder == "g722" else decode_soundfile(path)
    return to_model_rate(samples, sr)


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Clip to [-1, 1] and quantize to int16 (scale 32767); no normalisation."""
    return np.round(np.clip(samples, -1.0, 1.0) * INT16_SCALE).astype(np.int16)


def convert_job(job: Job, unpacked: Path) -> tuple[Job, np.ndarray | None, str | None]:
    """Worker: decode one job to int16 mono 24 kHz; errors are returned, never raised."""
    try:
        if job.decoder == "mix":
            parts = [load_file_24k(unpacked / f, "soundfile") for f in job.files]
            mixed = np.zeros(max(len(p) for p in parts), dtype=np.float32)
            for part in parts:
                mixed[: len(part)] += part
            audio = mixed * 0.5
        else:
            audio = load_file_24k(unpacked / job.files[0], job.decoder)
        return job, to_int16(audio), None
    except Exception as exc:  # noqa: BLE001 - one bad file must never abort the run
        return job, None, f"{type(exc).__name__}: {exc}"


def pieces_for(assignment: Assignment, n: int) -> list[tuple[str, int, int]]:
    """(split, start, stop) sample ranges of a converted file of ``n`` samples."""
    if assignment.split != "excerpt":
        return [(assignment.split, 0, n)]
    start = min(int(round(assignment.excerpt_start_s * SAMPLE_RATE)), n)
    stop = min(start + int(EXCERPT_SECONDS * SAMPLE_RATE), n)
    return [("train", 0, start), ("dev", start, stop), ("train", stop, n)]


def npy_header(length: int) -> bytes:
    """A version 1.0 .npy header for a 1-D little-endian int16 array, padded to NPY_HEADER_BYTES."""
    body = f"{{'descr': '<i2', 'fortran_order': False, 'shape': ({length},), }}"
    body_len = NPY_HEADER_BYTES - 10
    header = b"\x93NUMPY\x01\x00" + struct.pack("<H", body_len) + (body.ljust(body_len - 1) + "\n").encode("latin1")
    assert len(header) == NPY_HEADER_BYTES
    return header


class NpyWriter:
    """Append int16 samples to a .npy file on disk; the header is filled in on ``finish``."""

    def __init__(self, final: Path, partial: Path) -> None:
        self.final = final
        self.partial = partial
        partial.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(partial, "wb")
        self._file.write(npy_header(0))
        self.length = 0

    def append(self, pcm: np.ndarray) -> int:
        """Write ``pcm`` and return its offset (in samples) in the array."""
        offset = self.length
        self._file.write(np.ascontiguousarray(pcm, dtype="<i2").tobytes())
        self.length += len(pcm)
        return offset

    def finish(self) -> None:
        """Write the real header, sync and rename to the final path."""
        self._file.seek(0)
        self._file.write(npy_header(self.length))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.partial, self.final)


@dataclasses.dataclass
class ConvertState:
    """Writers, entry tables and counters of one convert run."""

    writers: dict[tuple[str, str], NpyWriter]
    entries: dict[tuple[str, str], list[dict[str, Any]]]
    dropped: list[dict[str, str]]
    done: int = 0
    seconds: float = 0.0


def store_result(state: ConvertState, job: Job, pcm: np.ndarray, assignment: Assignment) -> None:
    """Append the pieces of one converted job to the right arrays and entry tables."""
    for split, start, stop in pieces_for(assignment, len(pcm)):
        if stop - start < MIN_SECONDS * SAMPLE_RATE:
            continue
        key = (split, job.category)
        offset = state.writers[key].append(pcm[start:stop])
        state.entries[key].append({
            "source": job.source, "path": job.path, "tier": job.tier, "native_sr": job.native_sr,
            "offset": offset, "length": stop - start, "start": start,
        })
        state.seconds += (stop - start) / SAMPLE_RATE


def index_digest(layout: Layout) -> str:
    """sha1 of index.json, so the corpus records which index it was built from."""
    return hashlib.sha1(layout.index.read_bytes()).hexdigest()


def wait_for_ffmpeg(max_wait_s: float = 600.0) -> bool:
    """Poll for ffmpeg (another process may still be installing it)."""
    deadline = time.monotonic() + max_wait_s
    while shutil.which("ffmpeg") is None:
        if time.monotonic() > deadline:
            return False
        log("[convert] ffmpeg not found yet; waiting ...")
        time.sleep(20)
    return True


def run_conversion(layout: Layout, jobs: list[Job], plan: dict[str, Assignment], n_workers: int) -> ConvertState:
    """Convert all jobs with a process pool, writing results in job order."""
    tmp = layout.corpus / ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    keys = [(s, c) for s in SPLITS for c in CATEGORIES]
    state = ConvertState(
        writers={(s, c): NpyWriter(layout.corpus / s / f"{c}.npy", tmp / f"{s}_{c}.npy") for s, c in keys},
        entries={k: [] for k in keys}, dropped=[],
    )
    total_s = sum(j.seconds for j in jobs)
    done_s = 0.0
    start = time.monotonic()
    last_report = start
    worker = functools.partial(convert_job, unpacked=layout.unpacked)
    with multiprocessing.Pool(n_workers, maxtasksperchild=200) as pool:
        for job, pcm, error in pool.imap(worker, jobs, chunksize=1):
            state.done += 1
            done_s += job.seconds
            if error is not None or pcm is None:
                state.dropped.append({"path": job.path, "source": job.source, "error": error or "no data"})
                log(f"[convert] dropped {job.path}: {error}")
            elif len(pcm) < MIN_SECONDS * SAMPLE_RATE:
                state.dropped.append({"path": job.path, "source": job.source, "error": "shorter than 0.1 s"})
            else:
                store_result(state, job, pcm, plan[job.group])
            now = time.monotonic()
            if now - last_report >= 30 or state.done == len(jobs):
                last_report = now
                eta = (total_s - done_s) * (now - start) / max(done_s, 1e-9)
                log(f"[convert] {state.done}/{len(jobs)} files ({job.category}/{job.source}), "
                    f"{done_s / 3600:.2f}/{total_s / 3600:.2f} h of source audio, {len(state.dropped)} dropped, "
                    f"elapsed {(now - start) / 60:.1f} min, ETA {eta / 60:.1f} min")
    return state


def package_info(layout: Layout, packages: list[str]) -> dict[str, dict[str, Any]]:
    """Version, .deb name and licences (from the DEP-5 copyright file, if any) per package."""
    out = {}
    for package in packages:
        deb = find_deb(layout.debs, package)
        licences: list[str] = []
        copyright_file = layout.unpacked / package / "usr/share/doc" / package / "copyright"
        try:
            for line in copyright_file.read_text(encoding="utf-8", errors="replace").splitlines():
                m = re.match(r"License:\s*(\S.*)$", line)
                if m and m.group(1).strip() not in licences:
                    licences.append(m.group(1).strip())
        except OSError:
            pass
        out[package] = {
            "version": deb_version(deb) if deb else None, "deb": deb.name if deb else None,
            "licences": licences or None,
            "copyright": f"{package}/usr/share/doc/{package}/copyright" if copyright_file.is_file() else None,
        }
    return out


def split_totals(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Files, entries and minutes of one split and category, in total and per source."""
    sources: dict[str, dict[str, Any]] = {}
    for e in entries:
        s = sources.setdefault(e["source"], {"files": set(), "entries": 0, "minutes": 0.0})
        s["files"].add(e["path"])
        s["entries"] += 1
        s["minutes"] += e["length"] / SAMPLE_RATE / 60
    per_source = {
        k: {"files": len(v["files"]), "entries": v["entries"], "minutes": round(v["minutes"], 2)}
        for k, v in sorted(sources.items())
    }
    return {
        "files": sum(v["files"] for v in per_source.values()),
        "entries": len(entries),
        "minutes": round(sum(e["length"] for e in entries) / SAMPLE_RATE / 60, 2),
        "sources": per_source,
    }


def write_corpus(layout: Layout, state: ConvertState, packages: list[str], fraction: float) -> None:
    """Finish the arrays, write the entry tables and, last, the manifest."""
    for key, writer in state.writers.items():
        writer.finish()
        split, category = key
        write_json_atomic(layout.corpus / split / f"{category}.json",
                          {"sample_rate": SAMPLE_RATE, "entries": state.entries[key]})
    shutil.rmtree(layout.corpus / ".partial", ignore_errors=True)
    totals = {s: {c: split_totals(state.entries[(s, c)]) for c in CATEGORIES} for s in SPLITS}
    write_json_atomic(layout.manifest, {
        "version": CONVERT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "index_sha1": index_digest(layout),
        "sample_rate": SAMPLE_RATE,
        "format": {"dtype": "int16", "channels": 1, "scale": INT16_SCALE, "normalised": False,
                   "resampler": "soxr HQ", "downmix": "mean over channels"},
        "dev": {"fraction": fraction, "excerpt_seconds": EXCERPT_SECONDS, "forced": sorted(FORCED_DEV)},
        "totals": totals,
        "packages": package_info(layout, packages),
        "dropped": state.dropped,
    })
    for split in SPLITS:
        for category in CATEGORIES:
            t = totals[split][category]
            log(f"[convert] {split}/{category}: {t['files']} files, {t['entries']} entries, {t['minutes']:.1f} min")


def step_convert(
    layout: Layout, packages: list[str], n_workers: int, fraction: float, force: bool
) -> None:
    """Decode every indexed file to int16 mono 24 kHz and write the train/dev corpus."""
    index = read_json(layout.index)
    if not index:
        raise SystemExit("index.json is missing: run the index step first")
    manifest = read_json(layout.manifest)
    if not force and manifest and manifest.get("index_sha1") == index_digest(layout) \
            and manifest.get("version") == CONVERT_VERSION and manifest["dev"]["fraction"] == fraction:
        log(f"[convert] up to date: {layout.manifest}")
        return
    jobs = jobs_from_index(index["items"])
    if any(j.decoder == "g722" for j in jobs) and not wait_for_ffmpeg():
        log("[convert] WARNING: ffmpeg never appeared; the G.722 files will be dropped")
    plan = plan_split(index["items"], fraction)  # a stem mix follows its song folder's group
    log(f"[convert] {len(jobs)} jobs, {sum(j.seconds for j in jobs) / 3600:.2f} h of source audio "
        f"(stem mixes included), {sum(a.split != 'train' for a in plan.values())} groups held out, {n_workers} workers")
    layout.manifest.unlink(missing_ok=True)
    start = time.monotonic()
    state = run_conversion(layout, jobs, plan, n_workers)
    write_corpus(layout, state, packages, fraction)
    log(f"[convert] done in {(time.monotonic() - start) / 60:.1f} min; {len(state.dropped)} files dropped")


# ---------------------------------------------------------------------------- clips


@dataclasses.dataclass(frozen=True)
class DevSet:
    """The dev split of one category: its memory-mapped samples and entry table."""

    samples: np.ndarray
    entries: list[dict[str, Any]]

    def audio(self, entry: dict[str, Any]) -> np.ndarray:
        """The int16 samples of one entry."""
        return np.asarray(self.samples[entry["offset"]: entry["offset"] + entry["length"]])


def load_dev(layout: Layout, category: str) -> DevSet:
    """Memory-map ``corpus/dev/<category>.npy`` with its entries."""
    table = read_json(layout.corpus / "dev" / f"{category}.json") or {"entries": []}
    samples = np.load(layout.corpus / "dev" / f"{category}.npy", mmap_mode="r")
    return DevSet(samples, table["entries"])


def loudest_window(audio: np.ndarray, n: int) -> int:
    """Start of the loudest of a few candidate ``n``-sample windows (avoids silent intros/outros)."""
    if len(audio) <= n:
        return 0
    starts = [int((len(audio) - n) * f) for f in (0.2, 0.35, 0.5, 0.65, 0.8)]
    return max(starts, key=lambda s: float(np.mean(audio[s: s + n].astype(np.float32) ** 2)))


def item_record(entry: dict[str, Any], start: int, length: int) -> dict[str, Any]:
    """Where a piece of a clip comes from (times in the original file, at 24 kHz)."""
    return {"source": entry["source"], "path": entry["path"],
            "start_s": round((entry["start"] + start) / SAMPLE_RATE, 3), "seconds": round(length / SAMPLE_RATE, 3)}


def build_clip(dev: DevSet, entries: list[dict[str, Any]]) -> tuple[np.ndarray, list[dict[str, Any]], int]:
    """Fill 10 s: whole items joined by 0.2 s silence, or the loudest 10 s of a long first item."""
    n = int(CLIP_SECONDS * SAMPLE_RATE)
    gap = int(CLIP_GAP_SECONDS * SAMPLE_RATE)
    clip = np.zeros(n, dtype=np.int16)
    pos = 0
    used: list[dict[str, Any]] = []
    for entry in entries:
        if pos == 0 and entry["length"] >= n:
            audio = dev.audio(entry)
            start = loudest_window(audio, n)
            clip[:] = audio[start: start + n]
            return clip, [item_record(entry, start, n)], n
        at = pos + (gap if pos else 0)
        if at + entry["length"] > n:
            continue
        clip[at: at + entry["length"]] = dev.audio(entry)
        used.append(item_record(entry, 0, entry["length"]))
        pos = at + entry["length"]
    return clip, used, pos


def voice_of(entry: dict[str, Any]) -> str:
    """Language or voice of a speech entry (falls back to the source id)."""
    pattern = VOICE_PATTERNS.get(entry["source"])
    m = re.search(pattern, entry["path"]) if pattern else None
    if m:
        return m.group(1) or ("untagged" if entry["source"] == "tuxpaint-desc" else "en")
    if entry["source"].startswith(("asterisk", "fillets")):
        return entry["source"].rsplit("-", 1)[-1]
    return entry["source"]


def speech_groups(dev: DevSet) -> dict[str, list[tuple[str, list[dict[str, Any]]]]]:
    """Per source, its (voice, full/wide entries) groups, largest first."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for e in dev.entries:
        if e["tier"] in ("full", "wide"):
            grouped[(e["source"], voice_of(e))].append(e)
    out: dict[str, list[tuple[str, list[dict[str, Any]]]]] = defaultdict(list)
    for (source, voice), entries in sorted(grouped.items()):
        out[source].append((voice, entries))
    for groups in out.values():
        groups.sort(key=lambda g: (-sum(e["tier"] == "full" for e in g[1]), -sum(e["length"] for e in g[1])))
    return out


def speech_clips(dev: DevSet, count: int) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Clips of one voice each, cycling through the preferred sources so sources and languages vary."""
    groups = speech_groups(dev)
    order = [s for s in SPEECH_CLIP_SOURCES if s in groups] + sorted(set(groups) - set(SPEECH_CLIP_SOURCES))
    clips: list[tuple[np.ndarray, dict[str, Any]]] = []
    used_voices: set[str] = set()
    while len(clips) < count and any(groups[s] for s in order):
        for source in order:
            if len(clips) >= count or not groups[source]:
                continue
            fresh = [g for g in groups[source] if g[0] not in used_voices]
            voice, entries = (fresh or groups[source])[0]
            groups[source].remove((voice, entries))
            clip, items, filled = build_clip(dev, entries)
            if filled >= 0.6 * len(clip):
                used_voices.add(voice)
                clips.append((clip, {"category": "speech", "source": source, "voice": voice, "items": items}))
    return clips


def simple_clips(
    dev: DevSet, category: str, preferred: tuple[str, ...], count: int
) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """One clip per source (music: from one held-out track; sfx: sounds of one source)."""
    by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in dev.entries:
        if e["tier"] in ("full", "wide"):
            by_source[e["source"]].append(e)
    order = [s for s in preferred if s in by_source]
    order += sorted(set(by_source) - set(preferred) - set(CLIP_SKIP_SOURCES))
    clips: list[tuple[np.ndarray, dict[str, Any]]] = []
    for source in order:
        if len(clips) >= count:
            break
        entries = by_source[source]
        if category == "music":
            entries = sorted(entries, key=lambda e: -e["length"])[:1]
        clip, items, filled = build_clip(dev, entries)
        if filled >= 0.6 * len(clip):
            clips.append((clip, {"category": category, "source": source, "items": items}))
    return clips


def write_wav_atomic(path: Path, pcm: np.ndarray) -> None:
    """Write a 24 kHz mono PCM_16 WAV through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    sf.write(str(tmp), pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


def step_clips(layout: Layout, force: bool) -> None:
    """Build the 10 s dev evaluation clips from the dev split only."""
    manifest = read_json(layout.manifest)
    if not manifest:
        raise SystemExit("corpus/manifest.json is missing: run the convert step first")
    described = read_json(layout.clips / "clips.json")
    if not force and described and described.get("index_sha1") == manifest.get("index_sha1") \
            and described.get("manifest_created") == manifest.get("created"):
        log(f"[clips] up to date: {layout.clips}")
        return
    layout.clips.mkdir(parents=True, exist_ok=True)
    (layout.clips / "clips.json").unlink(missing_ok=True)
    for old in layout.clips.glob("*.wav"):
        old.unlink()
    described_clips = []
    for category in CATEGORIES:
        dev = load_dev(layout, category)
        if category == "speech":
            made = speech_clips(dev, CLIP_COUNTS[category])
        else:
            preferred = MUSIC_CLIP_SOURCES if category == "music" else SFX_CLIP_SOURCES
            made = simple_clips(dev, category, preferred, CLIP_COUNTS[category])
        for n, (pcm, info) in enumerate(made):
            name = f"{category}_{n:02d}.wav"
            write_wav_atomic(layout.clips / name, pcm)
            described_clips.append({"file": name, **info})
            log(f"[clips] {name}: {info['source']} {info.get('voice', '')} ({len(info['items'])} items)")
    write_json_atomic(layout.clips / "clips.json", {
        "sample_rate": SAMPLE_RATE, "seconds": CLIP_SECONDS, "gap_seconds": CLIP_GAP_SECONDS,
        "index_sha1": manifest.get("index_sha1"), "manifest_created": manifest.get("created"),
        "clips": described_clips,
    })
    log(f"[clips] wrote {len(described_clips)} clips to {layout.clips}")


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    default_root = os.environ.get("NEUCODEC_TRAIN_DIR") or str(Path.home() / ".cache" / "neucodec-train")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(default_root),
                   help="work folder with debs/, unpacked/, corpus/ (default: $NEUCODEC_TRAIN_DIR or %(default)s)")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of: %(default)s")
    p.add_argument("--jobs", type=int, default=2, help="worker processes for probing and conversion")
    p.add_argument("--dev-fraction", type=float, default=DEV_FRACTION, help="target dev share of each source")
    p.add_argument("--only-packages", default=None,
                   help="comma-separated package subset, for debugging (use a separate --root)")
    p.add_argument("--force", action="store_true", help="redo the chosen index/convert/clips steps even if up to date")
    args = p.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(args.steps) - set(STEPS)
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; choose from {','.join(STEPS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the requested steps in order."""
    args = parse_args(argv)
    packages = all_packages()
    if args.only_packages:
        wanted = [p.strip() for p in args.only_packages.split(",") if p.strip()]
        unknown = set(wanted) - set(packages)
        if unknown:
            raise SystemExit(f"--only-packages: not in audio-sources.md: {sorted(unknown)}")
        packages = sorted(wanted)
    layout = Layout(args.root.expanduser().resolve())
    layout.root.mkdir(parents=True, exist_ok=True)
    log(f"root {layout.root}; steps {','.join(args.steps)}; {len(packages)} packages; jobs {args.jobs}")
    if "download" in args.steps:
        step_download(layout, packages)
    if "unpack" in args.steps:
        step_unpack(layout, packages)
    if "index" in args.steps:
        step_index(layout, packages, args.jobs, args.force)
    if "convert" in args.steps:
        step_convert(layout, packages, args.jobs, args.dev_fraction, args.force)
    if "clips" in args.steps:
        step_clips(layout, args.force)
    log("all requested steps finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
