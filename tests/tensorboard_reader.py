"""Reads the scalar tags of a tensorboardX event file (protobuf records), without TensorBoard installed."""

import struct
from pathlib import Path

from tensorboardX.proto import event_pb2


def scalar_tags(run_dir: Path) -> set[str]:
    """Every scalar tag written to the event files in `run_dir`."""
    tags = set()
    for path in Path(run_dir).glob("events.out.tfevents*"):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
            i += 12 + length + 4
            for v in event.summary.value:
                tags.add(v.tag)
    return tags
