"""Model calls as requests: one file's data path runs alone, or batched with other files' on one device.

The data path (`pipeline` -> `writer`/`reader` -> `streamaudio` -> `model`) is written as generators.
Where a stage needs the codec or the LM coder, it yields a `Call` and reads `call.result()` when it
resumes; every stage passes the calls it meets on, up, unchanged, beside its own items (audio
chunks, codes). At the top, a driver answers them:

- alone (`alone`, `complete`): a call runs when its stage resumes and asks for its result. This is a
  single file, and every public function (`encode_file`, `Codec.encode_stream`, ...).
- batched (`run`, a folder on a GPU): many files' generators are advanced until each has yielded a
  call; the calls that can be stacked run as one call, their results go back, and the files resume.

These calls are all the data path makes:

    Codec.encode_step(chunk [B, C, t], state, final, n_q)   causal models, streaming encode
    Codec.decode_step(codes [B, K, f], state, final)        causal models, streaming decode
    Codec._encode_segments(x [N, C, L], n_q)                segmented models (48 kHz), 1 s segments
    Codec._decode_segments(codes [N, K, F], scales [N])
    entropy.encode_segments / decode_segments               LM coding (lists of segments)

Codec calls stack along their batch dimension when their shapes agree but for it, and their
streaming states (each stream's own, with its batch axis: dimension 1 for LSTM states) with them.
A causal model streams in steps of a few fixed sizes whatever the file (`model.steps`), so only each
file's short final step runs alone; the 48 kHz model's full 1 s segments all stack. LM-coding calls
stack when their LM is exact (it gives every segment the payload, and decodes it to the codes, it
would get alone): one LM run over all their segments.

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
import typing as tp

import torch

from .container import ARITHMETIC_FLAGS, SEGMENT_PACKED
from .exactlm import ExactLM
from .layers import LSTMState

Tensor = torch.Tensor
T = tp.TypeVar("T")

#: Audio samples (batch x channels x time) in one batched codec step, by default: 2**22, under 3 minutes
#: of 24 kHz audio.
MAX_BATCH_SAMPLES = 1 << 22


class Call:
    """`getattr(target, method)(*args)`, requested by a stage of the data path.

    `samples` (audio samples the call covers) is its share of device memory in a batch; calls with
    equal `key`s can run as one (None: alone)."""

    __slots__ = ("target", "method", "args", "samples", "key", "_answer")

    def __init__(self, target: tp.Any, method: str, args: tuple[tp.Any, ...], samples: int = 0,
                 key: tp.Hashable = None) -> None:
        self.target, self.method, self.args, self.samples, self.key = target, method, args, samples, key
        self._answer: tuple[tp.Any, BaseException | None] | None = None

    @classmethod
    def stacked(cls, target: tp.Any, method: str, args: tuple[tp.Any, ...], samples: int) -> Call:
        """A call of `target`'s tensor `method` that stacks with calls of equal signature."""
        return cls(target, method, args, samples, (id(target), method, _signature(args)))

    def answer(self, value: tp.Any = None, error: BaseException | None = None) -> None:
        self._answer = (value, error)

    def result(self) -> tp.Any:
        """The call's result (it runs now if no driver has answered it)."""
        if self._answer is None:
            return getattr(self.target, self.method)(*self.args)
        value, error = self._answer
        if error is not None:
            raise error
        return value


def encode_segments(items: list[Tensor], lm: ExactLM | None, bits: int, span: int | None) -> Call:
    """`entropy.encode_segments` as a call; it stacks with others when its LM is exact and its
    segments agree in codebooks."""
    from . import entropy  # constriction: only where files are coded

    key = None
    if isinstance(lm, ExactLM) and items and len({tuple(i.shape[1:-1]) for i in items}) == 1:
        key = ("encode_segments", _lm_key(lm), bits, span, tuple(items[0].shape[1:-1]))
    return Call(entropy, "encode_segments", (list(items), lm, bits, entropy.LM_THREADS, span), key=key)


def decode_segments(records: list[tuple[int, bytes, tuple[int, int, int], str]], lm: tp.Any, bits: int,
                    span: int | None) -> Call:
    """`entropy.decode_segments` as a call; it stacks with others when every record is exactly coded
    (or packed) and the records agree in codebooks."""
    from . import entropy

    exact = {SEGMENT_PACKED, *ARITHMETIC_FLAGS.values()}
    key = None
    if lm is not None and records and all(r[0] in exact for r in records) and len({r[2][1] for r in records}) == 1:
        key = ("decode_segments", _lm_key(lm), bits, span, records[0][2][1])
    return Call(entropy, "decode_segments", (list(records), lm, bits, entropy.LM_THREADS, span), key=key)


