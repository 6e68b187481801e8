"""Manifests with checksums for exported artifact directories.

An artifact directory is copied between machines and loaded long after export. The manifest
records what was written (sha256 and size of each file), by which versions, and the caller's
metadata, so that loading can refuse a truncated, edited or incompatible artifact with a message
that says what to do, instead of failing deep inside onnxruntime or ``torch.export.load``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from tcompile.errors import ArtifactError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "tcompile-artifact"
FORMAT_VERSION = 1

_CHUNK = 1 << 20
# key -> distributions that provide it (the GPU build of onnxruntime has its own name)
_OPTIONAL = {
    "transformers": ("transformers",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "onnxscript": ("onnxscript",),
}


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half.

    The temporary file lives in the same directory, because ``os.replace`` is atomic only
    within one file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644  # mkstemp would give 0600
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Yield an empty folder beside ``target``; when the block succeeds it replaces ``target``.

    An interrupted or failed write never leaves a half-written ``target`` behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB weights do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _version_of(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str]:
    """Versions of python, tcompile, torch and the optional backends that are installed.

    Installed-distribution metadata is used for the optional packages so that recording versions
    never imports (and pays the start-up cost of) onnxruntime or transformers.
    """
    import torch

    found = {
        "python": platform.python_version(),
        "tcompile": _version_of("tcompile") or "0+unknown",
        "torch": torch.__version__,
    }
    for key, dists in _OPTIONAL.items():
        version = next((v for v in map(_version_of, dists) if v is not None), None)
        if version is not None:
            found[key] = version
    return found


def write_manifest(directory: Path, files: list[str], meta: dict) -> dict:
    """Checksum ``files`` (paths relative to ``directory``) and write ``manifest.json``.

    ``meta`` (pipeline, budget, backend, target, input specs, model name...) is stored as given,
    at the top level; it may not override the keys the manifest itself defines.
    """
    directory = Path(directory)
    entries: dict[str, dict[str, Any]] = {}
    for name in files:
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ArtifactError(f"artifact file {name!r} must be a path inside {directory}")
        path = directory / rel
        if not path.is_file():
            raise ArtifactError(f"cannot write the manifest: {path} does not exist")
        entries[rel.as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "files": entries,
    }
    clash = sorted(set(meta) & set(manifest))
    if clash:
        raise ArtifactError(f"manifest meta may not set the reserved keys {clash}")
    manifest.update(meta)
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    logger.info("wrote %s with %d files", directory / MANIFEST, len(entries))
    return manifest


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def read_manifest(directory: Path, *, verify: bool = True) -> dict:
    """Read ``manifest.json`` and, when ``verify``, check every listed file and the torch version.

    Every failure is an :class:`ArtifactError` that names the problem and the fix.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist; check the path")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"not a tcompile artifact: no {MANIFEST} in {directory}; export one with opt.export({directory})"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-export the artifact") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(
            f"{path} has format {found!r}, expected {FORMAT!r}; this is not a tcompile artifact"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{path} has an invalid format_version {version!r}; re-export the artifact")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {version}, newer than the {FORMAT_VERSION} this tcompile "
            "reads; upgrade tcompile (pip install -U tcompile) or re-export with this version"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{path} lists no files; re-export the artifact")
    if verify:
        _verify_files(directory, files)
        _verify_torch(manifest)
        _verify_requires(manifest)
        _verify_device(manifest)
    return manifest


def _verify_files(directory: Path, files: dict[str, Any]) -> None:
    """Every listed file exists with its recorded checksum."""
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(
                f"{name} is listed in {MANIFEST} but missing from {directory}; copy the whole "
                "artifact directory or re-export the artifact"
            )
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        found = sha256_file(path)
        if found != expected:
            raise ArtifactError(
                f"{name} was modified after export: sha256 expected {expected}, found {found}; "
                "re-export the artifact"
            )


def _verify_torch(manifest: dict) -> None:
    """torch-serialized programs load only under the torch major.minor that wrote them."""
    if not manifest.get("requires_torch_match"):
        return
    import torch

    recorded = manifest.get("versions", {}).get("torch")
    if recorded is None or _major_minor(recorded) != _major_minor(torch.__version__):
        raise ArtifactError(
            f"this artifact holds torch-serialized programs written by torch {recorded}, but torch "
            f"{torch.__version__} is running; install torch {recorded} to load it, or re-export "
            f"the artifact with torch {torch.__version__}"
        )


# What each backend's files need to load. torch-serialized programs (ExportedPrograms, PT2
# archives, AOTInductor packages, torch-tensorrt programs) need the torch major.minor that wrote
# them. ONNX files are forward compatible: a newer onnxruntime runs them, an older one may lack
# their opset, so onnxruntime is a minimum.
_TORCH_BACKENDS = ("eager", "inductor", "aot", "tensorrt")
# Backends whose files are machine code for one device: an AOTInductor .so for one CPU
# architecture (or GPU), a TensorRT plan for one GPU compute capability.
_DEVICE_BOUND = ("aot", "tensorrt")


def device_info(device: str = "cpu") -> dict[str, Any]:
    """The device an artifact was built for: type, CPU architecture, GPU name and compute capability."""
    import torch

    info: dict[str, Any] = {"type": device, "arch": platform.machine()}
    if device == "cuda" and torch.cuda.is_available():
        info["name"] = torch.cuda.get_device_name()
        info["capability"] = "{}.{}".format(*torch.cuda.get_device_capability())
    return info


def compatibility(backend: str, device: str = "cpu") -> dict[str, Any]:
    """Manifest entries that :func:`read_manifest` checks: ``requires``, ``device``, ``device_bound``."""
    found = versions()
    requires: dict[str, str] = {}
    if backend in _TORCH_BACKENDS:
        requires["torch"] = _major_minor(found["torch"])
    if backend == "onnxruntime" and "onnxruntime" in found:
        requires["onnxruntime"] = ">=" + _major_minor(found["onnxruntime"])
    return {"requires": requires, "device": device_info(device), "device_bound": backend in _DEVICE_BOUND}


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in _major_minor(text).split(".") if p.isdigit())


