"""Numpy arrays between ranks: gathered over a group (``gather_rows``: a rollout split over ranks),
sent point to point (``send_arrays`` / ``recv_arrays``: between resource pools), and the small
collectives a pool's ranks agree by (``all_messages``, ``mean_over``).  No fleet here: plain
process groups."""

from __future__ import annotations

import numpy as np
import paddle
import paddle.distributed as dist


def gather_rows(arrays: dict, group) -> dict:
    """Concatenate each array of ``arrays`` (numpy, rows first) over ``group`` in rank order.

    Arrays of rank >= 2 are padded on axis 1 to the longest over the group (with the value given
    as ``arrays['_pad'][name]``, default 0) before gathering.
    """
    pads = arrays.get("_pad", {})
    arrays = {name: np.asarray(a) for name, a in arrays.items() if name != "_pad"}
    # the longest axis 1 of every array over the group, in one gather
    local = np.array([a.shape[1] if a.ndim >= 2 else 0 for a in arrays.values()], dtype=np.int64)
    gathered = []
    dist.all_gather(gathered, paddle.to_tensor(local), group=group)
    widths = np.max([g.numpy() for g in gathered], axis=0)
    out = {}
    for (name, a), width in zip(arrays.items(), widths):
        dtype = a.dtype
        work = a.astype(np.int64) if dtype == np.bool_ else a
        if work.ndim >= 2 and work.shape[1] < width:
            pad = [(0, 0)] * work.ndim
            pad[1] = (0, int(width) - work.shape[1])
            work = np.pad(work, pad, constant_values=pads.get(name, 0))
        parts = []
        dist.all_gather(parts, paddle.to_tensor(work), group=group)
        out[name] = np.concatenate([p.numpy() for p in parts]).astype(dtype)
    return out


_DTYPES = {0: np.int64, 1: np.float32, 2: np.float64}
_HEADER = 33  # int64 words: count, then per array its dtype code, ndim and 2 dims (up to 8 arrays)


def send_arrays(arrays: list, dst: int, group) -> None:
    """Send numpy arrays (int64 / float32 / float64, rank <= 2, at most 8) to world rank ``dst`` over
    ``group`` (the two ranks' link): a fixed-size header with their dtypes and shapes, then each
    array (``recv_arrays`` there)."""
    header = [len(arrays)]
    for a in arrays:
        code = next((c for c, t in _DTYPES.items() if np.dtype(t) == a.dtype), None)
        if code is None or a.ndim > 2:
            raise ValueError(f"send_arrays carries int64 / float32 / float64 arrays of rank <= 2, got {a.dtype} "
                             f"of rank {a.ndim}")
        header += [code, a.ndim, *a.shape, *([0] * (2 - a.ndim))]
    assert len(header) <= _HEADER, "too many arrays for one message"
    dist.send(paddle.to_tensor(np.array(header + [0] * (_HEADER - len(header)), dtype=np.int64)), dst=dst,
              group=group)
    for a in arrays:
        dist.send(paddle.to_tensor(np.ascontiguousarray(a)), dst=dst, group=group)


def recv_arrays(src: int, group) -> list:
    """The arrays ``send_arrays`` sent from world rank ``src`` over ``group``."""
    header = paddle.zeros([_HEADER], dtype="int64")
    dist.recv(header, src=src, group=group)
    h = header.numpy().tolist()
    out, at = [], 1
    for _ in range(h[0]):
        dtype, ndim, dims = _DTYPES[h[at]], h[at + 1], h[at + 2:at + 4]
        at += 4
        t = paddle.zeros([int(d) for d in dims[:ndim]], dtype=np.dtype(dtype).name)
        dist.recv(t, src=src, group=group)
        out.append(t.numpy())
    return out


def text_array(text: str) -> np.ndarray:
    """A string as an int64 array for ``send_arrays``: a 0, then its UTF-8 bytes (never empty)."""
    return np.concatenate([[0], np.frombuffer(text.encode("utf-8"), dtype=np.uint8)]).astype(np.int64)


def array_text(array) -> str:
    """The string of ``text_array``."""
    return np.asarray(array[1:], dtype=np.uint8).tobytes().decode("utf-8")


def all_messages(message: str, group) -> list:
    """Every rank's ``message`` over ``group``, in rank order (a group of one rank: None)."""
    if group is None or group.nranks <= 1:
        return [message]
    out: list = []
    dist.all_gather_object(out, message, group=group)
    return out


def mean_over(value: float, group) -> float:
    """The mean of a python float over ``group`` (the value itself without one)."""
    if group is None:
        return float(value)
    t = paddle.to_tensor(np.array([value], dtype=np.float64))
    dist.all_reduce(t, group=group)
    return float(t.numpy()[0]) / group.nranks

