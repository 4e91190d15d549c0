"""Weight resolution: official-name checkpoints from the cache, checksums, download, clear errors."""
from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

from neucodec import config as cfg
from neucodec import load_codec, load_lm, weights
from neucodec.errors import UnknownModel, WeightsUnavailable
from neucodec.lm import LanguageModel
from neucodec.model import Codec
from reference import randomize


def _official_style(folder: Path, name: str, module: torch.nn.Module) -> Path:
    """Save a state_dict as `name-<first 8 hex of its SHA-256>.th`, like the official files."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tmp.th"
    torch.save(module.state_dict(), tmp)
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    path = folder / f"{name}-{sha}.th"
    tmp.rename(path)
    return path


@pytest.fixture(scope="module")
def random_24khz() -> Codec:
    return randomize(Codec(cfg.encodec_24khz()))  # type: ignore[return-value]


def test_official_name_in_cache_loads_strictly_and_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            random_24khz: Codec) -> None:
    monkeypatch.setenv("NEUCODEC_CACHE", str(tmp_path))
    path = _official_style(tmp_path, "encodec_24khz", random_24khz)
    codec = load_codec("encodec_24khz")
    assert codec.model_id == "encodec_24khz" and codec.fingerprint == weights.sha256(path)[:16]
    wav = torch.randn(1, 1, 4000) * 0.1
    ref = Codec(cfg.encodec_24khz())
    ref.load_state_dict(random_24khz.state_dict())
    assert torch.equal(codec.encode(wav, 6.0).codes, ref.prepare_for_inference().encode(wav, 6.0).codes)
    # the same file by explicit path; then damaged: the checksum in its name catches it
    assert load_codec(path).fingerprint == codec.fingerprint
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsUnavailable, match="damaged or not what its name says"):
        load_codec(path)


def test_lm_checkpoint_loads_for_its_codec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEUCODEC_CACHE", str(tmp_path))
    lm = LanguageModel(cfg.lm_for(cfg.encodec_48khz()))
    _official_style(tmp_path, "encodec_lm_48khz", lm)
    loaded = load_lm("encodec_48khz")
    assert loaded.cfg.n_q == 16 and loaded.cfg.past_context == 525


def test_missing_weights_say_which_file_and_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEUCODEC_CACHE", str(tmp_path))
    monkeypatch.setenv("NEUCODEC_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable) as e:
        load_codec("encodec_48khz")
    assert "encodec_48khz-7e698e3e.th" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(UnknownModel, match="unknown model 'nope'"):
        load_codec("nope")
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        load_codec(tmp_path / "missing.th")
    with pytest.raises(WeightsUnavailable, match="is a folder"):
        load_codec(tmp_path)
    with pytest.raises(UnknownModel, match="no model given"):
        load_codec("")


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.th"
    torch.save({"x": object()}, path)  # needs full unpickling: weights_only refuses it
    with pytest.raises(WeightsUnavailable, match="not a loadable checkpoint"):
        load_codec(path)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> tuple[str, Path]:
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **kw: _Quiet(*a, directory=str(root), **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    httpd.shutdown()


def test_download_from_local_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: tuple[str, Path],
                                    random_24khz: Codec) -> None:
    url, www = server
    cache = tmp_path / "cache"
    monkeypatch.setenv("NEUCODEC_CACHE", str(cache))
    monkeypatch.delenv("NEUCODEC_OFFLINE", raising=False)
    served = _official_style(www, "encodec_24khz", random_24khz)
    got = weights.fetch(served.name, url)
    assert got == cache / served.name and got.read_bytes() == served.read_bytes()
    assert load_codec("encodec_24khz").fingerprint == weights.sha256(served)[:16]
    # the official name served with other bytes: rejected, nothing left in the cache
    (www / weights.OFFICIAL_FILES["encodec_48khz"]).write_bytes(b"not a checkpoint")
    monkeypatch.setenv("NEUCODEC_URL_ROOT", url)
    with pytest.raises(WeightsUnavailable, match="corrupt download"):
        load_codec("encodec_48khz")
    assert sorted(p.name for p in cache.iterdir()) == [served.name]
    # unreachable server: the error says where to put the file
    monkeypatch.setenv("NEUCODEC_URL_ROOT", "http://127.0.0.1:9/")
    with pytest.raises(WeightsUnavailable, match="copy it into"):
        weights.download("encodec_lm_24khz")


def test_package_info_reads_the_json_alone() -> None:
    info = weights.package_info(weights.PACKAGED_DIR / "neucodec_24khz.json")
    assert info.name == "neucodec_24khz" and info.lm_config is not None and info.envelope == "e4"
    assert info.default_bandwidth == 3.0 and info.weights == weights.PACKAGED_DIR / "neucodec_24khz.safetensors"
    loaded = weights.load_weights(weights.PACKAGED_DIR / "neucodec_24khz.json")
    assert (loaded.codec_config, loaded.envelope, loaded.default_bandwidth) == \
        (info.codec_config, info.envelope, info.default_bandwidth)


def test_a_json_that_is_not_a_package_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    with pytest.raises(WeightsUnavailable, match="not a neucodec release package"):
        weights.package_info(tmp_path / "x.json")
