"""URIs for everything lensmill stores: a local folder or ``s3://bucket/prefix``.

All I/O goes through ``pyarrow.fs`` so that the same code serves local disks, AWS S3 and
S3-compatible servers. Writes are atomic: a reader sees a whole file or none.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from lensmill.config import StorageConfig
from lensmill.errors import StorageError


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join_uri(base_uri: str, *parts: str) -> str:
    """Join path parts onto a URI with forward slashes."""
    out = base_uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def absolute_uri(uri: str) -> str:
    """Local paths become absolute (Ray workers run in other folders); S3 URIs are unchanged."""
    if is_s3(uri):
        return uri.rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return str(Path(uri).expanduser().resolve())


@dataclass(frozen=True)
class Location:
    """A filesystem plus a path on it (no scheme), as pyarrow and Ray Data take them."""

    filesystem: pafs.FileSystem
    path: str
    uri: str


def filesystem_for(uri: str, storage: StorageConfig) -> pafs.FileSystem:
    if is_s3(uri):
        kwargs: dict[str, Any] = {
            "region": storage.s3_region,
            # An unreachable endpoint fails in seconds with an error naming the URI, not minutes later.
            "connect_timeout": storage.s3_connect_timeout_s,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=storage.s3_max_attempts),
        }
        if storage.s3_endpoint_url:
            scheme, _, host = storage.s3_endpoint_url.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
            # Path-style addressing: S3-compatible servers rarely resolve bucket subdomains.
            kwargs["force_virtual_addressing"] = False
        return pafs.S3FileSystem(**kwargs)
    return pafs.LocalFileSystem()


def locate(uri: str, storage: StorageConfig) -> Location:
    uri = absolute_uri(uri)
    path = uri[len("s3://") :] if is_s3(uri) else uri
    return Location(filesystem_for(uri, storage), path, uri)


def _fail(action: str, uri: str, exc: Exception) -> StorageError:
    return StorageError(f"cannot {action} {uri}: {exc}")


def exists(uri: str, storage: StorageConfig) -> bool:
    loc = locate(uri, storage)
    try:
        return loc.filesystem.get_file_info(loc.path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise _fail("reach", uri, exc) from exc


def write_bytes(uri: str, data: bytes | pa.Buffer, storage: StorageConfig) -> None:
    """Write a whole file atomically: a temporary name renamed into place (S3 PUTs are atomic)."""
    loc = locate(uri, storage)
    fs = loc.filesystem
    try:
        parent = loc.path.rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)
        if is_s3(loc.uri):
            with fs.open_output_stream(loc.path) as out:
                out.write(data)
        else:
            tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
            with fs.open_output_stream(tmp) as out:
                out.write(data)
            fs.move(tmp, loc.path)
    except OSError as exc:
        raise _fail("write", uri, exc) from exc


def read_bytes(uri: str, storage: StorageConfig) -> bytes:
    loc = locate(uri, storage)
    try:
        with loc.filesystem.open_input_stream(loc.path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise StorageError(f"not found: {uri}") from exc
    except OSError as exc:
        raise _fail("read", uri, exc) from exc


def write_json(uri: str, obj: Any, storage: StorageConfig) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode(), storage)


def read_json(uri: str, storage: StorageConfig) -> Any:
    return json.loads(read_bytes(uri, storage))


def list_files(uri: str, storage: StorageConfig) -> list[str]:
    """URIs of the files below ``uri`` (recursive), sorted; empty when it does not exist."""
    loc = locate(uri, storage)
    try:
        infos = loc.filesystem.get_file_info(
            pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)
        )
    except OSError as exc:
        raise _fail("list", uri, exc) from exc
    prefix = "s3://" if is_s3(loc.uri) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File)


def ensure_writable(uri: str, storage: StorageConfig) -> None:
    """Fail early, naming the URI, when the root cannot be written (before hours of work)."""
    probe = join_uri(uri, f".lensmill-probe-{uuid.uuid4().hex}")
    write_bytes(probe, b"ok", storage)
    loc = locate(probe, storage)
    try:
        loc.filesystem.delete_file(loc.path)
    except OSError as exc:
        raise _fail("delete", probe, exc) from exc


def download_dir(uri: str, local_dir: Path, storage: StorageConfig) -> Path:
    """Copy a folder from any URI to a local folder (for model files)."""
    loc = locate(uri, storage)
    local_dir.mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(loc.path, str(local_dir), source_filesystem=loc.filesystem)
    except OSError as exc:
        raise _fail("download", uri, exc) from exc
    return local_dir
