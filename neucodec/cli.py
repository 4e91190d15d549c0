"""The `neucodec` command: encode, decode, info, models, download; options in, exit codes out.

Exit codes: 0 success; 1 failure (bad input, missing weights, corrupt file, any file of a folder that
failed); 2 usage error (unknown option, missing argument, a setting the model does not offer, binary
output to a terminal, an .ecdc file named as audio); 130 interrupted (Ctrl-C), 141 stdout closed by
its reader (`| head`), 143 terminated. Every error is one line on stderr that says what to do; `-v`
adds the traceback. Heavy modules (torch, the codec) are imported inside the commands that need them,
so `--help`, `--version`, `info` and `models` start quickly.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import traceback
import typing as tp
from pathlib import Path

import click

from . import __version__, audio_io
from .atomic import Terminated, raise_on_sigterm
from .errors import NeucodecError, OutputError, UsageError, command_line

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE, EXIT_TERMINATED = 0, 1, 2, 130, 141, 143
CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=100)


def _err(msg: str) -> None:
    click.echo(f"neucodec: {msg}", err=True)


def _fatal(msg: str, verbose: bool, code: int = EXIT_FAILURE) -> tp.NoReturn:
    if verbose:
        traceback.print_exc(file=sys.stderr)
    _err(f"error: {msg}")
    raise click.exceptions.Exit(code)


def _guarded(fn: tp.Callable[..., int | None]) -> tp.Callable[..., None]:
    """Map exceptions to one-line messages and exit codes (works the same under CliRunner and main)."""

    @functools.wraps(fn)
    def wrapper(*args: tp.Any, **kwargs: tp.Any) -> None:
        verbose = bool(kwargs.get("verbose"))
        try:
            with command_line():  # messages name -f/--force, not force=True
                code = fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            _err("interrupted; no partial output was left behind")
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        except Terminated:
            _err("terminated; no partial output was left behind")
            raise click.exceptions.Exit(EXIT_TERMINATED) from None
        except BrokenPipeError:
            # the reader of stdout went away (e.g. `| head`): say nothing and exit as if killed by SIGPIPE
            _silence_stdout()
            raise click.exceptions.Exit(EXIT_BROKEN_PIPE) from None
        except UsageError as e:
            _fatal(str(e), verbose, EXIT_USAGE)
        except NeucodecError as e:
            _fatal(str(e), verbose)
        except MemoryError:
            _fatal("out of memory; process shorter files or use the causal 24 kHz model, which streams", verbose)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            _fatal(f"{where}{e.strerror or e}", verbose)
        except Exception as e:  # noqa: BLE001
            _fatal(f"internal error {type(e).__name__}: {e}; rerun with -v and report it", verbose)
        raise click.exceptions.Exit(code or EXIT_OK)

    return wrapper


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the flush at exit cannot fail on a closed pipe again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (CliRunner)
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    except OSError:
        pass


def _formats_in_doc(fn: tp.Callable[..., tp.Any]) -> tp.Callable[..., tp.Any]:
    """Fill a command's help with the formats `audio_io` reads ({formats}) and writes ({outputs})."""
    fn.__doc__ = (fn.__doc__ or "").format(formats=audio_io.one_of(audio_io.INPUT_FORMATS),
                                           outputs="/".join(audio_io.OUTPUT_FORMATS))
    return fn


def _progress(quiet: bool) -> bool:
    """Progress bars: on stderr, and only when it is a terminal (a log file gets the result lines alone)."""
    return not quiet and sys.stderr.isatty()


def _say(quiet: bool) -> tp.Callable[[str], None]:
    """Notes to stderr unless `quiet`; warnings (lines starting "warning: ") always, as errors are."""
    def say(msg: str) -> None:
        if msg.startswith("warning: "):
            _err(msg)
        elif not quiet:
            click.echo(msg, err=True)
    return say


# ----------------------------------------------------------------------------------------- options
def _verbosity(fn: tp.Callable[..., tp.Any]) -> tp.Callable[..., tp.Any]:
    fn = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")(fn)
    return click.option("-v", "--verbose", is_flag=True, help="Show tracebacks and more detail.")(fn)


