"""Cross-file batching: many files' pipelines run in lockstep, their codec steps (and LM coding) run as one batch.

Each file keeps its own, unchanged pipeline (`pipeline.encode_file`/`decode_file`: reading,
resampling, entropy coding, the atomic write, its own errors). It runs as a *fiber*: a thread that
runs only while the scheduler waits for it, so one thing happens at a time, as in a single-file run.
A fiber pauses whenever its codec is asked for a step; the steps below are the only ones the
pipelines use:

    encode_step(chunk [B, C, t], state, final, n_q)   causal models, streaming encode
    decode_step(codes [B, K, f], state, final)        causal models, streaming decode
    _encode_segments(x [N, C, L], n_q)                segmented models (48 kHz), 1 s segments
    _decode_segments(codes [N, K, F], scales [N])

The entropy coder is shared the same way (`SharedCoder`): a file's `encode_segments` or
`decode_segments` call waits too, and the calls of all paused files with the same exact-arithmetic
LM, bandwidth and LM spans run as one call, one LM run over all their segments (an exact LM gives
every segment the same payload, and decodes it to the same codes, whatever it is batched with).

When every live fiber is paused, the scheduler groups the steps that can be stacked (same method,
same shapes but for the batch dimension, same streaming-state shapes, same `final`), concatenates
them along the batch dimension (dimension 1 for LSTM states), runs each group once, splits the
results and resumes the fibers. A causal model streams in steps of a few fixed sizes whatever
the file (`model.steps`), so only each file's short final step (at most `model.TAIL_FRAMES` frames)
runs alone; the 48 kHz model's full 1 s segments all stack, its shorter last segments run alone.

Each file gets the very computation it would get alone, only stacked with others, so its codes and
.ecdc bytes are those of a single-file run, as long as the device's kernels compute a row of a batch
as they compute it alone (tests check this on the CPU; on the CPU the LSTM takes another kernel for
one signal than for several, which moves latents by ~1e-7 and could change a code only at a near tie).
A group is cut into batches of at most `max_samples` audio samples, which bounds device memory; a
batch that fails (out of memory, say) is retried one file at a time, so only the file at fault fails.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import typing as tp

import torch

from . import entropy
from .container import ARITHMETIC_FLAGS, SEGMENT_PACKED
from .exactlm import ExactLM
from .layers import LSTMState
from .model import Codec

Tensor = torch.Tensor
T = tp.TypeVar("T")

#: Audio samples (batch x channels x time) in one batched codec step, by default: 2**22, under 3 minutes
#: of 24 kHz audio.
MAX_BATCH_SAMPLES = 1 << 22


class _Cancelled(BaseException):
    """Thrown into a paused fiber to unwind it (and remove its temporary output) on Ctrl-C or SIGTERM."""


# ------------------------------------------------------------------------------------------- fibers
_local = threading.local()


@dataclasses.dataclass
class _Step:
    target: tp.Any  # a Codec, or the `entropy` module
    method: str
    args: tuple[tp.Any, ...]
    samples: int  # audio samples the step covers (its share of the device memory)
    key: tp.Hashable  # steps with equal keys run as one call; None: alone


class _Fiber:
    """`fn()` on its own thread, running only between `resume()` and its next `pause()`: a coroutine
    that can pause deep inside a call stack (here: inside a codec call of the pipeline)."""

    def __init__(self, fn: tp.Callable[[], tp.Any]) -> None:
        self._fn = fn
        self._turn = threading.Condition()
        self._fiber_runs = False  # whose turn it is: the fiber's or the scheduler's
        self._reply: tuple[tp.Any, BaseException | None] = (None, None)
        self.step: _Step | None = None  # what it waits for, while paused
        self.done = False
        self.value: tp.Any = None
        self.error: BaseException | None = None  # escaped from fn
        threading.Thread(target=self._main, name="neucodec-fiber", daemon=True).start()

    def _main(self) -> None:
        _local.fiber = self
        try:
            self._wait_turn()
            self.value = self._fn()
        except _Cancelled:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the scheduler
            self.error = e
        finally:
            self.done = True
            self._hand_over(False)

    def _hand_over(self, to_fiber: bool) -> None:
        with self._turn:
            self._fiber_runs = to_fiber
            self._turn.notify_all()

    def _wait_turn(self) -> None:
        """On the fiber's thread: wait to be resumed, then take the reply."""
        with self._turn:
            self._turn.wait_for(lambda: self._fiber_runs)
        error = self._reply[1]
        if error is not None:
            raise error

    def resume(self, result: tp.Any = None, error: BaseException | None = None) -> None:
        """Run the fiber, handing it `result` (or raising `error` in it), until it pauses or ends."""
        self._reply = (result, error)
        self._hand_over(True)
        with self._turn:
            self._turn.wait_for(lambda: not self._fiber_runs)

    def pause(self, step: _Step) -> tp.Any:
        """On the fiber's thread: wait until the scheduler has run `step`; its result."""
        self.step = step
        self._hand_over(False)
        self._wait_turn()
        self.step = None
        return self._reply[0]

    def cancel(self) -> None:
        """Unwind the fiber (its `finally` blocks run) and wait for its end."""
        with self._turn:  # interrupted while it ran: let it reach its next pause first
            self._turn.wait_for(lambda: not self._fiber_runs)
        if not self.done:
            self.resume(error=_Cancelled())


