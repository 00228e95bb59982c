"""Where a sweep's state lives: a local directory (on a cluster, one every node mounts) or an object store URI.

`Location` is a path on a pyarrow file system, the kind Ray Tune itself writes its experiment state and checkpoints
through (`RunConfig(storage_path=..., storage_filesystem=...)`), so the service's own record (`service_plan.json`)
goes wherever Tune's state goes, and `--resume` reads both from the same place. URIs: `s3://bucket/prefix` (AWS, or
any S3-compatible store such as MinIO or Ceph: `storage.endpoint_url`, or `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL` in the environment) and `gs://bucket/prefix`. Credentials come from each process's environment
(or instance roles), never from the space file, so nothing pickled into Tune's state carries them.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import pyarrow.fs

SCHEMES = ("s3", "gs")  # object stores Ray Tune can keep a multi-node sweep in


@dataclass(frozen=True)
class Location:
    uri: str  # an absolute local path, or scheme://bucket/prefix
    endpoint_url: str | None = None  # S3-compatible endpoint (s3:// only)

    @property
    def remote(self) -> bool:
        return "://" in self.uri

    @property
    def scheme(self) -> str:
        return self.uri.split("://", 1)[0] if self.remote else "file"

    @property
    def name(self) -> str:
        return posixpath.basename(self.uri.rstrip("/"))

    @property
    def bucket(self) -> Location:
        """The bucket of an object store URI (`s3://bucket`)."""
        scheme, rest = self.uri.split("://", 1)
        return Location(f"{scheme}://{rest.split('/', 1)[0]}", self.endpoint_url)

    @property
    def endpoint(self) -> str | None:
        """The S3-compatible endpoint an s3:// location is reached at: `storage.endpoint_url`, else the environment's
        AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL; None for AWS itself and for every other kind of location."""
        if self.scheme != "s3":
            return None
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None

    def __truediv__(self, name: str) -> Location:
        return Location(f"{self.uri.rstrip('/')}/{name}", self.endpoint_url)

    def __str__(self) -> str:
        return self.uri

    def filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """(file system, path on it): what Ray Tune takes as storage_filesystem and storage_path."""
        import pyarrow.fs

        if not self.remote:
            return pyarrow.fs.LocalFileSystem(), self.uri
        path = self.uri.split("://", 1)[1].rstrip("/")
        if self.scheme == "gs":
            return pyarrow.fs.GcsFileSystem(), path
        endpoint = self.endpoint
        options: dict[str, str] = {}
        if endpoint:
            parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            # a fixed region: an S3-compatible store has no region lookup
            options = {"endpoint_override": parts.netloc, "scheme": parts.scheme, "region": region}
        # no keys here: each process (driver, workers) reads its own AWS_* environment or instance role
        return pyarrow.fs.S3FileSystem(**options), path

    def _info(self):  # noqa: ANN202 - pyarrow.fs.FileInfo
        fs, path = self.filesystem()
        return fs.get_file_info(path)

    def exists(self) -> bool:
        import pyarrow.fs

        return self._info().type != pyarrow.fs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs

        return self._info().type == pyarrow.fs.FileType.File

    def subdirs(self) -> list[str]:
        """Names of the directories right under this one (empty when it does not exist)."""
        import pyarrow.fs

        fs, path = self.filesystem()
        if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
            return []
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)

    def remove_tree(self) -> None:
        fs, path = self.filesystem()
        fs.delete_dir(path)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_bytes(self) -> bytes:
        fs, path = self.filesystem()
        with fs.open_input_stream(path) as f:
            return f.read()

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file at once: an object store PUT, or a rename on a local or mounted disk."""
        fs, path = self.filesystem()
        fs.create_dir(posixpath.dirname(path), recursive=True)
        if self.remote:
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def delete(self) -> None:
        """Remove the file (nothing when it is not there)."""
        if self.is_file():
            fs, path = self.filesystem()
            fs.delete_file(path)
