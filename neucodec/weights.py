"""Find, verify and load weights: official EnCodec checkpoints (.th) and neucodec release packages.

Resolution order for a name: explicit path -> cache folder ($NEUCODEC_CACHE, default
~/.cache/neucodec) -> packaged release models -> download from the official URL (unless
$NEUCODEC_OFFLINE is set) -> a `WeightsUnavailable` error naming the file and where to put it.
Official checkpoints are read with `torch.load(weights_only=True)` and verified against the
SHA-256 prefix in their name; release packages are safetensors + a JSON config.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import typing as tp
import urllib.error
import urllib.request
from pathlib import Path

from . import config as cfg
from .errors import NeucodecError, UnknownModel, WeightsUnavailable

if tp.TYPE_CHECKING:  # torch is imported where tensors are read or written: `neucodec models` needs none
    import torch
    from torch import nn

OFFICIAL_URL_ROOT = "https://dl.fbaipublicfiles.com/encodec/v0/"
OFFICIAL_FILES = {
    "encodec_24khz": "encodec_24khz-d7cc33bc.th",
    "encodec_48khz": "encodec_48khz-7e698e3e.th",
    "encodec_lm_24khz": "encodec_lm_24khz-1608e3c0.th",
    "encodec_lm_48khz": "encodec_lm_48khz-7add9fc3.th",
}
LM_FOR = {"encodec_24khz": "encodec_lm_24khz", "encodec_48khz": "encodec_lm_48khz"}
PACKAGED_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = "neucodec_24khz"
_CHECKSUM_NAME = re.compile(r"^(?P<name>.+)-(?P<sha>[0-9a-f]{8})\.th$")


@dataclasses.dataclass
class Weights:
    """Loaded tensors plus what identifies them."""

    name: str  # model id, e.g. "encodec_24khz" or "neucodec_24khz"
    state: dict[str, torch.Tensor]
    fingerprint: str  # first 16 hex digits of the SHA-256 of the weight file
    source: Path
    codec_config: cfg.CodecConfig | None = None
    lm_config: cfg.LMConfig | None = None
    lm_state: dict[str, torch.Tensor] | None = None
    metadata: dict[str, tp.Any] = dataclasses.field(default_factory=dict)
    #: fingerprints of earlier weights whose files these decode, per part ("codec", "lm"): see `lineage`
    compatible: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: earlier default models by fingerprint: the neucodec release that shipped each and the repository
    #: commit that holds its weights ({"neucodec": "0.5.0", "commit": "0f1799b"}), so that a file these
    #: weights cannot read is met with the release that can
    earlier: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    #: the envelope-correction table (`neucodec.envelope.table_names`) its files get by default, or None:
    #: a package opts in (package key `envelope`), since the correction is measured per model
    envelope: str | None = None
    #: the bandwidth its files get when none is asked for (package key `default_bandwidth`), or None
    default_bandwidth: float | None = None
    #: rate control (`neucodec.rate`): the operating points measured for these weights
    #: (package key `operating_points`, written by bin/fit_rate.py), and the file bitrate a file gets
    #: when none is asked for (`default_kbps`)
    operating_points: list[dict[str, tp.Any]] = dataclasses.field(default_factory=list)
    default_kbps: float | None = None
    #: a decode side (`neucodec.archive`): no encoder; `fingerprint` is that of the weights it stands in for
    decode_only: bool = False


def cache_dir() -> Path:
    return Path(os.environ.get("NEUCODEC_CACHE") or Path.home() / ".cache" / "neucodec")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path: Path) -> str:
    """Check the 8-hex SHA-256 prefix in an official-style name; returns the full digest."""
    digest = sha256(path)
    m = _CHECKSUM_NAME.match(path.name)
    if m and not digest.startswith(m["sha"]):
        raise WeightsUnavailable(f"{path} is damaged or not what its name says (SHA-256 {digest[:8]}, "
                                 f"name says {m['sha']}); delete it and download it again")
    return digest


def release_names() -> list[str]:
    """Names of the release packages shipped inside neucodec."""
    return sorted(p.stem for p in PACKAGED_DIR.glob("*.json"))


def known_names() -> list[str]:
    return sorted(set(release_names()) | {n for n in OFFICIAL_FILES if not n.startswith("encodec_lm")})


def _cached_official(name: str) -> Path | None:
    """The official file in the cache, or another file of the same pattern (e.g. test weights)."""
    folder = cache_dir()
    exact = folder / OFFICIAL_FILES[name]
    if exact.is_file():
        return exact
    others = sorted(p for p in folder.glob(f"{name}-*.th") if _CHECKSUM_NAME.match(p.name))
    return others[0] if others else None


def download(name: str, url_root: str | None = None, folder: Path | None = None) -> Path:
    """Fetch an official checkpoint into the cache (atomically), verifying its checksum."""
    if name not in OFFICIAL_FILES:
        raise UnknownModel(f"no official checkpoint named {name!r}; known: {', '.join(OFFICIAL_FILES)}")
    return fetch(OFFICIAL_FILES[name], url_root, folder)


def fetch(filename: str, url_root: str | None = None, folder: Path | None = None) -> Path:
    """Download `url_root + filename` (a `name-<sha8>.th` file) into `folder`; nothing is left
    behind unless the SHA-256 prefix in the name matches."""
    m = _CHECKSUM_NAME.match(filename)
    if m is None:
        raise WeightsUnavailable(f"{filename} does not follow the name-<sha256 prefix>.th pattern")
    root = url_root or os.environ.get("NEUCODEC_URL_ROOT") or OFFICIAL_URL_ROOT
    folder = folder or cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(root + filename, timeout=60) as resp:
            shutil.copyfileobj(resp, out, 1 << 20)
        digest = sha256(Path(tmp))
        if not digest.startswith(m["sha"]):
            raise WeightsUnavailable(f"downloaded {filename} has SHA-256 {digest[:8]}, not {m['sha']}: "
                                     "corrupt download; try again")
        os.replace(tmp, folder / filename)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise WeightsUnavailable(
            f"{filename} is not in {folder} and could not be downloaded ({getattr(e, 'reason', e)}); "
            f"fetch {root}{filename} on a connected machine and copy it into {folder}, "
            "or pass the file's path") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return folder / filename


def resolve(name_or_path: str | os.PathLike[str], allow_download: bool | None = None) -> Path:
    """Path of the weights for a model name or path (see module docstring for the order)."""
    if str(name_or_path) in ("", "."):
        raise UnknownModel(f"no model given; known models: {', '.join(known_names())} (or a path to weights)")
    path = Path(name_or_path)
    if path.is_dir():
        raise WeightsUnavailable(f"{path} is a folder; pass a weights file (a release .json or a .th checkpoint)")
    if path.suffix in (".th", ".json", ".safetensors") or path.exists():
        if not path.exists():
            raise WeightsUnavailable(f"weights file {path} does not exist; check the path")
        return path.with_suffix(".json") if path.suffix == ".safetensors" else path
    name = str(name_or_path)
    if name in OFFICIAL_FILES:
        cached = _cached_official(name)
        if cached is not None:
            return cached
        if allow_download is None:
            allow_download = not os.environ.get("NEUCODEC_OFFLINE")
        if not allow_download:
            raise WeightsUnavailable(f"{OFFICIAL_FILES[name]} is not in {cache_dir()}; copy it there, "
                                     f"run `neucodec download {name}` when online, or pass its path")
        return download(name)
    for folder in (cache_dir(), PACKAGED_DIR):
        if (folder / f"{name}.json").is_file():
            return folder / f"{name}.json"
    raise UnknownModel(f"unknown model {name!r}; known models: {', '.join(known_names())} (or a path to weights)")


def _official_config(state: dict[str, torch.Tensor], path: Path) -> tuple[str, tp.Any]:
    """Architecture of an official-layout state_dict, from its name or, failing that, its keys."""
    m = _CHECKSUM_NAME.match(path.name)
    stem = m["name"] if m else path.stem
    if "transformer.norm_in.weight" in state:
        n_q = sum(1 for k in state if k.startswith("emb.") and k.endswith(".weight"))
        codec = cfg.encodec_48khz() if ("48" in stem or n_q == 16) else cfg.encodec_24khz()
        return (stem if stem in OFFICIAL_FILES else f"lm_{codec.name}"), cfg.lm_for(codec, n_q=n_q)
    if "encoder.model.0.conv.norm.weight" in state:
        return (stem if stem in OFFICIAL_FILES else "encodec_48khz"), cfg.encodec_48khz()
    if "encoder.model.0.conv.conv.weight_g" in state:
        return (stem if stem in OFFICIAL_FILES else "encodec_24khz"), cfg.encodec_24khz()
    raise WeightsUnavailable(f"{path} does not hold EnCodec codec or LM weights")


def load_weights(path: Path) -> Weights:
    """Read (and verify) a resolved weights file: an official .th or a release .json package."""
    if path.suffix == ".json":
        return _load_release(path)
    import torch

    digest = verify_checksum(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused or damaged file
        raise WeightsUnavailable(f"{path} is not a loadable checkpoint ({type(e).__name__}); "
                                 "pass an official EnCodec .th file or a neucodec release .json") from None
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"{path} does not hold a state_dict")
    name, config = _official_config(state, path)
    if isinstance(config, cfg.LMConfig):
        return Weights(name, {}, digest[:16], path, lm_config=config, lm_state=state)
    return Weights(name, state, digest[:16], path, codec_config=config)


@dataclasses.dataclass
class Package:
    """What a release package's JSON says (its tensors are not read): see `package_info`."""

    name: str
    codec_config: cfg.CodecConfig
    lm_config: cfg.LMConfig | None
    weights: Path  # the safetensors file beside the JSON
    training: dict[str, tp.Any]
    compatible: dict[str, list[str]]
    earlier: dict[str, dict[str, str]]
    envelope: str | None
    default_bandwidth: float | None
    operating_points: list[dict[str, tp.Any]] = dataclasses.field(default_factory=list)
    default_kbps: float | None = None
    decodes: str | None = None  # a decode side: the fingerprint of the weights whose files it decodes


