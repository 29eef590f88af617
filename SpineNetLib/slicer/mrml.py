"""SpineNet results as MRML nodes: the only SpineNetLib module that imports ``slicer`` and ``vtk``.

Runs inside the 3D Slicer application and, headless, under the PyPI
``slicer-core`` package (the real MRML library without Qt), so the same code
is tested in CI and used by the module, the worker hand-over and the batch
script.  Everything is built from the result documents (``vertebrae.json``,
``discs.json``; see :mod:`SpineNetLib.outputs.documents`), never from pipeline
objects, so results can come from another process as JSON.

Nodes made for one volume (all tagged with the attributes
``SpineNet.SourceVolumeID`` = the volume's ID when they were made and
``SpineNet.Result`` = their role, and referencing the volume as
``SpineNetSourceVolume``: follow the reference, which MRML updates when it
renumbers nodes (a scene added to a non-empty one), the attribute it does not;
put under the volume's parent transform, if any):

* one ``vtkMRMLMarkupsClosedCurveNode`` per vertebra, linear, through the
  four corners of its mid-slice polygon, named "<volume> SpineNet <level>" (unfilled, its line alone, where
  a weaker detection drew it: ``outline_from``, as the vertebra's segment);
* one ``vtkMRMLMarkupsFiducialNode`` "<volume> SpineNet centroids" with a point
  labelled by level at every centroid;
* one ``vtkMRMLSegmentationNode`` "<volume> SpineNet segmentation" with a segment per
  vertebra (its polygons filled on every slice where it was found) and per
  disc (:func:`SpineNetLib.outputs.documents.disc_polygons`), filled in the volume's
  own IJK grid;
* a ``vtkMRMLTableNode`` "<volume> SpineNet grades" (:func:`documents.disc_table`);
* ``vtkMRMLTextNode`` "<volume> SpineNet vertebrae.json" (and "<volume> SpineNet
  discs.json") holding the documents, so a saved scene can be corrected later;
* hotspot heat maps as scalar volumes ("<volume> SpineNet hotspot L4-L5
  Pfirrmann") with the "SpineNet hotspot" colours.

"<volume>" is the volume's name (:func:`result_node_name`), so the results of
several volumes are told apart by name as well as by their reference.  Running
again for the same volume removes that volume's previous nodes first, and only
those: other volumes' results stay as they are.
"""

from __future__ import annotations

import json
import os
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from SpineNetLib.outputs import documents
from SpineNetLib.outputs.segmentation import filled_segments
from SpineNetLib.core.errors import InputError
from SpineNetLib.core.mr_weighting import Weighting, weighting_from_header
from SpineNetLib.inputs.canonical import scan_from_array
from SpineNetLib.inputs.dicom import is_localizer, not_mr_modality
from SpineNetLib.inputs.image import check_image_voxels, other_sagittal_images_of_session
from SpineNetLib.core.scan import Scan

SOURCE_ATTRIBUTE = "SpineNet.SourceVolumeID"
ROLE_ATTRIBUTE = "SpineNet.Result"
FOLDER_ATTRIBUTE = "SpineNet.ResultsFolder"
SOURCE_REFERENCE = "SpineNetSourceVolume"
HOTSPOT_COLOR_NAME = "SpineNet hotspot"


def slicer_class(name: str):
    """An MRML/Slicer class by name; slicer-core exposes some logic classes inside same-named modules."""
    obj = getattr(slicer, name)
    if isinstance(obj, types.ModuleType):
        obj = getattr(obj, name)
    return obj


# --------------------------------------------------------------------------- scenes and matrices

def new_scene(cache_dir: str | os.PathLike | None = None):
    """A headless MRML scene set up to save and load markups, segmentations, tables and bundles.

    The application and module logics are kept on the scene object so they
    live as long as it does.  Inside Slicer use ``slicer.mrmlScene`` instead.
    """
    scene = slicer.vtkMRMLScene()
    app = slicer_class("vtkSlicerApplicationLogic")()
    app.SetMRMLScene(scene)
    logics = [app]
    for module, class_name in (("Markups", "vtkSlicerMarkupsLogic"),
                               ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
                               ("Tables", "vtkSlicerTablesLogic"), ("Volumes", "vtkSlicerVolumesLogic")):
        logic = slicer_class(class_name)()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(module, logic)
        logics.append(logic)
    # a folder of our own is removed with the scene (or at exit at the latest), never left in /tmp
    own_cache = None if cache_dir else tempfile.TemporaryDirectory(prefix="spinenet-mrml-")
    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(str(cache_dir or own_cache.name))
    io_manager = slicer.vtkDataIOManager()
    io_manager.SetCacheManager(cache)
    scene.SetCacheManager(cache)
    scene.SetDataIOManager(io_manager)
    scene._spinenet_keep_alive = logics + [cache, io_manager] + ([own_cache] if own_cache else [])
    return scene


