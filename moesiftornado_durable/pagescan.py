"""Read the rows of a damaged SQLite file page by page, without SQLite: what `salvage` recovers from.

SQLite reaches a row through its table's b-tree, so one unreadable interior page (or a file cut short)
hides every row below it, although those rows sit intact in their leaf pages. This module reads every
page of the file instead (with the newest committed version of each page from the WAL, if there is
one), parses each table-leaf page's cells (following overflow chains), and says which pages it could
not read. It knows the file format only (sqlite.org/fileformat2.html), not our tables: telling the
rows apart is the caller's job. Nothing is written; the file is read once, page by page (plus a sample of
it, when the header that gives the page size is damaged: `find_page_size`).

The sqlite3 shell's `.recover` does the same job, but needs the `sqlite_dbpage` table, which Debian's
sqlite3 3.40 lacks ("SQL logic error" on any file), and Python's sqlite3 module has no recover API.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
from typing import BinaryIO, Dict, Iterator, List, Optional, Set, Tuple, Union

Value = Union[None, int, float, bytes, str]

_MAGIC = b"SQLite format 3\x00"
_TABLE_LEAF, _TABLE_INTERIOR, _INDEX_LEAF, _INDEX_INTERIOR = 0x0D, 0x05, 0x0A, 0x02
_WAL_MAGICS = (0x377F0682, 0x377F0683)  # checksums little-endian, big-endian
_DEFAULT_PAGE_SIZE = 4096  # SQLite's own default: assumed only when neither header, WAL nor pages tell
_PAGE_SIZES = tuple(1 << shift for shift in range(9, 17))  # every page size SQLite allows: 512 ... 65536
_CHUNK = 1 << 16  # the largest page size: a chunk at a multiple of it starts a page at every size
_SAMPLE_CHUNKS = 256  # chunks read to find the page size: at most 16 MiB, spread over the whole file


@dataclasses.dataclass(frozen=True)
class Row:
    """One row found on a table-leaf page: its rowid and its column values, in table order."""

    page: int
    rowid: int
    values: Tuple[Value, ...]


@dataclasses.dataclass
class Census:
    """What a scan read and what it could not: the honest half of a salvage report."""

    page_size: int = 0
    page_size_from: str = "header"  # "header", "wal", "pages" (found by `find_page_size`) or "default" (assumed)
    btree_pages_found: int = 0  # with "pages": pages of the sample that parse as b-tree pages at that size
    pages_sampled: int = 0  # with "pages": how many pages of that size the sample held
    pages_declared: int = 0  # the header's page count (0 when the header is unreadable)
    pages_present: int = 0  # pages read whole from the file or the WAL
    pages_missing: int = 0  # pages the header (or the WAL's last commit) declares that neither holds whole
    leaf_pages: int = 0
    rows: int = 0
    unreadable_pages: List[int] = dataclasses.field(default_factory=list)  # neither data, index, free nor empty
    zero_pages: int = 0  # all zeros yet not on the freelist: free pages of a freelist lost, or wiped pages
    damaged_cells: int = 0  # cells on a leaf page that do not parse, or whose overflow chain is broken
    header_damaged: bool = False


def scan(path: str, census: Census) -> Iterator[Row]:
    """Every row of every table-leaf page of the SQLite file `path` (and its `-wal`), page by page;
    `census` is filled in as the scan goes, and is complete once the iterator is exhausted."""
    with open(path, "rb") as file, contextlib.ExitStack() as closing:
        pages = _Pages(file, path + "-wal", census, closing)
        free = _freelist(pages)
        overflow: Set[int] = set()
        unknown: List[int] = []
        for number in range(1, pages.count + 1):
            page = pages.get(number)
            if page is None:
                census.pages_missing += 1
                continue
            census.pages_present += 1
            if number in free:
                continue
            start = 100 if number == 1 else 0
            kind = page[start]
            if kind == _TABLE_LEAF:
                rows = _leaf_rows(pages, number, page, start, overflow, census)
                if rows is None:
                    unknown.append(number)
                    continue
                census.leaf_pages += 1
                for row in rows:
                    census.rows += 1
                    yield row
            elif kind in (_TABLE_INTERIOR, _INDEX_LEAF, _INDEX_INTERIOR):
                continue
            elif any(page):
                unknown.append(number)  # perhaps an overflow page: known only once every leaf is read
            else:
                census.zero_pages += 1
        census.unreadable_pages = [number for number in unknown if number not in overflow]
        census.pages_missing += max(0, census.pages_declared - pages.count)  # cut off the end of the file


class _Pages:
    """The pages of a database file, each in its newest committed version (WAL frames over the file)."""

    def __init__(self, file: BinaryIO, wal_path: str, census: Census, closing: contextlib.ExitStack) -> None:
        self._file = file
        header = file.read(100)
        size = os.fstat(file.fileno()).st_size
        page_size = _page_size(header[16:18]) if header[:16] == _MAGIC and len(header) == 100 else None
        census.header_damaged = page_size is None
        self._wal: Dict[int, Tuple[str, int]] = {}
        self._wal_file: Optional[BinaryIO] = None
        wal_pages, wal_page_size, wal_declared = _committed_frames(wal_path)
        if page_size is None and wal_page_size is not None:
            page_size, census.page_size_from = wal_page_size, "wal"
        elif page_size is None:
            found = find_page_size(file, size)
            page_size, census.btree_pages_found, census.pages_sampled = found
            census.page_size_from = "pages" if census.btree_pages_found else "default"
        elif wal_page_size not in (None, page_size):
            wal_pages = {}  # a WAL of another database: ignore it
        self.page_size = page_size
        self.usable = page_size - (header[20] if not census.header_damaged else 0)
        self.count = max([size // page_size] + list(wal_pages))
        if wal_pages:
            self._wal_file = closing.enter_context(open(wal_path, "rb"))
            self._wal = {number: ("wal", offset) for number, offset in wal_pages.items()}
        census.page_size = page_size
        census.pages_declared = 0 if census.header_damaged else struct.unpack(">I", header[28:32])[0]
        if wal_pages:  # the last commit says how many pages the database then had
            census.pages_declared = wal_declared

    def get(self, number: int) -> Optional[bytes]:
        """Page `number` (1-based), or None when the file does not hold it whole."""
        if number < 1 or number > self.count:
            return None
        source = self._wal.get(number)
        if source is not None and self._wal_file is not None:
            self._wal_file.seek(source[1])
            data = self._wal_file.read(self.page_size)
        else:
            self._file.seek((number - 1) * self.page_size)
            data = self._file.read(self.page_size)
        return data if len(data) == self.page_size else None


def find_page_size(file: BinaryIO, size: int) -> Tuple[int, int, int]:
    """The page size of a database file whose header is unreadable, found from its pages: (page size, pages of
    the sample that parse as b-tree pages at that size, pages of that size in the sample).

    Every size SQLite allows is tried on a sample of the file (up to `_SAMPLE_CHUNKS` chunks of 64 KiB spread
    over it, so a large file costs at most 16 MiB read; each chunk starts a page at every size), and the size
    under which the most pages parse as b-tree pages wins. That is sound because a b-tree page keeps its cell
    content at its end: a real page parses at its own size and at larger ones (its cell pointers still fit),
    hardly ever at a smaller one (its pointers, or its first freeblock, point past the smaller page), and a
    larger size sees only every second, fourth... of the real pages' starts. So the true size has the most;
    on a tie the smallest wins. The header check (`_looks_like_btree_page`) is strict enough that record bytes
    almost never pass it. With no page parsing at any size, SQLite's default is assumed (0 pages found).
    """
    chunks = -(-size // _CHUNK)
    picked = range(chunks) if chunks <= _SAMPLE_CHUNKS else sorted({i * chunks // _SAMPLE_CHUNKS
                                                                   for i in range(_SAMPLE_CHUNKS)})
    found = dict.fromkeys(_PAGE_SIZES, 0)
    sampled = dict.fromkeys(_PAGE_SIZES, 0)
    for index in picked:
        file.seek(index * _CHUNK)
        chunk = file.read(_CHUNK)
        for page_size in _PAGE_SIZES:
            for at in range(0, len(chunk) - page_size + 1, page_size):
                sampled[page_size] += 1
                start = 100 if index == 0 and at == 0 else 0  # page 1 holds the (damaged) file header first
                found[page_size] += _looks_like_btree_page(chunk, at, start, page_size)
    best = max(_PAGE_SIZES, key=lambda page_size: (found[page_size], -page_size))
    if not found[best]:
        return _DEFAULT_PAGE_SIZE, 0, sampled[_DEFAULT_PAGE_SIZE]
    return best, found[best], sampled[best]


def _looks_like_btree_page(data: bytes, at: int, start: int, page_size: int) -> bool:
    """True if `data[at:at + page_size]` reads as a b-tree page of `page_size` bytes (its header at `start`):
    a b-tree page type, a cell content area and every cell pointer inside the page, a first freeblock (if any)
    in the content area, and at most 60 fragmented bytes (the file format's limit)."""
    head = at + start
    kind = data[head]
    if kind not in (_TABLE_LEAF, _TABLE_INTERIOR, _INDEX_LEAF, _INDEX_INTERIOR):
        return False
    freeblock, cells, content, fragmented = struct.unpack_from(">HHHB", data, head + 1)
    content = content or 65536
    pointers = start + (12 if kind in (_TABLE_INTERIOR, _INDEX_INTERIOR) else 8)
    if not pointers + 2 * cells <= content <= page_size or fragmented > 60:
        return False
    if freeblock and not content <= freeblock <= page_size - 4:
        return False
    if not cells:
        return True
    offsets = struct.unpack_from(f">{cells}H", data, at + pointers)
    return min(offsets) >= content and max(offsets) <= page_size - 4


def _page_size(raw: bytes) -> Optional[int]:
    """The page size the database header's two bytes give (1 means 65536), or None if it is not one."""
    value = struct.unpack(">H", raw)[0]
    size = 65536 if value == 1 else value
    return size if _valid_page_size(size) else None


def _valid_page_size(size: int) -> bool:
    return 512 <= size <= 65536 and size & (size - 1) == 0


def _committed_frames(wal_path: str) -> Tuple[Dict[int, int], Optional[int], int]:
    """{page number: offset of its newest committed frame} of a WAL file, its page size, and the database's
    size in pages at its last commit.

    A frame counts only if its salts match the WAL header and its checksum chain holds, and only up to
    the last commit frame: what SQLite itself would read back.
    """
    try:
        with open(wal_path, "rb") as wal:  # frame by frame: a WAL may be far larger than memory allows
            return _frames_of(wal)
    except OSError:
        return {}, None, 0


def _frames_of(wal: BinaryIO) -> Tuple[Dict[int, int], Optional[int], int]:
    header = wal.read(32)
    if len(header) < 32:
        return {}, None, 0
    magic, _, page_size, _, salt1, salt2 = struct.unpack(">IIIIII", header[:24])
    if not wal_header_ok(header) or not _valid_page_size(page_size):
        return {}, None, 0
    order = ">" if magic & 1 else "<"
    checksum = _checksum(order, header[:24], (0, 0))
    committed: Dict[int, int] = {}
    pending: Dict[int, int] = {}
    declared = 0
    offset = 32
    while True:
        frame = wal.read(24 + page_size)
        if len(frame) < 24 + page_size:
            break
        number, commit, frame_salt1, frame_salt2, sum1, sum2 = struct.unpack(">IIIIII", frame[:24])
        if (frame_salt1, frame_salt2) != (salt1, salt2):
            break
        checksum = _checksum(order, frame[:8], checksum)
        checksum = _checksum(order, frame[24:], checksum)
        if checksum != (sum1, sum2):
            break
        pending[number] = offset + 24
        if commit:
            committed.update(pending)
            pending.clear()
            declared = commit
        offset += 24 + page_size
    return committed, page_size, declared


def wal_header_ok(header: bytes) -> bool:
    """True if `header` (a WAL file's first 32 bytes) is one SQLite accepts: its magic and its checksum.
    SQLite ignores every frame of a WAL whose header it rejects."""
    if len(header) < 32:
        return False
    magic = int.from_bytes(header[:4], "big")
    if magic not in _WAL_MAGICS:
        return False
    order = ">" if magic & 1 else "<"
    return _checksum(order, header[:24], (0, 0)) == struct.unpack(">II", header[24:32])


def _checksum(order: str, data: bytes, start: Tuple[int, int]) -> Tuple[int, int]:
    """SQLite's WAL checksum over `data` (a multiple of 8 bytes), continuing from `start`."""
    s0, s1 = start
    words = struct.unpack(f"{order}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def _freelist(pages: _Pages) -> Set[int]:
    """The pages on the file's freelist (trunks and leaves), as far as its chain can be read."""
    first = pages.get(1)
    if first is None or first[:16] != _MAGIC:
        return set()
    free: Set[int] = set()
    trunk = struct.unpack(">I", first[32:36])[0]
    while trunk and trunk not in free and len(free) <= pages.count:
        page = pages.get(trunk)
        if page is None:
            break
        free.add(trunk)
        following, leaves = struct.unpack(">II", page[:8])
        if leaves > (pages.usable - 8) // 4:
            break
        free.update(struct.unpack(f">{leaves}I", page[8:8 + 4 * leaves]))
        trunk = following
    return free


def _leaf_rows(pages: _Pages, number: int, page: bytes, start: int, overflow: Set[int],
               census: Census) -> Optional[List[Row]]:
    """The rows of one table-leaf page, or None when its header makes no sense (not a leaf after all)."""
    cells = struct.unpack(">H", page[start + 3:start + 5])[0]
    pointers_end = start + 8 + 2 * cells
    if pointers_end > pages.usable:
        return None
    rows: List[Row] = []
    for index in range(cells):
        pointer = struct.unpack(">H", page[start + 8 + 2 * index:start + 10 + 2 * index])[0]
        try:
            if not pointers_end <= pointer < pages.usable:
                raise ValueError("cell pointer outside the page")
            rows.append(_cell(pages, number, page, pointer, overflow))
        except (ValueError, IndexError, struct.error, UnicodeDecodeError):
            census.damaged_cells += 1
    return rows


def _cell(pages: _Pages, number: int, page: bytes, at: int, overflow: Set[int]) -> Row:
    size, at = _varint(page, at)
    rowid, at = _varint(page, at)
    if rowid >= 1 << 63:
        rowid -= 1 << 64
    usable = pages.usable
    local = _local_size(size, usable)
    if at + local > usable:
        raise ValueError("cell runs past its page")
    payload = page[at:at + local]
    if local < size:
        payload += _overflow(pages, struct.unpack(">I", page[at + local:at + local + 4])[0], size - local, overflow)
    return Row(number, rowid, _record(payload))


def _local_size(size: int, usable: int) -> int:
    """How much of a payload of `size` bytes a table-leaf cell holds on its own page (the file format's rule)."""
    most = usable - 35
    if size <= most:
        return size
    least = (usable - 12) * 32 // 255 - 23
    local = least + (size - least) % (usable - 4)
    return local if local <= most else least


def _overflow(pages: _Pages, first: int, length: int, overflow: Set[int]) -> bytes:
    parts: List[bytes] = []
    number, left, seen = first, length, set()
    while left > 0:
        page = pages.get(number) if number not in seen else None
        if page is None:
            raise ValueError(f"overflow page {number} is missing")
        seen.add(number)
        chunk = page[4:pages.usable][:left]
        parts.append(chunk)
        left -= len(chunk)
        number = struct.unpack(">I", page[:4])[0]
    overflow.update(seen)
    return b"".join(parts)


def _record(payload: bytes) -> Tuple[Value, ...]:
    """The column values of one record (SQLite's record format), strictly: any inconsistency raises."""
    header_size, at = _varint(payload, 0)
    if not at <= header_size <= len(payload):
        raise ValueError("record header out of bounds")
    types: List[int] = []
    while at < header_size:
        serial, at = _varint(payload, at)
        types.append(serial)
    if at != header_size:
        raise ValueError("record header overruns")
    values: List[Value] = []
    body = header_size
    for serial in types:
        value, body = _value(payload, body, serial)
        values.append(value)
    if body != len(payload):
        raise ValueError("record body does not fill the payload")
    return tuple(values)


_INT_SIZES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}


def _value(payload: bytes, at: int, serial: int) -> Tuple[Value, int]:
    if serial == 0:
        return None, at
    if serial in _INT_SIZES:
        width = _INT_SIZES[serial]
        if at + width > len(payload):
            raise ValueError("integer past the payload")
        return int.from_bytes(payload[at:at + width], "big", signed=True), at + width
    if serial == 7:
        if at + 8 > len(payload):
            raise ValueError("float past the payload")
        return struct.unpack(">d", payload[at:at + 8])[0], at + 8
    if serial in (8, 9):
        return serial - 8, at
    if serial < 12:
        raise ValueError(f"reserved serial type {serial}")
    length = (serial - 12) // 2
    if at + length > len(payload):
        raise ValueError("text or blob past the payload")
    raw = payload[at:at + length]
    return (raw if serial % 2 == 0 else raw.decode("utf-8")), at + length


def _varint(data: bytes, at: int) -> Tuple[int, int]:
    """SQLite's big-endian varint at `at`: (value, offset after it)."""
    value = 0
    for i in range(8):
        byte = data[at + i]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, at + i + 1
    return (value << 8) | data[at + 8], at + 9