def _model_options(fn: tp.Callable[..., tp.Any]) -> tp.Callable[..., tp.Any]:
    fn = click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
                      help="Folders: files at once; worker processes on the CPU [default: half the cores, at "
                           "most 4], files batched together on a GPU [default: 16].")(fn)
    fn = click.option("-f", "--force", is_flag=True, help="Overwrite existing outputs.")(fn)
    fn = click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                      help="Where the codec runs; auto picks CUDA when present. The LM always runs on the CPU.")(fn)
    return click.option("-m", "--model", default=None, metavar="NAME|PATH",
                        help="Model name (see `neucodec models`) or weights file [default: the packaged model; "
                             "decode: the model named in the file].")(fn)


def _default_jobs() -> int:
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _given(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """An empty path argument, typically an unset shell variable, would mean the current folder."""
    if value == "":
        raise click.BadParameter("empty path (an unset shell variable?); give a file, a folder or -")
    return value


# ----------------------------------------------------------------------------------------- group
@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="neucodec", message="%(prog)s %(version)s")
def cli() -> None:
    """Neural audio codec (EnCodec): compress audio into .ecdc files and back.

    \b
      neucodec encode speech.wav speech.ecdc -b 6
      neucodec decode speech.ecdc speech.wav
      neucodec encode recordings/ compressed/ -j 4     # folders: mirror the tree
      sox in.wav -t wav - | neucodec encode - - | neucodec decode - - > out.wav

    Exit codes: 0 ok, 1 failure, 2 usage error, 130 interrupted.
    """


@cli.command(context_settings=CONTEXT)
@click.argument("src", metavar="IN", type=click.Path(allow_dash=True, path_type=str),
                callback=_given)
@click.argument("dst", metavar="OUT", type=click.Path(allow_dash=True, path_type=str),
                callback=_given)
@click.option("-b", "--bandwidth", type=float, default=None, metavar="KBPS",
              help="Target bitrate of the whole file: all channels, header and envelope correction included. "
                   "Any value from the model's lowest operating point up (`neucodec models` lists them); the "
                   "encoder picks the codebooks and correction that score best within it [default: the model's].")
@click.option("--lm/--no-lm", "use_lm", default=False, show_default=True,
              help="Entropy-code the codes with the model's language model: smaller codes, so more of them fit "
                   "the target (the envelope correction is not LM-coded); slower.")
@click.option("--envelope/--no-envelope", default=None,
              help="Only operating points with (or, --no-envelope, without) a correction of the decoded audio's "
                   "spectral envelope, which the encoder measures by running the decoder [default: whichever "
                   "scores best at the target].")
@click.option("--envelope-table", metavar="NAME", default=None,
              help="Only operating points whose envelope correction uses this table's tiles (implies "
                   "--envelope): e1 400 Hz x 40 ms, e2 200 Hz x 40 ms, e3 100 Hz x 40 ms, e4 as e3 to 4 kHz, "
                   "then 200 Hz; their rates: `neucodec models`.")
@_model_options
@_verbosity
@_guarded
@_formats_in_doc
def encode(src: str, dst: str, bandwidth: float | None, use_lm: bool, envelope: bool | None,
           envelope_table: str | None, model: str | None, device: str, force: bool, jobs: int | None, quiet: bool,
           verbose: bool) -> int:
    """Compress audio IN (file, folder or - for stdin) into OUT (.ecdc file, folder or - for stdout).

    Reads {formats} at any sample rate and channel count: audio is resampled for the model and a mono
    model codes each channel separately.
    """
    from . import pipeline

    if envelope_table is not None:
        if envelope is False:
            raise click.UsageError("--no-envelope and --envelope-table contradict each other; drop one")
        envelope = envelope_table  # type: ignore[assignment]
    options = dict(model=model, bandwidth=bandwidth, use_lm=use_lm, envelope=envelope, device=device)
    if _is_folder(src):
        return _folder("encode", Path(src), Path(dst), options, force, jobs, quiet, verbose)
    dst = _file_target(src, dst, ".ecdc")
    suffix = Path(dst).suffix.lower()  # an audio extension is refused by encode_file, with a usage error
    if dst != audio_io.STDIO and suffix != ".ecdc" and suffix not in audio_io.AUDIO_EXTENSIONS and not quiet:
        _err(f"note: {dst} does not end in .ecdc")
    result = pipeline.encode_file(src, dst, force=force, progress=_progress(quiet), notify=_say(quiet),
                                  **options)
    if not quiet:
        info = result.info
        how = f"{result.point.describe()} x {info.groups}" if result.point else f"{info.n_q} codebooks x {info.groups}"
        _err(f"{audio_io.describe(src)} -> {audio_io.describe(dst, output=True)}: {result.seconds:.2f} s, "
             f"target {result.target_kbps:g} kbps: {how}, {result.bytes:,} bytes "
             f"({result.kbps:.2f} kbps) in {result.elapsed:.1f} s")
    return EXIT_OK


