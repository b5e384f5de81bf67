"""A preallocated key/value cache with ragged per-sequence lengths, safe to train through."""
from typing import List, Optional, Union

import torch

from fastlab.ops.kvcache import Chunk, check_new_tokens, kvcache_append


class KVCache:
    """Keys and values of ``batch`` sequences, preallocated to ``max_len`` slots each.

    Storage is (batch, kv_heads, max_len, head_dim) for keys and for values; ``lengths``
    (a (batch,) int32 tensor on ``device``) says how many leading slots of each sequence
    are live. Sequences may have different lengths (prefill of prompts of different
    lengths, per-sequence rollback).

    * :meth:`append` writes new keys/values after each sequence's live slots;
      :func:`fastlab.ops.attention_with_kvcache` does the same fused with attention.
    * :meth:`truncate` rolls sequences back to a length; :meth:`reset` empties the cache.
    * :attr:`k` / :attr:`v` are views of the slots up to the longest sequence (slots at and
      beyond ``lengths[b]`` are not live for sequence b).

    Lengths live on the device, so checking capacity must not read them back at every
    decoding step: the cache keeps a host-side upper bound of the longest sequence, exact
    while all sequences share one length, and only when that bound says an append might not
    fit does it read the exact lengths (one host sync).

    Training: keys/values appended while autograd records (they require grad) are kept as
    chunks; attention over the cache sends each chunk the gradient of the slots it was
    written to, so a model can append and attend over several forward steps and backprop
    through all of them (see :mod:`fastlab.ops.kvcache`). :meth:`reset` drops the chunks.
    """

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32,
                 device: Optional[Union[str, torch.device]] = None):
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("max_len", max_len),
                            ("head_dim", head_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        shape = (batch, kv_heads, max_len, head_dim)
        self.k_buffer = torch.empty(shape, dtype=dtype, device=device)
        self.v_buffer = torch.empty(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=self.k_buffer.device)
        self.batch, self.kv_heads, self.max_len, self.head_dim = batch, kv_heads, max_len, head_dim
        self.dtype, self.device = dtype, self.k_buffer.device
        self._bound = 0          # host upper bound of max(lengths)
        self._uniform = True     # all lengths equal _bound exactly
        self.chunks: List[Chunk] = []
        # Truncations/resets so far, and the count at the last append that followed one:
        # an attention that read the cache before a truncation sees its slots overwritten
        # once an append follows it.
        self.shrink_count = 0
        self.overwrite_count = 0

    # ------------------------------------------------------------------ views and bounds
    @property
    def k(self) -> torch.Tensor:
        """Keys (batch, kv_heads, longest length, head_dim): a view, not a copy."""
        return self.k_buffer[:, :, :self._bound]

    @property
    def v(self) -> torch.Tensor:
        """Values (batch, kv_heads, longest length, head_dim): a view, not a copy."""
        return self.v_buffer[:, :, :self._bound]

    @property
    def length_bound(self) -> int:
        """A host-side upper bound of the longest live length (exact when :attr:`uniform`)."""
        return self._bound

    @property
    def uniform(self) -> bool:
        """True when every sequence is known, on the host, to have ``length_bound`` tokens."""
        return self._uniform

    def reserve(self, n_new: int, new_lens: Optional[torch.Tensor] = None) -> None:
        """Raise ValueError unless ``n_new`` tokens (or ``new_lens[b]``) fit every sequence."""
        if self._bound + n_new <= self.max_len:
            return
        if not self._uniform:
            # The bound is loose after ragged appends or rollbacks: read the exact lengths
            # (one host sync, only when the bound alone cannot rule out an overflow).
            self._bound = int(self.lengths.max())
            needed = self.lengths if new_lens is None else self.lengths + new_lens
            if int((needed + (n_new if new_lens is None else 0)).max()) <= self.max_len:
                return
        raise ValueError(
            f"appending {n_new} tokens to a cache whose longest sequence holds {self._bound} "
            f"would exceed max_len {self.max_len}")

    def appended(self, n_new: int, new_lens: Optional[torch.Tensor] = None) -> None:
        """Update the host bookkeeping after ``n_new`` tokens were written."""
        if n_new == 0:
            return
        self._bound = min(self._bound + n_new, self.max_len)
        self._uniform = self._uniform and new_lens is None
        self.overwrite_count = self.shrink_count

    # ------------------------------------------------------------------ mutation
    def append(self, k: torch.Tensor, v: torch.Tensor,
               new_lens: Optional[torch.Tensor] = None) -> None:
        """Append k/v (batch, kv_heads, n, head_dim) to every sequence.

        With ``new_lens`` (batch,) only the first ``new_lens[b]`` tokens go to sequence b.
        Raises (leaving the cache unchanged) if anything does not fit.
        """
        new_lens = check_new_tokens(self, k, v, new_lens)
        n_new = k.shape[2]
        self.reserve(n_new, new_lens)
        record = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        start = self.lengths.long() if record else None  # a copy, taken before the append
        kvcache_append(self.k_buffer, self.v_buffer, self.lengths, k.detach(), v.detach(),
                       new_lens)
        if record:
            end = start + (new_lens.long() if new_lens is not None else n_new)
            self.chunks.append(Chunk(k, v, start, end))
        self.appended(n_new, new_lens)

    def truncate(self, length: Union[int, torch.Tensor]) -> None:
        """Roll every sequence back to at most ``length`` tokens (an int, or (batch,) tensor).

        Sequences already shorter are left as they are; slots past the new lengths are
        dropped (and overwritten by the next append).
        """
        if isinstance(length, torch.Tensor):
            if length.dtype.is_floating_point or length.dtype == torch.bool:
                raise TypeError(f"length must be an integer tensor, got {length.dtype}")
            if length.shape != (self.batch,):
                raise ValueError(f"length must have shape ({self.batch},), got "
                                 f"{tuple(length.shape)}")
            if length.device != self.device:
                raise ValueError(f"length is on {length.device} but the cache is on "
                                 f"{self.device}")
            if bool((length < 0).any()):  # host sync: a rollback is not a per-token step
                raise ValueError(f"length must be >= 0, got {length.tolist()}")
            torch.minimum(self.lengths, length.to(torch.int32), out=self.lengths)
            self._uniform = False
        elif isinstance(length, int) and not isinstance(length, bool):
            if length < 0:
                raise ValueError(f"length must be >= 0, got {length}")
            self.lengths.clamp_(max=length)
            self._bound = min(self._bound, length)
        else:
            raise TypeError(f"length must be an int or a tensor, got {type(length).__name__}")
        self.shrink_count += 1
        if self.chunks:
            live = self.lengths.long()
            self.chunks = [c._replace(end=torch.minimum(c.end, live)) for c in self.chunks]

    def reset(self) -> None:
        """Empty every sequence and forget the chunks kept for autograd."""
        self.lengths.zero_()
        self._bound, self._uniform = 0, True
        self.chunks = []
        self.shrink_count += 1

    def __repr__(self) -> str:
        return (f"KVCache(batch={self.batch}, kv_heads={self.kv_heads}, max_len={self.max_len}, "
                f"head_dim={self.head_dim}, dtype={self.dtype}, device={self.device}, "
                f"length_bound={self._bound})")
