"""Local-disk storage: objects are files under one root, served by this app under /storage/.

URLs: PUT {base}/storage/{key}?expires={unix}&length={bytes}&signature={hex}
      GET {base}/storage/{key}?expires={unix}&signature={hex}
The signature is HMAC-SHA256 over "PUT\\n{key}\\n{expires}\\n{content type}\\n{content md5}\\n
{length}" (or "GET\\n{key}\\n{expires}", which HEAD also accepts), so the Content-Type and
Content-MD5 headers are checked by recomputing it from what the client actually sent.

Files whose name starts with "." are ours (".{name}.meta" sidecars, ".{name}.{token}.part"
uploads in progress); keys can never name them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import IO
from xml.sax.saxutils import escape

import anyio
import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from app.config import CONTENT_TYPE_EXTENSIONS, Settings
from app.storage import (
    LIST_PAGE_SIZE,
    ListedObject,
    ObjectStream,
    SignedRequest,
    StorageError,
    StoredObject,
    md5_base64_to_hex,
    signed_put,
)

ROUTE_PATH = "/storage/{key:path}"
ROUTE_METHODS = ["PUT", "GET", "HEAD"]
CHUNK_SIZE = 64 * 1024
# Upload bodies are written in batches of this size so small masks cost one thread hop in all.
FLUSH_SIZE = 1024 * 1024
_MIME_BY_EXTENSION = {extension: mime for mime, extension in CONTENT_TYPE_EXTENSIONS.items()}
# Keys come from mask_key(). This charset needs no URL quoting, and no segment may start with
# "." so "..", "." and our hidden files are unreachable through a key.
_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}"
_KEY = re.compile(rf"mask(?:/{_SEGMENT})+")
_PREFIX = re.compile(rf"mask/(?:{_SEGMENT}/)*(?:{_SEGMENT})?")
_SEGMENT_NAME = re.compile(_SEGMENT)


def _error(status: int, code: str, message: str) -> Response:
    # S3's error shape, so clients handle both backends alike.
    body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>'
    body += f"{escape(message)}</Message></Error>"
    return Response(body, status_code=status, media_type="application/xml")


def _sidecar(path: Path) -> Path:
    return path.with_name(f".{path.name}.meta")


def _read_meta(path: Path, st: os.stat_result) -> tuple[str, str] | None:
    """(md5 hex, content type) if the sidecar describes exactly this file.

    Sidecar and data are replaced by two renames; comparing inode, size and mtime makes a
    sidecar left over from a crash or a racing upload harmless (we fall back to hashing).
    """
    try:
        meta = json.loads(path.read_bytes())
        if [meta["ino"], meta["size"], meta["mtime_ns"]] == [st.st_ino, st.st_size, st.st_mtime_ns]:
            return str(meta["md5"]), str(meta["content_type"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _hash_fd(fd: int) -> str:
    digest, offset = hashlib.md5(usedforsecurity=False), 0
    while block := os.pread(fd, FLUSH_SIZE, offset):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


class _FileChunks:
    """Streams an already open descriptor: the body always matches the size and ETag read from
    it, even if the object is replaced meanwhile. A raw fd closed in __del__ means an unread
    stream cannot leak a descriptor."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def __aiter__(self) -> _FileChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._fd is None:
            raise StopAsyncIteration
        try:
            chunk = await anyio.to_thread.run_sync(os.read, self._fd, CHUNK_SIZE)
        except BaseException:
            self.close()
            raise
        if not chunk:
            self.close()
            raise StopAsyncIteration
        return chunk

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    __del__ = close


def _open_object(path: Path) -> tuple[int, int, str, str] | None:
    """(fd, size, md5 hex, content type). The caller wraps the fd in _FileChunks at once: an
    object built here would stay referenced by the idle worker thread and keep the file open.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            meta = _read_meta(_sidecar(path), st) or (
                _hash_fd(fd),
                _MIME_BY_EXTENSION.get(path.suffix[1:], "application/octet-stream"),
            )
            return fd, st.st_size, *meta
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


class _Vanished(Exception):
    """A delete removed the upload's temp file or folder while the body was arriving."""


