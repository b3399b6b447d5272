"""Turn request bodies (JSON with references, or multipart uploads) into measurement tasks.

Everything here runs in a worker thread (tables are parsed with pandas). Problems with the
caller's input raise :class:`~forcedphot.api.problems.Problem` or the engine's input errors,
which become 4xx problem+json; nothing the caller sends reaches a 500.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
import shutil
import tempfile
from typing import Any, TypeVar

import pandas as pd
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.datastructures import FormData, UploadFile

from forcedphot.api.problems import Problem, invalid_request
from forcedphot.api.schemas import ApdbObjectsRef, ExposureReference, MeasureOptions, MeasureRequest, Position
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.formats import DEFAULT_FORMAT, FORMATS, table_format
from forcedphot.photometry.objects import (
    InputError,
    ObjectArrays,
    format_examples,
    object_table_format,
    plain_records,
    read_objects,
    records_frame,
    validate_objects,
)
from forcedphot.photometry.table_limits import TableLimits, TableTooLarge, check_size
from forcedphot.serving.apdb import ApdbObjects, objects_by_id, open_apdb
from forcedphot.serving.executor import ExposureInput, MeasureTask
from forcedphot.serving.repository import ExposureRef, Repository, UriRef, describe

T = TypeVar("T")
GENERIC_MEDIA_TYPES = ("", "application/octet-stream")
MULTIPART_FIELDS = {"exposure", "exposure_ref", "difference", "difference_ref", "objects", "objects_ref",
                    "psf_fwhm", "apertures", "include_offimage", "extra_columns", "subtract_background", "measurements", "psf"}
_SCALARS = (str, int, float, bool, type(None))
_REF_ADAPTER: TypeAdapter = TypeAdapter(ExposureReference)


def _caller_table_problem(name: str, parse: Callable[[], T]) -> T:
    """Run a table parse; type and value errors the engine does not word become InputError."""
    try:
        return parse()
    except (InputError, TableTooLarge):
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise InputError(f"{name}: cannot use the table: {exc}") from None


def _validated(model: type[BaseModel], data: Any, prefix: tuple[str, ...]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request(exc.errors(include_url=False), prefix) from None


class Intake:
    """Builds :class:`MeasureTask` objects against one repository and the service limits."""

    def __init__(self, repository: Repository, max_objects: int, batch_bytes: int, backend: str, upload_dir: Path,
                 table_limits: TableLimits | None = None, apdb: str | None = None):
        """``apdb``: the configuration file of the server's APDB, if it has one."""
        self.repository = repository
        self.apdb = apdb
        self.max_objects = max_objects
        self.table_limits = table_limits or TableLimits(max_rows=max_objects)
        self.batch_bytes = batch_bytes
        self.backend = backend
        self.upload_dir = upload_dir

    # --- pieces ------------------------------------------------------------------------

    def _check_count(self, n: int, name: str) -> None:
        if n > self.max_objects:
            raise Problem(413, "too-many-objects", f"{name}: {n} DiaObjects, more than the {self.max_objects} allowed per request; "
                                                   "split the table or submit a job")

    def objects_from_records(self, records: list[dict[str, Any]]) -> pd.DataFrame:
        """Inline JSON records -> validated objects."""
        name = "objects"
        self._check_count(len(records), name)
        if not records:
            raise InputError(f"{name}: the object table is empty")
        for row, record in enumerate(records):
            for key, value in record.items():
                if not isinstance(value, _SCALARS):
                    raise InputError(f"{name}: row {row} column {key!r} holds a {type(value).__name__}; values must be numbers or strings")
        frame = _caller_table_problem(name, lambda: records_frame(records, name))
        return _caller_table_problem(name, lambda: validate_objects(frame, name=name))

    def objects_from_bytes(self, data: bytes, fmt: str, name: str) -> pd.DataFrame:
        """An uploaded table (parquet, csv or json) -> validated objects."""
        frame = _caller_table_problem(name, lambda: read_objects(data, media_type=fmt, name=name, limits=self.table_limits))
        self._check_count(len(frame), name)
        return frame

    def objects_from_ref(self, ref: UriRef) -> pd.DataFrame:
        """A table in the repository -> validated objects."""
        path = self.repository.resolve(ref)
        fmt = _object_format(path.suffix, ref.uri) if path.suffix else None
        if fmt is None:
            raise Problem(415, "unsupported-media-type", f"{ref.uri}: object tables must be .parquet, .csv, .json or .avro (alert packets) files")
        check_size(path.stat().st_size, self.table_limits, ref.uri)
        frame = _caller_table_problem(ref.uri, lambda: read_objects(path.read_bytes(), media_type=fmt, name=ref.uri, limits=self.table_limits))
        self._check_count(len(frame), ref.uri)
        return frame

    def _apdb_config(self, what: str) -> str:
        if self.apdb is None:
            raise Problem(422, "no-apdb", f"{what}: this server has no APDB (start it with --apdb apdb.yaml, or set FORCEDPHOT_APDB_CONFIG)")
        return self.apdb

    def objects_from_apdb(self, ref: ApdbObjectsRef, *, per_exposure: bool) -> pd.DataFrame | ApdbObjects:
        """DiaObjects of the APDB: those named (a table now), else, where ``per_exposure``,
        those each exposure overlaps (read when it is measured)."""
        config = self._apdb_config("objects.apdb")
        if ref.apdb.diaObjectIds is None:
            if not per_exposure:
                raise Problem(422, "invalid-request", "objects.apdb: name the DiaObjects (diaObjectIds); the DiaObjects on an exposure "
                                                      "are taken by POST /v1/forced-photometry, one exposure at a time")
            return ApdbObjects(config, ref.apdb.min_dia_sources)
        ids = list(dict.fromkeys(ref.apdb.diaObjectIds))
        self._check_count(len(ids), "objects.apdb.diaObjectIds")
        found = objects_by_id(open_apdb(config), ids)
        missing = sorted(set(ids) - set(found["diaObjectId"].tolist()))
        if missing:
            raise Problem(404, "unknown-object", f"objects.apdb.diaObjectIds: no DiaObject {format_examples(missing)} in the APDB")
        return found

    def objects(self, objects: list[dict[str, Any]] | UriRef | ApdbObjectsRef, *, per_exposure: bool = False) -> pd.DataFrame | ApdbObjects:
        """The objects of a request (``per_exposure``: one exposure's, which may come from the APDB's region)."""
        if isinstance(objects, ApdbObjectsRef):
            return self.objects_from_apdb(objects, per_exposure=per_exposure)
        return self.objects_from_ref(objects) if isinstance(objects, UriRef) else self.objects_from_records(objects)

    def measured_objects(self, objects: list[dict[str, Any]] | UriRef | ApdbObjectsRef) -> ObjectArrays | ApdbObjects:
        """The objects of a one-exposure measurement as the engine reads them: arrays (inline
        records in the plain form without a table, see :func:`plain_records`), or the APDB's
        on the exposure, read when it is measured."""
        if isinstance(objects, list) and objects:
            self._check_count(len(objects), "objects")
            plain = plain_records(objects)
            if plain is not None:
                return plain
        found = self.objects(objects, per_exposure=True)
        return found if isinstance(found, ApdbObjects) else ObjectArrays.of(found)

    def store_to(self, store: bool) -> str | None:
        """The APDB configuration to store a request's DiaForcedSources in, if asked to."""
        return self._apdb_config("store") if store else None

    def lightcurve_objects(self, objects: list[dict[str, Any]] | UriRef | ApdbObjectsRef | Position) -> pd.DataFrame:
        """The objects of a light-curve request; one position is diaObjectId 0."""
        if isinstance(objects, Position):
            return validate_objects(pd.DataFrame({"diaObjectId": [0], "ra": [objects.ra], "dec": [objects.dec]}), name="objects")
        return self.objects(objects)

    def psf_file(self, ref: UriRef) -> ExposureInput:
        """A PSF file in the repository (checked to lie inside a root)."""
        return ExposureInput(path=self.repository.resolve(ref), label=ref.uri)

    def exposure(self, ref: ExposureRef) -> ExposureInput:
        """A repository reference -> the file to read (checked to lie inside a root)."""
        return ExposureInput(path=self.repository.resolve(ref), label=describe(ref))

    def config(self, options: MeasureOptions) -> MeasurementConfig:
        fields: dict[str, Any] = {"include_offimage": options.include_offimage, "extra_columns": options.extra_columns,
                                  "subtract_background": options.subtract_background, "measurements": options.measurements,
                                  "backend": self.backend,
                                  "batch_bytes": self.batch_bytes}
        if options.apertures:
            fields["apertures_px"] = tuple(options.apertures)
        return MeasurementConfig(**fields)

    # --- whole requests ----------------------------------------------------------------

    def from_json(self, body: bytes) -> MeasureTask:
        """A JSON request body -> task."""
        try:
            request = MeasureRequest.model_validate_json(body)
        except ValidationError as exc:
            raise invalid_request(exc.errors(include_url=False), ("body",)) from None
        return MeasureTask(
            science=self.exposure(request.exposure),
            difference=self.exposure(request.difference) if request.difference else None,
            objects=self.measured_objects(request.objects),
            config=self.config(request),
            psf_fwhm=request.psf_fwhm,
            store=self.store_to(request.store),
        )

    def from_form(self, form: FormData) -> tuple[MeasureTask, list[Path]]:
        """A multipart form -> task, and the temporary upload files the caller deletes afterwards."""
        unknown = sorted(set(form.keys()) - MULTIPART_FIELDS)
        if unknown:
            raise Problem(422, "invalid-request", f"unknown form field(s) {', '.join(unknown)}; expected {', '.join(sorted(MULTIPART_FIELDS))}")
        options = _validated(MeasureOptions, _form_options(form), ("body",))
        temporary: list[Path] = []
        try:
            science = self._form_exposure(form, "exposure", temporary, required=True)
            difference = self._form_exposure(form, "difference", temporary, required=False)
            objects = ObjectArrays.of(self._form_objects(form))
            task = MeasureTask(science=science, difference=difference, objects=objects,
                               config=self.config(options), psf_fwhm=options.psf_fwhm, psf=self._form_psf(form, temporary))
        except BaseException:
            remove_uploads(temporary)
            raise
        return task, temporary

    def _form_exposure(self, form: FormData, name: str, temporary: list[Path], *, required: bool) -> ExposureInput | None:
        upload, ref_text = form.get(name), form.get(f"{name}_ref")
        if upload is not None and ref_text is not None:
            raise Problem(422, "invalid-request", f"give either the file part {name!r} or {name + '_ref'!r}, not both")
        if upload is None and ref_text is None:
            if required:
                raise Problem(422, "invalid-request", f"missing the FITS file part {name!r} (or a reference in {name + '_ref'!r})")
            return None
        if ref_text is not None:
            return self.exposure(_parse_ref(name + "_ref", ref_text))
        if not isinstance(upload, UploadFile):
            raise Problem(422, "invalid-request", f"form field {name!r} must be a file part holding a FITS file")
        return self._saved(upload, name, ".fits", temporary)

    def _saved(self, upload: UploadFile, name: str, suffix: str, temporary: list[Path]) -> ExposureInput:
        """An uploaded file part, saved for the engine; named by its form field and file name."""
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.upload_dir, suffix=suffix, delete=False) as out:
            temporary.append(Path(out.name))
            upload.file.seek(0)
            shutil.copyfileobj(upload.file, out, length=2**20)
        return ExposureInput(path=Path(out.name), label=f"upload:{upload.filename or name}", uploaded=True)

    def _form_psf(self, form: FormData, temporary: list[Path]) -> ExposureInput | None:
        """The optional PSF file part: a PSFEx ``.psf`` file or a FITS PSF image."""
        upload = form.get("psf")
        if upload is None:
            return None
        if not isinstance(upload, UploadFile):
            raise Problem(422, "invalid-request", "form field 'psf' must be a file part holding a PSFEx .psf file or a FITS PSF image")
        suffix = ".psf" if (upload.filename or "").lower().endswith(".psf") else ".fits"
        return self._saved(upload, "psf", suffix, temporary)

    def _form_objects(self, form: FormData) -> pd.DataFrame:
        upload, ref_text = form.get("objects"), form.get("objects_ref")
        if upload is not None and ref_text is not None:
            raise Problem(422, "invalid-request", "give either the file part 'objects' or 'objects_ref', not both")
        if ref_text is not None:
            try:
                ref = UriRef.model_validate_json(ref_text)
            except ValidationError as exc:
                raise invalid_request(exc.errors(include_url=False), ("body", "objects_ref")) from None
            return self.objects_from_ref(ref)
        if upload is None:
            raise Problem(422, "invalid-request", "missing the DiaObject table part 'objects' (parquet, CSV or JSON)")
        if not isinstance(upload, UploadFile):
            raise Problem(422, "invalid-request", "form field 'objects' must be a file part holding a parquet, CSV or JSON table")
        name = f"objects part {upload.filename or ''}".strip()
        fmt = _table_format(upload)
        check_size(upload.file.seek(0, 2), self.table_limits, name)
        upload.file.seek(0)
        return self.objects_from_bytes(upload.file.read(), fmt, name)