def load_mrb(path, scene=None):
    """Read a ``.mrb`` bundle into ``scene`` (a new headless one by default); returns the scene."""
    scene = scene if scene is not None else new_scene()
    if not scene.ReadFromMRB(str(Path(path).resolve())):
        raise OSError(f"cannot read the scene bundle {path}")
    return scene


def write_mrb(scene, path) -> Path:
    """Save the whole scene as one ``.mrb`` bundle (storage nodes are added as needed)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not scene.WriteToMRB(str(path)):
        raise OSError(f"cannot write the scene bundle {path}")
    return path


def matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_matrix(array) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    a = np.asarray(array, float)
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(a[r, c]))
    return matrix


def ijk_to_ras(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix_to_numpy(matrix)


def volume_dimensions(volume_node) -> tuple[int, int, int]:
    """(ni, nj, nk) of a volume node's image."""
    return tuple(int(n) for n in volume_node.GetImageData().GetDimensions())  # type: ignore[return-value]


# --------------------------------------------------------------------------- volumes

def volume_arrays(volume_node) -> tuple[np.ndarray, np.ndarray]:
    """A copy of the voxels as ``[k, j, i]`` (like ``slicer.util.arrayFromVolume``) and the IJK-to-RAS.

    A transform applied to the volume is not included: these are the
    volume's own voxels and RAS, and the result nodes go under the same
    transform (:func:`_tag`).
    """
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError("the input volume has no voxels")
    ni, nj, nk = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    array = numpy_support.vtk_to_numpy(scalars)
    components = scalars.GetNumberOfComponents()
    shape = (nk, nj, ni) if components == 1 else (nk, nj, ni, components)
    return array.reshape(shape).copy(), ijk_to_ras(volume_node)


#: The DICOM tag of the Modality, as Slicer's DICOM database (ctkDICOMDatabase) names tags.
MODALITY_TAG = "0008,0060"
#: The tags that tell a series' weighting (``core/mr_weighting.weighting_from_header``), by the names
#: ``inputs/dicom.py`` gives them in ``Scan.metadata``.
ACQUISITION_TAGS = {"echo_time_ms": "0018,0081", "repetition_time_ms": "0018,0080", "inversion_time_ms": "0018,0082",
                    "scanning_sequence": "0018,0020", "series_description": "0008,103E"}
#: The tags that place a series in its exam, by the names ``inputs/dicom.py`` gives them in ``Scan.metadata``.
SERIES_TAGS = {"series_uid": "0020,000E", "series_number": "0020,0011", "study_uid": "0020,000D",
               "frame_of_reference_uid": "0020,0052"}
#: ImageType, which marks a scout as LOCALIZER, and SeriesDescription, which names one
#: (``inputs/dicom.is_localizer``).
IMAGE_TYPE_TAG, DESCRIPTION_TAG = "0008,0008", "0008,103E"


def _instances_and_database(volume_node) -> tuple[list[str], object]:
    """(the SOP instance UIDs a volume node was loaded from, Slicer's DICOM database); no UIDs where the
    node did not come from Slicer's DICOM module or there is no database (slicer-core)."""
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = getattr(slicer, "dicomDatabase", None)
    return (uids if database is not None else []), database


def _dicom_values(volume_node, tags: dict[str, str]) -> dict[str, str] | None:
    """name -> the non-empty value of each tag in the first instance of the series a volume node was loaded
    from, read from Slicer's DICOM database through the node's ``DICOM.instanceUIDs`` attribute; None where
    the node did not come from Slicer's DICOM module, there is no database (slicer-core), or the database
    cannot answer."""
    uids, database = _instances_and_database(volume_node)
    if not uids:
        return None
    values = {}
    for name, tag in tags.items():
        try:
            value = str(database.instanceValue(uids[0], tag) or "").strip()
        except Exception:   # another database version: checked as without a database
            return None
        if value:
            values[name] = value
    return values


def dicom_instance_files(volume_node) -> list[str] | None:
    """The files of the DICOM images a volume node was loaded from (its ``DICOM.instanceUIDs``, looked up in
    Slicer's DICOM database), for results that are made from the DICOM files themselves; None where the
    node did not come from the DICOM module, there is no database, or a file is not there."""
    uids, database = _instances_and_database(volume_node)
    if not uids:
        return None
    files = []
    for uid in uids:
        try:
            path = str(database.fileForInstance(uid) or "")
        except Exception:   # another database version: as without a database
            return None
        if not path or not os.path.isfile(path):
            return None
        files.append(path)
    return files


