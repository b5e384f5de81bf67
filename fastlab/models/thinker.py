"""Latent-memory "thinker" (Perceiver-AR style): ``n_latent`` latent vectors work on the
input over ``n_step`` steps, write what they hold to a memory, and the output is decoded
from that memory, every output position at once.

Plan. A step runs the ops of its plan in order; every step runs the same ops with the same
weights, and a learned step embedding added to the latents at the start of each step tells
the steps apart. After the last step the ``output`` op decodes. The ops:

- ``read_input``: the latents cross-attend to the embedded input (every position), then an
  MLP.
- ``mem_lookup``: the latents attend over the memory written so far (earlier steps, and
  earlier ``mem_write`` ops of this step), then an MLP. Before the first write there is no
  key to attend to and the op is its MLP alone.
- ``mem_write``: the keys and values of the latents are appended to the memory (``n_latent``
  more slots). One projection serves every write, so all readers query one key space.
- ``output``: ``output_len`` learned queries attend over the whole memory, then an MLP and
  the vocabulary head: logits (B, output_len, vocab_size).

Each reading op (``read_input``, ``mem_lookup``, ``output``) is ``n_layer`` pre-norm
residual blocks of attention and MLP. ``plan`` is a preset of :data:`PLANS` or the ops of
one step joined by ``+`` (``output`` always follows the last step and is not named).

Memory. A :class:`fastlab.nn.KVCache` of ``n_step x writes per step x n_latent`` slots: a
write appends, a read attends over the live slots through
:func:`fastlab.ops.attention_with_kvcache`. No read is masked: the cache holds only what
was written before the read, so the order of the writes is the causal order. Training runs
through the cache: it keeps every appended chunk for autograd and writes their values into
a buffer autograd never sees, so gradients reach every step and no later append modifies a
tensor an earlier read saved (autograd's in-place error of a cache written in place). Under
``torch.compile`` the memory's reads and writes stay eager (graph breaks; see
``_Memory.write``).
``forward(inputs, use_cache=False)`` computes the same function with the memory as a
``torch.cat`` of the written keys and values read by :func:`fastlab.ops.attention`: the
reference the cache is tested against.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from fastlab.nn.attention import Attention
from fastlab.nn.kvcache import KVCache
from fastlab.ops.attention import attention
from fastlab.ops.kvcache import attention_with_kvcache

#: the ops a step may run, in any order and number (at least one mem_write)
STEP_OPS = ("read_input", "mem_lookup", "mem_write")
#: the two plans of the base-16 addition log
PLANS = {
    "read_write": ("read_input", "mem_write"),
    "read_lookup_write": ("read_input", "mem_lookup", "mem_write"),
}


def parse_plan(plan: str, option: str = "plan") -> Tuple[str, ...]:
    """The ops of one step: the preset ``plan`` of :data:`PLANS`, or op names of
    :data:`STEP_OPS` joined by ``+``. Errors are ValueErrors naming ``option``."""
    if not isinstance(plan, str):
        raise ValueError(f"{option} must be a string, got {type(plan).__name__} {plan!r}")
    if plan in PLANS:
        return PLANS[plan]
    ops = tuple(op.strip() for op in plan.split("+"))
    if "output" in ops:
        raise ValueError(f"{option}={plan!r}: output runs once after the last step; name only "
                         f"the ops of a step")
    unknown = [op for op in ops if op not in STEP_OPS]
    if unknown:
        raise ValueError(f"{option} must be a preset {sorted(PLANS)} or ops of {STEP_OPS} "
                         f"joined by '+', got {plan!r} (unknown op {unknown[0]!r})")
    if "mem_write" not in ops:
        raise ValueError(f"{option}={plan!r} never runs mem_write: the output would have no "
                         f"memory to read")
    return ops


@dataclass
class ThinkerConfig:
    vocab_size: int
    input_len: int
    output_len: int
    d_model: int = 16
    n_head: int = 8
    d_hid: int = 64
    n_layer: int = 1
    n_latent: int = 8
    n_step: int = 2
    plan: str = "read_write"
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "input_len", "output_len", "d_model", "n_head", "d_hid",
                     "n_layer", "n_latent", "n_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head "
                             f"({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        parse_plan(self.plan)

    @property
    def step_ops(self) -> Tuple[str, ...]:
        return parse_plan(self.plan)

    @property
    def memory_len(self) -> int:
        """Memory slots after the last step."""
        return self.n_step * self.step_ops.count("mem_write") * self.n_latent

    @classmethod
    def from_model_config(cls, model_cfg, *, vocab_size: int, input_len: int,
                          output_len: int) -> "ThinkerConfig":
        """The thinker of the trainer's ``model.*`` options (``model.d_hid=0``: 4 x d_model)."""
        return cls(vocab_size=vocab_size, input_len=input_len, output_len=output_len,
                   d_model=model_cfg.d_model, n_head=model_cfg.n_head,
                   d_hid=model_cfg.d_hid or 4 * model_cfg.d_model, n_layer=model_cfg.n_layer,
                   n_latent=model_cfg.n_latent, n_step=model_cfg.n_step, plan=model_cfg.plan,
                   dropout=model_cfg.dropout)


