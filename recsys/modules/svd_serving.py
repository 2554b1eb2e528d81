"""Serving state for compact SVD-attention: a per-user factor cache and a
windowed incremental Gram state that answers requests without the history.

Shape legend:
    B  users (requests) in the batch
    L  history length
    C  candidates per user
    D  embedding dim
    R  rank
    W  window: the number of most recent events a state keeps

Compact attention (see `recsys.modules.svd_attention`) depends on a history
only through its Gram matrix G = X^T X, a sum over events. `IncrementalSVDState`
keeps G over the last W events: an event costs O(D^2) (one rank-1 update and,
once the window is full, one rank-1 down-date of the event it pushes out), and
a request costs O(D^3 + C D^2) whatever the history length. With W equal to
the number of events the ranker reads, min(`data.history_cap`,
`features.history_cap`) (the exported model's `serving_window` in ranker.json;
the data keeps the last of each history), a request served from the state sees
the same events the ranker's batch forward sees, and the two agree to float
tolerance (tested).

Numerics: the state has a fixed event dtype (events are cast to it) and a
fixed accumulator: gram_dtype "float64" sums in float64; "input" (what "auto"
means here: serving runs without autograd, like the batch path's "auto" under
torch.no_grad) sums in the event dtype, like the batch path's float32 GEMM.
Down-dates subtract, so rounding would drift; every W events the state
recomputes G from its ring buffer of the window's events (O(W D^2) every W
events: O(D^2) per event amortised), which bounds the drift. A down-date
also cancels: an event much larger than the rest leaves G with the rounding
error of its own square (in float32, 1e-7 of an event 1e4 times the others
was 50% of what remained), so the state also recomputes G once the energy
it has subtracted since the last recompute exceeds `CANCEL_RATIO` times
what G holds. Events must be finite: a NaN or inf one is refused (once in
G, subtraction cannot take it out again).

Example:
    >>> from recsys.modules.svd_attention import SVDAttention, SVDAttentionConfig
    >>> att = SVDAttention(SVDAttentionConfig(dim=8, rank=4))
    >>> state = IncrementalSVDState(dim=8, window=50).append(torch.randn(120, 8))
    >>> forward_from_state(att, [state], torch.randn(1, 5, 8)).shape
    torch.Size([1, 5, 8])
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from recsys.modules.svd_attention import SVDAttention, SVDFactors, svd_factors
from recsys.modules.svd_kernels import GRAM_DTYPES, GramDtype, rank_floor, tokens_from_spectrum, top_eigh

STATE_GRAM_DTYPES: tuple[GramDtype, ...] = GRAM_DTYPES
# recompute G when the energy down-dated since the last recompute passes this
# multiple of trace(G): the cancellation error then stays near 16 x the
# accumulator's epsilon of trace(G) (2e-6 in float32)
CANCEL_RATIO = 16.0


def history_fingerprint(history: Tensor, length: int) -> tuple[int, str]:
    """(length, short hash of the valid rows) of one user's history (L, D): a cheap cache key.

    O(L D) bytes hashed, versus O(L D^2) for the factorisation it guards; a
    caller with a version counter (e.g. `IncrementalSVDState.count`) can use
    (length, version) instead.
    """
    rows = history[:length].detach().to("cpu").contiguous()
    digest = hashlib.blake2b(rows.view(torch.uint8).numpy().tobytes(), digest_size=12).hexdigest()
    return length, digest


class FactorCache:
    """Per-user SVD factors, reused while the history is unchanged.

    One entry per user key: (fingerprint, rank) -> detached factors (float64-
    derived, stored in the history's dtype). A request with the same fingerprint
    and rank is a hit; a new fingerprint recomputes and replaces the entry.
    Least recently used users are evicted beyond `max_entries`. `keep_u=False`
    stores only S, V and the full spectrum (all that compact needs; truncated
    recomputes U S = X V). Counters `hits` and `misses` count lookups.
    """

    def __init__(self, max_entries: int = 10_000, keep_u: bool = True) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.keep_u = keep_u
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, tuple[Hashable, int, SVDFactors]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, user_key: Hashable, fingerprint: Hashable, history: Tensor, length: int, rank: int) -> SVDFactors:
        """Factors of one user's history (L, D): U (1, length, R) or None, S (1, R), V (1, D, R), S_all, V_all."""
        entry = self._entries.get(user_key)
        if entry is not None and entry[0] == fingerprint and entry[1] == rank:
            self.hits += 1
            self._entries.move_to_end(user_key)
            return entry[2]
        self.misses += 1
        with torch.no_grad():
            f = svd_factors(history[None, :length], torch.tensor([length]), rank)
        factors = SVDFactors(f.U if self.keep_u else None, f.S, f.V, f.S_all, f.V_all)
        self._entries[user_key] = (fingerprint, rank, factors)
        self._entries.move_to_end(user_key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return factors

    def get_batch(
        self,
        user_keys: Sequence[Hashable],
        fingerprints: Sequence[Hashable],
        history: Tensor,
        lengths: Tensor,
        rank: int,
    ) -> SVDFactors:
        """Factors for a padded batch (B, L, D): U zero-padded to (B, L, R) (or None)."""
        got = [
            self.get(k, fp, history[i], int(lengths[i]), rank)
            for i, (k, fp) in enumerate(zip(user_keys, fingerprints, strict=True))
        ]
        s = torch.cat([f.S for f in got])  # (B, R)
        v = torch.cat([f.V for f in got])  # (B, D, R)
        s_all = torch.cat([f.S_all for f in got])  # (B, D)
        v_all = torch.cat([f.V_all for f in got])  # (B, D, D)
        if not self.keep_u:
            return SVDFactors(None, s, v, s_all, v_all)
        u = history.new_zeros(history.shape[0], history.shape[1], rank)  # (B, L, R)
        for i, f in enumerate(got):
            assert f.U is not None
            u[i, : f.U.shape[1]] = f.U[0]
        return SVDFactors(u, s, v, s_all, v_all)


class IncrementalSVDState:
    """Gram matrix G = X^T X (D, D) of one user's last `window` events, with down-dates.

    dim: D. window: W >= 1, the number of most recent events kept (use the
    ranker's min(data.history_cap, features.history_cap): ranker.json's serving_window). gram_dtype: "float64" or "input" ("auto" = "input",
    as the batch path under no_grad); dtype: the event dtype (fixed; events are
    cast to it). Holds no gradient (serving state). `count` is the number of
    events ever appended (a version number for caches); `length` the number in
    the window, min(count, W).
    """

    def __init__(
        self, dim: int, window: int, gram_dtype: GramDtype = "auto", dtype: torch.dtype = torch.float32
    ) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int (ranker.json's serving_window), got {window!r}")
        if gram_dtype not in STATE_GRAM_DTYPES:
            raise ValueError(f"gram_dtype must be one of {STATE_GRAM_DTYPES}, got {gram_dtype!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self.dim, self.window, self.dtype = dim, window, dtype
        self.gram_dtype = "input" if gram_dtype == "auto" else gram_dtype
        self.acc_dtype = torch.float64 if self.gram_dtype == "float64" else dtype
        self.gram = torch.zeros(dim, dim, dtype=self.acc_dtype)  # (D, D)
        self._buf = torch.zeros(window, dim, dtype=dtype)  # (W, D) ring buffer; unfilled rows are zero
        self._head = 0  # next row of the ring buffer to overwrite (the oldest event once full)
        self._since_refresh = 0
        self._removed = 0.0  # energy (sum of squares) down-dated since the last recompute
        self.count = 0

    @property
    def length(self) -> int:
        return min(self.count, self.window)

    @classmethod
    def from_history(
        cls, history: Tensor, window: int, length: int | None = None, gram_dtype: GramDtype = "auto"
    ) -> IncrementalSVDState:
        """State of one user's history (L, D), valid rows [:length], in history's dtype."""
        state = cls(history.shape[-1], window, gram_dtype=gram_dtype, dtype=history.dtype)
        return state.append(history if length is None else history[:length])

    def append(self, events: Tensor) -> IncrementalSVDState:
        """Add events (n, D) or (D,), oldest first; the window drops what they push out. Returns self."""
        if events.dim() == 1:
            events = events[None]
        if events.dim() != 2 or events.shape[-1] != self.dim:
            raise ValueError(f"events must be (n, {self.dim}) or ({self.dim},), got {tuple(events.shape)}")
        n = events.shape[0]
        with torch.no_grad():
            e = events.detach().to(device="cpu", dtype=self.dtype)  # (n, D)
            if n and not bool(torch.isfinite(e).all()):
                bad = (~torch.isfinite(e)).any(dim=1).nonzero()[:5, 0].tolist()
                raise ValueError(f"events hold NaN or inf values (rows {bad} of this append, in {self.dtype}): "
                                 "the state refuses them, since a down-date cannot remove them from G")
            if n >= self.window:
                self._buf.copy_(e[n - self.window :])
                self._head = 0
                self._refresh()
            elif n:
                idx = (self._head + torch.arange(n)) % self.window  # (n,)
                old = self._buf[idx].to(self.acc_dtype)  # (n, D); zeros where the window was not yet full
                new = e.to(self.acc_dtype)  # (n, D)
                self.gram += new.mT @ new - old.mT @ old
                self._buf[idx] = e
                self._head = (self._head + n) % self.window
                self._since_refresh += n
                self._removed += float(old.to(torch.float64).square().sum())
                if self._since_refresh >= self.window or self._removed > CANCEL_RATIO * max(float(self.gram.trace()), 0.0):
                    self._refresh()
        self.count += n
        return self

    def _refresh(self) -> None:
        """Recompute G from the window's events: bounds the rounding drift of down-dates."""
        buf = self._buf.to(self.acc_dtype)  # (W, D)
        self.gram = buf.mT @ buf
        self._since_refresh = 0
        self._removed = 0.0

    def events(self) -> Tensor:
        """The window's events (length, D), oldest first."""
        if self.count < self.window:
            return self._buf[: self.count].clone()
        return torch.cat([self._buf[self._head :], self._buf[: self._head]])


def state_tokens(attention: SVDAttention, states: Sequence[IncrementalSVDState]) -> Tensor:
    """Compact tokens M (B, D, D), float64, of B states: one batched float64 eigh, O(D^3) per user.

    Tokens stay valid until the next append, so a server may keep them per
    user and call `attention.attend_tokens` per request (O(C D^2)).
    """
    cfg = attention.config
    if cfg.mode != "compact":
        raise ValueError(f"serving from a state needs mode 'compact', config has {cfg.mode!r}")
    for st in states:
        if st.dim != cfg.dim:
            raise ValueError(f"state has dim {st.dim}, attention has {cfg.dim}")
    device = attention.w_q.device
    with torch.no_grad():
        gram = torch.stack([st.gram for st in states]).to(device=device, dtype=torch.float64)  # (B, D, D)
        counts = torch.tensor([st.length for st in states], device=device)  # (B,)
        lam, e = top_eigh(gram)  # (B, D), (B, D, D)
        s_all = lam.clamp_min(0).sqrt()  # (B, D)
        # each state's route (event dtype, accumulator) has its own rank tolerance: (B, 1)
        floor = torch.tensor([[rank_floor(st.dtype, st.dim, st.gram_dtype)] for st in states], dtype=torch.float64,
                             device=device).reshape(-1, 1)
        m = tokens_from_spectrum(s_all, e, cfg.rank, cfg.taper, floor)  # (B, D, D)
        return attention.scale_tokens(m, counts)


def forward_from_state(
    attention: SVDAttention, states: IncrementalSVDState | Sequence[IncrementalSVDState], queries: Tensor
) -> Tensor:
    """Compact attention served from windowed states (B of them), queries (B, C, D) or (C, D) -> (B, C, D).

    Costs O(D^3 + C D^2) per user whatever the history length; equals
    `attention(window events, ...)` in compact mode. Gradients reach queries
    and the projections, not the (already summed) history.
    """
    if isinstance(states, IncrementalSVDState):
        states = [states]
    if queries.dim() == 2:
        queries = queries[None]
    d = attention.config.dim
    if queries.dim() != 3 or queries.shape[-1] != d:
        raise ValueError(f"queries must be (B, C, {d}) or (C, {d}), got {tuple(queries.shape)}")
    if len(states) != queries.shape[0]:
        raise ValueError(f"{len(states)} states but queries batch is {queries.shape[0]}")
    if not states:  # no request: nothing to factor
        return queries.new_zeros(queries.shape)
    return attention.attend_tokens(queries, state_tokens(attention, states))