def package_info(path: Path) -> Package:
    """Read and check the JSON of a release package (WeightsUnavailable when it is not one)."""
    path = Path(path)
    meta = json.loads(path.read_text())
    if meta.get("format") != "neucodec-release":
        raise WeightsUnavailable(f"{path} is not a neucodec release package")
    compatible = meta.get("compatible") or {}
    if not (isinstance(compatible, dict) and all(isinstance(v, list) and all(isinstance(f, str) for f in v)
                                                 for v in compatible.values())):
        raise WeightsUnavailable(f"{path}: 'compatible' must map 'codec'/'lm' to lists of fingerprints")
    earlier = meta.get("earlier") or {}
    if not (isinstance(earlier, dict) and all(isinstance(v, dict) and all(isinstance(t, str) for t in v.values())
                                              for v in earlier.values())):
        raise WeightsUnavailable(f"{path}: 'earlier' must map fingerprints to {{\"neucodec\": ..., \"commit\": ...}}")
    envelope = meta.get("envelope")
    if envelope is not None and not isinstance(envelope, str):
        raise WeightsUnavailable(f"{path}: 'envelope' must name an envelope table, such as \"e1\"")
    codec_config = cfg.codec_from_dict(meta["codec"])
    bandwidth = meta.get("default_bandwidth")
    if bandwidth is not None and (isinstance(bandwidth, bool) or bandwidth not in codec_config.bandwidths):
        raise WeightsUnavailable(f"{path}: 'default_bandwidth' must be one of the codec's bandwidths "
                                 f"{list(codec_config.bandwidths)}")
    points = meta.get("operating_points") or []
    if not (isinstance(points, list) and all(isinstance(p, dict) and {"codebooks", "kbps", "score"} <= set(p)
                                             for p in points)):
        raise WeightsUnavailable(f"{path}: 'operating_points' must be a list of points (bin/fit_rate.py writes them)")
    kbps = meta.get("default_kbps")
    if kbps is not None and (isinstance(kbps, bool) or not isinstance(kbps, (int, float)) or kbps <= 0):
        raise WeightsUnavailable(f"{path}: 'default_kbps' must be a positive number of kbps")
    decodes = meta.get("decodes")
    if decodes is not None and not isinstance(decodes, str):
        raise WeightsUnavailable(f"{path}: 'decodes' must be the fingerprint of the weights it stands in for")
    return Package(meta["name"], codec_config, cfg.lm_from_dict(meta["lm"]) if meta.get("lm") else None,
                   path.with_name(meta.get("weights", path.with_suffix(".safetensors").name)),
                   meta.get("training", {}), compatible, earlier, envelope,
                   None if bandwidth is None else float(bandwidth), points, None if kbps is None else float(kbps),
                   decodes)


