"""A token file read through a memory map, and windows of it gathered on a device.

Files. ``.npy`` files carry their dtype and shape in the header; ``.bin`` files are raw
little-endian tokens whose dtype the caller names. Tokens are ``uint16`` (vocabularies up
to 65536) or ``uint32``, in one 1-D sequence: documents joined with a separator token,
as :func:`fastlab.data.text.read_tokens` makes them.

Windows. ``window(starts, length)`` returns ``tokens[starts[i] : starts[i] + length]`` for
every i as one ``(n, length)`` int64 tensor, by one gather with no Python loop. On the
host it reads through the memory map, touching only the pages the windows lie on. For a
task, whose batches are computed on the device inside a captured step, ``to(device)``
first copies the tokens there once; the gather is then a device op with no host sync, so
``starts`` drawn on the device from (seed, step) give a batch that is a pure function of
them. The device copy keeps the file's 2 or 4 bytes per token: the unsigned tokens are
stored as the signed integers of the same width (same bits) and widened after the gather.
"""
import os
from typing import Optional, Union

import numpy as np
import torch

PathLike = Union[str, "os.PathLike[str]"]

TOKEN_DTYPES = (np.dtype(np.uint16), np.dtype(np.uint32))
#: the signed type of each token type's width, which torch stores and gathers everywhere
_SIGNED = {np.dtype(np.uint16): np.int16, np.dtype(np.uint32): np.int32}
_MASKS = {np.dtype(np.uint16): 0xFFFF, np.dtype(np.uint32): 0xFFFFFFFF}


class TokenStream:
    """The tokens of a ``.npy`` or ``.bin`` file, memory-mapped.

    Args:
        path: the file; ``.npy`` (dtype from its header) or anything else, read as raw
            tokens of ``dtype``.
        dtype: ``uint16`` or ``uint32`` (numpy dtype or its name); required for raw files,
            checked against the header for ``.npy``.
    """

    def __init__(self, path: PathLike, dtype: Optional[Union[str, np.dtype, type]] = None):
        name = os.fspath(path)
        if not os.path.isfile(name):
            raise FileNotFoundError(f"token file {name!r} does not exist or is not a file")
        want = None
        if dtype is not None:
            try:
                want = np.dtype(dtype)
            except TypeError:
                raise TypeError(f"dtype must be uint16 or uint32, got {dtype!r}") from None
            if want not in TOKEN_DTYPES:
                raise TypeError(f"dtype must be uint16 or uint32, got {want}")
        if name.lower().endswith(".npy"):
            try:
                tokens = np.load(name, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise ValueError(f"{name}: not a readable .npy file ({exc})") from None
            kind = np.dtype(f"{tokens.dtype.kind}{tokens.dtype.itemsize}")  # byte order aside
            if kind not in TOKEN_DTYPES or tokens.ndim != 1:
                raise ValueError(f"{name}: expected a 1-D uint16 or uint32 array, got "
                                 f"{tokens.dtype} of shape {tokens.shape}")
            if want is not None and kind != want:
                raise ValueError(f"{name}: holds {kind} tokens, dtype={want} was asked for")
        else:
            if want is None:
                raise ValueError(f"{name}: a raw token file needs dtype (uint16 or uint32)")
            size = os.path.getsize(name)
            if size % want.itemsize:
                raise ValueError(f"{name}: {size} bytes is not a whole number of {want} "
                                 f"tokens")
            # np.memmap cannot map an empty file
            tokens = (np.memmap(name, dtype=want.newbyteorder("<"), mode="r") if size
                      else np.zeros(0, want))
        self.path = name
        self.tokens = tokens
        #: the tokens' type in native byte order
        self.dtype = np.dtype(f"u{tokens.dtype.itemsize}")
        self._device_tokens: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def device(self) -> torch.device:
        """Where :meth:`window` gathers: the device of ``to(device)``, else the CPU."""
        return (torch.device("cpu") if self._device_tokens is None
                else self._device_tokens.device)

    def to(self, device: Union[str, torch.device]) -> "TokenStream":
        """Copy every token to ``device`` once (reads the whole file); returns self."""
        host = np.array(self.tokens, dtype=self.dtype).view(_SIGNED[self.dtype])
        self._device_tokens = torch.from_numpy(host).to(device)
        return self

    def window(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        """``(n, length)`` int64: the ``length`` tokens from each of ``starts`` ``(n,)``.

        ``starts`` must be on :attr:`device` and in ``[0, len(self) - length]``; values
        outside are clamped into it (checking them would read them back from the device,
        a host sync).
        """
        if not isinstance(starts, torch.Tensor) or starts.dtype not in (torch.int32,
                                                                       torch.int64):
            raise TypeError(f"starts must be an int32 or int64 tensor, got "
                            f"{getattr(starts, 'dtype', type(starts).__name__)}")
        if starts.dim() != 1:
            raise ValueError(f"starts must be 1-D, got shape {tuple(starts.shape)}")
        if not isinstance(length, int) or not 1 <= length <= len(self):
            raise ValueError(f"length must be an int in [1, {len(self)}] (the file's "
                             f"tokens), got {length!r}")
        if starts.device != self.device:
            raise ValueError(f"starts is on {starts.device} but the tokens are on "
                             f"{self.device}: call to({starts.device}) first")
        last = len(self) - length
        if self._device_tokens is None:
            first = starts.numpy().astype(np.int64).clip(0, last)
            rows = np.asarray(self.tokens[first[:, None] + np.arange(length)])
            return torch.from_numpy(rows.astype(np.int64))
        positions = starts.to(torch.int64).clamp(0, last)[:, None] + torch.arange(
            length, device=starts.device)
        return self._device_tokens[positions].to(torch.int64) & _MASKS[self.dtype]