@cli.command(context_settings=CONTEXT)
@click.argument("src", metavar="IN", type=click.Path(allow_dash=True, path_type=str),
                callback=_given)
@click.argument("dst", metavar="OUT", type=click.Path(allow_dash=True, path_type=str),
                callback=_given)
@click.option("--subtype", type=click.Choice(audio_io.SUBTYPES, case_sensitive=False), default=None,
              help="Sample format [default: PCM_16].")
@click.option("--format", "audio_format", type=click.Choice([e[1:] for e in audio_io.OUTPUT_FORMATS],
                                                            case_sensitive=False), default="wav",
              show_default=True, help="Output format for folders (files take it from OUT's extension; stdout is WAV).")
@click.option("--sample-rate", type=click.IntRange(min=1000), default=None,
              help="Output sample rate [default: the original file's].")
@click.option("--salvage", is_flag=True,
              help="Decode a damaged file through the damage: each lost span becomes silence of its length "
                   "(named on stderr), every intact segment decodes as in the undamaged file.")
@_model_options
@_verbosity
@_guarded
@_formats_in_doc
def decode(src: str, dst: str, subtype: str | None, audio_format: str, sample_rate: int | None, salvage: bool,
           model: str | None, device: str, force: bool, jobs: int | None, quiet: bool, verbose: bool) -> int:
    """Decompress IN (.ecdc file, folder or - for stdin) into OUT ({outputs} file, folder or - for WAV on stdout).

    The original sample rate and channel count are restored.
    """
    from . import pipeline

    options = dict(model=model, device=device, subtype=subtype, sample_rate=sample_rate, salvage=salvage)
    ext = "." + audio_format.lower()
    if _is_folder(src):
        return _folder("decode", Path(src), Path(dst), options, force, jobs, quiet, verbose, audio_ext=ext)
    dst = _file_target(src, dst, ext)
    result = pipeline.decode_file(src, dst, force=force, progress=_progress(quiet), notify=_say(quiet),
                                  **options)
    if not quiet:
        _err(f"{audio_io.describe(src)} -> {audio_io.describe(dst, output=True)}: {result.seconds:.2f} s, "
             f"{result.sample_rate} Hz, {result.channels} ch in {result.elapsed:.1f} s")
    return EXIT_OK


def _is_folder(src: str) -> bool:
    return src != audio_io.STDIO and Path(src).is_dir()


def _file_target(src: str, dst: str, ext: str) -> str:
    """OUT as a file: an existing folder receives IN's name with `ext`."""
    if dst != audio_io.STDIO and Path(dst).is_dir():
        if src == audio_io.STDIO:
            raise OutputError(f"{dst} is a folder; name the output file when reading stdin")
        return str(Path(dst) / (Path(src).stem + ext))
    return dst


