"""The stage cache, timers and rank rules of a run, owned in one place.

A stage's result is recorded in `stages/<key>.json` with the fingerprint of everything it read; `--resume`
returns the record instead of rerunning when the fingerprint matches and its outputs exist. Under torchrun
every rank runs every stage (training is data-parallel, maps and masks are sharded); rank 0 writes the
record and all ranks meet at a barrier after each stage.

A stage that writes one file per image (maps, a U-Net's probabilities) resumes inside itself too: its folder
is marked with the fingerprint it is being written for, and a resumed run with the same fingerprint keeps the
files already there (each was written atomically) and computes only the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set

from wsseg import distributed as dist
from wsseg.errors import about
from wsseg.pipeline.layout import RunLayout
from wsseg.stages.common import write_json

log = logging.getLogger("wsseg")

#: Version of what a stage record and a fingerprint mean. Bump it when either changes: a run folder written
#: under another version reruns its stages once, with a log line that says so.
CACHE_FORMAT = 2


def fingerprint(*parts: Any) -> str:
    """Hash of a stage's inputs (configs as their dataclass fields, fingerprints of upstream stages)."""
    text = json.dumps([CACHE_FORMAT, *parts], sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _plain(value: Any) -> Any:
    from dataclasses import is_dataclass

    if is_dataclass(value) and not isinstance(value, type):
        return _fields(value)
    return str(value)


def _fields(value: Any) -> Any:
    """A dataclass as `dataclasses.asdict` gives it, less the fields its class lists in `NOT_FINGERPRINTED`
    (how something is computed, not what: a stage that depends on one adds it to its fingerprint itself) and
    those in `FINGERPRINTED_WHEN_SET` left at their default (options newer than the caches keyed without them)."""
    from dataclasses import fields, is_dataclass

    if is_dataclass(value) and not isinstance(value, type):
        skip = getattr(type(value), "NOT_FINGERPRINTED", ())
        when_set = getattr(type(value), "FINGERPRINTED_WHEN_SET", ())
        default = type(value)() if when_set else None
        return {f.name: _fields(getattr(value, f.name)) for f in fields(value) if f.name not in skip
                and not (f.name in when_set and getattr(value, f.name) == getattr(default, f.name))}
    if isinstance(value, (list, tuple)):
        return [_fields(v) for v in value]
    if isinstance(value, dict):
        return {k: _fields(v) for k, v in value.items()}
    return value


def _recorded_fingerprint(path: Path) -> Optional[str]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or half written: nothing is known about the folder
        return None
    return record.get("fingerprint") if record.get("format") == CACHE_FORMAT else None


class StageTimer:
    """Wall time per stage for the benchmark table; an exception inside names the stage (wsseg.errors)."""

    def __init__(self):
        self.timings: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        log.info("stage %s: start", stage)
        try:
            with about(stage):
                yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start
            log.info("stage %s: %.1f s", stage, self.timings[stage])


class StageExecutor:
    """Runs a stage's work unless a finished record with the same fingerprint is on disk (when resuming)."""

    # Paths inside the run folder are stored relative to it, so a run still resumes when moved or copied.
    RUN_PREFIX = "{run}/"

    def __init__(self, layout: RunLayout, resume: bool = False):
        self.layout, self.resume = layout, resume
        self.timer = StageTimer()
        self.skipped: List[str] = []

    def finished(self, key: str, digest: str) -> Optional[Any]:
        """The recorded result of stage `key` when resuming and it finished with this fingerprint, else None."""
        record_path = self.layout.stage_record(key)
        if not (self.resume and record_path.is_file()):
            return None
        record = self._from_stored(json.loads(record_path.read_text()))
        if record.get("format") != CACHE_FORMAT:
            log.info("stage %s: recorded by another wsseg version (cache format %s, now %s), run again", key,
                     record.get("format", 1), CACHE_FORMAT)
            return None
        if record.get("fingerprint") != digest:
            log.info("stage %s: its inputs changed since it was recorded, run again", key)
            return None
        missing = [p for p in record.get("outputs", []) if not Path(p).exists()]
        if missing:
            log.info("stage %s: its output %s is missing, run again", key, missing[0])
            return None
        return record["result"]

    def cached(self, key: str, digest: str, work: Callable[[], Any],
               outputs: Optional[Callable[[Any], List[Path]]] = None) -> Any:
        """`work()`'s result, or the recorded one of a finished stage with the same fingerprint."""
        saved = self.finished(key, digest)
        if saved is not None:
            log.info("stage %s: finished in an earlier run, skipped", key)
            self.skipped.append(key)
            return saved
        result = work()
        if dist.is_main():
            write_json(self.layout.stage_record(key),
                       {"format": CACHE_FORMAT, "fingerprint": digest, "result": self._to_stored(result),
                        "outputs": self._to_stored([str(p) for p in (outputs(result) if outputs else [])])})
        dist.barrier()
        return result

    def cached_folder(self, key: str, digest: str, folder: Path, write: Callable[[Set[str]], Any],
                      suffix: str = ".npy") -> Path:
        """A stage writing `folder/<image stem><suffix>` per image, cached like `cached`. `write(done)` gets the
        stems an interrupted run with this fingerprint already wrote (empty unless resuming) and skips them."""
        folder = Path(folder)

        def work():
            write(self.files_written(key, digest, folder, suffix))
            return str(folder)

        return Path(self.cached(key, digest, work, lambda r: [Path(r)]))

    def files_written(self, key: str, digest: str, folder: Path, suffix: str = ".npy") -> Set[str]:
        """Stems in `folder` from an interrupted run of stage `key` with fingerprint `digest`, when resuming.
        Otherwise the folder's `suffix` files are stale (another fingerprint, or no resume): they are removed,
        and the folder is marked with `digest` before anything is written into it."""
        marker = self.layout.partial_record(key)
        done: Set[str] = set()
        if dist.is_main():
            if self.resume and _recorded_fingerprint(marker) == digest:
                done = {p.name[:-len(suffix)] for p in folder.glob(f"*{suffix}") if not p.name.startswith(".")}
                if done:
                    log.info("stage %s: %d files from an interrupted run kept", key, len(done))
            else:
                for stale in folder.glob(f"*{suffix}"):
                    stale.unlink()
                write_json(marker, {"format": CACHE_FORMAT, "fingerprint": digest, "folder": self._to_stored(str(folder))})
        return set(dist.broadcast_object(sorted(done)))

    def _to_stored(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self._to_stored(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._to_stored(v) for v in value]
        if isinstance(value, str) and value and Path(value).exists():
            try:
                inside = Path(value).resolve().relative_to(self.layout.root.resolve())
            except (ValueError, OSError):
                return value
            return self.RUN_PREFIX + inside.as_posix()
        return value

    def _from_stored(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self._from_stored(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._from_stored(v) for v in value]
        if isinstance(value, str) and value.startswith(self.RUN_PREFIX):
            return str(self.layout.root / value[len(self.RUN_PREFIX):])
        return value
