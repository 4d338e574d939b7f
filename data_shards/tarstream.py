"""A lean reader of the tar members of a shard stream, in place of webdataset's `tar_file_iterator`.

webdataset walks a shard with Python's `tarfile` in streaming mode: a TarInfo object, its header parsed field
by field, and an `extractfile` wrapper per member. On our shards (a 96 px JPEG, a JSON and a PNG per sample,
~2 KB each) that was a third of the loader's time in one process (docs/benchmarks.md). This reader parses
only what a shard needs: each 512-byte header's name, size and type, checked by its checksum; ustar name
prefixes, pax `path` records and GNU long names are honoured, so any tar that webdataset's writer, GNU tar
or Python's `tarfile` produces reads the same. The rest of webdataset's pipeline (url_opener, group_by_keys,
shuffle, batched) is used as is; `tar_samples` is webdataset's `tarfile_samples` with this reader and the
grouping of members into samples done in the same pass.

A header that fails its checksum, a member cut short or a stream that ends without the end-of-archive blocks
raises `TarStreamError` through the handler (as `tarfile.ReadError` does in webdataset): the samples read so
far stay, the rest of that shard is skipped."""
from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterable, Iterator

import webdataset as wds

BLOCK = 512
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: members like __index__ are not samples
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key, extensions
_REGULAR = (b"0", b"\0", b"7")  # other types (links, directories, devices) hold no sample data: skipped


class TarStreamError(Exception):
    """A shard's tar stream is damaged: a bad header checksum or a member cut short."""


def _number(field: bytes, what: str) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for sizes of 8 GiB and more
        value = int.from_bytes(field[1:], "big")
        return -value if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip(b" \0")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarStreamError(f"tar header field {what} is not an octal number: {field!r}") from None


def _checksum_ok(header: bytes) -> bool:
    """The header's stored checksum against the sum of its bytes with the checksum field read as spaces. The sum
    comes from zlib's Adler-32 of each 256-byte half, whose low 16 bits are 1 + the half's byte sum (at most
    256 · 255 = 65280, below Adler's modulus 65521, so exact): a tenth of the time of summing in Python, which
    was most of the reader's cost per member."""
    stored = _number(header[148:156], "chksum")
    total = (zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF) - 2
    return stored == total - sum(header[148:156]) + 8 * 32


def _read(stream, count: int) -> bytes:
    """Up to `count` bytes, fewer only at the end of the stream (a network body may return short reads)."""
    data = stream.read(count)
    while 0 < len(data) < count:
        more = stream.read(count - len(data))
        if not more:
            break
        data += more
    return data


def _read_exact(stream, count: int, name: str) -> bytes:
    data = _read(stream, count)
    if len(data) != count:
        raise TarStreamError(f"tar member {name!r} cut short: {len(data)} of {count} bytes")
    return data


def _pax_path(records: bytes) -> str | None:
    """The `path` of a pax extended header (`<length> path=<name>\\n` records), if it has one."""
    pos = 0
    while pos < len(records):
        space = records.index(b" ", pos)
        length = int(records[pos:space])
        keyword, _, value = records[space + 1:pos + length - 1].partition(b"=")
        if keyword == b"path":
            return value.decode("utf-8")
        pos += length
    return None


def tar_members(stream, select_files: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular member of a tar stream, in order; members `select_files` rejects are
    skipped without being kept in memory, webdataset's meta members (`__…__`) are skipped."""
    long_name: str | None = None
    while True:
        header = _read(stream, BLOCK)
        if len(header) < BLOCK:
            raise TarStreamError(f"tar stream ends inside a header ({len(header)} of {BLOCK} bytes)")
        if header.count(0) == BLOCK:  # end-of-archive block
            return
        if not _checksum_ok(header):
            raise TarStreamError("tar header checksum mismatch (a damaged or non-tar shard)")
        size = _number(header[124:136], "size")
        kind = header[156:157]
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if header[257:262] == b"ustar" and header[345:346] != b"\0":
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            name = f"{prefix}/{name}"
        padded = -(-size // BLOCK) * BLOCK
        if kind in (b"x", b"L", b"g"):  # pax / GNU long-name records describe the next member
            records = _read_exact(stream, padded, name)[:size]
            if kind == b"L":
                long_name = records.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":
                long_name = _pax_path(records) or long_name
            continue
        if long_name is not None:
            name, long_name = long_name, None
        keep = kind in _REGULAR and not _META.match(name) and (select_files is None or select_files(name))
        if not keep:
            _skip(stream, padded, name)
            continue
        data = _read_exact(stream, padded, name)
        yield name, data[:size] if padded != size else data


def _skip(stream, count: int, name: str) -> None:
    while count > 0:
        chunk = stream.read(min(count, 1 << 20))
        if not chunk:
            raise TarStreamError(f"tar member {name!r} cut short")
        count -= len(chunk)


def tar_samples(urls: Iterable[dict], handler: Callable[[Exception], bool],
                select_files: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """Samples ({"__key__", "__url__", "<ext>": bytes}) of a stream of {"url": ...}: webdataset's url_opener,
    then the members grouped by key as webdataset's group_by_keys does (key = the name up to its first dot,
    extension lower-cased, never across shards), in one pass without a dict per member. A duplicate
    extension within a sample goes to `handler` and the member is dropped; a damaged shard ends there, its
    last sample kept as far as it was read."""
    for source in wds.tariterators.url_opener(urls, handler=handler):
        url, stream, current = source["url"], source["stream"], None
        try:
            for fname, data in tar_members(stream, select_files):
                match = _KEY.match(fname)
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                if ext in current:
                    if not handler(ValueError(f"{fname}: duplicate file name in tar file {url}")):
                        return
                    continue
                current[ext] = data
        except Exception as exn:  # noqa: BLE001 - the handler decides (count and skip, or raise)
            exn.args = exn.args + (url,)
            if not handler(exn):
                return
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        if current is not None:
            yield current