def _load_release(path: Path) -> Weights:
    from safetensors.torch import load_file

    package = package_info(path)
    if not package.weights.is_file():
        raise WeightsUnavailable(f"{package.weights} is missing next to {path}; reinstall neucodec or re-export")
    digest = sha256(package.weights)
    tensors = load_file(str(package.weights))
    codec_state = complete_codebooks(
        {k[len("codec."):]: v.float() for k, v in tensors.items() if k.startswith("codec.")})
    lm_state = {k[len("lm."):]: v.float() for k, v in tensors.items() if k.startswith("lm.")}
    return Weights(package.name, codec_state, package.decodes or digest[:16], path, package.codec_config,
                   package.lm_config, lm_state or None, package.training, package.compatible, package.earlier,
                   package.envelope, package.default_bandwidth, package.operating_points, package.default_kbps,
                   decode_only=package.decodes is not None)


def save_release(path: Path, name: str, codec: nn.Module, codec_config: cfg.CodecConfig,
                 lm: nn.Module | None = None, lm_config: cfg.LMConfig | None = None,
                 training: dict[str, tp.Any] | None = None, dtype: torch.dtype | None = None,
                 parents: tp.Sequence[Weights] = (), envelope: str | None = None,
                 default_bandwidth: float | None = None) -> Path:
    """Write `name.safetensors` + `name.json` (atomically) that `load_codec` reads.

    `parents`: the weights these were trained from; the package lists those whose files it still
    decodes (`lineage`). `envelope`: the envelope-correction table its files get by default;
    `default_bandwidth`: the bandwidth they get when none is asked for. `dtype`: of the stored floats
    (None: float16)."""
    import torch

    dtype = torch.float16 if dtype is None else dtype
    path = Path(path)
    folder = path.parent if path.suffix else path
    stem = path.stem if path.suffix else name
    tensors = {f"codec.{k}": _store(v, dtype) for k, v in codec.state_dict().items()
               if not k.endswith(_TRAINING_ONLY)}
    if lm is not None:
        tensors.update({f"lm.{k}": _store(v, dtype) for k, v in lm.state_dict().items()})
    meta = {"format": "neucodec-release", "version": 1, "name": name, "weights": f"{stem}.safetensors",
            "codec": cfg.to_dict(codec_config), "lm": cfg.to_dict(lm_config) if lm_config else None,
            "training": training or {}}
    compatible = lineage(tensors, codec_config, lm_config, parents)
    if compatible:
        meta["compatible"] = compatible
    if envelope is not None:
        meta["envelope"] = envelope
    if default_bandwidth is not None:
        meta["default_bandwidth"] = default_bandwidth
    return write_package(folder, stem, tensors, meta)


