"""A fit or a scoring on a Dask cluster survives the loss of a worker.

Worker processes are SIGKILLed (as the kernel's out-of-memory killer does)
while a fit or a scoring runs under ``joblib.parallel_config(backend=
"dask")``: the worker holding the arguments shared by the chunks, a worker in
the middle of a chunk of the fit's first pass (PaDiM's moments, PatchCore's
patches), while it scores the training images, while it scores new images.
The scheduler is also made to forget tasks, as it does with data lost for
good. As long as a worker is left the result must be the one a single
process gives, each chunk counted once; when a chunk cannot be computed, or
no worker is left, the fit must fail with ``WorkerLostError`` and leave a
fitted detector as it was.

Chunks are slowed down on the workers (a worker plugin delays every image
read) so that the kills land while they run, and kills are triggered by what
the scheduler reports (a chunk's task processing on a worker) rather than by
wall-clock delays, which would miss on a loaded machine.
"""

import copy
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import joblib
import numpy as np
import pytest
from PIL import Image

from skpadim import PadimDetector, PatchCoreDetector
from skpadim._parallel import WorkerLostError, _DaskChunkMap

from conftest import SMALL, smooth_texture

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")

# 30-60 s in all: worker processes import torch, and again after each kill.
pytestmark = pytest.mark.slow

N_TRAIN = 24
# Per image read on the workers: a 12-image chunk then takes about a second.
READ_DELAY = 0.06
PARAMS = dict(SMALL, batch_size=2, n_jobs=4)
# Task keys: the arguments shared by all chunks, whether a task of ours or
# data scattered by joblib's Dask backend (how this test found that bug).
SHARED = ("skpadim-shared", "PatchFeatureExtractor-")


# ----------------------------------------------------------------- helpers


def slow_reads_plugin(delay):
    """A worker plugin that delays every image read by ``delay`` seconds.

    The class is made here, in a function, so that cloudpickle ships it by
    value: the workers need not import this test module. A plugin is set up
    again on every worker that joins, so restarted workers are slow too.
    """

    class SlowReads(distributed.WorkerPlugin):
        name = "skpadim-test-slow-reads"

        def setup(self, worker):
            from skpadim._images import ImageSet

            read = ImageSet._load
            if getattr(read, "slowed", False):
                return

            def slow_load(self, item):
                time.sleep(delay)
                return read(self, item)

            slow_load.slowed = True
            ImageSet._load = slow_load

    return SlowReads()


def scheduler_probe():
    """A function to run on the scheduler: the processing tasks, the tasks in
    memory and the workers' pids. Made here, like the plugin, so that it is
    pickled by value (the scheduler may be another process)."""

    def probe(dask_scheduler):
        tasks = dask_scheduler.tasks.values()
        processing = {
            str(ts.key): ts.processing_on.address
            for ts in tasks
            if ts.state == "processing" and ts.processing_on is not None
        }
        holding = {
            str(ts.key): sorted(ws.address for ws in ts.who_has or ())
            for ts in tasks
            if ts.state == "memory"
        }
        pids = {addr: ws.pid for addr, ws in dask_scheduler.workers.items()}
        return processing, holding, pids

    return probe


def scheduler_cancel(keys, client_id):
    """A function to run on the scheduler: drop ``keys`` (and what depends on
    them) as when their data is lost for good, telling every client."""

    def cancel(dask_scheduler):
        dask_scheduler.stimulus_cancel(
            keys, client=client_id, force=True, reason="lost in a test", msg=None
        )

    return cancel