# -------------------------------------------------------------------------------------- codec view
class SharedCodec:
    """A codec as the files of a lockstep run see it: everything is the codec's, except that the
    four steps (module docstring), called from a fiber, wait to run in a batch. Called from anywhere
    else they run at once."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    def __getattr__(self, name: str) -> tp.Any:
        if name == "codec":  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self.codec, name)

    encode_stream = Codec.encode_stream  # their loops call the steps below
    decode_stream = Codec.decode_stream

    def encode_step(self, chunk: Tensor, state: tp.Any, final: bool, n_q: int) -> tp.Any:
        return self._step("encode_step", chunk.shape[0] * chunk.shape[-1], chunk, state, final, n_q)

    def decode_step(self, codes: Tensor, state: tp.Any, final: bool) -> tp.Any:
        return self._step("decode_step", codes.shape[0] * codes.shape[-1] * self.codec.hop_length, codes, state, final)

    def _encode_segments(self, x: Tensor, n_q: int) -> tp.Any:
        return self._step("_encode_segments", x.shape[0] * x.shape[-1], x, n_q)

    def _decode_segments(self, codes: Tensor, scale: Tensor | None) -> tp.Any:
        return self._step("_decode_segments", codes.shape[0] * codes.shape[-1] * self.codec.hop_length, codes, scale)

    def _step(self, method: str, samples: int, *args: tp.Any) -> tp.Any:
        fiber: _Fiber | None = getattr(_local, "fiber", None)
        if fiber is None:
            return getattr(self.codec, method)(*args)
        key = (id(self.codec), method, _signature(args))
        return fiber.pause(_Step(self.codec, method, args, samples * self.codec.channels, key))


class SharedCoder:
    """`neucodec.entropy`'s `encode_segments`/`decode_segments` as the files of a lockstep run see
    them: called from a fiber, they wait to run together with the other files' calls (module
    docstring). Only calls that give every segment the result it would get alone are stacked:
    those with an exact-arithmetic LM (and packed segments); a float32-LM call runs alone, since
    its results depend on the batch."""

    def encode_segments(self, items: list[Tensor], lm: tp.Any, bits: int = 10, threads: int = entropy.LM_THREADS,
                        span: int | None = None) -> list[entropy.CodedSegment]:
        stackable = isinstance(lm, ExactLM) and len({tuple(i.shape[1:-1]) for i in items}) == 1
        key = ("encode_segments", _lm_key(lm), bits, threads, span, tuple(items[0].shape[1:-1])) \
            if stackable and items else None
        return self._step("encode_segments", key, list(items), lm, bits, threads, span)

    def decode_segments(self, records: list[tuple[int, bytes, tuple[int, int, int], str]], lm: tp.Any, bits: int = 10,
                        threads: int = entropy.LM_THREADS, span: int | None = None) -> list[Tensor]:
        exact = {SEGMENT_PACKED, *ARITHMETIC_FLAGS.values()}
        stackable = lm is not None and all(r[0] in exact for r in records) and len({r[2][1] for r in records}) == 1
        key = ("decode_segments", _lm_key(lm), bits, threads, span, records[0][2][1]) \
            if stackable and records else None
        return self._step("decode_segments", key, list(records), lm, bits, threads, span)

    @staticmethod
    def _step(method: str, key: tp.Hashable, *args: tp.Any) -> tp.Any:
        fiber: _Fiber | None = getattr(_local, "fiber", None)
        if fiber is None:
            return getattr(entropy, method)(*args)
        return fiber.pause(_Step(entropy, method, args, 0, key))


def _lm_key(lm: tp.Any) -> tp.Hashable:
    """What must be equal for LM calls to stack: the arithmetic and the weights (hub's fingerprint)."""
    base = lm.source if isinstance(lm, ExactLM) else lm
    return type(lm).__name__, getattr(lm, "arithmetic", None), getattr(base, "fingerprint", None) or id(base)


# --------------------------------------------------------------------------------------- scheduler
def run(tasks: tp.Iterable[tp.Callable[[], T]], width: int, done: tp.Callable[[T], None],
        max_samples: int = MAX_BATCH_SAMPLES) -> None:
    """Run `tasks` (each one file's pipeline, using a `SharedCodec`), `width` at a time, in lockstep.

    `done` is called on this thread with each task's return value, in completion order. The tasks
    must handle their own errors; an exception that escapes one is re-raised here. On Ctrl-C or
    SIGTERM every running task is unwound (temporary outputs removed) before the exception goes on.
    """
    pending = collections.deque(tasks)
    live: list[_Fiber] = []  # started, not finished

    def advance(f: _Fiber, reply: tuple[tp.Any, BaseException | None] = (None, None)) -> None:
        f.resume(*reply)
        if f.error is not None:
            raise f.error
        if f.done:
            live.remove(f)
            done(f.value)

    try:
        while pending or live:
            while pending and len(live) < width:
                live.append(_Fiber(pending.popleft()))
                advance(live[-1])
            paused = list(live)
            replies = _execute([tp.cast(_Step, f.step) for f in paused], max_samples)
            for f, reply in zip(paused, replies):
                advance(f, reply)
    except BaseException:
        for f in live:
            f.cancel()
        raise


def _execute(steps: list[_Step], max_samples: int) -> list[tuple[tp.Any, BaseException | None]]:
    """Run the steps, stacked where they can be, in batches of at most `max_samples` samples."""
    replies: list[tuple[tp.Any, BaseException | None]] = [(None, None)] * len(steps)
    groups: dict[tp.Hashable, list[int]] = {}
    for i, s in enumerate(steps):
        groups.setdefault(("alone", i) if s.key is None else s.key, []).append(i)
    with torch.inference_mode():
        for members in groups.values():
            batch: list[int] = []
            size = 0
            for i in members:
                if batch and size + steps[i].samples > max_samples:
                    _run_batch(steps, batch, replies)
                    batch, size = [], 0
                batch.append(i)
                size += steps[i].samples
            if batch:
                _run_batch(steps, batch, replies)
    return replies


def _run_batch(steps: list[_Step], batch: list[int], replies: list[tuple[tp.Any, BaseException | None]]) -> None:
    """Run steps[i] for i in `batch` as one call; their results (or errors) go into `replies`.
    Codec steps stack their tensors and states; coder steps concatenate their lists of segments
    (results: one per segment)."""
    first = steps[batch[0]]
    fn = getattr(first.target, first.method)
    try:
        if len(batch) == 1:
            replies[batch[0]] = (fn(*first.args), None)
            return
        if isinstance(first.args[0], list):
            sizes = [len(steps[i].args[0]) for i in batch]
            out = fn([x for i in batch for x in steps[i].args[0]], *first.args[1:])
            parts = [out[a: a + n] for a, n in zip(itertools.accumulate(sizes, initial=0), sizes)]
        else:
            out = fn(*_cat([steps[i].args for i in batch]))
            parts = _split(out, [int(steps[i].args[0].shape[0]) for i in batch])
        for i, o in zip(batch, parts):
            replies[i] = (o, None)
    except Exception as e:  # noqa: BLE001 - goes to the file(s) at fault
        if len(batch) == 1:
            replies[batch[0]] = (None, e)
            return
        for i in batch:  # one at a time: only the file at fault fails
            _run_batch(steps, [i], replies)


# ---------------------------------------------------------------------- stacking steps and states
def _batch_dim(parent: object) -> int:
    return 1 if isinstance(parent, LSTMState) else 0  # h, c: [layers, B, H]


def _signature(value: tp.Any, dim: int = 0) -> tp.Hashable:
    """What must be equal for values to be stacked: shapes but the batch dimension, flags, sizes."""
    if isinstance(value, Tensor):
        shape = list(value.shape)
        del shape[dim]
        return ("tensor", value.dtype, value.device, tuple(shape))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        d = _batch_dim(value)
        return (type(value).__name__,) + tuple(_signature(getattr(value, f.name), d)
                                               for f in dataclasses.fields(value))
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v, dim) for v in value)
    return value  # None, bool, int: equal or not stacked