def _mlp(cfg: ThinkerConfig) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, cfg.d_hid),
                         nn.GELU(), nn.Linear(cfg.d_hid, cfg.d_model), nn.Dropout(cfg.dropout))


class _Memory:
    """The memory of one forward: keys and values (B, n_head, slots, head_dim), in a KVCache
    or, for the reference, in lists concatenated at every read."""

    def __init__(self, cfg: ThinkerConfig, batch: int, use_cache: bool):
        self.cfg, self.batch, self.use_cache = cfg, batch, use_cache
        self.cache: Optional[KVCache] = None
        self.keys: List[torch.Tensor] = []
        self.values: List[torch.Tensor] = []

    @property
    def empty(self) -> bool:
        return self.cache is None and not self.keys

    # Eager even inside a compiled forward: traced by torch.compile, the cache's read
    # saves a buffer alias whose version the next append bumps, and backward fails with
    # autograd's in-place error; run eagerly, the alias keeps its own version counter.
    @torch.compiler.disable
    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self.use_cache:
            self.keys.append(k)
            self.values.append(v)
            return
        if self.cache is None:
            # made at the first write, in the dtype the projections produce (the autocast
            # dtype under autocast), so reads and writes never convert
            self.cache = KVCache(self.batch, self.cfg.n_head, self.cfg.memory_len,
                                 self.cfg.d_model // self.cfg.n_head, k.dtype, k.device)
        self.cache.append(k, v)

    @torch.compiler.disable  # see write
    def read(self, q: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            return attention_with_kvcache(q.to(self.cache.dtype), self.cache,
                                          causal=False).to(q.dtype)
        return attention(q, torch.cat(self.keys, dim=2), torch.cat(self.values, dim=2))


class _InputRead(nn.Module):
    """The latents cross-attend to the embedded input, then an MLP."""

    def __init__(self, cfg: ThinkerConfig):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_head)
        self.mlp = _mlp(cfg)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln(x), context)
        return x + self.mlp(x)


