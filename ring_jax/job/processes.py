"""The job's processes: joining a multi-process run, and keeping them in step when one fails.
Every process runs the same batches (SPMD); only process 0 touches the output file and speaks."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from ring_jax.job.records import Item, JobError, OrderedWriter, check_sidecar, existing_records


def log(message: str) -> None:
    """A line on stderr from process 0 (the others stay quiet)."""
    if jax.process_index() == 0:
        print(f"[job] {message}", file=sys.stderr, flush=True)


def init_distributed(args) -> None:
    """Joins the processes of a multi-process run; must come before any other JAX use.

    On the CPU, cross-process collectives use gloo: jax 0.10+ picks it by default
    (`jax_cpu_collectives_implementation`), so nothing is set here."""
    try:
        if args.coordinator:
            jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                       process_id=args.process_id)
        elif args.distributed == "auto":
            jax.distributed.initialize()
    except (RuntimeError, ValueError, TypeError) as e:
        raise JobError(f"jax.distributed.initialize failed: {e}") from None


def stop_all(failure: JobError | None) -> None:
    """Raises `failure` (process 0's output error, or None) on every process, so that the others
    do not wait for process 0 in their next collective. Every process must call it."""
    failed = failure is not None
    if jax.process_count() > 1:
        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))
    if failed:
        raise failure or JobError("process 0 failed to open or write the output (see its error)")


def open_output(path: str, items: Sequence[Item], digest: str) -> tuple[int, OrderedWriter | None]:
    """Process 0 reads what an earlier run left in the output (with the same fingerprint) and opens
    it for appending; every process learns how many records are there (broadcast). Returns (that
    count, the writer on process 0, None on the others)."""
    written, writer, failure = 0, None, None
    if jax.process_index() == 0:
        try:
            written, size = existing_records(path, items)
            check_sidecar(path, digest)
            writer = OrderedWriter(path, [item.line for item in items], written, size)
        except JobError as e:
            failure = e
        except OSError as e:
            folder = os.path.dirname(os.path.abspath(path))
            failure = JobError(f"--output {path!r}: " + (str(e) if os.path.isdir(folder) else f"no folder {folder}"))
    stop_all(failure)
    if jax.process_count() > 1:
        written = int(multihost_utils.broadcast_one_to_all(np.int32(written)))
    return written, writer


def write(writer: OrderedWriter | None, make_records: Callable[[], list[dict]], path: str) -> list[dict]:
    """Process 0 makes the records, queues them and writes those that are ready (durably); when
    any of that fails, every process stops with the error (stop_all), so that none waits for
    process 0 in a collective. The others (writer None) join the broadcast. Returns the records
    (none on the others)."""
    records, failure = [], None
    if writer:
        try:
            records = make_records()
            for rec in records:
                writer.add(rec)
            writer.flush()
        except OSError as e:
            failure = JobError(f"writing {path}: {e}")
        except Exception as e:  # noqa: BLE001  (any failure here must reach the other processes)
            failure = JobError(f"making the records for {path}: {type(e).__name__}: {e}")
    stop_all(failure)
    return records


def check_same_everywhere(digest: str) -> None:
    """Every process must have read the same prompts with the same settings (they run SPMD)."""
    if jax.process_count() > 1:
        try:
            multihost_utils.assert_equal(np.frombuffer(bytes.fromhex(digest)[:16], np.uint32))
        except AssertionError:
            raise JobError("the processes read different prompts or settings: give every process the same "
                           "--input, model folder, tokenizer and generation flags") from None


