"""Read back a W&B offline run folder (``wandb/offline-run-*/run-<id>.wandb``), as written by wandb 0.31.

wandb 0.31 has no Python reader for its record log, so this is a small one. The file format
(wandb-core, ``core/pkg/leveldb/record.go``):

* A 7-byte file header: ``b":W&B"``, the magic ``0xBEE1`` as a little-endian uint16, and a version
  byte (0).
* Then LevelDB log framing: the file is cut into 32 KiB blocks counted from offset 0 (so the first
  block holds 32 KiB - 7 bytes of chunks). Each chunk has a 7-byte header -- CRC-32 (IEEE, zlib's)
  of the type byte followed by the payload (uint32 LE), the payload length (uint16 LE), and the
  chunk type (1 full, 2 first, 3 middle, 4 last) -- and never crosses a block; a block tail shorter
  than a chunk header is zero padding.
* Each record (a full chunk, or first + middles + last) is a serialized protobuf
  ``wandb.proto.wandb_internal_pb2.Record``.

``read_run`` replays the records: ``run`` (id, project, group, name, tags, initial config and the
``resume`` flag; re-sent in full when the name or tags change), ``config`` and ``summary`` (updates and
removals, nested keys as a list), ``history`` (one record per committed step), ``files`` (paths
under the run's ``files/`` folder, e.g. ``media/images/*.png``), ``artifact`` (logged artifacts with
their manifest) and ``exit``. All values are JSON strings in the log and come back decoded.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wandb.proto.wandb_internal_pb2 import Record

__all__ = ["OfflineRun", "WandbLogError", "find_runs", "iter_records", "read_run"]

_FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_IDENT, _MAGIC, _VERSION = b":W&B", 0xBEE1, 0
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32, payload length, chunk type
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_RUN_DIR = re.compile(r"offline-run-(\d{8}_\d{6})-(.+)")


class WandbLogError(ValueError):
    """A ``.wandb`` file is not a W&B record log, or is corrupt or truncated."""


@dataclass
class OfflineRun:
    """What an offline run recorded. Nested keys (``{"model": {"depth": 3}}``) are nested dicts."""

    run_dir: Path
    run_id: str
    project: str = ""
    group: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    #: ``wandb.init(resume=...)`` was asked to resume this id. Offline, wandb cannot know the old
    #: run: it writes a new folder with the same id whose ``_step`` starts again at 0.
    resumed: bool = False
    started_at: datetime | None = None
    #: From the ``exit`` record; ``None`` when the process died before ``run.finish()``.
    exit_code: int | None = None
    #: With ``read_run(strict=False)``: why reading stopped early (e.g. a truncated last record).
    error: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the run wrote its exit record."""
        return self.exit_code is not None

    def history_keys(self) -> list[str]:
        """All top-level keys seen in any history row, sorted."""
        return sorted({key for row in self.history for key in row})

    def series(self, key: str) -> list[tuple[int, Any]]:
        """``(step, value)`` for every history row that has ``key``."""
        return [(row.get("_step", i), row[key]) for i, row in enumerate(self.history) if key in row]

    def file_path(self, path: str) -> Path:
        """Where a saved file (a ``files`` entry or a media ``path``) lies on disk."""
        return self.run_dir / "files" / path


def find_runs(wandb_dir: Path) -> list[Path]:
    """The offline run folders in a ``wandb/`` directory, oldest first (by the time in their name)."""
    runs = [p for p in Path(wandb_dir).glob("offline-run-*") if p.is_dir() and _RUN_DIR.fullmatch(p.name)]
    return sorted(runs, key=lambda p: p.name)  # offline-run-YYYYMMDD_HHMMSS-<id>


def iter_records(path: Path) -> Iterator[Record]:
    """The protobuf ``Record`` messages in a ``.wandb`` file, in order.

    Raises ``WandbLogError`` (after yielding the records before it) on a bad header, a checksum
    mismatch, or a file that ends inside a record.
    """
    from wandb.proto import wandb_internal_pb2

    for offset, payload in _iter_payloads(Path(path)):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except Exception as e:  # protobuf's DecodeError
            raise WandbLogError(f"{path}: record at byte {offset} is not a valid Record: {e}") from e
        yield record


def read_run(run_dir: Path, *, strict: bool = True) -> OfflineRun:
    """Read an offline run folder (or its ``run-<id>.wandb`` file).

    With ``strict=False`` a damaged file (typically a run killed mid-write, whose last record is
    cut off) gives the records before the damage, and ``OfflineRun.error`` says what was wrong.
    """
    log = _log_file(Path(run_dir))
    run = OfflineRun(run_dir=log.parent, run_id=log.stem.removeprefix("run-"))
    files: dict[str, None] = {}  # ordered set
    try:
        for record in iter_records(log):
            _apply(run, record, files)
    except WandbLogError as e:
        if strict:
            raise
        run.error = str(e)
    run.files = list(files)
    return run