class _MemoryRead(nn.Module):
    """Queries attend over the memory written so far, then an MLP."""

    def __init__(self, cfg: ThinkerConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.ln = nn.LayerNorm(cfg.d_model)
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.mlp = _mlp(cfg)

    def forward(self, x: torch.Tensor, memory: _Memory) -> torch.Tensor:
        if not memory.empty:
            b, s, _ = x.shape
            q = self.q_proj(self.ln(x)).view(b, s, self.n_head, self.head_dim).transpose(1, 2)
            y = memory.read(q)
            x = x + self.out_proj(y.transpose(1, 2).reshape(b, s, -1))
        return x + self.mlp(x)


class _MemoryWrite(nn.Module):
    """The keys and values of the latents, appended to the memory."""

    def __init__(self, cfg: ThinkerConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.ln = nn.LayerNorm(cfg.d_model)
        self.kv_proj = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, memory: _Memory) -> None:
        b, s, _ = x.shape
        k, v = self.kv_proj(self.ln(x)).view(b, s, 2, self.n_head, self.head_dim).unbind(2)
        memory.write(k.transpose(1, 2), v.transpose(1, 2))


class Thinker(nn.Module):
    """``forward(inputs)``: int64 tokens (B, input_len) -> logits (B, output_len, vocab_size)
    (see the module docstring for the plan and the memory)."""

    def __init__(self, cfg: ThinkerConfig):
        super().__init__()
        self.cfg = cfg
        self.step_ops = cfg.step_ops
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.input_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.ln_in = nn.LayerNorm(d)
        self.latents = nn.Parameter(torch.empty(cfg.n_latent, d))
        self.step_emb = nn.Parameter(torch.empty(cfg.n_step, d))
        # one stack of n_layer blocks per reading op of the step plan, in plan order
        self.reads = nn.ModuleList(
            nn.ModuleList((_InputRead if op == "read_input" else _MemoryRead)(cfg)
                          for _ in range(cfg.n_layer))
            for op in self.step_ops if op != "mem_write")
        self.write = _MemoryWrite(cfg)
        self.queries = nn.Parameter(torch.empty(cfg.output_len, d))
        self.decoder = nn.ModuleList(_MemoryRead(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for p in (self.latents, self.step_emb, self.queries):
            nn.init.normal_(p, std=0.02)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def plan(self) -> Tuple[str, ...]:
        """Every op a forward runs, in order: the step's ops n_step times, then output."""
        return self.step_ops * self.cfg.n_step + ("output",)

    def forward(self, inputs: torch.Tensor, *, use_cache: bool = True) -> torch.Tensor:
        """Logits (B, output_len, vocab_size) of ``inputs`` (B, input_len) int64 tokens.

        ``use_cache=False`` keeps the memory as concatenated tensors instead of a KVCache:
        the same function, the reference of the cache path.
        """
        cfg = self.cfg
        if (not isinstance(inputs, torch.Tensor) or inputs.dim() != 2
                or inputs.shape[1] != cfg.input_len):
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else inputs
            raise ValueError(f"inputs must be a (batch, input_len={cfg.input_len}) tensor, "
                             f"got {shape!r}")
        if inputs.dtype.is_floating_point or inputs.dtype == torch.bool:
            raise ValueError(f"inputs must be integer tokens, got dtype {inputs.dtype}")
        b = inputs.shape[0]
        pos = torch.arange(cfg.input_len, device=inputs.device)
        context = self.ln_in(self.drop(self.tok_emb(inputs) + self.pos_emb(pos)))
        memory = _Memory(cfg, b, use_cache)
        z = self.latents.expand(b, -1, -1)
        for step in range(cfg.n_step):
            z = z + self.step_emb[step]
            reads = iter(self.reads)
            for op in self.step_ops:
                if op == "mem_write":
                    self.write(z, memory)
                    continue
                for block in next(reads):
                    z = block(z, context if op == "read_input" else memory)
        x = self.queries.expand(b, -1, -1)
        for block in self.decoder:
            x = block(x, memory)
        return self.head(self.ln_f(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward = 3 x forward) of one sample divided by
        ``seq_len``, the tokens the task counts per sample: matmuls only, 2 per
        multiply-add."""
        cfg = self.cfg
        d, h = cfg.d_model, cfg.d_hid
        mlp = 4 * d * h
        read_input = cfg.n_latent * (4 * d * d + mlp) + cfg.input_len * 4 * d * d \
            + 4 * cfg.n_latent * cfg.input_len * d
        write = cfg.n_latent * 4 * d * d
        forward, written = 0, 0
        for op in self.step_ops * cfg.n_step:
            if op == "read_input":
                forward += cfg.n_layer * read_input
            elif op == "mem_write":
                forward += write
                written += cfg.n_latent
            elif written:
                forward += cfg.n_layer * cfg.n_latent * (4 * d * d + mlp + 4 * written * d)
            else:
                forward += cfg.n_layer * cfg.n_latent * mlp
        forward += cfg.n_layer * cfg.output_len * (4 * d * d + mlp + 4 * written * d)
        forward += 2 * cfg.output_len * d * cfg.vocab_size
        return 3 * forward / seq_len
