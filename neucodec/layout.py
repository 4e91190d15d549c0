"""Where a signal's segments and code frames fall: integer arithmetic shared by the codec, the writer
and the readers, with no torch (so that `neucodec info` reads a file without it)."""
from __future__ import annotations

import dataclasses


def num_frames(length: int, hop_length: int) -> int:
    """Frames the encoder emits for `length` samples: ceil(length / hop), exact integers."""
    return -(-length // hop_length)


@dataclasses.dataclass
class Segment:
    offset: int  # first sample
    length: int  # samples
    frames: int  # code frames: ceil(length / hop)


def segment_layout(length: int, hop_length: int, segment_length: int | None,
                   segment_stride: int | None) -> list[Segment]:
    """The segments of a signal of `length` samples: one for a streaming model (`segment_length`
    None), else one starting every `segment_stride` samples, each `segment_length` long or cut at
    the end (so the last ones may be shorter). The encoder, the decoder and the .ecdc readers all
    take their segments from here."""
    if segment_length is None or segment_stride is None:
        return [Segment(0, length, num_frames(length, hop_length))]
    out = []
    for offset in range(0, max(length, 1), segment_stride):
        n = min(length - offset, segment_length)
        out.append(Segment(offset, n, num_frames(n, hop_length)))
    return out