def dicom_modality(volume_node) -> str | None:
    """The DICOM Modality of the series a volume node was loaded from (upper case), or None
    (:func:`_dicom_values`)."""
    values = _dicom_values(volume_node, {"modality": MODALITY_TAG})
    return (values or {}).get("modality", "").upper() or None


def dicom_acquisition(volume_node) -> dict:
    """The echo, repetition and inversion times, ScanningSequence and SeriesDescription of the series a
    volume node was loaded from, for ``Scan.metadata`` (with ``"dicom_header": True``), so that the run
    reads its weighting as ``spinenet run`` reads a DICOM folder's; {} where the database cannot tell."""
    values = _dicom_values(volume_node, ACQUISITION_TAGS)
    return {**values, "dicom_header": True} if values else {}


def dicom_weighting(volume_node) -> Weighting | None:
    """The weighting that the DICOM header of the series a volume node was loaded from tells (as
    ``spinenet run`` reads a DICOM folder's), or None (:func:`dicom_acquisition`: no database, a volume
    from a file, a header that does not say)."""
    values = dicom_acquisition(volume_node)
    return weighting_from_header(values) if values else None


def sagittal_volumes(scene) -> list:
    """The scalar volume nodes of ``scene`` (label maps left out) whose slices are sagittal: their K axis,
    the step from one slice to the next as Slicer's DICOM module loads a series, lies closest to
    left-right."""
    nodes = []
    for n in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(n)
        if node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode"):
            if int(np.argmax(np.abs(ijk_to_ras(node)[:3, 2]))) == 0:
                nodes.append(node)
    return nodes


def dicom_series(volume_node) -> dict:
    """``series_uid``, ``series_number``, ``study_uid``, ``frame_of_reference_uid`` and what
    :func:`dicom_acquisition` gives, of the series a volume node was loaded from, for ``Scan.metadata``;
    {} where the database cannot tell."""
    values = _dicom_values(volume_node, SERIES_TAGS)
    return {**values, **dicom_acquisition(volume_node)} if values else {}


def exam_volumes(volume_node, limit: int) -> list:
    """The other sagittal MR volumes of the volume node's scene that Slicer's DICOM database places in its
    exam and frame of reference (the same StudyInstanceUID and FrameOfReferenceUID, another
    SeriesInstanceUID; no scout, ``inputs/dicom.is_localizer``), by series number, at most ``limit``: the
    series whose levels a run compares with its own, as ``spinenet run`` compares an exam folder's
    (``label/other_series.py``). For a volume without both UIDs (a volume from a file, no database:
    slicer-core), the volumes of its BIDS session (:func:`session_volumes`), else []."""
    if volume_node is None or volume_node.GetScene() is None:
        return []
    mine = _dicom_values(volume_node, SERIES_TAGS) or {}
    exam = (mine.get("study_uid", ""), mine.get("frame_of_reference_uid", ""))
    if not all(exam):
        return session_volumes(volume_node, limit)
    tags = {**SERIES_TAGS, "modality": MODALITY_TAG, "image_type": IMAGE_TYPE_TAG, "description": DESCRIPTION_TAG}
    found = {}   # series UID -> (sort key, node)
    for node in sagittal_volumes(volume_node.GetScene()):
        values = _dicom_values(node, tags) or {}
        uid, number = values.get("series_uid", ""), values.get("series_number", "")
        if (node is not volume_node and (values.get("study_uid"), values.get("frame_of_reference_uid")) == exam
                and uid not in ("", mine.get("series_uid", "")) and uid not in found
                and not not_mr_modality({"Modality": values.get("modality", "")})
                and not is_localizer({"ImageType": values.get("image_type", ""),
                                      "SeriesDescription": values.get("description", "")})):
            order = (0, int(number)) if number.lstrip("-").isdigit() else (1, 0)
            found[uid] = ((*order, node.GetName()), node)
    return [node for _, node in sorted(found.values(), key=lambda item: item[0])][:limit]


def _loaded_from(volume_node) -> str:
    """The absolute path of the file a volume node was loaded from ("" for none)."""
    storage = volume_node.GetStorageNode()
    name = storage.GetFileName() if storage is not None else ""
    return os.path.abspath(name) if name else ""


def session_volumes(volume_node, limit: int) -> list:
    """For a volume loaded from an image of a BIDS session, the scene's sagittal volumes loaded from the session's
    other sagittal images (``inputs/image.other_sagittal_images_of_session``, as ``spinenet run`` compares
    them), by file name, each file once, at most ``limit``; [] otherwise."""
    path = _loaded_from(volume_node)
    wanted = [str(other) for other in other_sagittal_images_of_session(path)] if path else []   # absolute
    if not wanted:
        return []
    loaded = {}
    for node in sagittal_volumes(volume_node.GetScene()):
        source = _loaded_from(node)
        if node is not volume_node and source in wanted:
            loaded.setdefault(source, node)
    return [loaded[source] for source in wanted if source in loaded][:limit]