class _Upload:
    """One PUT body on its way to disk; every method runs in a worker thread."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.temp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.part")
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.file: IO[bytes] | None = None
        self.committed = False

    def write(self, chunks: list[bytes]) -> None:
        if self.file is None:
            for attempt in (1, 2):
                self.target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                try:
                    self.file = open(self.temp, "xb")  # noqa: SIM115 - closed by commit() or abort()
                    break
                except FileNotFoundError:
                    # delete_prefix pruned the empty folder between mkdir and open.
                    if attempt == 2:
                        raise
        assert self.file is not None
        for chunk in chunks:
            self.md5.update(chunk)
            self.file.write(chunk)

    def commit(self, chunks: list[bytes], md5_hex: str, content_type: str) -> bool:
        self.write(chunks)
        assert self.file is not None
        if self.md5.hexdigest() != md5_hex:
            return False
        self.file.flush()
        os.fsync(self.file.fileno())
        st = os.fstat(self.file.fileno())
        self.file.close()
        meta = {"md5": md5_hex, "content_type": content_type, "size": st.st_size}
        meta |= {"ino": st.st_ino, "mtime_ns": st.st_mtime_ns}
        sidecar_temp = self.temp.with_suffix(".meta.part")
        try:
            # No fsync: a sidecar lost in a crash fails _read_meta's check and we re-hash.
            sidecar_temp.write_text(json.dumps(meta))
            os.replace(sidecar_temp, _sidecar(self.target))
            os.replace(self.temp, self.target)
        except FileNotFoundError as error:
            # The group was deleted meanwhile: its prefix went, our temp file with it.
            raise _Vanished from error
        self.committed = True
        directory = os.open(self.target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return True

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
        self.temp.unlink(missing_ok=True)
        self.temp.with_suffix(".meta.part").unlink(missing_ok=True)


def _unlink(path: str) -> int:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return 0 if os.path.basename(path).startswith(".") else 1


def _rmdir(path: str | Path) -> bool:
    try:
        os.rmdir(path)
    except OSError:  # not empty: an upload started meanwhile
        return False
    return True


def _remove_tree(directory: str) -> int:
    count = 0
    # followlinks=False: a symlink is removed as a link, never descended into.
    for parent, dirnames, filenames in os.walk(directory, topdown=False):
        count += sum(_unlink(os.path.join(parent, name)) for name in filenames)
        for name in dirnames:
            path = os.path.join(parent, name)
            if os.path.islink(path):
                _unlink(path)
            else:
                _rmdir(path)
    _rmdir(directory)
    return count


def load_or_create_secret(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.part")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(secrets.token_hex(32).encode() + b"\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            # link() refuses to overwrite: a process starting alongside keeps the first secret,
            # and nobody ever reads a half-written one.
            os.link(temp, path)
        except FileExistsError:
            pass
        finally:
            temp.unlink()
    secret = path.read_bytes().strip()
    if len(secret) < 32:
        raise StorageError(f"{path} holds no usable secret; delete it to generate a new one")
    return secret


class LocalStorage:
    def __init__(self, root: Path, secret: bytes, base_url: str, max_size: int) -> None:
        self._root = root
        self._mac = hmac.new(secret, digestmod=hashlib.sha256)
        self._base_url = base_url
        self._max_size = max_size

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalStorage:
        root = settings.resolved_local_storage_dir
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        secret = settings.local_storage_secret.encode() or load_or_create_secret(
            settings.var_dir / "storage-secret"
        )
        base_url = settings.resolved_public_base_url + "/storage/"
        return cls(root.resolve(), secret, base_url, settings.max_mask_size_bytes)

    def _sign(self, canonical: str) -> str:
        mac = self._mac.copy()
        mac.update(canonical.encode())
        return mac.hexdigest()

    def presign_put(
        self,
        key: str,
        *,
        content_type: str,
        content_md5: str,
        content_length: int,
        expires_in: int,
        now: datetime,
    ) -> SignedRequest:
        if _KEY.fullmatch(key) is None:
            raise ValueError(f"invalid storage key {key!r}")
        expires = int(now.timestamp()) + expires_in
        canonical = f"PUT\n{key}\n{expires}\n{content_type}\n{content_md5}\n{content_length}"
        query = f"?expires={expires}&length={content_length}&signature={self._sign(canonical)}"
        return signed_put(
            self._base_url + key + query,
            content_type=content_type,
            content_md5=content_md5,
            expires_in=expires_in,
            now=now,
        )

    def presign_get(self, key: str, *, expires_in: int, now: datetime) -> SignedRequest:
        if _KEY.fullmatch(key) is None:
            raise ValueError(f"invalid storage key {key!r}")
        expires = int(now.timestamp()) + expires_in
        signature = self._sign(f"GET\n{key}\n{expires}")
        return SignedRequest(
            url=f"{self._base_url}{key}?expires={expires}&signature={signature}",
            method="GET",
            headers=(),
            expires_at=now + timedelta(seconds=expires_in),
        )

    def _path(self, key: str) -> Path:
        if _KEY.fullmatch(key) is None:
            raise ValueError(f"invalid storage key {key!r}")
        # The key syntax already excludes "..": this catches symlinks leading out of the root.
        path = (self._root / key).resolve()
        if not path.is_relative_to(self._root):
            raise PermissionError("storage key leads outside the storage root")
        return path

    async def handle(self, request: Request) -> Response:
        """Serves ROUTE_PATH: signed PUTs, GETs and HEADs of one object."""
        key: str = request.path_params["key"]
        if _KEY.fullmatch(key) is None:
            return _error(400, "InvalidArgument", "Invalid object key.")
        query, headers = request.query_params, request.headers
        expires, length = query.get("expires", ""), query.get("length", "")
        if request.method == "PUT":
            content_type = headers.get("content-type", "")
            content_md5 = headers.get("content-md5", "")
            canonical = f"PUT\n{key}\n{expires}\n{content_type}\n{content_md5}\n{length}"
        else:
            canonical = f"GET\n{key}\n{expires}"
        expected = self._sign(canonical).encode()
        if not hmac.compare_digest(expected, query.get("signature", "").encode()):
            return _error(403, "SignatureDoesNotMatch", "The request signature does not match.")
        if not (expires.isascii() and expires.isdigit()) or int(time.time()) > int(expires):
            return _error(403, "AccessDenied", "Request has expired.")
        try:
            path = self._path(key)
        except PermissionError:
            return _error(403, "AccessDenied", "Access denied.")
        if request.method == "PUT":
            if not (length.isascii() and length.isdigit()):
                return _error(400, "InvalidArgument", "Invalid signed length.")
            return await self._put(request, path, content_type, content_md5, int(length))
        found = await anyio.to_thread.run_sync(_open_object, path)
        if found is None:
            return _error(404, "NoSuchKey", "The specified key does not exist.")
        fd, size, md5_hex, media_type = found
        chunks = _FileChunks(fd)
        response_headers = {"Content-Length": str(size), "ETag": f'"{md5_hex}"'}
        if request.method == "HEAD":
            chunks.close()
            return Response(headers=response_headers, media_type=media_type)
        return StreamingResponse(chunks, headers=response_headers, media_type=media_type)

    async def _put(
        self, request: Request, path: Path, content_type: str, content_md5: str, length: int
    ) -> Response:
        if length > self._max_size:
            return _error(400, "EntityTooLarge", "The object exceeds the maximum size.")
        if "content-length" not in request.headers:
            return _error(411, "MissingContentLength", "Content-Length is required.")
        if request.headers["content-length"] != str(length):
            return _error(400, "InvalidArgument", "Content-Length differs from the signed one.")
        md5_hex = md5_base64_to_hex(content_md5)
        if md5_hex is None:
            return _error(400, "InvalidDigest", "The Content-MD5 is not valid.")
        upload, batch, batched, received = _Upload(path), [], 0, 0
        try:
            async with aclosing(request.stream()) as body:
                async for chunk in body:
                    received += len(chunk)
                    if received > length:
                        return _error(400, "EntityTooLarge", "Body longer than Content-Length.")
                    batch.append(chunk)
                    batched += len(chunk)
                    if batched >= FLUSH_SIZE:
                        await anyio.to_thread.run_sync(upload.write, batch)
                        batch, batched = [], 0
            if received != length:
                return _error(400, "IncompleteBody", "Body shorter than Content-Length.")
            commit = partial(upload.commit, batch, md5_hex, content_type)
            if not await anyio.to_thread.run_sync(commit):
                return _error(400, "BadDigest", "The Content-MD5 does not match the body.")
        except _Vanished:
            return _error(
                409, "OperationAborted", "The object's folder was deleted during the upload."
            )
        finally:
            if not upload.committed:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(upload.abort)
        return Response(headers={"ETag": f'"{md5_hex}"'})

    async def stat_objects(self, keys: Sequence[str]) -> dict[str, StoredObject]:
        by_folder: dict[str, dict[str, str]] = {}
        for key in keys:
            if _KEY.fullmatch(key) is None:
                raise ValueError(f"invalid storage key {key!r}")
            folder, _, name = key.rpartition("/")
            by_folder.setdefault(folder, {})[name] = key
        found: dict[str, StoredObject] = {}
        for folder, names in by_folder.items():
            found |= await anyio.to_thread.run_sync(self._stat_folder, folder, names)
        return found

    def _stat_folder(self, folder: str, names: dict[str, str]) -> dict[str, StoredObject]:
        directory = (self._root / folder).resolve()
        if not directory.is_relative_to(self._root):
            raise StorageError("storage folder leads outside the storage root")
        try:
            with os.scandir(directory) as listing:
                entries = {entry.name: entry for entry in listing}
        except (FileNotFoundError, NotADirectoryError):
            return {}
        found: dict[str, StoredObject] = {}
        for name, key in names.items():
            entry = entries.get(name)
            if entry is None or not entry.is_file(follow_symlinks=False):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                meta = _read_meta(directory / f".{name}.meta", st)
                md5_hex = meta[0] if meta else self._hash_path(Path(entry.path))
            except FileNotFoundError:  # deleted since the listing
                continue
            found[key] = StoredObject(key=key, size=st.st_size, md5_hex=md5_hex)
        return found

    @staticmethod
    def _hash_path(path: Path) -> str:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return _hash_fd(fd)
        finally:
            os.close(fd)

    async def delete_prefix(self, prefix: str) -> int:
        if _PREFIX.fullmatch(prefix) is None:
            raise ValueError(f"invalid storage prefix {prefix!r}")
        return await anyio.to_thread.run_sync(self._delete_prefix, prefix)

    def _delete_prefix(self, prefix: str) -> int:
        folder, _, start = prefix.rpartition("/")
        directory = (self._root / folder).resolve()
        if not directory.is_relative_to(self._root) or directory == self._root:
            raise StorageError("storage prefix leads outside the storage root")
        try:
            with os.scandir(directory) as listing:
                entries = list(listing)
        except (FileNotFoundError, NotADirectoryError):
            return 0
        count = 0
        for entry in entries:
            # Hidden files belong to the object named after the dot (sidecars, uploads).
            if not entry.name.removeprefix(".").startswith(start):
                continue
            if entry.is_dir(follow_symlinks=False):
                count += _remove_tree(entry.path)
            else:
                count += _unlink(entry.path)
        while directory != self._root and _rmdir(directory):
            directory = directory.parent
        return count

    async def list_objects(self, prefix: str) -> AsyncIterator[list[ListedObject]]:
        if _PREFIX.fullmatch(prefix) is None:
            raise ValueError(f"invalid storage prefix {prefix!r}")
        folder, _, start = prefix.rpartition("/")
        pending, page = [(folder, start)], []
        while pending:
            folder, start = pending.pop()
            files, folders = await anyio.to_thread.run_sync(self._list_folder, folder, start)
            pending.extend((child, "") for child in reversed(folders))
            page.extend(files)
            while len(page) >= LIST_PAGE_SIZE:
                yield page[:LIST_PAGE_SIZE]
                page = page[LIST_PAGE_SIZE:]
        if page:
            yield page

    def _list_folder(self, folder: str, start: str) -> tuple[list[ListedObject], list[str]]:
        directory = (self._root / folder).resolve()
        if not directory.is_relative_to(self._root):
            raise StorageError("storage folder leads outside the storage root")
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except (FileNotFoundError, NotADirectoryError):
            return [], []
        files: list[ListedObject] = []
        folders: list[str] = []
        for entry in entries:
            # Hidden names are ours (sidecars, uploads in progress), never objects.
            if not entry.name.startswith(start) or _SEGMENT_NAME.fullmatch(entry.name) is None:
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(f"{folder}/{entry.name}")
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    modified = datetime.fromtimestamp(st.st_mtime, UTC)
                    files.append(ListedObject(f"{folder}/{entry.name}", st.st_size, modified))
            except FileNotFoundError:  # deleted since the listing
                continue
        return files, folders

    async def delete_objects(self, keys: Sequence[str]) -> int:
        paths = [self._path(key) for key in keys]
        await anyio.to_thread.run_sync(self._delete_paths, paths)
        return len(keys)

    def _delete_paths(self, paths: list[Path]) -> None:
        for path in paths:
            _unlink(str(path))
            _unlink(str(_sidecar(path)))
        for directory in sorted({path.parent for path in paths}, reverse=True):
            while directory != self._root and _rmdir(directory):
                directory = directory.parent

    async def open(self, key: str) -> ObjectStream | None:
        path = self._path(key)
        found = await anyio.to_thread.run_sync(_open_object, path)
        if found is None:
            return None
        fd, size, md5_hex, content_type = found
        etag = f'"{md5_hex}"'
        return ObjectStream(size=size, etag=etag, content_type=content_type, chunks=_FileChunks(fd))

    async def ensure_bucket(self, cors_origins: Sequence[str]) -> None:
        # Served by this app itself, so CORS is the app's middleware, not ours.
        make = partial(self._root.mkdir, mode=0o700, parents=True, exist_ok=True)
        await anyio.to_thread.run_sync(make)

    async def aclose(self) -> None:
        pass