def _log_file(path: Path) -> Path:
    if path.is_file():
        return path
    logs = sorted(path.glob("run-*.wandb"))
    if len(logs) != 1:
        raise FileNotFoundError(f"{path}: expected one run-*.wandb file, found {[p.name for p in logs]}")
    return logs[0]


def _iter_payloads(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(offset, payload)`` of each record, reassembled from its chunks and CRC-checked."""
    data = path.read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise WandbLogError(f"{path}: truncated file header ({len(data)} bytes)")
    ident, magic, version = _FILE_HEADER.unpack_from(data)
    if ident != _IDENT or magic != _MAGIC:
        raise WandbLogError(f"{path}: not a W&B record log (header {data[:7]!r})")
    if version != _VERSION:
        raise WandbLogError(f"{path}: unsupported record log version {version}")

    pos, end = _FILE_HEADER.size, len(data)
    parts: list[bytes] = []  # chunks of the record being reassembled
    start = pos  # offset of that record's first chunk
    while pos < end:
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER.size:  # block tail too short for a chunk: zero padding
            if data[pos : pos + left].strip(b"\0"):
                raise WandbLogError(f"{path}: corrupt: non-zero block padding at byte {pos}")
            pos += left
            continue
        if end - pos < _CHUNK_HEADER.size:
            raise WandbLogError(f"{path}: truncated: partial chunk header at byte {pos}")
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if crc == length == kind == 0 and not parts:  # zeroed block rest (pre-allocated file)
            pos += left
            continue
        body = pos + _CHUNK_HEADER.size
        if length > left - _CHUNK_HEADER.size:
            raise WandbLogError(f"{path}: corrupt: chunk at byte {pos} crosses a block boundary")
        if body + length > end:
            raise WandbLogError(f"{path}: truncated: chunk at byte {pos} is cut off at byte {end}")
        payload = data[body : body + length]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise WandbLogError(f"{path}: corrupt: checksum mismatch in chunk at byte {pos}")
        if (kind in (_FULL, _FIRST)) == bool(parts) or kind not in (_FULL, _FIRST, _MIDDLE, _LAST):
            raise WandbLogError(f"{path}: corrupt: unexpected chunk type {kind} at byte {pos}")
        if kind in (_FULL, _FIRST):
            start = pos
        parts.append(payload)
        pos = body + length
        if kind in (_FULL, _LAST):
            yield start, b"".join(parts)
            parts = []
    if parts:
        raise WandbLogError(f"{path}: truncated: file ends inside the record starting at byte {start}")


def _apply(run: OfflineRun, record: Record, files: dict[str, None]) -> None:
    kind = record.WhichOneof("record_type")
    if kind == "run":
        r = record.run
        run.run_id = r.run_id or run.run_id
        run.project = r.project or run.project
        run.group = r.run_group or run.group
        run.name = r.display_name or run.name
        run.tags = list(r.tags)  # every run record carries the full tag list
        run.resumed = run.resumed or r.resume or r.resumed
        if r.HasField("start_time"):
            run.started_at = r.start_time.ToDatetime(tzinfo=timezone.utc)
        _update(run.config, r.config.update, r.config.remove)
    elif kind == "config":
        _update(run.config, record.config.update, record.config.remove)
    elif kind == "summary":
        _update(run.summary, record.summary.update, record.summary.remove)
    elif kind == "history":
        row: dict[str, Any] = {}
        _update(row, record.history.item, ())
        run.history.append(row)
    elif kind == "files":
        files.update(dict.fromkeys(f.path for f in record.files.files))
    elif kind == "artifact":
        a = record.artifact
        entries = [
            {"path": e.path, "digest": e.digest, "size": e.size, "ref": e.ref or None}
            for e in a.manifest.contents
        ]
        run.artifacts.append(
            {
                "name": a.name,
                "type": a.type,
                "aliases": list(a.aliases),
                "tags": list(a.tags),
                "digest": a.digest,
                "description": a.description,
                "metadata": _decode(a.metadata) if a.metadata else {},
                "files": [e["path"] for e in entries],
                "entries": entries,
            }
        )
    elif kind == "exit":
        run.exit_code = record.exit.exit_code


def _update(target: dict[str, Any], updates: Any, removes: Any) -> None:
    """Apply ``ConfigItem``/``SummaryItem``/``HistoryItem`` updates and removals to ``target``."""
    for item in updates:
        *parents, last = list(item.nested_key) or [item.key]
        node = target
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[last] = _decode(item.value_json)
    for item in removes:
        *parents, last = list(item.nested_key) or [item.key]
        node = target
        for key in parents:
            node = node.get(key)
            if not isinstance(node, dict):
                break
        else:
            node.pop(last, None)


def _decode(value_json: str) -> Any:
    """A JSON value as wandb writes it (``NaN``/``Infinity`` allowed); undecodable text is kept as is."""
    try:
        return json.loads(value_json)
    except ValueError:
        return value_json