def input_volume_arrays(volume_node) -> tuple[np.ndarray, np.ndarray]:
    """:func:`volume_arrays` of a volume to run SpineNet on, refused as ``spinenet run`` refuses a file.

    A label map volume node, a volume of a DICOM series that is no MR scan (:func:`dicom_modality`, e.g. a
    CT; ``inputs/dicom.NOT_MR_MODALITIES``), and voxels :func:`SpineNetLib.inputs.image.check_image_voxels`
    refuses (NaN or infinite values, one value everywhere, a label map), give a one-line :class:`InputError`.
    """
    name = f'the volume "{volume_node.GetName()}"' if volume_node is not None else "the volume"
    if volume_node is not None and volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"{name} is a label map (a segmentation), not an MR image: choose the scan itself")
    modality = dicom_modality(volume_node) if volume_node is not None else None
    if not_mr_modality({"Modality": modality}):
        raise InputError(f"{name} is a {modality} series (DICOM Modality), not MR: SpineNet reads sagittal MR scans")
    voxels, affine = volume_arrays(volume_node)
    check_image_voxels(voxels, name)
    return voxels, affine


def scan_from_volume_node(volume_node, metadata: dict | None = None) -> Scan:
    """The canonical :class:`Scan` of a volume node (its voxels and IJK-to-RAS unchanged)."""
    voxels, affine = input_volume_arrays(volume_node)
    meta = {"format": "MRML volume", "path": volume_node.GetName()}
    meta.update(metadata or {})
    return scan_from_array(voxels, affine, meta)