def _folder(mode: tp.Literal["encode", "decode"], src: Path, dst: Path, options: dict[str, tp.Any],
            force: bool, jobs: int | None, quiet: bool, verbose: bool, audio_ext: str = ".wav") -> int:
    from . import batch, pipeline, rate

    if str(dst) == audio_io.STDIO:
        raise OutputError("a folder cannot be written to stdout; give an output folder")
    if dst.exists() and not dst.is_dir():
        raise OutputError(f"{dst} is a file; a folder IN needs a folder OUT")
    device = pipeline.pick_device(options.get("device"))
    options = dict(options, device=str(device))
    # fail once, up front, for a bad model or setting instead of once per file
    if mode == "encode" or options.get("model"):
        codec = pipeline.get_codec(options.get("model"), device)
        if mode == "encode":
            target = options.get("bandwidth") or pipeline.default_kbps(codec)
            points, _ = rate.model_points(codec, options.get("envelope"))
            rate.check_target(points, target, lm=bool(options.get("use_lm")))
            if options.get("use_lm"):
                pipeline.get_lm(options.get("model"))
    jobs_list = batch.plan(src, dst, mode, audio_ext)
    if not jobs_list:
        kind = "audio files" if mode == "encode" else ".ecdc files"
        raise NeucodecError(f"no {kind} found under {src}")
    dst.mkdir(parents=True, exist_ok=True)
    say = _say(quiet)

    def report(o: batch.Outcome) -> None:
        if o.status == "failed":
            msg = o.error or "failed"
            _err(f"error: {msg if str(o.job.source) in msg else f'{o.job.source}: {msg}'}")
            if verbose and o.detail:
                click.echo(o.detail, err=True)
        elif verbose:
            say(f"{o.status}: {o.job.source} -> {o.job.target}")
        for n in o.damage:
            say(f"warning: {n}")
        for n in o.notes if verbose else []:
            say(n)

    n_jobs = jobs or (_default_jobs() if device.type == "cpu" else batch.GPU_FILES)
    summary = batch.run(jobs_list, mode, options, force=force, n_jobs=n_jobs, progress=_progress(quiet),
                        report=report)
    line = summary.line(mode)
    if summary.failed:
        _err(line)
        return EXIT_FAILURE
    say(line)
    return EXIT_OK


# ----------------------------------------------------------------------------------------- info
@cli.command(context_settings=CONTEXT)
@click.argument("path", metavar="FILE", type=click.Path(allow_dash=True, path_type=str),
                callback=_given)
