"""Reads the records of an offline W&B run file (``offline-run-*/run-<id>.wandb``).

The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB
blocks of chunks, each with a 7-byte header (crc32, length, type: full/first/middle/last),
holding serialized ``wandb_internal_pb2.Record`` messages.
"""

import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: too short for a chunk header
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            pos += left
            continue
        if pos + 7 + length > len(data):  # cut off by a killed writer
            return
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def history_and_ids(path: Path) -> tuple[list[int], set[str]]:
    """The step of every history row, and the run ids, recorded in one offline run file."""
    from wandb.proto import wandb_internal_pb2

    steps, ids = [], set()
    for raw in raw_records(path):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(raw)
        except Exception:  # noqa: BLE001 - the last record of a killed writer may be incomplete
            break
        kind = record.WhichOneof("record_type")
        if kind == "history":
            steps.append(record.history.step.num)
        elif kind == "run":
            ids.add(record.run.run_id)
    return steps, ids