def _parse_ref(name: str, text: str) -> ExposureRef:
    try:
        return _REF_ADAPTER.validate_json(text)
    except ValidationError as exc:
        raise invalid_request(exc.errors(include_url=False), ("body", name)) from None


def _form_options(form: FormData) -> dict[str, Any]:
    """The measurement options given as plain form fields."""
    options: dict[str, Any] = {}
    for key in ("psf_fwhm", "include_offimage", "apertures", "extra_columns", "subtract_background", "measurements"):
        if key not in form:
            continue
        value = form[key]
        if not isinstance(value, str):
            raise Problem(422, "invalid-request", f"form field {key!r} must be a plain field, not a file part")
        options[key] = [part.strip() for part in value.split(",") if part.strip()] if key == "apertures" else value
    return options


def _table_format(upload: UploadFile) -> str:
    """parquet, csv or json from the part's media type, else from its file name."""
    media_type = (upload.content_type or "").split(";")[0].strip().lower()
    if media_type not in GENERIC_MEDIA_TYPES:
        fmt = _object_format(media_type, "objects") if "/" in media_type else None
        if fmt is None:
            raise Problem(415, "unsupported-media-type", f"the objects part has media type {media_type!r}; send "
                          f"{', '.join(sorted(FORMATS[f] for f in ('parquet', 'csv', 'json')))} or application/avro (alert packets)")
        return fmt
    suffix = Path(upload.filename or "").suffix
    return (_object_format(suffix, "objects") if suffix else None) or DEFAULT_FORMAT


def _object_format(kind: str, name: str) -> str | None:
    """The object-table format ``kind`` names (see :func:`object_table_format`), else None."""
    try:
        return object_table_format(kind, name)
    except InputError:
        return None


def remove_uploads(paths: list[Path]) -> None:
    """Delete temporary upload files."""
    for path in paths:
        path.unlink(missing_ok=True)