@click.option("--json", "as_json", is_flag=True, help="Print the header and totals as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks.")
@_guarded
def info(path: str, as_json: bool, verbose: bool) -> int:
    """Describe an .ecdc file: model, bitrate, duration, original format."""
    from .probe import read_info  # no torch: the header and totals only

    if path != audio_io.STDIO and not Path(path).is_file():
        raise NeucodecError(f"{path} does not exist; check the path" if not Path(path).exists()
                            else f"{path} is not a file; give an .ecdc file")
    if path == audio_io.STDIO:
        stream_info = read_info(sys.stdin.buffer)
    else:
        with open(path, "rb") as f:
            stream_info = read_info(f)
    data = stream_info.to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return EXIT_OK
    seconds = data.get("duration") or 0.0
    groups = data.get("groups") or 1
    coder = f"LM {data['lm_id']} ({data.get('lm_fingerprint')})" if data.get("lm_id") else "plain (no LM)"
    settings = data.get("coder")
    if isinstance(settings, dict) and settings.get("arithmetic"):  # as the writer declared it (FORMAT.md §4.2)
        coder += f" in {str(settings['arithmetic'])[:20]} arithmetic"
    bw = f"{data['bandwidth']:g} kbps" if data.get("bandwidth") else "all codebooks"
    rows = [
        ("file", audio_io.describe(path)),
        ("model", f"{data.get('model_id')} ({data.get('model_fingerprint')})"),
        ("entropy coder", coder + (f", {data.get('lm_segments')} of {data.get('segments')} segments LM-coded"
                                   if data.get("lm_id") else "")),
        ("format version", data.get("format_version")),
        ("envelope", "corrected ({table} table, {bands} bands of {bins} bins{wider}, {step_db:g} dB steps; "
                     "{kbps:.2f} kbps)".format(**dict(data["envelope"], wider="".join(
                         f", {w} from bin {b}" for b, w in data["envelope"].get("wider") or ())),
                                               kbps=data.get("envelope_kbps") or 0.0)
         if isinstance(data.get("envelope"), dict) else "none"),
        ("duration", f"{seconds:.3f} s ({data.get('length')} samples at {data['sample_rate']} Hz)"),
        ("original", f"{data.get('source_sample_rate')} Hz, {data.get('source_channels')} channel(s)"
                     + (f", {data['source_length']} samples" if data.get("source_length") is not None else "")),
        ("coded", f"{groups} stream(s) of {data.get('channels')} channel(s), {bw} each, "
                  f"{data.get('n_q')} codebooks, {data.get('frame_rate')} frames/s"),
        ("segments", f"{data.get('segments')} ({data.get('layout')})"),
        ("size", f"{data.get('bytes'):,} bytes" + (f" ({data['kbps']:.2f} kbps)" if data.get("kbps") else "")),
        *([("bits", _bits_split(data))] if data.get("header_bytes") else []),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
    return EXIT_OK


def _bits_split(data: dict[str, tp.Any]) -> str:
    """Where a file's bytes go: codes (with volume scales), envelope correction, header, framing."""
    seconds = data.get("duration") or 0.0
    envelope = data.get("envelope_bytes") or 0
    framing = data["bytes"] - data["header_bytes"] - data["payload_bytes"]
    parts = [("codes", data["payload_bytes"] - envelope), ("envelope correction", envelope),
             ("header", data["header_bytes"]), ("framing", framing)]
    return ", ".join(f"{name} {n:,} B" + (f" ({8 * n / 1000 / seconds:.2f} kbps)" if seconds else "")
                     for name, n in parts if n or name == "codes")


# ----------------------------------------------------------------------------------------- models
@cli.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks.")
@_guarded
def models(as_json: bool, verbose: bool) -> int:
    """List the models, their operating points (file kbps -> codebooks + correction) and where their weights are."""
    from .weights import model_table

    rows = model_table()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return EXIT_OK
    from .weights import DEFAULT_MODEL, cache_dir

    for r in rows:
        mark = " (default)" if r["name"] == DEFAULT_MODEL else ""
        bws = ", ".join(f"{b:g}" for b in r["bandwidths"])
        click.echo(f"{r['name']}{mark}: {r['sample_rate'] // 1000} kHz, {r['channels']} ch, "
                   f"{'streaming' if r['causal'] else 'segmented'}; codes at {bws} kbps; "
                   f"-b {r['default_kbps']:g} by default")
        how = "rates measured on the dev split" if r["measured"] else \
            "the codes' rates; the correction's comes on top" if r.get("envelope") else "the codes' rates"
        click.echo(f"    operating points, for a long mono file ({how}):")
        for p in r["operating_points"]:
            click.echo(f"      -b {p['from_kbps']:<5g} -> {p['describe']} (about {p['kbps']:.2f} kbps)")
        click.echo(f"    weights: {r['weights'] or 'not downloaded (run: neucodec download ' + r['name'] + ')'}")
        if r.get("lm") is not None:
            click.echo(f"    LM: {r['lm'] or 'not downloaded (run: neucodec download ' + r['name'] + ')'}")
    click.echo(f"cache folder: {cache_dir()} (set NEUCODEC_CACHE to move it)")
    return EXIT_OK


@cli.command(context_settings=CONTEXT)
@click.argument("names", metavar="NAME...", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Download every official checkpoint.")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks.")
@_guarded
def download(names: tuple[str, ...], everything: bool, verbose: bool) -> int:
    """Fetch official weights (and their LM) into the cache folder, for offline use later."""
    from . import weights as w

    if everything:
        names = tuple(w.OFFICIAL_FILES)
    if not names:
        raise click.UsageError(f"name a model: {', '.join(w.OFFICIAL_FILES)} (or --all)")
    wanted: list[str] = []
    for name in names:
        if name in w.release_names():
            click.echo(f"{name} is packaged with neucodec; nothing to download")
            continue
        if name not in w.OFFICIAL_FILES:
            raise NeucodecError(f"no downloadable model named {name!r}; choose from {', '.join(w.OFFICIAL_FILES)}")
        wanted += [name] + ([w.LM_FOR[name]] if name in w.LM_FOR else [])
    for name in dict.fromkeys(wanted):
        try:
            path = w.resolve(name, allow_download=False)
            click.echo(f"{name}: already in {path}")
        except NeucodecError:
            path = w.download(name)
            click.echo(f"{name}: downloaded to {path}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> None:
    """Console entry point (`neucodec`, `python -m neucodec`)."""
    raise_on_sigterm()
    cli.main(args=argv, prog_name="neucodec")
