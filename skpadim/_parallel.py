"""Map-reduce over contiguous chunks of images, locally or on a Dask cluster.

Fitting and scoring are embarrassingly parallel over images: each job runs the
backbone on its own chunk and hands back a small partial result (moments, a
sub-sampled patch bank, scores), merged here. Locally the jobs go through
``joblib.Parallel``. Inside ``joblib.parallel_config(backend="dask")`` they
are submitted to the backend's Dask client directly, one task per chunk, so
that a chunk lost with its worker is computed again (see ``_DaskChunkMap``).
"""

from __future__ import annotations

import queue
import sys
import warnings
from contextlib import contextmanager, suppress
from time import monotonic
from uuid import uuid4

import numpy as np
import torch
from joblib import Parallel, delayed, effective_n_jobs
from joblib.parallel import get_active_backend

from .exceptions import WorkerLostError

# How many times a chunk is submitted to Dask before a worker loss is final.
# Dask itself already re-runs a task whose worker died under it, up to
# ``distributed.scheduler.allowed-failures`` times (then KilledWorker); ours
# are whole new tasks, for the losses Dask does not recompute (a key the
# scheduler forgot, a closed connection) and a last try after KilledWorker.
MAX_CHUNK_ATTEMPTS = 3

# Seconds between checks that the cluster still has workers while waiting.
_POLL_SECONDS = 1.0