def _lm_key(lm: tp.Any) -> tp.Hashable:
    """What must be equal for LM calls to stack: the arithmetic and the weights (hub's fingerprint)."""
    base = lm.source if isinstance(lm, ExactLM) else lm
    return type(lm).__name__, getattr(lm, "arithmetic", None), getattr(base, "fingerprint", None) or id(base)


def alone(items: tp.Iterable[T | Call]) -> tp.Iterator[T]:
    """A stage's items with its calls left to run one by one: the single-file iterator."""
    it = iter(items)
    while True:
        item = _step(it, _END)
        if item is _END:
            return
        if not isinstance(item, Call):
            yield tp.cast(T, item)


def complete(gen: tp.Generator[Call, None, T]) -> T:
    """Run a generator that yields only calls (a whole file's encode or decode) alone; its return value."""
    while True:
        try:
            _step(gen)
        except StopIteration as stop:
            return tp.cast(T, stop.value)


_END = object()
_RAISE = object()


def _step(it: tp.Iterator[tp.Any], end: tp.Any = _RAISE) -> tp.Any:
    """`next(it)` (or `end` when it is exhausted and `end` is given) in inference mode. The mode is
    entered here rather than in the stages: a context entered in a generator stays entered across
    its yields, and the generators of a batched run resume in any order."""
    with torch.inference_mode():
        return next(it) if end is _RAISE else next(it, end)


# --------------------------------------------------------------------------------------- scheduler
def run(tasks: tp.Iterable[tp.Callable[[], tp.Generator[Call, None, T]]], width: int, done: tp.Callable[[T], None],
        max_samples: int = MAX_BATCH_SAMPLES) -> None:
    """Run `tasks` (each makes one file's generator), `width` at a time, their calls batched.

    `done` is called with each task's return value, in completion order. The tasks must handle their
    own errors; an exception that escapes one is re-raised here. On Ctrl-C or SIGTERM every running
    task is closed (its temporary output removed) before the exception goes on.
    """
    pending = collections.deque(tasks)
    live: dict[tp.Generator[Call, None, T], Call] = {}  # started, not finished: the call each waits on

    def advance(gen: tp.Generator[Call, None, T]) -> None:
        try:
            call = _step(gen)
        except StopIteration as stop:
            live.pop(gen, None)
            done(tp.cast(T, stop.value))
            return
        if not isinstance(call, Call):
            raise TypeError(f"internal error: a file's data path yielded {type(call).__name__}, not a call")
        live[gen] = call

    try:
        while pending or live:
            while pending and len(live) < width:
                gen = pending.popleft()()
                live[gen] = tp.cast(Call, None)
                advance(gen)
            waiting = list(live.items())
            _execute([call for _, call in waiting], max_samples)
            for gen, _ in waiting:
                advance(gen)
    except BaseException:
        for gen in live:
            gen.close()
        raise


def _execute(calls: list[Call], max_samples: int) -> None:
    """Answer the calls, stacked where they can be, in batches of at most `max_samples` samples."""
    groups: dict[tp.Hashable, list[Call]] = {}
    for i, c in enumerate(calls):
        groups.setdefault(("alone", i) if c.key is None else c.key, []).append(c)
    with torch.inference_mode():
        for members in groups.values():
            batch: list[Call] = []
            size = 0
            for c in members:
                if batch and size + c.samples > max_samples:
                    _run_batch(batch)
                    batch, size = [], 0
                batch.append(c)
                size += c.samples
            if batch:
                _run_batch(batch)


def _run_batch(batch: list[Call]) -> None:
    """Run the calls as one and answer each with its part. Codec calls stack their tensors and states;
    coder calls concatenate their lists of segments (results: one per segment)."""
    first = batch[0]
    fn = getattr(first.target, first.method)
    try:
        if len(batch) == 1:
            first.answer(fn(*first.args))
            return
        if isinstance(first.args[0], list):
            sizes = [len(c.args[0]) for c in batch]
            out = fn([x for c in batch for x in c.args[0]], *first.args[1:])
            parts = [out[a: a + n] for a, n in zip(itertools.accumulate(sizes, initial=0), sizes)]
        else:
            out = fn(*_cat([c.args for c in batch]))
            parts = _split(out, [int(c.args[0].shape[0]) for c in batch])
        for c, part in zip(batch, parts):
            c.answer(part)
    except Exception as e:  # noqa: BLE001 - goes to the file(s) at fault
        if len(batch) == 1:
            first.answer(error=e)
            return
        for c in batch:  # one at a time: only the file at fault fails
            _run_batch([c])


# ---------------------------------------------------------------------- stacking calls and states
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
