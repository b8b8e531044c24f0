"""Streaming safetensors I/O: read one tensor at a time, write shards without holding them.

Reading uses plain positioned reads (no mmap) so resident memory stays at one tensor; writing
plans each shard's header from the declared (name, dtype, shape) list first and then streams the
tensors' bytes, so a checkpoint of any size is written holding two tensors at a time: the one
being written and the next one, produced meanwhile in a background thread (file I/O and torch or
numpy work release the GIL, so computing and writing overlap). Untouched tensors are copied byte
for byte from the source file (dtype and bits kept).
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from realign.errors import RealignError

T = TypeVar("T")
R = TypeVar("R")

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_COPY_CHUNK = 16 << 20


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise RealignError(f"dtype {dtype} cannot be stored in safetensors")
    return DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor locations and the ``__metadata__`` of one safetensors file."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 << 20:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as e:
        raise RealignError(f"{path} is not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise RealignError(f"{path} is not a readable safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + size
    infos: dict[str, TensorInfo] = {}
    try:
        for name, h in header.items():
            if h["dtype"] not in DTYPES:
                raise RealignError(f"{path}: tensor {name} has dtype {h['dtype']}, which realign does not handle")
            begin, end = (int(x) for x in h["data_offsets"])
            shape = tuple(int(d) for d in h["shape"])
            if not 0 <= begin <= end or end - begin != math.prod(shape) * DTYPES[h["dtype"]].itemsize:
                raise ValueError(f"tensor {name}: offsets {begin}..{end} do not fit its shape {list(shape)}")
            infos[name] = TensorInfo(name, h["dtype"], shape, path, base + begin, end - begin)
    except (KeyError, TypeError, ValueError) as e:
        raise RealignError(f"{path} is not a readable safetensors file ({e})") from None
    # A truncated download or copy keeps its header: check that every tensor's bytes are there.
    needed = base + max((i.start - base + i.nbytes for i in infos.values()), default=0)
    actual = path.stat().st_size
    if actual < needed:
        raise RealignError(f"{path} is truncated: its header needs {needed} bytes, the file has {actual}; download "
                           "or copy it again")
    return infos, meta


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor into fresh memory with its stored dtype (no mmap, no zero-fill)."""
    raw = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        view = memoryview(raw.numpy())
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.start)
            got = 0
            while got < info.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise RealignError(f"{info.file} is truncated (tensor {info.name})")
                got += n
    return raw.view(info.torch_dtype).reshape(info.shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


@dataclass
class OutTensor:
    """One tensor of an output checkpoint: its declared layout and how to get its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    # Either a source to copy byte for byte, or a function that produces the tensor.
    copy_from: TensorInfo | None = None
    produce: Callable[[], torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=DTYPES[self.dtype]).element_size()


def plan_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header_bytes(shard: list[OutTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _libc_fallocate():
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (AttributeError, OSError):
        return None  # not Linux: no preallocation
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    return fn


_FALLOCATE = _libc_fallocate()


def preallocate(fd: int, size: int, path: Path) -> None:
    """Reserve a file's blocks before writing it: on ext4 streaming into preallocated blocks is
    several times faster than growing the file (bench/io.py), and a full disk fails here, at
    once, instead of after minutes of work. Filesystems without fallocate are simply skipped
    (glibc's posix_fallocate would emulate it by writing every block)."""
    if _FALLOCATE is None or size <= 0:
        return
    if _FALLOCATE(fd, 0, 0, size) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT):
            raise RealignError(f"not enough disk space for {path} ({size / 1e9:.2f} GB): free space or choose "
                               "another --out")


def _copy_range(src: TensorInfo, out) -> None:
    """Copy a tensor's bytes file to file: in the kernel (copy_file_range) where it can, else by chunks."""
    out.flush()
    begin = out.tell()
    with open(src.file, "rb") as f:
        if hasattr(os, "copy_file_range"):
            try:
                done = 0
                while done < src.nbytes:
                    n = os.copy_file_range(f.fileno(), out.fileno(), src.nbytes - done, src.start + done, begin + done)
                    if n == 0:
                        raise RealignError(f"{src.file} is truncated (tensor {src.name})")
                    done += n
                out.seek(begin + done)
                return
            except OSError:
                out.seek(begin)  # e.g. a filesystem without copy_file_range: start over by chunks
        f.seek(src.start)
        left = src.nbytes
        while left:
            chunk = f.read(min(_COPY_CHUNK, left))
            if not chunk:
                raise RealignError(f"{src.file} is truncated (tensor {src.name})")
            out.write(chunk)
            left -= len(chunk)


def prefetched(items: Iterable[T], load: Callable[[T], R], ahead: int = 1) -> Iterator[tuple[T, R]]:
    """(item, load(item)) in order, with up to ``ahead`` further items loading in a background
    thread while the caller works on the current one: the I/O of the next tensor overlaps the
    work on this one, and at most ``ahead + 1`` results are held."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="realign-prefetch") as pool:
        pending: deque[tuple[T, Future[R]]] = deque()
        try:
            for item in items:
                pending.append((item, pool.submit(load, item)))
                if len(pending) > ahead:
                    yield _take(pending)
            while pending:
                yield _take(pending)
        finally:
            for _, future in pending:
                future.cancel()


def _take(pending: deque) -> tuple:
    # A function of its own, so no frame keeps the handed-out result alive after the caller drops it.
    head, future = pending.popleft()
    return head, future.result()


def write_safetensors_stream(
    path: Path, shard: Iterable[OutTensor], metadata: dict[str, str] | None = None, on_tensor=None
) -> None:
    """Write one safetensors file, holding at most two produced tensors in memory (the next one is
    produced while this one is written)."""
    shard = list(shard)
    header = _header_bytes(shard, metadata or {})
    produced = prefetched([t for t in shard if t.copy_from is None], lambda t: t.produce())  # type: ignore[misc]
    with closing(produced), open(path, "wb") as out:
        preallocate(out.fileno(), len(header) + sum(t.nbytes for t in shard), path)
        out.write(header)
        for t in shard:
            if t.copy_from is not None:
                _copy_range(t.copy_from, out)
            else:
                assert t.produce is not None
                _, value = next(produced)
                if tuple(value.shape) != t.shape or dtype_name(value.dtype) != t.dtype:
                    raise RealignError(
                        f"internal: tensor {t.name} was declared {t.dtype}{list(t.shape)} "
                        f"but produced {dtype_name(value.dtype)}{list(value.shape)}"
                    )
                out.write(tensor_bytes(value))
                del value
            if on_tensor is not None:
                on_tensor(t)


def write_sharded(
    out_dir: Path,
    tensors: list[OutTensor],
    max_shard_bytes: int = 5 << 30,
    metadata: dict[str, str] | None = None,
    basename: str = "model",
    on_tensor=None,
) -> list[Path]:
    """Write tensors as ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index."""
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise RealignError("internal: duplicate tensor names in output")
    shards = plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        files = [out_dir / f"{basename}.safetensors"]
    else:
        files = [out_dir / f"{basename}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    meta = {"format": "pt", **(metadata or {})}
    for file, shard in zip(files, shards, strict=True):
        write_safetensors_stream(file, shard, meta, on_tensor)
        weight_map.update({t.name: file.name for t in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        (out_dir / f"{basename}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def parse_size(text: str | int) -> int:
    """A size as huggingface_hub reads one ('5GB', '500MB', 'TB/GB/MB/KB', decimal), or a byte count
    in digits. Anything else is refused rather than guessed: '5B' (5 bytes or 5 billion?), '5G',
    '2GiB'."""
    from huggingface_hub.serialization._base import parse_size_to_int

    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    elif isinstance(text, str) and text.strip().isdigit():
        size = int(text.strip())
    else:
        try:
            size = parse_size_to_int(str(text))
        except ValueError:
            raise RealignError(f"cannot read size {text!r}: use a number with TB, GB, MB or KB (e.g. 5GB, 500MB), "
                               "or a byte count in digits") from None
    if size < 1:
        raise RealignError(f"size {text!r} must be at least 1 byte")
    return size


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
