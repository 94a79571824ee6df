"""Runs the detector over many files or documents, on every core.

Worker processes each build one :class:`Detector` at start-up and then receive batches: file
references (workers read the files themselves, so contents never cross a pipe) or, for git sources,
documents. Small scans stay in-process, where starting workers would cost more than it saves.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from broker.scan.detector import Detector
from broker.scan.document import Document
from broker.scan.errors import Skipped
from broker.scan.findings import Finding
from broker.scan.progress import Progress
from broker.scan.rules import ScanConfig
from broker.scan.sources import FileRef, read

# Batches of about this many bytes amortise inter-process overhead without starving a core at the end.
_BATCH_BYTES: Final = 1 << 20
_BATCH_FILES: Final = 64
_MIN_PARALLEL_FILES: Final = 32

_worker_detector: Detector | None = None


@dataclass(slots=True)
class Stats:
    files: int = 0
    bytes: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def add(self, other: Stats) -> None:
        self.files += other.files
        self.bytes += other.bytes
        self.skipped.update(other.skipped)


def _init(config: ScanConfig) -> None:
    global _worker_detector  # noqa: PLW0603 - one detector per worker process, built once
    _worker_detector = Detector(config)


def _detector() -> Detector:
    assert _worker_detector is not None, "worker not initialised"
    return _worker_detector


def _scan_refs(batch: Sequence[FileRef], max_size: int) -> tuple[list[Finding], Stats]:
    detector, stats, found = _detector(), Stats(), []
    for ref in batch:
        try:
            doc = read(ref, max_size)
        except Skipped as skip:
            stats.skipped[skip.reason] += 1
            continue
        stats.files += 1
        stats.bytes += len(doc.text)
        found.extend(detector.scan(doc))
    return found, stats


def _scan_refs_task(args: tuple[Sequence[FileRef], int]) -> tuple[list[Finding], Stats]:
    return _scan_refs(*args)


def _scan_docs(batch: Sequence[Document]) -> tuple[list[Finding], Stats]:
    detector, stats, found = _detector(), Stats(), []
    for doc in batch:
        stats.files += 1
        stats.bytes += len(doc.text)
        found.extend(detector.scan(doc))
    return found, stats


def _ref_batches(refs: Sequence[FileRef], max_size: int) -> Iterator[tuple[Sequence[FileRef], int]]:
    batch: list[FileRef] = []
    size = 0
    for ref in refs:
        batch.append(ref)
        # A file that vanished is reported by the worker that fails to open it; here it weighs nothing.
        with contextlib.suppress(OSError):
            size += os.lstat(ref.abspath).st_size
        if size >= _BATCH_BYTES or len(batch) >= _BATCH_FILES:
            yield batch, max_size
            batch, size = [], 0
    if batch:
        yield batch, max_size


def _doc_batches(docs: Iterable[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= _BATCH_BYTES or len(batch) >= _BATCH_FILES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _pool(jobs: int, config: ScanConfig) -> multiprocessing.pool.Pool:
    # fork shares the compiled rules with the workers for free; elsewhere they are pickled once each.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(jobs, _init, (config,))


def _collect(results: Iterable[tuple[list[Finding], Stats]], progress: Progress) -> tuple[list[Finding], Stats]:
    findings: list[Finding] = []
    total = Stats()
    for found, stats in results:
        findings.extend(found)
        total.add(stats)
        progress.update(total.files, total.bytes)
    progress.done()
    findings.sort(key=Finding.sort_key)
    return findings, total


def scan_files(refs: Sequence[FileRef], config: ScanConfig, jobs: int,
               progress: Progress) -> tuple[list[Finding], Stats]:
    """Findings in the files ``refs`` (allowlisted paths are never opened)."""
    wanted = [r for r in refs if not config.allowlist.allows_path(r.path)]
    batches = _ref_batches(wanted, config.max_file_size)
    if jobs <= 1 or len(wanted) < _MIN_PARALLEL_FILES:
        _init(config)
        return _collect((_scan_refs_task(b) for b in batches), progress)
    with _pool(jobs, config) as pool:
        return _collect(pool.imap_unordered(_scan_refs_task, batches), progress)


def scan_documents(docs: Iterable[Document], config: ScanConfig, jobs: int,
                   progress: Progress) -> tuple[list[Finding], Stats]:
    """Findings in in-memory documents (diffs, standard input)."""
    if jobs <= 1:
        _init(config)
        return _collect((_scan_docs(b) for b in _doc_batches(docs)), progress)
    with _pool(jobs, config) as pool:
        return _collect(pool.imap_unordered(_scan_docs, _doc_batches(docs)), progress)
