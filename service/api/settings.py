"""Service settings: environment variables ``FORCEDPHOT_*``, an optional config file, defaults.

Precedence, highest first: keyword arguments (the command line), environment variables,
the config file (TOML or JSON, named by ``config_file`` or ``FORCEDPHOT_CONFIG_FILE``),
the defaults below. List settings (``repository_roots``, ``api_keys``) read from the
environment are comma-separated (a JSON list also works). Sizes are in bytes.

With no repository root the service runs in *demo mode*: it serves an embedded demo
repository (synthetic visits written once into ``data_dir``) and needs no API key. Outside
demo mode at least one API key is required.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import tomllib
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from forcedphot.photometry.backend import BackendName
from forcedphot.photometry.config import DEFAULT_BATCH_BYTES
from forcedphot.photometry.exposure import DEFAULT_LIMITS, ExposureLimits
from forcedphot.photometry.table_limits import TableLimits
from forcedphot.serving.repository import DEFAULT_PATH_TEMPLATE

ENV_PREFIX = "FORCEDPHOT_"
MiB = 2**20


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/forcedphot``, else ``~/.local/share/forcedphot``."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "forcedphot"


class SettingsError(ValueError):
    """The settings cannot be used; the message names the setting."""


class Settings(BaseSettings):
    """Everything the service can be configured with."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    config_file: Path | None = Field(None, description="TOML or JSON file with any of these settings")
    data_dir: Path = Field(default_factory=default_data_dir, description="job store, results, uploads, demo repository")
    repository_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="directories exposures are served from; none: demo mode")
    butler_repository: str | None = Field(None, description=(
        "a Butler repository (its root, or the URI of its butler.yaml): exposures are data ids resolved by its registry "
        "and light curves find their exposures from its regions; needs butler_collections"))
    apdb_config: str | None = Field(None, description=(
        "an APDB's configuration file (apdb-cli create-sql writes one): requests may take their DiaObjects from it "
        "and store DiaForcedSources in it; the demo has its own"))
    butler_collections: Annotated[list[str], NoDecode] = Field(default_factory=list, description="Butler collections searched, in order")
    butler_science_type: str = Field("visit_image", description='the Butler dataset type measured for "calexp" (scienceFlux)')
    butler_difference_type: str = Field("difference_image", description='the Butler dataset type measured for "difference" (psfFlux)')
    remote_cache_bytes: int = Field(8 * 1024 * MiB, gt=0, description=(  # serving.butler.DEFAULT_REMOTE_CACHE_BYTES (not imported: it loads the Butler)
        "bytes fetched into local copies of Butler files in object storage (s3://, gs://, https://), in "
        "data_dir/remote-files; a copy holds the headers and the rows requests have read; least recently used ones "
        "are removed beyond this"))
    path_template: str = Field(DEFAULT_PATH_TEMPLATE, description="data id -> path inside a root; fields visit, detector, datasetType")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list, description="accepted bearer tokens")
    database_url: SecretStr | None = Field(None, description=(
        "PostgreSQL URL (postgresql://user:password@host:port/database) of a job store shared by replicas; "
        "none: SQLite in data_dir"))
    dask_scheduler: str | None = Field(None, description=(
        "Dask scheduler address (tcp://host:8786): light-curve jobs run there, one task per exposure; none: in the server"))
    backend: BackendName = Field("auto", description="auto (CuPy when a CUDA device answers), numpy, cupy, or stand-in (CI's stand-in device)")
    batch_bytes: int = Field(DEFAULT_BATCH_BYTES, gt=0, description="memory bound of one cutout batch")
    cache_bytes: int = Field(2048 * MiB, ge=0, description=(
        "exposure cache size (pixels held in memory); the measurement processes share it out, and jobs, "
        "which run in the server process, have a cache of this size of their own"))
    max_body_bytes: int = Field(512 * MiB, gt=0, description=(
        "largest request body (multipart uploads: FITS files are spooled to disk); beyond it 413"))
    max_json_body_bytes: int = Field(32 * MiB, gt=0, description=(
        "largest JSON request body; beyond it 413 (a parsed JSON body costs up to 40 times its size)"))
    max_json_values: int | None = Field(None, gt=0, description=(
        "most JSON values (keys included) in a request body or JSON object table, counted before parsing "
        "(each becomes a Python object of ~100 bytes); default 16 per allowed object plus 4096"))
    max_table_bytes: int = Field(64 * MiB, gt=0, description=(
        "largest object table (a file part, a repository table, or a parquet table once decompressed); beyond it 413"))
    max_objects: int = Field(100_000, gt=0, description="most DiaObjects in one request or job; beyond it 413")
    max_concurrent_requests: int = Field(16, gt=0, description="measurements in flight; beyond it 429")
    request_time_limit_seconds: float = Field(60.0, gt=0, description=(
        "time budget of one request's measurement; beyond it the request is answered 504 (a measurement process "
        "is terminated; in threads, MEASURE_PROCESSES=0, the work stops at its next batch of kernels)"))
    body_timeout_seconds: float = Field(30.0, gt=0, description="time to receive a request body; beyond it 408")
    header_timeout_seconds: float = Field(10.0, gt=0, description=(
        "time a connection has to send a request's headers, from their first byte (from the connection, for the first)"))
    write_timeout_seconds: float = Field(30.0, gt=0, description=(
        "a client that reads nothing of its answer for this long is disconnected (what it did not read is dropped)"))
    max_connections: int = Field(1000, gt=0, description="open connections per server process; beyond it 503 and closed")
    keep_alive_seconds: float = Field(5.0, gt=0, description="idle keep-alive connections are closed after this")
    shutdown_grace_seconds: float = Field(20.0, ge=0, description=(
        "after SIGTERM, how long requests in flight may finish before they are cancelled (their measurement "
        "processes terminated); with the job runner's and the pool's 10 s each, shutdown ends within this + 20 s"))
    max_hdus: int = Field(DEFAULT_LIMITS.max_hdus, gt=0, description="HDUs a FITS file may have")
    max_image_pixels: int = Field(DEFAULT_LIMITS.max_pixels, gt=0, description="pixels an image, mask or variance plane may declare")
    max_tile_pixels: int = Field(DEFAULT_LIMITS.max_tile_pixels, gt=0, description="pixels one compression tile may declare")
    measure_threads: int = Field(8, gt=0, description="threads measuring requests off the event loop (they stage cutouts; with batching they mostly wait for the batcher)")
    measure_processes: int | None = Field(None, ge=0, le=1024, description=(
        "processes measuring requests, each with its own exposure cache; 0: threads of the server process "
        "(needed for dynamic batching and for a GPU); default: one per core on the NumPy backend, else 0"))
    batching: bool = Field(True, description="coalesce concurrent in-process measurements' kernel calls into one batch (dynamic batching)")
    batch_wait_ms: float = Field(2.0, ge=0, le=1000, description="how long the batcher waits for more requests before a kernel call")
    batch_max_objects: int = Field(50_000, gt=0, description="objects in one coalesced kernel call at most")
    max_active_jobs: int = Field(64, gt=0, description="queued plus running jobs; beyond it 429")
    max_active_jobs_per_key: int = Field(16, gt=0, description=(
        "queued plus running jobs of one API key (so that one key cannot take every place); beyond it 429"))
    max_job_exposures: int = Field(1000, gt=0, description="most exposures in one job")
    result_encode_seconds: float = Field(600.0, gt=0, description=(
        "time budget of encoding a job result in another format than parquet (once per result and format, "
        "in a measurement process, holding a measurement slot)"))
    max_table_encode_rows: int = Field(1_000_000, gt=0, description=(
        "most rows of a job result served as FITS or VOTable (written from the whole table in memory); "
        "parquet, CSV, ECSV and JSON are written in batches and have no such limit"))
    job_workers: int = Field(1, gt=0, description="threads running jobs")
    job_heartbeat_seconds: float = Field(2.0, gt=0, description="how often a running job's owner says it is alive")
    job_stale_seconds: float = Field(15.0, gt=0, description="a running job silent this long is re-queued")
    job_max_attempts: int = Field(3, gt=0, description="runs of one job interrupted by server deaths before it fails")
    retry_after_seconds: int = Field(1, ge=0, description="Retry-After sent with 429 and 503")
    demo_visits: int = Field(24, ge=2, le=500, description="visits in the embedded demo repository (60 days, g and r, dithered)")
    demo_size: int = Field(512, ge=64, le=8192, description="side of each demo exposure, pixels")
    demo_objects: int = Field(200, ge=1, le=100_000, description="DiaObjects of the demo field")
    max_lightcurve_pairs: int = Field(20_000, gt=0, description=(
        "(object, exposure) pairs a light-curve request measures at once; a larger request is accepted as a job"))

    @field_validator("repository_roots", "api_keys", "butler_collections", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("path_template")
    @classmethod
    def _template_fields(cls, template: str) -> str:
        for name in ("{visit", "{detector", "{datasetType"):
            if name not in template:
                raise ValueError(f"path_template {template!r} must use the field {name}}}")
        if template.startswith("/") or ".." in template.split("/"):
            raise ValueError(f"path_template {template!r} must be a relative path without '..'")
        return template

    @field_validator("database_url")
    @classmethod
    def _postgresql_url(cls, url: SecretStr | None) -> SecretStr | None:
        if url is not None and not url.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("database_url must be a PostgreSQL URL: postgresql://user:password@host:port/database")
        return url

    @model_validator(mode="after")
    def _one_source(self) -> Settings:
        if self.butler_repository and self.repository_roots:
            raise ValueError("give either repository_roots (plain files) or butler_repository, not both")
        if self.butler_repository and not self.butler_collections:
            raise ValueError("butler_repository needs butler_collections (FORCEDPHOT_BUTLER_COLLECTIONS=coll1,coll2)")
        return self

    @model_validator(mode="after")
    def _keys_outside_demo(self) -> Settings:
        if not self.demo_mode and not self.api_keys:
            raise ValueError(
                "API keys are required when serving a repository, on any address (anyone who reaches the port, other "
                "users of this machine too, could read it): set FORCEDPHOT_API_KEYS (comma-separated, 16+ characters each; "
                "e.g. FORCEDPHOT_API_KEYS=$(openssl rand -hex 16)) or api_keys in the config file, and send "
                "'Authorization: Bearer <key>'; only the embedded demo runs without")
        if any(len(key.get_secret_value()) < 16 for key in self.api_keys):
            raise ValueError("every API key must be at least 16 characters long")
        return self

    @property
    def demo_mode(self) -> bool:
        """True when no repository is configured: the embedded demo repository is served."""
        return not self.repository_roots and not self.butler_repository

    @property
    def demo_repository(self) -> Path:
        """Where the embedded demo repository lives."""
        return self.data_dir / "demo-repository"

    @property
    def json_values_limit(self) -> int:
        """JSON values a request body or JSON table may hold (``max_json_values``, else 16
        per allowed object, about seven columns of records, plus 4096 for the rest)."""
        return self.max_json_values or 16 * self.max_objects + 4096

    @property
    def table_limits(self) -> TableLimits:
        """What one object table from a client may declare (see :class:`TableLimits`)."""
        return TableLimits(max_rows=self.max_objects, max_bytes=self.max_table_bytes, max_json_values=self.json_values_limit)

    @property
    def exposure_limits(self) -> ExposureLimits:
        """What a FITS file may declare (see :class:`ExposureLimits`)."""
        return ExposureLimits(max_hdus=self.max_hdus, max_pixels=self.max_image_pixels, max_tile_pixels=self.max_tile_pixels)

    def public(self) -> dict[str, Any]:
        """The settings safe to show a client (no keys, no server paths)."""
        shown = self.model_dump(mode="json", exclude={"api_keys", "config_file", "data_dir", "repository_roots", "database_url",
                                                      "butler_repository"})
        shown["exposures"] = "butler" if self.butler_repository else "files"
        shown["job_store"] = "postgresql" if self.database_url else "sqlite"
        shown["auth"] = "api-key" if self.api_keys else "none"
        shown["demo_mode"] = self.demo_mode
        return shown

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return init_settings, env_settings, _ConfigFileSource(settings_cls, init_settings), file_secret_settings


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Settings from the TOML or JSON file named by ``config_file`` / ``FORCEDPHOT_CONFIG_FILE``."""

    def __init__(self, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource):
        super().__init__(settings_cls)
        self._init_kwargs = getattr(init_settings, "init_kwargs", {})

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the whole file

    def __call__(self) -> dict[str, Any]:
        path = self._init_kwargs.get("config_file") or os.environ.get(f"{ENV_PREFIX}CONFIG_FILE")
        if not path:
            return {}
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise SettingsError(f"config file {path}: cannot read it as {'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: {exc}") from None
        if not isinstance(data, dict):
            raise SettingsError(f"config file {path}: expected a table of settings at the top level")
        return data


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment and config file, ``overrides`` winning (None values ignored).

    Raises :class:`SettingsError` with one line per invalid setting.
    """
    from pydantic import ValidationError

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False, include_input=False):
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            lines.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
        raise SettingsError("; ".join(lines)) from None
