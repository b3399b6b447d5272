"""Resolve exposure references to files inside the repository roots, and nowhere else.

A reference is either ``{"uri": "<path relative to a root>"}`` or a data id
``{"visit": V, "detector": D, "datasetType": "calexp" | "difference"}`` that the path
template (default ``{visit}/{detector}/{datasetType}.fits``) turns into such a path.

Refused: URLs and any ``scheme:`` prefix (400), backslashes and NUL characters (400),
absolute paths and ``..`` components (403), and paths that resolve (symlinks followed)
outside the root they were found in (403). A path that does not exist is 404.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
import re

from pydantic import BaseModel, ConfigDict, Field

from forcedphot.defaults import DEFAULT_PATH_TEMPLATE

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
MAX_URI_LENGTH = 1024
PLAIN_DATASET_TYPES = ("calexp", "difference")  # what a path template names: the science and the difference image


class UriRef(BaseModel):
    """A file named by its path relative to a repository root."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"uri": "2026112400042/94/calexp.fits"}]})

    uri: str = Field(min_length=1, max_length=MAX_URI_LENGTH, description="path relative to a repository root")


class DataIdRef(BaseModel):
    """An exposure named by its data id: resolved with the repository's path template, or
    by a Butler registry (:mod:`forcedphot.serving.butler`)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"visit": 2026112400042, "detector": 94, "datasetType": "calexp"},
        {"instrument": "LSSTCam", "visit": 2025120100123, "detector": 94, "datasetType": "visit_image"}]})

    visit: int = Field(ge=0, le=2**63 - 1)
    detector: int = Field(ge=0, le=2**31 - 1)
    datasetType: str = Field(  # noqa: N815 (the Butler's spelling)
        min_length=1, max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_]*$",
        description='"calexp" or "difference" (the science and difference image, any repository), or a Butler dataset type')
    instrument: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_-]*$",
                                   description="the Butler instrument (optional when the repository has one)")


ExposureRef = UriRef | DataIdRef


class RepositoryError(Exception):
    """A reference that cannot be served; ``status`` is the HTTP status that fits."""

    status = 400
    slug = "bad-reference"


class BadReference(RepositoryError):
    """Malformed: a URL, a scheme, odd characters."""


class ForbiddenReference(RepositoryError):
    """Would leave the repository roots."""

    status = 403
    slug = "forbidden-reference"


class UnknownDatasetType(RepositoryError):
    """A dataset type the repository does not have."""

    status = 422
    slug = "unknown-dataset-type"


class UnknownReference(RepositoryError):
    """Well-formed but nothing is there."""

    status = 404
    slug = "unknown-exposure"


def describe(ref: ExposureRef) -> str:
    """A short text naming the reference, for messages and provenance."""
    if isinstance(ref, UriRef):
        return ref.uri
    instrument = f"instrument={ref.instrument} " if ref.instrument else ""
    return f"{instrument}visit={ref.visit} detector={ref.detector} datasetType={ref.datasetType}"


class Repository:
    """One or more root directories searched in order, and the data id path template."""

    def __init__(self, roots: list[Path], path_template: str):
        if not roots:
            raise ValueError("a repository needs at least one root directory")
        self.roots = [Path(root) for root in roots]
        self.path_template = path_template

    def readable(self) -> list[str]:
        """Problems that stop the repository from being served (empty when all is well)."""
        return [f"repository root {i + 1} of {len(self.roots)} is not a readable directory" for i, root in enumerate(self.roots)
                if not (root.is_dir() and os.access(root, os.R_OK | os.X_OK))]

    def relative_path(self, ref: ExposureRef) -> str:
        """The path inside a root that ``ref`` names (not yet checked)."""
        if isinstance(ref, UriRef):
            return ref.uri
        if ref.datasetType not in PLAIN_DATASET_TYPES:
            raise UnknownDatasetType(f"{describe(ref)}: a plain repository has the dataset types {' and '.join(PLAIN_DATASET_TYPES)}; "
                                     f"{ref.datasetType!r} needs a Butler repository (FORCEDPHOT_BUTLER_REPOSITORY)")
        return self.path_template.format(visit=ref.visit, detector=ref.detector, datasetType=ref.datasetType)

    def resolve(self, ref: ExposureRef) -> Path:
        """The real path of the file ``ref`` names, inside a root; raises :class:`RepositoryError`."""
        text = self.relative_path(ref)
        parts = _safe_parts(text)
        for root in self.roots:
            candidate = root.joinpath(*parts)
            if not os.path.lexists(candidate):
                continue
            try:
                real_root, real = real_path(root), real_path(candidate)
            except (OSError, RuntimeError):  # dangling or looping symbolic link
                raise UnknownReference(f"{text!r} is a broken symbolic link in the repository") from None
            if not real.is_relative_to(real_root):
                raise ForbiddenReference(f"{text!r} leads out of the repository (through a symbolic link); refused")
            if not real.is_file():
                raise UnknownReference(f"{text!r} is not a file in the repository")
            return real
        raise UnknownReference(f"no file {text!r} in the repository ({describe(ref)})")


def real_path(path: Path) -> Path:
    """``path`` with every symbolic link followed, as ``Path.resolve(strict=True)`` gives it
    (OSError when it or a link on the way is missing): on Linux the kernel's own answer for
    a descriptor of it (two system calls, where resolving looks up every component: ~0.2 ms
    of the server's CPU a request), else ``resolve``."""
    if not hasattr(os, "O_PATH"):
        return path.resolve(strict=True)
    descriptor = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        return Path(os.readlink(f"/proc/self/fd/{descriptor}"))
    except OSError:  # no /proc
        return path.resolve(strict=True)
    finally:
        os.close(descriptor)


def _safe_parts(text: str) -> tuple[str, ...]:
    """Path components of a relative reference, or raise if it could leave a root."""
    if "\x00" in text or "\\" in text or any(ord(c) < 32 for c in text):
        raise BadReference(f"{text!r}: references may not contain NUL, control characters or backslashes")
    if "://" in text or _SCHEME.match(text):
        raise BadReference(f"{text!r}: URLs and URI schemes are not accepted; give a path relative to the repository root")
    path = PurePosixPath(text)
    if path.is_absolute() or text.startswith("~"):
        raise ForbiddenReference(f"{text!r}: absolute paths are refused; give a path relative to the repository root")
    if ".." in path.parts:
        raise ForbiddenReference(f"{text!r}: '..' is refused in references")
    parts = tuple(part for part in path.parts if part not in ("", "."))
    if not parts:
        raise BadReference(f"{text!r} names no file")
    return parts