def map_chunks(job, images, *args, n_jobs=None, **kwargs):
    """Run ``job(chunk, *args, n_threads=..., start=..., **kwargs)`` over chunks.

    Parameters
    ----------
    job : callable
        A module-level function (so that worker processes can import it).
    images : ImageSet
        The images, cut into ``n_jobs`` contiguous chunks.
    *args, **kwargs
        Passed to every call, with ``n_threads`` (torch threads for the job, or
        None to leave them) and ``start`` (the chunk's first index in
        ``images``).
    n_jobs : int or None
        As in scikit-learn; 1 (or a single image) runs ``job`` once, here, on
        all images with ``n_threads=None``.

    Returns
    -------
    results : list
        One result per chunk, in input order.

    Raises
    ------
    WorkerLostError
        Under the Dask backend, when a chunk cannot be computed because
        workers were lost.
    """
    backend = _active_dask_backend()
    n_jobs_ = _effective_n_jobs(n_jobs, backend, job)
    if n_jobs_ == 1 or len(images) < 2:
        return [job(images, *args, n_threads=None, start=0, **kwargs)]
    chunks = chunk_indices(len(images), n_jobs_)
    # Share the cores between the jobs instead of oversubscribing them.
    threads = max(1, torch.get_num_threads() // n_jobs_)
    if backend is not None:
        return _DaskChunkMap(backend, job, args, kwargs, threads).run(images, chunks)
    return Parallel(n_jobs=n_jobs)(
        delayed(job)(
            images.subset(chunk),
            *args,
            n_threads=threads,
            start=int(chunk[0]),
            **kwargs,
        )
        for chunk in chunks
    )


def chunk_indices(n_samples, n_chunks):
    """Contiguous index arrays splitting ``range(n_samples)`` into ``n_chunks``."""
    return np.array_split(np.arange(n_samples), min(n_chunks, n_samples))


def tree_reduce(parts, merge):
    """Merge partial results as a balanced binary tree (fewer, evener merges).

    Parameters
    ----------
    parts : list
        At least one partial result.
    merge : callable
        ``merge(a, b)`` -> the result of both; need not be commutative (order
        is kept).

    Returns
    -------
    result
        The merge of all parts.
    """
    parts = list(parts)
    while len(parts) > 1:
        merged = [merge(a, b) for a, b in zip(parts[::2], parts[1::2])]
        parts = merged + ([parts[-1]] if len(parts) % 2 else [])
    return parts[0]


@contextmanager
def torch_threads(n_threads):
    """Temporarily set torch's intra-op thread count (None: leave it)."""
    if n_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------- Dask


def _active_dask_backend():
    """joblib's active Dask backend, or None.

    joblib imports its Dask module only when that backend is selected, so
    looking it up in ``sys.modules`` never imports distributed for the local
    backends.
    """
    joblib_dask = sys.modules.get("joblib._dask")
    if joblib_dask is None:
        return None
    backend, _ = get_active_backend()
    if isinstance(backend, joblib_dask.DaskDistributedBackend):
        return backend
    return None


def _effective_n_jobs(n_jobs, backend, job):
    """``effective_n_jobs``, with joblib's "no worker" timeout on a Dask
    cluster (every worker lost between two maps) told as a worker loss."""
    if backend is None:
        return effective_n_jobs(n_jobs)
    try:
        return effective_n_jobs(n_jobs)
    except TimeoutError as exc:  # joblib's own, after wait_for_workers_timeout
        raise WorkerLostError(
            f"The Dask cluster has no worker left to run {job.__name__}: "
            f"{_describe(exc)} {_ADVICE}"
        ) from exc


_ADVICE = (
    "The detector was left as it was. Check the workers' logs for why they "
    "died (running out of memory is the usual cause: each worker needs the "
    "backbone, one batch of a chunk and the chunk's partial result, see the "
    "user guide's 'Memory and speed' page), give the workers more memory or "
    "lower batch_size, make sure workers stay available (or raise "
    "wait_for_workers_timeout in joblib.parallel_config), and fit again."
)


def _describe(exc):
    kind = type(exc)
    return f"{kind.__module__}.{kind.__qualname__}: {str(exc).rstrip('.')}"


def _identity(value):
    return value


def _run_chunk(shared, images, *, n_threads, start):
    job, args, kwargs = shared
    return job(images, *args, n_threads=n_threads, start=start, **kwargs)


class _DaskChunkMap:
    """One Dask task per chunk, resubmitted when its worker is lost.

    Going through joblib's Dask backend loses a fit with a worker: joblib
    scatters large arguments (the fitted extractor, a head) to one worker,
    and scattered data that dies with its worker cannot be recomputed, so
    the scheduler forgets every task that needs it. Here the arguments
    shared by all chunks are the payload of one ordinary task instead: the
    scheduler keeps its definition and recomputes it on another worker, as
    it does for a lost chunk task. Each chunk task carries its own images.
    Results are stored by chunk index and a chunk whose task was replaced
    only counts its replacement's result, so every chunk's partial result
    is used exactly once, whatever was recomputed.
    """

    def __init__(self, backend, job, args, kwargs, threads):
        self.client = backend.client
        # joblib's setting for how long to wait for workers; here, how long
        # the cluster may stay without any before the map is given up.
        self.no_worker_timeout = backend.wait_for_workers_timeout or 0
        self.job, self.args, self.kwargs, self.threads = job, args, kwargs, threads
        self.name = getattr(job, "__name__", "job")
        self.shared = None
        self._last_loss = None
        self.done = queue.Queue()  # (chunk index, future), from Dask's threads

    def run(self, images, chunks):
        self.pending, self.attempts, results = {}, {}, {}
        self.chunks = [(images.subset(chunk), int(chunk[0])) for chunk in chunks]
        # One chunk per worker thread, as a preference only: the scheduler
        # would otherwise put every chunk on the worker that holds the shared
        # arguments (their only dependency) and leave the others to work
        # stealing.
        chunks_at = range(len(chunks))
        slots = [
            address
            for address, n_threads in sorted(self.client.ncores().items())
            for _ in range(n_threads)
        ]
        self.preferred = [slots[i % len(slots)] if slots else None for i in chunks_at]
        try:
            with _seceded():
                for index in range(len(chunks)):
                    self._submit(index)
                no_worker_since = None
                while self.pending:
                    try:
                        index, future = self.done.get(timeout=_POLL_SECONDS)
                    except queue.Empty:
                        no_worker_since = self._check_workers(no_worker_since)
                        continue
                    if self.pending.get(index) is not future:
                        continue  # a replaced task: its result is never used
                    outcome = self._outcome(future)
                    if outcome is _LOST:
                        self._resubmit(index, future)
                    else:
                        results[index] = outcome
                        del self.pending[index]
        finally:
            # On an error, stop the other chunks' tasks; on success, release
            # the shared payload's task.
            leftovers = list(self.pending.values())
            if self.shared is not None:
                leftovers.append(self.shared)
            with suppress(Exception):  # never hide the error that got us here
                self.client.cancel(leftovers)
        return [results[index] for index in range(len(chunks))]

    def _submit(self, index):
        # A lost payload is recomputed by the scheduler; only a failed or
        # forgotten one needs a new task.
        if self.shared is None or self.shared.status in ("error", "cancelled"):
            self.shared = self._submit_shared()
        images, start = self.chunks[index]
        # A resubmitted chunk goes wherever the scheduler likes.
        preferred = None if index in self.attempts else self.preferred[index]
        placement = {}
        if preferred is not None:
            placement = dict(workers=[preferred], allow_other_workers=True)
        future = self.client.submit(
            _run_chunk,
            self.shared,
            images,
            n_threads=self.threads,
            start=start,
            **placement,
            # A new key for every attempt (never a cached, forgotten one); the
            # job's name first, so dashboards and task streams show it.
            key=f"{self.name}-chunk{index}-{uuid4().hex}",
            pure=False,
        )
        self.pending[index] = future
        self.attempts[index] = self.attempts.get(index, 0) + 1
        future.add_done_callback(lambda done, index=index: self.done.put((index, done)))

    def _submit_shared(self):
        with warnings.catch_warnings():
            # The payload holds the backbone weights, more than Dask expects of
            # a task; it is meant to be there, where the scheduler can run it
            # again (scattering it would not survive its worker).
            warnings.filterwarnings("ignore", "Sending large graph", UserWarning)
            return self.client.submit(
                _identity,
                (self.job, self.args, self.kwargs),
                key=f"skpadim-shared-arguments-{uuid4().hex}",
                pure=False,
            )

    def _outcome(self, future):
        """The chunk's result, or ``_LOST`` when its worker was lost; a
        job's own error is raised as it is, with its remote traceback."""
        try:
            # Also for a finished task: its result may vanish with its worker
            # before it reaches us (Dask then recomputes it, or gives up).
            return future.result()
        except BaseException as exception:
            # A cancelled task was dropped by the scheduler: its worker, a
            # dependency or its key went before it could finish.
            if isinstance(exception, _worker_loss_types()) or _is_cancellation(
                exception
            ):
                self._last_loss = exception
                return _LOST
            raise

    def _resubmit(self, index, future):
        if self.attempts[index] >= MAX_CHUNK_ATTEMPTS:
            images, start = self.chunks[index]
            raise WorkerLostError(
                f"A Dask worker was lost and chunk {index + 1} of "
                f"{len(self.chunks)} ({len(images)} images from index {start}) "
                f"of {self.name} could not be computed in "
                f"{self.attempts[index]} attempts; last error: "
                f"{_describe(self._last_loss)}. {_ADVICE}"
            ) from self._last_loss
        self.client.cancel([future])
        self._submit(index)

    def _check_workers(self, no_worker_since):
        """Give up when the cluster stayed without workers too long: Dask
        would keep the tasks waiting for one forever."""
        if self.client.ncores():
            return None
        now = monotonic()
        if no_worker_since is None:
            no_worker_since = now
        if now - no_worker_since >= self.no_worker_timeout:
            raise WorkerLostError(
                f"Every Dask worker was lost: {len(self.pending)} of "
                f"{len(self.chunks)} chunks of {self.name} were left and no "
                f"worker joined the cluster within {self.no_worker_timeout} s "
                f"(distributed.scheduler: no workers). {_ADVICE}"
            )
        return no_worker_since


_LOST = object()


def _worker_loss_types():
    """The errors a task gets for its worker's loss, not its own failure."""
    import distributed.scheduler
    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    types = [KilledWorker, CommClosedError]
    # The scheduler's no-workers-timeout (when set) fails tasks that waited
    # too long for a worker; recent distributed only.
    for name in ("NoWorkerError", "NoValidWorkerError"):
        if hasattr(distributed.scheduler, name):
            types.append(getattr(distributed.scheduler, name))
    return tuple(types)


def _is_cancellation(exception):
    # asyncio's and concurrent.futures' CancelledError (distributed's
    # FutureCancelledError derives from one of them) are unrelated classes.
    import asyncio
    import concurrent.futures

    cancelled = (asyncio.CancelledError, concurrent.futures.CancelledError)
    return isinstance(exception, cancelled)


@contextmanager
def _seceded():
    """Inside a Dask task (a nested fit), leave the worker's thread pool
    while waiting, so the chunks can run on that worker (as joblib does)."""
    from distributed import rejoin, secede
    from distributed.utils import thread_state

    in_task = hasattr(thread_state, "execution_state")
    if in_task:
        secede()
    try:
        yield
    finally:
        if in_task:
            rejoin()
