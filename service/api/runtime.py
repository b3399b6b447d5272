"""The service's long-lived parts, built from settings: backend, cache, measurement, jobs.

:class:`ServiceRuntime` owns them, starts them in the application's lifespan (job
runners; the demo repository is written in a background thread so ``/healthz`` answers
at once) and says whether the service is ready.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
import random
import threading
from typing import TYPE_CHECKING

from forcedphot.api.auth import ApiKeys
from forcedphot.api.intake import Intake
from forcedphot.api.metrics import ServiceMetrics, device_memory_reader
from forcedphot.api.problems import Problem
from forcedphot.api.schemas import JobRequest, LightCurveRequest
from forcedphot.api.settings import Settings
from forcedphot.demo.repository import APDB as DEMO_APDB
from forcedphot.demo.repository import BUTLER as DEMO_BUTLER
from forcedphot.demo.repository import DemoVisitId, ensure_demo_repository
from forcedphot.photometry.backend import select_backend
from forcedphot.photometry.warm_up import exercise_measurement
from forcedphot.serving.batching import KernelBatcher
from forcedphot.serving.executor import LightCurveTask, MeasureService
from forcedphot.serving.exposure_cache import ExposureCache
from forcedphot.serving.index import ExposureIndex, RefreshReport
from forcedphot.serving.job_store import STORE_ERRORS, IdempotencyConflict, Job, JobLimitReached, JobStore, store_error_reason
from forcedphot.serving.jobs import JobRunner, job_spec
from forcedphot.serving.lightcurves import plan_lightcurves
from forcedphot.serving.repository import Repository

if TYPE_CHECKING:
    from forcedphot.serving.butler import ButlerSource

log = logging.getLogger("forcedphot.service")


def measure_processes(settings: Settings, backend_name: str) -> int:
    """How many measurement processes to run: the setting, else one per core this process
    may run on (its CPU affinity; a container's CPU quota is not seen) on NumPy, else 0."""
    if settings.measure_processes is not None:
        return settings.measure_processes
    if backend_name != "numpy":
        return 0
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def index_path(settings: Settings) -> Path:
    """The exposure index of the served folders: one file per (roots, path template), so
    that servers of other repositories sharing the data directory never touch it."""
    served = json.dumps([[str(Path(root).resolve()) for root in settings.repository_roots], settings.path_template])
    return settings.data_dir / "indexes" / f"{hashlib.sha256(served.encode()).hexdigest()[:16]}.sqlite"


class ServiceRuntime:
    """Everything a request needs, shared by all requests of one server process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.keys = ApiKeys(settings.api_keys)
        self.backend = select_backend(settings.backend)
        limits = settings.exposure_limits
        # no memory maps of repository files in the server process: a file truncated under a map kills it (SIGBUS)
        self.cache = ExposureCache(settings.cache_bytes, on_event=self._count_cache, limits=limits, backend=self.backend, memory_map=False)
        batcher = KernelBatcher(settings.batch_wait_ms / 1000, settings.batch_max_objects) if settings.batching else None
        self.service = MeasureService(self.cache, self.backend, settings.measure_threads, batcher,
                                      processes=measure_processes(settings, self.backend.name), on_process_cache_event=self._count_cache,
                                      time_limit=settings.request_time_limit_seconds, limits=limits, memory_map=False)
        self._jobs: JobStore | None = None
        self.runner: JobRunner | None = None
        self._jobs_error: str | None = None  # why jobs are unavailable (degraded mode)
        try:
            url = settings.database_url.get_secret_value() if settings.database_url else None
            self._jobs = JobStore(settings.data_dir / "jobs", url)
        except STORE_ERRORS as exc:  # sync measurement still works; jobs answer 503
            self._jobs_error = f"the job store cannot be opened ({store_error_reason(exc)})"
            log.error("jobs unavailable, measuring requests only: %s", self._jobs_error)
        else:
            self.runner = JobRunner(self._jobs, self.service, workers=settings.job_workers,
                                    heartbeat_seconds=settings.job_heartbeat_seconds, stale_seconds=settings.job_stale_seconds,
                                    max_attempts=settings.job_max_attempts,
                                    on_finished=lambda state: self.metrics.jobs.labels(state).inc(),
                                    dask_scheduler=settings.dask_scheduler)
        self.upload_dir = settings.data_dir / "uploads"
        self.demo_visits: list[DemoVisitId] = []
        self._processes_ready = self.service.processes == 0
        self.in_flight = 0
        self._repository: Repository | None = None
        self._startup_error: str | None = None  # the demo repository's
        self._process_error: str | None = None
        self.metrics.watch(self.metrics.cache_bytes, lambda: float(self.cache.nbytes))
        self.metrics.watch(self.metrics.queue_depth, self._queue_depth)
        self.metrics.watch(self.metrics.in_flight, lambda: float(self.in_flight))
        if batcher is not None:
            self.metrics.watch(self.metrics.kernel_calls, lambda: float(batcher.stats.kernel_calls))
            self.metrics.watch(self.metrics.batched_requests, lambda: float(batcher.stats.requests))
        reader = device_memory_reader(self.backend.name)
        if reader:
            self.metrics.watch(self.metrics.device_memory, reader)
        #: the APDB's configuration file: the settings', else the demo's (once written)
        self.apdb = settings.apdb_config
        self.index: ExposureIndex | ButlerSource = ExposureIndex(index_path(settings))
        self.index_report: RefreshReport | None = None  # the last refresh's
        if settings.butler_repository:
            self._open_butler(settings.butler_repository, settings.butler_collections)
        elif not settings.demo_mode:
            self._repository = Repository(settings.repository_roots, settings.path_template)

    def _open_butler(self, repository: str, collections: list[str], table_roots: list[Path] | None = None) -> None:
        """The Butler repository serves the references and the coverage (its registry is the
        index); one that cannot be opened is reported by /readyz."""
        from forcedphot.serving.butler import ButlerSource, ButlerUnavailable, RemoteFiles

        s = self.settings
        try:
            source = ButlerSource(repository, collections, s.butler_science_type, s.butler_difference_type, table_roots=table_roots,
                                  remote=RemoteFiles(s.data_dir / "remote-files", s.remote_cache_bytes, s.exposure_limits))
        except ButlerUnavailable as exc:
            self._startup_error = str(exc)
            log.error("%s", exc)
            return
        self._repository = self.index = source
        self.index_report = RefreshReport()

    def _queue_depth(self) -> float:
        try:
            return float(self._jobs.count_active()) if self._jobs is not None else math.nan
        except STORE_ERRORS:
            return math.nan

    @property
    def jobs(self) -> JobStore:
        """The job store, or 503 when it could not be opened (degraded mode)."""
        if self._jobs is None:
            raise Problem(503, "jobs-unavailable", f"batch jobs are unavailable: {self._jobs_error}; single requests still work",
                          headers={"Retry-After": self.retry_after()})
        return self._jobs

    def retry_after(self) -> str:
        """A Retry-After value (seconds) spread at random over ``[r, 3r]`` for the setting
        ``r`` (at least 1), so refused clients do not come back in lockstep."""
        base = max(1, self.settings.retry_after_seconds)
        return str(random.randint(base, 3 * base))

    def _count_cache(self, outcome: str) -> None:
        """Count an exposure cache outcome ("hit", "miss", "bypass") of any process."""
        self.metrics.cache.labels(outcome).inc()

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the job runners, and write the demo repository in the background if needed."""
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.upload_dir.glob("*.fits"):  # uploads of a process that died
            stale.unlink(missing_ok=True)
        if not self._processes_ready:
            threading.Thread(target=self._start_processes, name="measure-processes", daemon=True).start()
        # before the server takes connections, and before the job runner's threads start:
        # loading the kernels holds the interpreter for long stretches, and a job's heartbeat
        # would wait behind it
        self._exercise()
        if self.runner is not None:
            if self.backend.name == "numpy":  # jobs measure in this process: load the fused kernels before the first one
                from forcedphot.kernels.fused_cpu import warm_up

                warm_up()
            self.runner.start()
        if self.settings.demo_mode:
            threading.Thread(target=self._make_demo, name="demo-repository", daemon=True).start()
        elif not self.settings.butler_repository:
            threading.Thread(target=self._refresh_index_logged, name="index", daemon=True).start()

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()
        self.service.close()

    def _start_processes(self) -> None:
        try:
            self.service.warm_up()
            self._processes_ready = True
            log.info("%d measurement processes ready", self.service.processes)
        except Exception as exc:  # reported by /readyz
            log.exception("the measurement processes could not start")
            self._process_error = f"the measurement processes could not start: {exc}"

    @staticmethod
    def _exercise() -> None:
        """Pay this process's first-use costs (light curves and jobs are encoded here) now,
        not in the first request (~0.1 s; up to a second where the kernels load here first);
        a failure only costs that."""
        try:
            exercise_measurement()
        except Exception:
            log.warning("the warm-up measurement failed; the first request will be slower", exc_info=True)

    def _make_demo(self) -> None:
        s = self.settings
        try:
            log.info("preparing the demo repository in %s", s.demo_repository)
            from forcedphot.demo.butler import RUN as DEMO_RUN  # loads the Butler: only the demo needs it at start

            self.demo_visits = ensure_demo_repository(s.demo_repository, visits=s.demo_visits, size=s.demo_size, objects=s.demo_objects)
            self.apdb = self.apdb or str(s.demo_repository / DEMO_APDB)
            self._open_butler(str(s.demo_repository / DEMO_BUTLER), [DEMO_RUN], table_roots=[s.demo_repository])
            log.info("demo repository ready: %d visits from %d, served through its Butler repository", len(self.demo_visits),
                     self.demo_visits[0].visit)
        except Exception as exc:  # reported by /readyz
            log.exception("the demo repository could not be written")
            self._startup_error = f"the demo repository could not be written: {store_error_reason(exc)}"

    def demo_state(self) -> str:
        """The embedded demo repository: "being written", "ready", or why it failed."""
        if self._startup_error:
            return self._startup_error
        return "ready" if self._repository is not None else "being written"

    def refresh_index(self) -> RefreshReport:
        """Bring the exposure index up to date with the repository (new and changed files)."""
        if self._repository is None:
            raise Problem(503, "not-ready", "the repository is not ready yet; retry shortly", headers={"Retry-After": self.retry_after()})
        report = self.index.refresh(self._repository.roots, self.settings.path_template)
        self.index_report = report
        return report

    def _refresh_index_logged(self) -> None:
        try:
            log.info("exposure index: %s", self.refresh_index())
        except Exception:  # reported by the light-curve endpoints: the index stays as it was
            log.exception("the exposure index could not be refreshed")

    def ready_index(self) -> ExposureIndex:
        """The exposure index, once built at least once; else 503."""
        if self.index_report is None:
            raise Problem(503, "index-not-ready", "the exposure index is being built; retry shortly", headers={"Retry-After": self.retry_after()})
        return self.index

    # --- light curves ----------------------------------------------------------------

    def plan_lightcurves(self, intake: Intake, request: LightCurveRequest) -> LightCurveTask:
        """Validate the request and find the epochs covering its objects."""
        objects = intake.lightcurve_objects(request.objects)
        return plan_lightcurves(self.ready_index(), objects, intake.config(request), mjd_min=request.mjd_min, mjd_max=request.mjd_max,
                                bands=request.bands, psf_fwhm=request.psf_fwhm)

    def submit_lightcurve_job(self, task: LightCurveTask, request: LightCurveRequest, key: str | None, client: str) -> tuple[Job, bool]:
        """A light-curve request too large to answer at once, accepted as a job (rows sorted
        as a light curve)."""
        fingerprint, earlier = self._earlier_job(request, key, client)
        if earlier is not None:
            return earlier, False
        spec = job_spec([(e.science, e.difference, None) for e in task.epochs], task.config, task.psf_fwhm, order="lightcurve",
                        products=request.products())
        return self._create_job(spec, task.objects, fingerprint, key, client)

    # --- state -------------------------------------------------------------------------

    def problems(self) -> dict[str, str]:
        """Readiness checks that fail, by name (empty when ready)."""
        failing: dict[str, str] = {}
        if self._startup_error:
            failing["repository"] = self._startup_error
        elif self._repository is None:
            failing["repository"] = "the demo repository is being written"
        else:
            issues = self._repository.readable()
            if issues:
                failing["repository"] = "; ".join(issues)
        if self._process_error:
            failing["measure"] = self._process_error
        elif not self._processes_ready:
            failing["measure"] = f"the {self.service.processes} measurement processes are starting"
        if self._jobs is None:
            failing["jobs"] = f"batch jobs are unavailable: {self._jobs_error}"
        elif self.runner is not None and not self.runner.alive():
            failing["jobs"] = "the job runner has stopped"
        return failing

    def degraded(self) -> dict[str, str]:
        """What works only in part, by name: a job store that cannot be written (full disk,
        read-only) refuses new jobs, but requests, light curves and reads of jobs still
        work, so the server stays ready (taking it out of service would stop those too)."""
        if self._jobs is None:
            return {}
        try:
            self._jobs.probe_write()  # a write, as jobs make: a full or read-only store fails it
        except STORE_ERRORS as exc:
            return {"jobs": f"the job store cannot be written ({store_error_reason(exc)}): new jobs are refused, reads work"}
        return {}

    def intake(self) -> Intake:
        """Request parsing against the repository; 503 while it is not there yet."""
        if self._repository is None:
            raise Problem(503, "not-ready", self._startup_error or "the service is starting (writing the demo repository); retry shortly",
                          headers={"Retry-After": self.retry_after()})
        s = self.settings
        return Intake(self._repository, s.max_objects, s.batch_bytes, self.backend.name, self.upload_dir, s.table_limits, self.apdb)

    # --- jobs --------------------------------------------------------------------------

    def submit_job(self, intake: Intake, request: JobRequest, key: str | None, client: str) -> tuple[Job, bool]:
        """Validate and accept a job: ``(job, True)``, or ``(earlier job, False)`` for a known key.

        Every reference is resolved and the object table validated now, so an accepted
        job can only fail on the files' contents.
        """
        s = self.settings
        fingerprint, earlier = self._earlier_job(request, key, client)
        if earlier is not None:
            return earlier, False
        if len(request.exposures) > s.max_job_exposures:
            raise Problem(413, "too-many-exposures", f"{len(request.exposures)} exposures, more than the {s.max_job_exposures} allowed per job")
        exposures = [(intake.exposure(item.exposure), intake.exposure(item.difference) if item.difference else None,
                      intake.psf_file(item.psf) if item.psf else None) for item in request.exposures]
        by_file: dict[Path, list[str]] = {}
        for science, difference, _ in exposures:  # the same file under several names counts once
            measured = difference or science
            by_file.setdefault(measured.path.resolve(), []).append(measured.label)
        repeated = [" = ".join(labels) for labels in by_file.values() if len(labels) > 1]
        if repeated:
            raise Problem(422, "invalid-request", f"exposure(s) listed more than once: {'; '.join(repeated)}")
        objects = intake.objects(request.objects)
        spec = job_spec(exposures, intake.config(request), request.psf_fwhm)
        spec["store"] = intake.store_to(request.store)
        return self._create_job(spec, objects, fingerprint, key, client)

    def _earlier_job(self, request, key: str | None, client: str) -> tuple[str, Job | None]:
        """The request's fingerprint, and the job ``client`` already submitted under ``key``
        (None if none); 422 when that client used the key for another request."""
        fingerprint = _fingerprint(request)
        try:
            return fingerprint, self.jobs.by_key(client, key, fingerprint) if key is not None else None
        except IdempotencyConflict as exc:
            raise Problem(422, "idempotency-key-reused", str(exc)) from None

    def _create_job(self, spec: dict, objects, fingerprint: str, key: str | None, client: str) -> tuple[Job, bool]:
        s = self.settings
        try:
            job, created = self.jobs.create(spec=spec, objects=objects, fingerprint=fingerprint, key=key, max_active=s.max_active_jobs,
                                            client=client, max_active_per_client=s.max_active_jobs_per_key)
        except JobLimitReached as exc:
            raise Problem(429, "too-many-jobs", f"{exc}; retry later", headers={"Retry-After": self.retry_after()}) from None
        except IdempotencyConflict as exc:
            raise Problem(422, "idempotency-key-reused", str(exc)) from None
        if created:
            self.runner.notify()
        return job, created

    def job(self, job_id: str, client: str) -> Job:
        """``client``'s job, or a 404 problem (also for another client's job: its existence
        is not revealed)."""
        job = self.jobs.of(job_id, client)
        if job is None:
            raise Problem(404, "unknown-job", f"no job {job_id!r} of this API key (never accepted, or deleted)")
        return job

    def delete_job(self, job_id: str, client: str) -> None:
        """Cancel (if active) and delete ``client``'s job; 404 if it has none of that id."""
        self.job(job_id, client)
        self.runner.deleted(job_id)
        self.jobs.delete(job_id)


def _fingerprint(request) -> str:
    """What identifies a request for its idempotency key: its canonical JSON."""
    return hashlib.sha256(json.dumps(request.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()