class Saboteur(threading.Thread):
    """Kills workers, or makes the scheduler forget tasks, in the background.

    ``when`` is part of a task key (or a tuple of alternatives): ``delay``
    seconds after such a task is seen processing on a worker (or held in
    memory by one: data, such as the shared arguments), that worker is
    SIGKILLed (every worker with ``everyone=True``), or with
    ``action="forget"`` that task is dropped by the scheduler. With
    ``target`` (the same kind of key part) the tasks it names, or the workers
    holding them, are struck instead. That is done ``times`` times, on tasks
    with new keys. ``hits`` records what was done: (worker, the tasks it was
    running) or the forgotten keys.
    """

    def __init__(
        self,
        client,
        when,
        delay=0.0,
        *,
        action="kill",
        target=None,
        everyone=False,
        times=1,
        timeout=120,
    ):
        super().__init__(daemon=True)
        self.client, self.when, self.delay = client, when, delay
        self.action, self.target = action, target
        self.everyone, self.times, self.timeout = everyone, times, timeout
        self.hits, self.seen = [], set()
        self.error = None
        self.stop = threading.Event()

    def run(self):
        try:
            deadline = time.monotonic() + self.timeout
            while len(self.hits) < self.times and not self.stop.is_set():
                if time.monotonic() > deadline:
                    return
                found = self._find(self.when, new=True)
                if not found:
                    time.sleep(0.02)
                    continue
                time.sleep(self.delay)
                if self.target is not None:
                    found = self._find(self.target)
                self._strike(found)
        except Exception as exc:  # reported by the test, not lost in a thread
            self.error = exc

    def _find(self, parts, new=False):
        """{key: worker} of a task whose key holds one of ``parts``
        (processing, or held in memory)."""
        parts = (parts,) if isinstance(parts, str) else parts
        processing, holding, _ = self.client.run_on_scheduler(scheduler_probe())
        tasks = {**processing, **{k: w[0] for k, w in holding.items() if w}}
        for key, worker in tasks.items():
            if any(part in key for part in parts) and not (new and key in self.seen):
                self.seen.add(key)
                return {key: worker}
        return {}

    def _strike(self, found):
        if self.action == "forget":
            keys = list(found)
            self.client.run_on_scheduler(scheduler_cancel(keys, self.client.id))
            self.hits.extend(keys)
            return
        processing, _, pids = self.client.run_on_scheduler(scheduler_probe())
        victims = list(pids) if self.everyone else list(found.values())
        for victim in victims:
            if pids.get(victim):
                running = sorted(k for k, w in processing.items() if w == victim)
                os.kill(pids[victim], signal.SIGKILL)
                self.hits.append((victim, running))

    def finish(self):
        self.stop.set()
        self.join(timeout=30)
        if self.error is not None:
            raise self.error
        return self.hits


@contextmanager
def sabotage(client, when, delay=0.0, **kwargs):
    saboteur = Saboteur(client, when, delay, **kwargs)
    saboteur.start()
    try:
        yield saboteur
    finally:
        saboteur.finish()


def assert_same_padim(got, expected):
    """Each training image counted once, and the single-process model."""
    assert got.n_samples_seen_ == expected.n_samples_seen_ == N_TRAIN
    # A chunk merged twice (or dropped) changes the count: 24 +- 12.
    assert got.gaussian_.moments_.count == N_TRAIN
    moments, reference = got.gaussian_.moments_, expected.gaussian_.moments_
    for name in ("mean", "scatter"):
        a, b = getattr(moments, name).numpy(), getattr(reference, name).numpy()
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())
    np.testing.assert_allclose(got.train_scores_, expected.train_scores_, rtol=1e-6)
    np.testing.assert_allclose(got.offset_, expected.offset_, rtol=1e-6)


def fitted_state(detector):
    """What a fit set: the objects, and copies of the arrays and numbers."""
    state = {
        key: value
        for key, value in vars(detector).items()
        if key.endswith("_") and not key.startswith("_")
    }
    head = detector.gaussian_
    copies = dict(
        train_scores_=detector.train_scores_.copy(),
        offset_=detector.offset_,
        n_samples_seen_=detector.n_samples_seen_,
        whitening_=head.whitening_.copy(),
        location_=np.array(head.location_, copy=True),
    )
    return state, copies


def assert_unchanged(detector, before):
    """A failed refit left the fitted detector as it was."""
    state, copies = before
    now, _ = fitted_state(detector)
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert now[key] is value, key  # the same objects...
    head = detector.gaussian_
    np.testing.assert_array_equal(detector.train_scores_, copies["train_scores_"])
    assert detector.offset_ == copies["offset_"]  # ...with the same contents
    assert detector.n_samples_seen_ == copies["n_samples_seen_"]
    np.testing.assert_array_equal(head.whitening_, copies["whitening_"])
    np.testing.assert_array_equal(head.location_, copies["location_"])


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def train():
    return smooth_texture(np.random.default_rng(0), N_TRAIN)


@pytest.fixture(scope="module")
def test_images():
    return smooth_texture(np.random.default_rng(1), 16)


