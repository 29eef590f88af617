"""What a phantom is made from: :class:`PhantomParams` and the values its options accept.

The lowest module of :mod:`SpineNetLib.synthetic`: the anatomy, rendering and
writing modules read the parameters, :func:`SpineNetLib.synthetic.phantom.make_phantom`
validates them (``_validate`` there) and re-exports everything here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FOVS = ("cervical", "thoracic", "lumbar", "whole")
CONTRASTS = ("T1", "T2", "STIR")
ORIENTATIONS = ("dicom", "ras")
PATHOLOGIES = ("narrow_disc", "dark_disc", "slip", "wedge_fracture", "endplate_notch")
TRANSITIONAL = ("lumbarised_S1", "sacralised_L5")


@dataclass
class PhantomParams:
    """What to synthesise; see :mod:`SpineNetLib.synthetic.phantom` for the geometry rules."""

    fov: str = "lumbar"
    contrast: str = "T2"
    #: (rows, cols); None = keep the FOV's physical size (:data:`DEFAULT_GRID`).
    shape: tuple[int, int] | None = None
    #: (row_mm, col_mm); None = keep the FOV's physical size.
    pixel_spacing: tuple[float, float] | None = None
    slice_thickness_mm: float = 4.0
    n_slices: int = 15
    #: In-plane tilt of the whole patient, degrees, counter-clockwise as displayed
    #: (head at the top, anterior on the left), about the image centre.
    rotation_deg: float = 0.0
    #: Standard deviation of the Gaussian noise in each quadrature channel, as a
    #: fraction of 1000 scanner units (Rician magnitude noise).
    noise: float = 0.025
    #: Strength of the smooth multiplicative bias field (0 = none; 0.2 = about +-20 %).
    bias_field: float = 0.15
    #: Level ("L3") or disc ("L4-L5") -> list of :data:`PATHOLOGIES`.
    pathology: dict[str, list[str]] = field(default_factory=dict)
    #: Reverse the input slice axis (dicom: k runs L->R instead of R->L; ras: i runs R->L instead of L->R).
    reverse_slices: bool = False
    #: Input array layout: "dicom" (i = A->P columns, j = S->I rows, k = slices) or
    #: "ras" (NIfTI-like: i = slices towards R, j = P->A, k = I->S).
    orientation: str = "dicom"
    seed: int = 0
    #: Partial field of view: the window covers these levels with 15 mm margins.
    top_level: str | None = None
    bottom_level: str | None = None
    #: None, "lumbarised_S1" or "sacralised_L5".
    transitional: str | None = None
    #: Also list the first fused sacral segment as "S2" (marked ``extra=True``).
    include_s2: bool = False
    #: Lateral position of the spine's midline, mm to the patient's left of the slab centre.
    midline_offset_mm: float = 0.0
    #: Scale of the tissue textures (0 = piecewise-constant tissues, handy for tests).
    texture: float = 1.0
    #: Tissue name (:data:`TISSUE_TABLE`) -> intensity replacing the sequence's value.
    intensity_overrides: dict[str, float] | None = None
    #: Inter-subject variation: 0 = textbook geometry and intensities (tables exact);
    #: 1 = typical variation of sizes (~4 %), curvature (~30 %) and intensities (~8 %).
    variability: float = 0.0