def _verify_requires(manifest: dict) -> None:
    """Each required package is installed at the version the manifest asks for."""
    requires = manifest.get("requires") or {}
    if not isinstance(requires, dict):
        raise ArtifactError(f"{MANIFEST} has a malformed 'requires' entry {requires!r}; re-export the artifact")
    backend = manifest.get("backend", "?")
    for package, wanted in requires.items():
        running = versions().get(package)
        minimum = str(wanted).startswith(">=")
        target = str(wanted).removeprefix(">=")
        if running is None:
            pin = f"{package}>={target}" if minimum else f"{package}=={target}.*"
            raise ArtifactError(f"this {backend} artifact needs {package} {wanted}, which is not installed; "
                                f"install it (pip install '{pin}') to load the artifact")
        ok = (_version_tuple(running) >= _version_tuple(target)) if minimum else (_major_minor(running) == target)
        if not ok:
            need = f"{package} {target} or newer" if minimum else f"{package} {target}.x"
            raise ArtifactError(
                f"version mismatch: this {backend} artifact was written by {package} "
                f"{manifest.get('versions', {}).get(package, target)} and needs {need}, but {package} {running} "
                f"is installed; install {need} (pip install '{package}{'>=' if minimum else '=='}{target}"
                f"{'' if minimum else '.*'}') or re-export the artifact with this environment")


def _verify_device(manifest: dict) -> None:
    """Device-bound engines (AOTInductor code, TensorRT plans) load only where they were built for."""
    recorded = manifest.get("device")
    if not manifest.get("device_bound") or not isinstance(recorded, dict):
        return
    backend = manifest.get("backend", "?")
    here = device_info(recorded.get("type", "cpu"))
    if recorded.get("type") == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ArtifactError(f"this {backend} artifact was built for a CUDA GPU ({recorded.get('name', '?')}), "
                                "but torch sees no CUDA device here; load it on a CUDA machine or re-export for CPU")
        if recorded.get("capability") and recorded.get("capability") != here.get("capability"):
            raise ArtifactError(
                f"this {backend} artifact was built for GPU compute capability {recorded['capability']} "
                f"({recorded.get('name', '?')}), but this GPU is {here.get('capability')} ({here.get('name')}); "
                "engines are specific to the GPU generation: re-export the artifact on this GPU")
    if recorded.get("arch") and recorded["arch"] != here["arch"]:
        raise ArtifactError(f"this {backend} artifact holds machine code for {recorded['arch']}, but this machine "
                            f"is {here['arch']}; re-export the artifact on a {here['arch']} machine")
