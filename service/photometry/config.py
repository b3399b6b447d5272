"""Measurement configuration: one pydantic model, shared by the CLI, the service and tests."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from forcedphot.defaults import DEFAULT_APERTURES_PX, DEFAULT_BATCH_BYTES  # light, for the command line


class MeasurementConfig(BaseModel):
    """How objects are measured. Lengths in pixels, sizes in bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    apertures_px: tuple[float, ...] = Field(DEFAULT_APERTURES_PX, description="circular aperture radii, px")
    batch_bytes: int = Field(DEFAULT_BATCH_BYTES, gt=0, description=(
        "memory bound for one cutout batch and its kernel work (the fused CPU kernels run one batch a thread at once)"))
    psf_footprint_scaling: float = Field(3.0, gt=0, description="footprint radius for pixelFlags, in PSF sigmas")
    background_inner_sigma: float = Field(7.0, gt=0, description="local background annulus inner radius, PSF sigmas")
    background_outer_sigma: float = Field(15.0, gt=0, description="local background annulus outer radius, PSF sigmas")
    background_iterations: int = Field(3, ge=1, description="clipping iterations (the first uses median and IQR)")
    background_clip_sigma: float = Field(3.0, gt=0, description="clipping half-width, in (robust) sigmas")
    bad_mask_planes: tuple[str, ...] = Field((), description="mask planes whose pixels the PSF fit ignores (LSST: none)")
    include_offimage: bool = Field(False, description="return objects off the detector, flagged pixelFlags_offimage")
    extra_columns: bool = Field(False, description="add AB magnitudes and limits as light curves have them: psfMag, psfMagErr, psfMagLim5Sigma (5-sigma limiting magnitude), isUpperLimit (S/N below 3: psfMag null), the same for scienceFlux (scienceMag, ...), psfFlux_snr, scienceFlux_snr and epochStatus")
    subtract_background: Literal["auto", "on", "off"] = Field(
        "auto", description="subtract each object's local background (the clipped mean of its annulus, "
                            "localBackground_instFlux) from its PSF and aperture fluxes, the background's error added to theirs: "
                            "'auto' does it on direct images in plain FITS (their sky is still in the pixels), never on LSST "
                            "files (background-subtracted by the pipelines) or on difference images")
    measurements: Literal["all", "psf"] = Field(
        "all", description="'all': the PSF flux, aperture fluxes, local background and pixel flags; 'psf': the PSF fluxes "
                           "alone (psfFlux, and scienceFlux with a difference image), as Rubin's DiaForcedSourceTask measures "
                           "them (base_PsfFlux): the APDB's DiaForcedSource columns and the fit's own columns and flags, from "
                           "cutouts no larger than the PSF stamp (a local background subtracted as subtract_background says "
                           "is still measured for that, not reported)")
    backend: Literal["auto", "numpy", "cupy", "stand-in"] = "auto"
    cpu_kernels: Literal["fused", "array-api"] = Field(
        "fused", description="on the NumPy backend: every measurement of an object in one compiled pass (numba, all cores), "
                             "or the array-API kernels that a GPU runs (the same numbers; kept for comparison)")

    @field_validator("apertures_px")
    @classmethod
    def _positive_sorted(cls, radii: tuple[float, ...]) -> tuple[float, ...]:
        if not radii or any(r <= 0 for r in radii):
            raise ValueError("aperture radii must be positive and at least one must be given")
        return tuple(sorted(set(float(r) for r in radii)))

    @field_validator("background_outer_sigma")
    @classmethod
    def _outer_beyond_inner(cls, outer: float, info) -> float:
        inner = info.data.get("background_inner_sigma", 0.0)
        if outer <= inner:
            raise ValueError(f"background_outer_sigma ({outer}) must exceed background_inner_sigma ({inner})")
        return outer