def write_package(folder: Path, stem: str, tensors: dict[str, tp.Any], meta: dict[str, tp.Any]) -> Path:
    """Write `stem.safetensors` and `stem.json` into `folder`, each through a temporary file and the
    weights first, so that a JSON never names incomplete weights; the JSON's path."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp_t = folder / f".{stem}.safetensors.tmp"
    save_file(tensors, str(tmp_t))
    tmp_j = folder / f".{stem}.json.tmp"
    tmp_j.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_t, folder / f"{stem}.safetensors")
    os.replace(tmp_j, folder / f"{stem}.json")
    return folder / f"{stem}.json"


_TRAINING_ONLY = ("._codebook.embed_avg", "._codebook.cluster_size")
#: The parts of a codec that fix what its codes mean; a new decoder for them reads the same files.
_CODE_PARTS = ("codec.encoder.", "codec.quantizer.")


def carried(codec_config: cfg.CodecConfig, parent: Weights | None) -> tuple[cfg.CodecConfig, dict[str, tp.Any]]:
    """What a package trained from `parent` keeps of its settings: the bandwidths it offers beyond
    `codec_config`'s (the union), its envelope table and its default bandwidth; as the codec
    configuration and the keyword arguments of `save_release`. Without a parent, nothing changes."""
    if parent is None or parent.codec_config is None:
        return codec_config, {}
    offered = tuple(sorted({*codec_config.bandwidths, *parent.codec_config.bandwidths}))
    return (dataclasses.replace(codec_config, bandwidths=offered),
            {"envelope": parent.envelope, "default_bandwidth": parent.default_bandwidth})


def lineage(tensors: dict[str, torch.Tensor], codec_config: cfg.CodecConfig, lm_config: cfg.LMConfig | None,
            parents: tp.Sequence[Weights]) -> dict[str, list[str]]:
    """Fingerprints of earlier weights whose files the package of `tensors` decodes.

    For the codec: a parent with the same configuration (bar the bandwidths offered) whose encoder
    and codebooks are these bit for bit (a decoder-only fine-tuning gives the same codes), with the
    parent's own list. For the LM: a parent whose LM is this one bit for bit, with its list. Decided
    by comparing the stored tensors, never by how the weights were made."""
    import torch

    out: dict[str, list[str]] = {}

    def same(prefix: str, state: dict[str, torch.Tensor] | None, keys: list[str]) -> bool:
        return bool(keys) and state is not None and all(
            k[len(prefix):] in state and state[k[len(prefix):]].shape == tensors[k].shape
            and torch.equal(_store(state[k[len(prefix):]], tensors[k].dtype), tensors[k]) for k in keys)

    code_keys = [k for k in tensors if k.startswith(_CODE_PARTS)]
    lm_keys = [k for k in tensors if k.startswith("lm.")]
    for parent in parents:
        offered = dataclasses.replace(parent.codec_config, bandwidths=codec_config.bandwidths)  # not what codes mean
        if offered == codec_config and same("codec.", parent.state, code_keys):
            out.setdefault("codec", []).extend([parent.fingerprint, *parent.compatible.get("codec", [])])
        if lm_config is not None and parent.lm_config == lm_config and parent.lm_state is not None \
                and len(parent.lm_state) == len(lm_keys) and same("lm.", parent.lm_state, lm_keys):
            out.setdefault("lm", []).extend([parent.fingerprint, *parent.compatible.get("lm", [])])
    return {part: list(dict.fromkeys(fps)) for part, fps in out.items()}


def _store(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.to(dtype) if t.is_floating_point() else t


def complete_codebooks(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Release packages omit the codebooks' EMA statistics; rebuild neutral ones for strict loading."""
    import torch

    for key in [k for k in state if k.endswith("._codebook.embed")]:
        base = key[: -len("embed")]
        state.setdefault(base + "embed_avg", state[key].clone())
        state.setdefault(base + "cluster_size", torch.ones(state[key].shape[0]))
        state.setdefault(base + "inited", torch.ones(1))
    return state