def add_volume(scene, voxels_kji, ijk_to_ras_matrix, name: str, *, node_class: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node holding a ``[k, j, i]`` array with its IJK-to-RAS, with display nodes."""
    array = np.ascontiguousarray(voxels_kji)
    if array.ndim != 3:
        raise ValueError(f"voxels must be a 3D [k, j, i] array, got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    nk, nj, ni = array.shape
    image = vtk.vtkImageData()
    image.SetDimensions(ni, nj, nk)
    vtk_array = numpy_support.numpy_to_vtk(array.ravel(), deep=True,
                                           array_type=numpy_support.get_vtk_array_type(array.dtype))
    image.GetPointData().SetScalars(vtk_array)
    node = scene.AddNewNodeByClass(node_class, name)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(numpy_to_matrix(ijk_to_ras_matrix))
    node.CreateDefaultDisplayNodes()
    return node


def _compact_dtype(voxels: np.ndarray) -> np.ndarray:
    """Integer-valued float voxels as int16/uint16 when they fit (halves the saved scene)."""
    v = np.asarray(voxels)
    if v.dtype.kind != "f" or v.size == 0 or not np.array_equal(v, np.round(v)):
        return v
    lo, hi = float(v.min()), float(v.max())
    if lo >= 0 and hi <= 65535:
        return v.astype(np.uint16)
    if lo >= -32768 and hi <= 32767:
        return v.astype(np.int16)
    return v


def add_scan_volume(scene, scan: Scan, name: str):
    """A volume node of a canonical scan, in its exact physical place.

    The canonical array ``[row, col, slice]`` is used as ``[k, j, i]``, so
    i runs along the sagittal slices; the IJK-to-RAS is the canonical-to-RAS
    with its columns reordered accordingly.  (Used by the batch script,
    where the scan comes from :func:`SpineNetLib.inputs.load.load_scan`.)
    """
    to_ras = np.asarray(scan.canonical_to_ras, float)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = to_ras[:3, 2], to_ras[:3, 1], to_ras[:3, 0], to_ras[:3, 3]
    return add_volume(scene, _compact_dtype(scan.voxels), affine, name)


# --------------------------------------------------------------------------- results

def _grid_corners(ijk_to_ras_matrix, shape_ijk) -> np.ndarray:
    """RAS of the 8 corner voxel centres of a grid (the same points whichever way its axes run)."""
    ni, nj, nk = shape_ijk
    ijk = np.array([[i, j, k, 1.0] for i in (0, ni - 1) for j in (0, nj - 1) for k in (0, nk - 1)])
    return (ijk @ np.asarray(ijk_to_ras_matrix, float).T)[:, :3]


def check_results_fit_volume(volume_node, vertebrae_doc: dict) -> None:
    """One-line :class:`InputError` unless the scan a vertebrae document records (``"scan"``: ``shape``,
    ``ijk_to_ras``) is the volume's voxel grid: as many voxels, and the same corners within half a voxel.

    Loaders may order a scan's axes differently (a DICOM series in Slicer and in SpineNet), so the
    grids are compared by their voxel counts and the places of their corners, not axis by axis.
    """
    name = volume_node.GetName()
    if volume_node.GetImageData() is None:
        raise InputError(f'the volume "{name}" has no voxels: there is nothing to show results on')
    scan = vertebrae_doc.get("scan") if isinstance(vertebrae_doc, dict) else None
    try:
        shape = [int(n) for n in scan["shape"]]
        matrix = np.asarray(scan["ijk_to_ras"], float).reshape(4, 4)
    except (TypeError, KeyError, ValueError):
        raise InputError("the vertebrae document does not record the scan it was made on ('scan' with 'shape' "
                         f'and \'ijk_to_ras\'): cannot check that it belongs to the volume "{name}"') from None
    if len(shape) != 3:
        raise InputError(f"the vertebrae document records a scan of shape {shape}, not a 3D voxel grid")
    dims, own = list(volume_dimensions(volume_node)), ijk_to_ras(volume_node)
    theirs, ours = _grid_corners(matrix, shape), _grid_corners(own, dims)
    if sorted(shape) == sorted(dims):
        furthest = max(float(np.min(np.linalg.norm(ours - corner, axis=1))) for corner in theirs)
        if furthest <= 0.5 * float(np.min(np.linalg.norm(own[:3, :3], axis=0))):
            return

    def grid(size, corners):
        return f"{'x'.join(map(str, size))} voxels centred at RAS {' '.join(f'{x:.1f}' for x in corners.mean(0))} mm"

    raise InputError(f'these results were made on another scan ({grid(shape, theirs)}), not on the volume "{name}" '
                     f"({grid(dims, ours)})")


@dataclass
class ResultNodes:
    """The nodes made for one volume by :func:`show_results`."""

    curves: list = field(default_factory=list)
    centroids: object = None
    segmentation: object = None
    table: object = None
    documents: list = field(default_factory=list)
    hotspots: list = field(default_factory=list)
    #: the levels of each other series of the exam that names a vertebra otherwise (:func:`add_other_series_levels`)
    other_series: list = field(default_factory=list)
    #: where the levels need review, the level the labelling's best shifted alternative gives each vertebra it
    #: names otherwise (:func:`add_next_best_levels`)
    next_best: object = None

    def all(self) -> list:
        nodes = [*self.curves, self.centroids, self.segmentation, self.table, *self.documents, *self.hotspots,
                 *self.other_series, self.next_best]
        return [n for n in nodes if n is not None]


def result_node_name(volume_node, name: str) -> str:
    """Name of a result node of ``volume_node``: "T2 sagittal" + "SpineNet L4" -> "T2 sagittal SpineNet L4"."""
    volume_name = (volume_node.GetName() or "").strip()
    return f"{volume_name} {name}" if volume_name else name


def _tag(node, volume_node, role: str) -> None:
    """Mark a result node as ``volume_node``'s and put it under the volume's parent transform (its
    coordinates are the volume's own RAS, so it then lines up with the volume as displayed)."""
    node.SetAttribute(SOURCE_ATTRIBUTE, volume_node.GetID())
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    node.SetNodeReferenceID(SOURCE_REFERENCE, volume_node.GetID())
    if node.IsA("vtkMRMLTransformableNode"):
        node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())


def result_nodes(scene, volume_node, role: str | None = None) -> list:
    """Nodes tagged as SpineNet results of ``volume_node`` (optionally of one role)."""
    found = []
    volume_id = volume_node.GetID()
    for n in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(n)
        if node is None or node.GetAttribute(ROLE_ATTRIBUTE) is None:
            continue
        reference = node.GetNodeReferenceID(SOURCE_REFERENCE)
        if (reference or node.GetAttribute(SOURCE_ATTRIBUTE)) != volume_id:
            continue
        if role is None or node.GetAttribute(ROLE_ATTRIBUTE) == role:
            found.append(node)
    return found


def remove_node(scene, node) -> None:
    """Remove a node with its display and storage nodes (``RemoveNode`` alone may leave them in the
    scene, where they would be saved with it, displaying nothing)."""
    helpers = []
    if node.IsA("vtkMRMLDisplayableNode"):
        helpers += [node.GetNthDisplayNode(n) for n in range(node.GetNumberOfDisplayNodes())]
    if node.IsA("vtkMRMLStorableNode"):
        helpers += [node.GetNthStorageNode(n) for n in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and scene.IsNodePresent(helper):
            scene.RemoveNode(helper)


def remove_results(scene, volume_node, roles: tuple[str, ...] | None = None) -> int:
    """Remove this volume's SpineNet nodes (all, or only those of ``roles``) with their display and
    storage nodes; returns how many result nodes."""
    nodes = [n for n in result_nodes(scene, volume_node) if roles is None or n.GetAttribute(ROLE_ATTRIBUTE) in roles]
    for node in nodes:
        remove_node(scene, node)
    return len(nodes)


def _add_control_point(node, ras, label: str) -> None:
    node.AddControlPoint(vtk.vtkVector3d(*(float(x) for x in ras)), label)


def add_vertebra_curve(scene, volume_node, vertebra: dict, index: int):
    """Linear closed curve through the corners (rt, rb, lb, lt) of the vertebra's mid-slice polygon."""
    name = documents.vertebra_name(vertebra, index)
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsClosedCurveNode", result_node_name(volume_node, f"SpineNet {name}"))
    node.SetCurveTypeToLinear()
    polygon = documents.mid_polygon(vertebra)
    for corner, label in zip(polygon["corners_ras"], ("rt", "rb", "lb", "lt")):
        _add_control_point(node, corner, label)
    outline_from = vertebra.get("outline_from") or ""   # which network drew it (core/results.py; "weaker": rough)
    for key, value in {"Level": name, "Slice": str(polygon["slice"]), "OutlineFrom": outline_from}.items():
        node.SetAttribute(f"SpineNet.{key}", value)
    node.SetLocked(True)
    display = _display_node(node)
    if display is not None:
        for set_colour in (display.SetSelectedColor, display.SetColor):
            set_colour(*documents.level_colour(vertebra.get("level")))
        display.SetPointLabelsVisibility(False)
        # the centroid points carry the level; "<volume> SpineNet L4" beside every outline only crowds the view
        display.SetPropertiesLabelVisibility(False)
        display.SetFillOpacity(0.15)
        display.SetFillVisibility(not documents.rough_outline(vertebra))   # a rough outline: its line alone
    _tag(node, volume_node, "vertebra-outline")
    return node


def _display_node(node):
    """The node's display node, created with the defaults when it has none yet (None if it cannot have one)."""
    display = node.GetDisplayNode()
    if display is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    return display


def add_centroids(scene, volume_node, vertebrae_doc: dict):
    """One fiducial node with a point at each vertebra's centroid, labelled by level."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", result_node_name(volume_node, "SpineNet centroids"))
    for i, v in enumerate(vertebrae_doc["vertebrae"]):
        _add_control_point(node, v["centroid_ras"], documents.vertebra_name(v, i))
    _labelled_points(node, volume_node, (1.0, 1.0, 0.4), "centroids")
    return node


def _labelled_points(node, volume_node, colour: tuple[float, float, float], role: str) -> None:
    """A fiducial node of SpineNet's, locked, its points and labels drawn large in ``colour``, tagged with
    ``role``."""
    node.SetLocked(True)
    display = _display_node(node)
    if display is not None:
        display.SetSelectedColor(*colour)
        display.SetGlyphScale(2.0)
        display.SetTextScale(3.0)
    _tag(node, volume_node, role)


def add_other_series_levels(scene, volume_node, vertebrae_doc: dict) -> list:
    """One fiducial node per other reading of the levels (``documents.other_readings``: each other series of
    the exam that names a vertebra otherwise, and the volume's own levels where it took another series'), with a
    point at each vertebra labelled by the level that reading gives: in the patient's coordinates the series
    share, so the reader sees both readings on this volume."""
    return [_reading_node(scene, volume_node, other, "{}", documents.OTHER_READING_COLOUR, "other-series-levels")
            for other in documents.other_readings(vertebrae_doc)]


def add_next_best_levels(scene, volume_node, vertebrae_doc: dict):
    """Where the levels need review, a fiducial node labelling each vertebra the labelling's best shifted
    alternative names otherwise "or S2", at its ``marker_ras`` (``documents.next_best_reading``), else None."""
    reading = documents.next_best_reading(vertebrae_doc)
    return None if reading is None else _reading_node(scene, volume_node, reading, "or {}",
                                                      documents.NEXT_BEST_COLOUR, "next-best-levels", "marker_ras")


def _reading_node(scene, volume_node, reading: dict, label: str, colour: tuple[int, int, int], role: str,
                  at: str = "centroid_ras"):
    """A fiducial node "<volume> SpineNet levels of <reading's series>" with a point at each of the reading's
    vertebrae (its ``at`` position), labelled ``label`` with its level filled in."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                   result_node_name(volume_node, f"SpineNet levels of {reading['series']}"))
    for vertebra in reading.get("vertebrae") or []:
        _add_control_point(node, vertebra[at], label.format(vertebra["level"]))
    _labelled_points(node, volume_node, tuple(c / 255.0 for c in colour), role)
    return node


def _oriented_labelmap(mask_kji: np.ndarray, ijk_to_ras_matrix):
    """A ``vtkOrientedImageData`` of the mask's bounding box (extent in volume IJK)."""
    ks, js, is_ = np.nonzero(mask_kji)
    k0, k1, j0, j1, i0, i1 = ks.min(), ks.max(), js.min(), js.max(), is_.min(), is_.max()
    crop = np.ascontiguousarray(mask_kji[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1], dtype=np.uint8)
    image = slicer_class("vtkOrientedImageData")()
    image.SetExtent(int(i0), int(i1), int(j0), int(j1), int(k0), int(k1))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = crop.ravel()
    image.SetImageToWorldMatrix(numpy_to_matrix(ijk_to_ras_matrix))
    return image


def segment_masks(volume_node, vertebrae_doc: dict) -> Iterator[tuple[str, tuple, np.ndarray, bool]]:
    """``(name, colour, [k, j, i] mask, rough)`` per vertebra then per disc, filled in the volume's grid one at a
    time (:func:`SpineNetLib.outputs.segmentation.filled_segments`: a whole-grid mask each, so a large volume's
    are not all held at once); ``rough``: a vertebra whose outline a weaker detection drew
    (:func:`documents.rough_outline`)."""
    vertebrae = vertebrae_doc["vertebrae"]
    segments = filled_segments(vertebrae_doc, ijk_to_ras(volume_node), volume_dimensions(volume_node))
    return ((s.name, documents.level_colour(vertebrae[n].get("level")), s.mask, documents.rough_outline(vertebrae[n]))
            if s.kind == "vertebra" else (s.name, documents.SEGMENT_DISC_COLOUR, s.mask, False)
            for n, s in enumerate(segments))


def add_segmentation(scene, volume_node, vertebrae_doc: dict):
    """Segmentation with one segment per vertebra and per disc (empty ones are skipped); a vertebra with a rough
    outline is drawn unfilled in the slice views, as its markups outline is."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", result_node_name(volume_node, "SpineNet segmentation"))
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    node.CreateDefaultDisplayNodes()
    display, affine, unfilled = node.GetDisplayNode(), ijk_to_ras(volume_node), []
    for name, colour, mask, rough in segment_masks(volume_node, vertebrae_doc):
        if not mask.any():
            continue
        segment_id = node.AddSegmentFromBinaryLabelmapRepresentation(_oriented_labelmap(mask, affine), name, list(colour))
        node.GetSegmentation().GetSegment(segment_id).SetTag("SpineNet.Kind", "disc" if "-" in name else "vertebra")
        unfilled += [segment_id] if rough else []
    # Non-overlapping segments share label layers: a compact .seg.nrrd.
    node.GetSegmentation().CollapseBinaryLabelmaps(False)
    if display is not None:
        display.SetOpacity2DFill(0.35)
        for segment_id in unfilled:
            display.SetSegmentVisibility2DFill(segment_id, False)
    _tag(node, volume_node, "segmentation")
    return node


_VTK_COLUMN = {"str": vtk.vtkStringArray, "int": vtk.vtkIntArray, "float": vtk.vtkDoubleArray}


def add_grades_table(scene, volume_node, vertebrae_doc: dict | None, discs_doc: dict | None = None):
    """Table "<volume> SpineNet grades": one row per disc (:func:`documents.disc_table`), with units."""
    columns, rows = documents.disc_table(vertebrae_doc, discs_doc)
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", result_node_name(volume_node, "SpineNet grades"))
    table = node.GetTable()
    for c, column in enumerate(columns):
        array = _VTK_COLUMN[column.kind]()
        array.SetName(column.name)
        for row in rows:
            value = row[c]
            if column.kind == "str":
                array.InsertNextValue("" if value is None else str(value))
            elif column.kind == "int":
                array.InsertNextValue(int(value))
            else:
                array.InsertNextValue(float("nan") if value is None else float(value))
        table.AddColumn(array)
    for column in columns:
        if column.unit:
            node.SetColumnUnitLabel(column.name, column.unit)
        if column.description:
            node.SetColumnDescription(column.name, column.description)
    node.SetUseColumnTitleAsColumnHeader(True)
    node.SetLocked(True)
    node.Modified()
    _tag(node, volume_node, "grades")
    return node


def table_rows(table_node) -> tuple[list[str], list[list[str]]]:
    """Column names and cell texts of a table node (for tests and CSV export)."""
    table = table_node.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    rows = [[table_node.GetCellText(r, c) for c in range(len(names))] for r in range(table_node.GetNumberOfRows())]
    return names, rows


def add_document_node(scene, volume_node, document: dict, name: str, role: str, folder=None):
    """A text node "<volume> SpineNet <name>" holding a result document as JSON."""
    node = scene.AddNewNodeByClass("vtkMRMLTextNode", result_node_name(volume_node, f"SpineNet {name}"))
    node.SetText(json.dumps(document))
    if folder:
        node.SetAttribute(FOLDER_ATTRIBUTE, str(folder))
    _tag(node, volume_node, role)
    return node


def stored_documents(scene, volume_node) -> tuple[dict | None, dict | None, str | None]:
    """(vertebrae document, discs document, results folder) stored in the scene for a volume."""
    vertebrae, discs, folder = None, None, None
    for node in result_nodes(scene, volume_node, "vertebrae-document"):
        vertebrae = json.loads(node.GetText())
        folder = node.GetAttribute(FOLDER_ATTRIBUTE)
    for node in result_nodes(scene, volume_node, "discs-document"):
        discs = json.loads(node.GetText())
    return vertebrae, discs, folder


def hotspot_colour_node(scene):
    """A transparent-black -> red -> yellow -> white colour table for heat maps (made once per scene)."""
    existing = scene.GetFirstNodeByName(HOTSPOT_COLOR_NAME)
    if existing is not None:
        return existing
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", HOTSPOT_COLOR_NAME)
    node.SetTypeToUser()
    n = 256
    node.SetNumberOfColors(n)
    for i in range(n):
        t = i / (n - 1)
        r, g, b = min(1.0, 3 * t), min(1.0, max(0.0, 3 * t - 1)), min(1.0, max(0.0, 3 * t - 2))
        node.SetColor(i, f"{i}", r, g, b, 0.0 if i == 0 else 1.0)
    node.SetAttribute("Category", "SpineNet")
    return node


def add_hotspot_volume(scene, volume_node, heat_kji, heat_ijk_to_ras, name: str):
    """A heat map as a scalar volume shown with the hotspot colours, window 0..max.

    ``name`` is the name without the volume's ("SpineNet hotspot L4-L5 Pfirrmann",
    as :func:`documents.hotspot_node_name` gives it); the node is :func:`result_node_name`.
    """
    heat = np.asarray(heat_kji, np.float32)
    node = add_volume(scene, heat, heat_ijk_to_ras, result_node_name(volume_node, name))
    display = node.GetDisplayNode()
    if display is not None:
        display.SetAndObserveColorNodeID(hotspot_colour_node(scene).GetID())
        hi = float(heat.max()) if heat.size and float(heat.max()) > 0 else 1.0
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(0.0, hi)
    _tag(node, volume_node, "hotspot")
    return node


def load_hotspot_file(scene, volume_node, path, name: str):
    """Read a hotspot image (NIfTI, NRRD, MHA; ``inputs.image.read_image_arrays``) and add it
    (:func:`add_hotspot_volume`)."""
    from SpineNetLib.inputs.image import read_image_arrays

    array, affine = read_image_arrays(path)
    return add_hotspot_volume(scene, volume_node, array, affine, name)


def show_results(scene, volume_node, vertebrae_doc: dict, discs_doc: dict | None = None, *,
                 folder=None, hotspot_paths: dict | None = None) -> ResultNodes:
    """Replace this volume's SpineNet nodes by new ones built from the documents.

    ``hotspot_paths`` maps node names (without the volume's name, see
    :func:`add_hotspot_volume`) to hotspot image files to load too.
    The documents are stored in text nodes (with ``folder``, the results
    folder, as an attribute) so the scene can be corrected after reloading.
    """
    documents.check_vertebrae_document(vertebrae_doc)
    if discs_doc is not None:
        documents.check_discs_document(discs_doc)
    remove_results(scene, volume_node)
    nodes = ResultNodes()
    for i, vertebra in enumerate(vertebrae_doc["vertebrae"]):
        nodes.curves.append(add_vertebra_curve(scene, volume_node, vertebra, i))
    nodes.centroids = add_centroids(scene, volume_node, vertebrae_doc)
    nodes.other_series = add_other_series_levels(scene, volume_node, vertebrae_doc)
    nodes.next_best = add_next_best_levels(scene, volume_node, vertebrae_doc)
    nodes.segmentation = add_segmentation(scene, volume_node, vertebrae_doc)
    nodes.table = add_grades_table(scene, volume_node, vertebrae_doc, discs_doc)
    nodes.documents.append(add_document_node(scene, volume_node, vertebrae_doc, "vertebrae.json",
                                             "vertebrae-document", folder))
    if discs_doc is not None:
        nodes.documents.append(add_document_node(scene, volume_node, discs_doc, "discs.json", "discs-document"))
    for name, path in (hotspot_paths or {}).items():
        nodes.hotspots.append(load_hotspot_file(scene, volume_node, path, name))
    return nodes
