"""OCI image archives written with the standard library, for images made of a few files (no builder needed).

`files_image` writes a one-layer image (an OCI layout in a tar) that `ctr images import` reads and names
from the index's annotations: the node's pause image from a static binary, the busybox image from Debian's
busybox-static. Layers are uncompressed tars with fixed owners and times, so the same files give the same
digests.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

LAYER = "application/vnd.oci.image.layer.v1.tar"
CONFIG = "application/vnd.oci.image.config.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def layer_tar(files: dict[str, Path], links: dict[str, str], dirs: dict[str, int]) -> bytes:
    """A layer of `files` (path in the image -> file on the host, kept executable), symlinks and folders
    (path -> mode; the parents of files and links are 0755)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        modes = {str(Path(p).parent): 0o755 for p in [*files, *links]} | dirs
        for d, mode in sorted(modes.items()):
            if d == ".":
                continue
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        for path, source in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode = source.stat().st_size, 0o755
            with open(source, "rb") as f:
                tar.addfile(info, f)
        for path, target in sorted(links.items()):
            info = tarfile.TarInfo(path)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def files_image(out: Path, name: str, files: dict[str, Path], links: dict[str, str] | None = None,
                dirs: dict[str, int] | None = None, entrypoint: list[str] | None = None,
                cmd: list[str] | None = None, user: str = "", env: list[str] | None = None) -> Path:
    """Write the image `name` (e.g. localcluster.local/pause:3.10) as an OCI archive at `out`."""
    layer = layer_tar(files, links or {}, dirs or {})
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {k: v for k, v in (("Entrypoint", entrypoint), ("Cmd", cmd), ("User", user), ("Env", env)) if v},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }, sort_keys=True).encode()
    blobs = {layer_digest: layer, "sha256:" + hashlib.sha256(config).hexdigest(): config}
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config)},
        "layers": [{"mediaType": LAYER, "digest": layer_digest, "size": len(layer)}],
    }, sort_keys=True).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    blobs[manifest_digest] = manifest
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": MANIFEST, "digest": manifest_digest, "size": len(manifest),
        "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
    }]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _add(tar, "index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            _add(tar, "blobs/sha256/" + digest.split(":")[1], data)
    tmp.rename(out)
    return out