def lm_name_for(weights: Weights) -> str | None:
    return LM_FOR.get(weights.name)


def model_table() -> list[dict[str, tp.Any]]:
    """One row per known model: name, sample rate, channels, causal, bandwidths, weights path or None,
    envelope-correction table its package opts in to or None, its package's default bandwidth or None,
    the default file bitrate, and the operating points worth choosing (`rate.frontier`)."""
    from . import rate

    rows = []
    for name in known_names():
        lm_path: str | None = None
        has_lm = False
        envelope = default_bandwidth = default_kbps = None
        entries: list[dict[str, tp.Any]] = []
        try:
            path = resolve(name, allow_download=False)
        except NeucodecError:
            path = None
        if name in cfg.OFFICIAL:
            config = cfg.OFFICIAL[name]()
            has_lm = name in LM_FOR
            if has_lm:
                try:
                    lm_path = str(resolve(LM_FOR[name], allow_download=False))
                except NeucodecError:
                    lm_path = ""
        else:
            assert path is not None
            package = package_info(path)
            config = package.codec_config
            has_lm = package.lm_config is not None
            lm_path = str(path) if has_lm else None
            envelope, default_bandwidth = package.envelope, package.default_bandwidth
            entries, default_kbps = package.operating_points, package.default_kbps
        points, _ = rate.config_points(entries, config, envelope)
        bandwidth = default_bandwidth or (6.0 if 6.0 in config.bandwidths else min(config.bandwidths))
        rows.append(dict(name=name, sample_rate=config.sample_rate, channels=config.channels,
                         causal=config.seanet.causal, bandwidths=list(config.bandwidths),
                         weights=str(path) if path else None, lm=lm_path if has_lm else None,
                         envelope=envelope, default_bandwidth=default_bandwidth,
                         default_kbps=default_kbps or bandwidth, measured=bool(entries),
                         operating_points=[dict(dataclasses.asdict(p), describe=p.describe(),
                                                from_kbps=math.ceil(rate.needs_kbps(p) * 10 - 1e-9) / 10)
                                           for p in rate.frontier(points)]))
    return rows
