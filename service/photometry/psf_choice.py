"""Which PSF measures an exposure: an explicit file or FWHM, else the exposure's own."""

from __future__ import annotations

from forcedphot.photometry.archive_psfs import archive_psf, archive_psf_class
from forcedphot.photometry.psf_models import PSF_FWHM_KEYWORD, PsfError, PsfModel, check_psf_fwhm, header_fwhm_pixels, load_psf

__all__ = ["NO_PSF_HINT", "choose_psf", "choose_psfs"]

NO_PSF_HINT = "give a PSF FWHM in pixels (psf_fwhm in a request, --psf-fwhm on the command line)"


def choose_psf(exposure, source: str | None = None, *, path: str | None = None, path_name: str | None = None, fwhm_pixels: float | None = None,
               fwhm_name: str = "psf_fwhm", how: str = NO_PSF_HINT, allow_pickled: bool = True) -> PsfModel:
    """The PSF to measure ``exposure`` with: the file ``path``, else a Gaussian of
    ``fwhm_pixels``, else the PSF in the exposure's afw archive (see
    :mod:`~forcedphot.photometry.archive_psfs`), else the Gaussian its header declares
    (``PSF_FWHM``).

    ``source`` names the exposure (default its ``name``), ``path_name`` the PSF file (default its path; a service
    passes the form field or reference, so no server path reaches a client) and
    ``fwhm_name`` the caller's FWHM option in errors; ``how`` tells the caller how to pass
    a PSF when none is found. ``allow_pickled`` False refuses an archive PSF stored as a
    pickle (``PiffPsf``): a service passes False for uploads. The model's ``origin`` says in
    words where it came from.
    """
    source = source or exposure.name
    if path is not None:
        name = path_name or str(path)
        try:
            model = load_psf(path=str(path))
        except PsfError as exc:
            raise PsfError(str(exc).replace(str(path), name)) from None
        model.origin = f"from the file {name}"
        return model
    if fwhm_pixels is not None:
        model = load_psf(fwhm_pixels=check_psf_fwhm(fwhm_pixels, fwhm_name))
        model.origin = f"given as {fwhm_name}"
        return model
    try:
        model = archive_psf(exposure.archive, (exposure.x0, exposure.y0), allow_pickled=allow_pickled)
    except PsfError as exc:
        raise PsfError(f"{source}: {exc}; {how}") from None
    if model is not None:
        model.origin = f"from the archive of {source}"
        return model
    value = header_fwhm_pixels(exposure.header, source)
    if value is not None:
        model = load_psf(fwhm_pixels=check_psf_fwhm(value, f"{source} {PSF_FWHM_KEYWORD}"))
        model.origin = f"from the {PSF_FWHM_KEYWORD} keyword of {source}"
        return model
    kind = archive_psf_class(exposure.archive)
    unsupported = f"; its archive holds a {kind}, which is not read" if kind else ""
    raise PsfError(f"{source}: no PSF given and no {PSF_FWHM_KEYWORD} keyword in its header{unsupported}; {how}")


def choose_psfs(science, difference, science_name: str, difference_name: str | None, **options) -> tuple[PsfModel, PsfModel]:
    """``(PSF of the image measured, PSF of the direct image)`` for a measurement, as
    ``DiaForcedSourceTask`` uses them: the difference image's own PSF measures ``psfFlux``
    and the science image's ``scienceFlux``. An explicit file or FWHM (``options``, see
    :func:`choose_psf`) applies to both; a difference image that carries no PSF of its own
    (none in its archive, no ``PSF_FWHM``) is measured with the science image's."""
    science_psf = choose_psf(science, science_name, **options)
    if difference is None:
        return science_psf, science_psf
    try:
        return choose_psf(difference, difference_name or "difference", **options), science_psf
    except PsfError:
        if archive_psf_class(difference.archive) is not None:
            raise
        return science_psf, science_psf