def _cat(values: list[tp.Any], dim: int = 0) -> tp.Any:
    """Stack equal-signature values (tensors, states, lists of them) along their batch dimension."""
    first = values[0]
    if isinstance(first, Tensor):
        return torch.cat(values, dim)
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        d = _batch_dim(first)
        return type(first)(**{f.name: _cat([getattr(v, f.name) for v in values], d)
                              for f in dataclasses.fields(first)})
    if isinstance(first, (list, tuple)):
        return type(first)(_cat(list(vs), dim) for vs in zip(*values))
    return first


def _split(value: tp.Any, sizes: list[int], dim: int = 0) -> list[tp.Any]:
    """The inverse of `_cat`: one value per batch member of `sizes` items."""
    if isinstance(value, Tensor):  # contiguous: an LSTM state must be, split along dim 1
        return [part.contiguous() for part in value.split(sizes, dim)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        d = _batch_dim(value)
        fields = {f.name: _split(getattr(value, f.name), sizes, d) for f in dataclasses.fields(value)}
        return [type(value)(**{k: v[i] for k, v in fields.items()}) for i in range(len(sizes))]
    if isinstance(value, (list, tuple)):
        parts = [_split(v, sizes, dim) for v in value]
        return [type(value)(p[i] for p in parts) for i in range(len(sizes))]
    return [value] * len(sizes)