@pytest.fixture(scope="module")
def serial(train):
    return PadimDetector(**{**PARAMS, "n_jobs": 1}).fit(train)


@pytest.fixture(scope="module")
def cluster():
    """Two one-thread worker processes, with nannies (a killed worker is
    restarted), and slow image reads."""
    with (
        # A LocalCluster closes a worker's nanny for good when no worker of
        # that name is back 15 s after one was removed, counted from every
        # removal: a worker killed twice within 15 s, and slow to restart the
        # second time, would be lost to the following tests.
        dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"}),
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.register_plugin(slow_reads_plugin(READ_DELAY))
        yield cluster, client


@pytest.fixture
def resubmitted(monkeypatch):
    """The (job, chunk, loss) of every chunk task submitted again."""
    calls = []
    resubmit = _DaskChunkMap._resubmit

    def spy(self, index, future):
        calls.append((self.name, index, type(self._last_loss).__name__))
        return resubmit(self, index, future)

    monkeypatch.setattr(_DaskChunkMap, "_resubmit", spy)
    return calls


@contextmanager
def on_dask(client, **backend_params):
    client.wait_for_workers(2, timeout=120)  # killed workers are back
    # The client named: another one (the module's cluster) may be current.
    with joblib.parallel_config(backend="dask", client=client, **backend_params):
        yield


# ------------------------------------------------------------------- tests


@contextmanager
def scheduler_allowed_failures(cluster, n):
    """Temporarily set how often the (in-process) scheduler re-runs a task
    whose worker died before it gives up with KilledWorker."""
    scheduler = cluster.scheduler
    previous = scheduler.allowed_failures
    scheduler.allowed_failures = n
    try:
        yield
    finally:
        scheduler.allowed_failures = previous


@pytest.mark.parametrize(
    "when, delay, allowed_failures",
    [
        # The worker holding the arguments shared by the chunks (what joblib
        # used to scatter), as soon as it holds them: Dask recomputes them.
        pytest.param(SHARED, 0.0, 3, id="shared-arguments"),
        # In the middle of a chunk's moments, with a scheduler that gives up
        # on a task at its first lost worker: KilledWorker, resubmitted.
        pytest.param("_chunk_moments", 0.5, 0, id="moments-KilledWorker"),
        # While the training images are scored, in the fit's second pass:
        # Dask runs the lost chunk again.
        pytest.param("_chunk_outputs", 0.2, 3, id="training-scores"),
    ],
)
def test_padim_fit_survives_a_killed_worker(
    cluster, train, serial, resubmitted, when, delay, allowed_failures
):
    cluster, client = cluster
    with (
        on_dask(client),
        scheduler_allowed_failures(cluster, allowed_failures),
        sabotage(client, when, delay) as saboteur,
    ):
        det = PadimDetector(**PARAMS).fit(train)
    assert saboteur.finish(), f"no worker was killed ({when})"
    assert_same_padim(det, serial)
    if allowed_failures == 0:
        assert ("_chunk_moments", "KilledWorker") in {
            (job, loss) for job, _, loss in resubmitted
        }


def test_padim_fit_survives_forgotten_shared_arguments(
    cluster, train, serial, resubmitted
):
    # What joblib's scattered arguments suffered: the scheduler forgets them,
    # and every chunk task that needs them, while the chunks run.
    _, client = cluster
    with (
        on_dask(client),
        sabotage(
            client, "_chunk_moments", 0.3, action="forget", target=SHARED
        ) as saboteur,
    ):
        det = PadimDetector(**PARAMS).fit(train)
    assert saboteur.finish()
    assert_same_padim(det, serial)
    # The running chunks went with the arguments: they were submitted again.
    assert resubmitted
    assert {(job, loss) for job, _, loss in resubmitted} == {
        ("_chunk_moments", "FutureCancelledError")
    }


def test_scoring_survives_a_killed_worker(cluster, serial, test_images):
    _, client = cluster
    det = copy.deepcopy(serial).set_params(n_jobs=4)
    expected = serial.score_samples(test_images)
    with on_dask(client), sabotage(client, "_chunk_outputs", 0.3) as saboteur:
        scores = det.score_samples(test_images)
    assert saboteur.finish()
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_patchcore_fit_survives_a_killed_worker(cluster, train, test_images):
    _, client = cluster
    params = dict(PARAMS, coreset_size=0.1, n_neighbors=3)
    reference = PatchCoreDetector(**{**params, "n_jobs": 1}).fit(train)
    with on_dask(client), sabotage(client, "_chunk_coreset", 0.5) as saboteur:
        det = PatchCoreDetector(**params).fit(train)
    assert saboteur.finish()
    bank, expected = det.memory_bank_, reference.memory_bank_
    # Every chunk's patches once: as many seen, and the same bank.
    assert bank.n_patches_seen_ == expected.n_patches_seen_
    np.testing.assert_array_equal(bank.bank_, expected.bank_)
    np.testing.assert_array_equal(bank.bank_sources_, expected.bank_sources_)
    np.testing.assert_allclose(det.train_scores_, reference.train_scores_, rtol=1e-6)


def test_a_job_error_is_raised_as_it_is(cluster, train, tmp_path, resubmitted):
    # Not a lost worker: no retries, the job's own error and message.
    _, client = cluster
    paths = []
    for i, image in enumerate(train[:6]):
        paths.append(str(tmp_path / f"image_{i}.png"))
        Image.fromarray(image).save(paths[-1])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    with on_dask(client), pytest.raises(ValueError, match="broken.png"):
        PadimDetector(**PARAMS).fit(paths + [str(broken)])
    assert resubmitted == []


def test_a_chunk_lost_every_time_ends_in_a_clear_error(cluster, train, serial):
    _, client = cluster
    fitted = copy.deepcopy(serial).set_params(n_jobs=4)
    before = fitted_state(fitted)
    with (
        on_dask(client),
        sabotage(
            client, "_chunk_moments-chunk0-", action="forget", times=3
        ) as saboteur,
        pytest.raises(WorkerLostError, match="could not be computed") as info,
    ):
        fitted.fit(train[::-1])
    assert len(saboteur.finish()) == 3
    message = str(info.value)
    assert "chunk 1 of 2" in message and "3 attempts" in message
    assert "FutureCancelledError" in message  # the Dask error, named
    assert_unchanged(fitted, before)


# ------------------------------------------------------ without a nanny


class CliCluster:
    """A scheduler and one-thread workers without nannies, as separate
    processes: a killed worker stays dead, as a lost machine does."""

    def __init__(self, folder):
        self.scheduler_file = str(folder / "scheduler.json")
        self.processes = []

    def _spawn(self, module, *args):
        # Should our watchdog for a cluster without workers fail, the
        # scheduler's own gives up on the tasks after a while: the test then
        # fails instead of hanging.
        env = dict(os.environ, DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT="20s")
        self.processes.append(
            subprocess.Popen(
                [sys.executable, "-m", f"distributed.cli.{module}"]
                + ["--scheduler-file", self.scheduler_file, "--no-dashboard", *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
        )

    def add_workers(self, n):
        """Start ``n`` more workers; wait until they have joined."""
        expected = len(self.client.scheduler_info()["workers"]) + n
        for _ in range(n):
            self._spawn("dask_worker", "--nthreads", "1", "--no-nanny")
        self.client.wait_for_workers(expected, timeout=120)

    def __enter__(self):
        self._spawn("dask_scheduler", "--host", "127.0.0.1", "--port", "0")
        try:
            self.client = distributed.Client(
                scheduler_file=self.scheduler_file, timeout=120
            )
            self.client.register_plugin(slow_reads_plugin(READ_DELAY))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info):
        if hasattr(self, "client"):
            self.client.close()
        for process in reversed(self.processes):
            process.kill()
            process.wait(timeout=60)


def test_every_worker_lost_ends_in_a_clear_error(tmp_path, serial, train):
    fitted = copy.deepcopy(serial).set_params(n_jobs=4)
    before = fitted_state(fitted)
    with CliCluster(tmp_path) as cluster:
        cluster.add_workers(2)
        client = cluster.client
        with (
            on_dask(client, wait_for_workers_timeout=2),
            sabotage(client, "_chunk_moments", 0.3, everyone=True) as saboteur,
            pytest.raises(WorkerLostError, match="Every Dask worker was lost") as info,
        ):
            fitted.fit(train[::-1])
        assert len(saboteur.finish()) == 2
    assert "wait_for_workers_timeout" in str(info.value)
    assert_unchanged(fitted, before)
