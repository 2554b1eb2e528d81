"""TorchRec ranker: item table shared by candidates and history, a history
encoder (mean / exact target attention / SVD-attention), pooled categorical
features, dense features (counts, recent activity, match features), an MLP or
DCN-v2 over-arch and two heads: click (`label`) and LT proxy (`returned_1d`).
The LT head has its own tower over the dense features by default (`lt_tower`):
returning tomorrow is a property of the user-day, and id embeddings let the
shared tower memorise train users.

Shape legend:
    B  requests in the batch
    L  history length (jagged L_b; padded to max_b L_b for attention)
    C  candidates of a request (jagged C_b; padded to max_b C_b for attention)
    N  candidates in the batch, sum_b C_b
    D  embedding dim
    De distilled item embedding dim
    F  dense features per candidate
    K  pooled sparse features (user + item categoricals)
    H  over-arch output width

Like torchrec's DLRM / DLRMTrain: `Ranker` returns logits, `RankerTrain` adds
the multi-task loss. Tables (TorchRec modules, sharded under DMP):
    item_embeddings  EmbeddingCollection, one table "item" with features
                     "hist_item" and "cand_item": the SAME vectors describe a
                     candidate and a past event.
    user_embeddings  EmbeddingBagCollection over "user" (+ user categoricals).
    item_features    EmbeddingBagCollection over item categoricals (mean-pooled,
                     e.g. genres).
Distilled item embeddings (`use_distilled_embeddings`): "init" initialises the
item table from them (PCA to D dims); "concat" keeps them as a frozen second
item table (a buffer, never trained, so never sharded or optimised) looked up
with the same ids; each item vector is then Linear([learned, distilled]) -> D.

History interaction: [candidate, summary, candidate * summary]; the product
carries the candidate-history dot product, the signal mean pooling learns
from. Attention encoders therefore start as the mean pool (W_Q = W_V = I,
W_K = 0: `init_as_mean_pool_`, not xavier, which rotates the summary and
scrambles that product), and `history_mean` appends the mean encoder's own
block [mean, candidate * mean], so the mean pathway stays while the attention
learns (issue 14, long histories, valid GAUC: exact attention started as the
mean pool reached 0.67 where mean pooling reached 0.75, as its projections
drifted; with history_mean, 0.75; compact SVD-attention, blind to the
history's sign, cannot represent the mean at all).

Example:
    >>> import numpy as np
    >>> from recsys.data import FeatureSpec, synthetic_batch
    >>> spec = FeatureSpec(n_items=50, n_users=10, user_fields=(("user", 10),))
    >>> model = Ranker(RankerConfig(embedding_dim=8, svd_rank=4), spec)
    >>> out = model(synthetic_batch(spec, 2, 5, 3, np.random.default_rng(0)))
    >>> out.click.shape, out.lt.shape
    (torch.Size([6]), torch.Size([6]))
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.crossnet import CrossNet
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.mlp import MLP

from torchrec.sparse.jagged_tensor import KeyedTensor

from recsys.config.sections import HISTORY_ENCODERS, RankerConfig
from recsys.data import CAND_KEY, HIST_KEY, FeatureSpec, RankBatch
from recsys.modules.reference_attention import TargetAttention, init_as_mean_pool_
from recsys.modules.svd_attention import SVDAttention, SVDAttentionConfig

ITEM_TABLE = "item"




class RankerOutput(NamedTuple):
    """Logits per candidate, in the jagged order of "cand_item": click (N,), lt (N,)."""

    click: Tensor
    lt: Tensor


def _pad(values: Tensor, lengths: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
    """Jagged (sum lengths, D) -> padded (B, max_len, D) (zeros) and its mask (B, max_len)."""
    b, d = lengths.shape[0], values.shape[-1]
    mask = torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]  # (B, M)
    # D spelled out, not -1: a batch whose histories are all empty has 0 elements (max_len 0)
    if values.shape[0] == b * max_len:  # every length is max_len: a view, no copy
        return values.view(b, max_len, d), mask
    padded = values.new_zeros(b * max_len, d)  # (B M, D)
    padded = padded.index_copy(0, mask.reshape(-1).nonzero().squeeze(1), values)  # (B M, D)
    return padded.view(b, max_len, d), mask


def _in_order(pooled: KeyedTensor, keys: list[str]) -> Tensor:
    """Pooled embeddings (B, K D) in `keys` order: a sharded EmbeddingBagCollection
    returns its keys grouped by sharding, not in config order."""
    if pooled.keys() == keys:
        return pooled.values()
    by_key = pooled.to_dict()
    return torch.cat([by_key[k] for k in keys], dim=1)


# Mean history length (events per request in a batch) from which compact
# SVD-attention reads the jagged history directly (`SVDAttention.forward_jagged`)
# instead of a zero-padded (B, L, D) copy. Padding, masking and their backward
# are passes over B L D that cost more than the Gram at long lengths; the jagged
# path loops over the B histories (~tens of microseconds each), which costs more
# at short ones. Timed here (op forward + backward, lookup included, one
# thread): padded and jagged tie near 64-128 events; at 256 jagged took 0.6-0.9x
# padded's time in 3 of the 4 cases (D 16/64, B 16/256; 1.2x in one), at 1,024
# 0.5-0.7x. Both paths compute the same numbers (tests/recsys/test_ranker_model.py).
JAGGED_MIN_MEAN_LENGTH = 256


# Elements of the (rows, C, L) logits that the encoders with per-event logits
# (reference, svd_truncated) materialise at once: a batch above it runs in row
# chunks, each padded to its own longest history and request, so memory stays
# bounded (a default evaluation batch of 2,048 requests over 10k-event histories
# with 50-candidate requests asked for 3.2 GB per temporary, several at once;
# at 2^22, 16 MiB, such an evaluation peaked at 2.2 GB RSS, at 2^25 at 4.4 GB).
# The rows are independent, so the chunks compute the same numbers.
LOGITS_BUDGET = 1 << 22  # 16 MiB per float32 temporary


def row_chunks(hist_lengths: list[int], cand_lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive row ranges [s, e) whose padded logits, rows x max C x max L,
    stay within `budget` elements (a row alone may exceed it)."""
    chunks, start, max_l, max_c = [], 0, 0, 0
    for i, (hl, cl) in enumerate(zip(hist_lengths, cand_lengths)):
        new_l, new_c = max(max_l, hl), max(max_c, cl)
        if i > start and (i + 1 - start) * new_l * new_c > budget:
            chunks.append((start, i))
            start, new_l, new_c = i, hl, cl
        max_l, max_c = new_l, new_c
    chunks.append((start, len(hist_lengths)))
    return chunks


def make_history_encoder(config: RankerConfig) -> nn.Module | None:
    """The attention encoder, (history (B, L, D), lengths (B,), queries (B, C, D))
    -> (B, C, D); None for "mean", which the ranker computes as a segment mean
    over the jagged history (no padding)."""
    d = config.embedding_dim
    if config.history_encoder == "mean":
        return None
    if config.history_encoder == "reference":
        return TargetAttention(d)
    mode = "truncated" if config.history_encoder == "svd_truncated" else "compact"
    return SVDAttention(SVDAttentionConfig(dim=d, rank=config.svd_rank, mode=mode,
                                           normalize_tokens=config.svd_normalize_tokens,
                                           gram_dtype=config.svd_gram_dtype))


def _pca_init(pretrained: Tensor, dim: int, std: float) -> Tensor:
    """Distilled vectors (n, De) -> (n, D): top-D principal components, scaled to `std`."""
    x = pretrained.double()
    x = x - x.mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)  # (n, k), (k,)
    k = min(dim, s.shape[0])
    proj = u[:, :k] * s[:k]  # (n, k)
    out = torch.zeros(x.shape[0], dim, dtype=torch.float64)
    out[:, :k] = proj
    scale = out[:, :k].std().clamp_min(1e-12)
    return (out / scale * std).float()


class Ranker(nn.Module):
    """Two-head ranker over a `RankBatch`; returns logits (see module docstring).

    Args:
        config: RankerConfig.
        spec: FeatureSpec from `RankingData.spec` (vocabularies, dense width).
        item_embeddings: distilled item vectors (n_items, De), needed when
            config.use_distilled_embeddings != "off".
        generator: torch.Generator for the initial weights (deterministic init
            without touching the global RNG).
    """

    def __init__(
        self,
        config: RankerConfig,
        spec: FeatureSpec,
        item_embeddings: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.spec = spec
        d = config.embedding_dim
        if config.use_distilled_embeddings != "off" and item_embeddings is None:
            raise ValueError(f"use_distilled_embeddings={config.use_distilled_embeddings!r} needs item embeddings")
        self.item_embeddings = EmbeddingCollection(
            tables=[EmbeddingConfig(num_embeddings=spec.n_items, embedding_dim=d, name=ITEM_TABLE,
                                    feature_names=[HIST_KEY, CAND_KEY])],
            device=torch.device("cpu"),
        )
        self.user_keys = [k for k, _ in spec.user_fields if config.use_user_id or k != "user"]
        self.item_keys = [k for k, _ in spec.item_fields]
        vocab = dict(spec.user_fields) | dict(spec.item_fields)
        self.user_embeddings = self._bags(self.user_keys, vocab, d, PoolingType.SUM)
        self.item_features = self._bags(self.item_keys, vocab, d, PoolingType.MEAN)
        self.distilled_mode = config.use_distilled_embeddings
        if self.distilled_mode == "concat":
            # frozen second item table: a buffer, so no optimiser, sharder or DDP gradient touches it
            # L2-normalised, as match features read them: a file's scale (x100 from another encoder) must not
            # change the ranker (raw vectors x100 took test logloss from 0.66 to 3.2 in a probe)
            self.register_buffer("distilled", nn.functional.normalize(item_embeddings.float(), dim=1),
                                 persistent=False)
            # Linear([learned, distilled]) as two blocks, so the distilled block runs once per distinct item
            self.learned_projection = nn.Linear(d, d, bias=False)
            self.distilled_projection = nn.Linear(item_embeddings.shape[1], d, bias=False)
        self.history_encoder = make_history_encoder(config)
        self.with_mean = config.history_encoder == "mean" or config.history_mean
        # history_mean adds the mean encoder's own interaction, [mean, candidate * mean]: without the
        # product an MLP over [candidate, mean] must discover the dot product itself
        n_mean = 2 * int(config.history_encoder != "mean" and config.history_mean)
        self.dense_arch = MLP(spec.n_dense, list(config.dense_arch_layer_sizes), bias=True, activation="relu") \
            if spec.n_dense else None
        n_dense_out = config.dense_arch_layer_sizes[-1] if spec.n_dense else 0
        # [candidate, history summary, candidate * history, (history mean, candidate * mean), pooled user,
        #  pooled item, dense]
        in_features = (3 + n_mean) * d + d * (len(self.user_keys) + len(self.item_keys)) + n_dense_out
        self.cross = CrossNet(in_features, config.dcn_layers) if config.over_arch == "dcn" else None
        self.over_arch = MLP(in_features, list(config.over_arch_layer_sizes), bias=True, activation="relu")
        h = config.over_arch_layer_sizes[-1]
        self.click_head = nn.Linear(h, 1)
        # the dense tower needs dense inputs; without any it falls back to the shared output
        self.lt_tower = MLP(spec.n_dense, list(config.over_arch_layer_sizes), bias=True, activation="relu") \
            if config.lt_tower == "dense" and spec.n_dense else None
        self.lt_head = nn.Linear(h, 1)
        self.reset_parameters(generator, item_embeddings)

    @staticmethod
    def _bags(keys: list[str], vocab: dict[str, int], d: int, pooling: PoolingType) -> EmbeddingBagCollection | None:
        if not keys:
            return None
        return EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(num_embeddings=vocab[k], embedding_dim=d, name=k, feature_names=[k],
                                       pooling=pooling) for k in keys],
            device=torch.device("cpu"),
        )

    def embedding_tables(self) -> list[nn.Parameter]:
        """Parameters of the TorchRec tables (the sparse part; row-wise Adagrad)."""
        mods = [self.item_embeddings, self.user_embeddings, self.item_features]
        return [p for m in mods if m is not None for p in m.parameters()]

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None, item_embeddings: Tensor | None = None) -> None:
        """Tables N(0, init_std), matrices xavier, biases 0, all drawn from `generator`;
        the history encoder starts as the mean pool (`init_as_mean_pool_`, no draws)."""
        tables = {id(p) for p in self.embedding_tables()}
        encoder = set() if self.history_encoder is None else {id(p) for p in self.history_encoder.parameters()}
        for name, p in self.named_parameters():
            if id(p) in encoder:
                continue
            if id(p) in tables:
                p.normal_(0.0, self.config.init_std, generator=generator)
            elif p.dim() >= 2:
                nn.init.xavier_uniform_(p, generator=generator)
            else:
                p.zero_()
        if self.history_encoder is not None:
            init_as_mean_pool_(self.history_encoder)
        if self.distilled_mode == "init" and item_embeddings is not None:
            w = self.item_embeddings.embeddings[ITEM_TABLE].weight
            w.copy_(_pca_init(item_embeddings, w.shape[1], self.config.init_std))

    def _item_vectors(self, learned: Tensor, ids: Tensor) -> Tensor:
        """Concat mode's item vectors (n, D) from the learned lookups (n, D) and their table rows (n,)."""
        uniq, inverse = torch.unique(ids, return_inverse=True)  # (U,), (n,)
        frozen = self.distilled_projection(self.distilled[uniq])  # (U, D)
        return self.learned_projection(learned) + frozen[inverse]  # (n, D)

    @property
    def _logits_per_event(self) -> bool:
        """Whether the history encoder materialises (B, C, L) logits (reference, svd_truncated)."""
        enc = self.history_encoder
        return isinstance(enc, TargetAttention) or (isinstance(enc, SVDAttention) and enc.config.mode == "truncated")

    def _jagged_history(self, n_hist: int, b: int) -> bool:
        """Whether the history encoder reads the jagged history (compact SVD-attention on long histories)."""
        enc = self.history_encoder
        return (isinstance(enc, SVDAttention) and enc.config.mode == "compact" and b > 0
                and n_hist >= JAGGED_MIN_MEAN_LENGTH * b)

    def _attend_padded(self, hist: Tensor, hist_lengths: Tensor, cand: Tensor, cand_lengths: Tensor) -> Tensor:
        """The history encoder on zero-padded (B, L, D) histories and (B, C, D)
        queries -> the summary per candidate (N, D), jagged order."""
        b = cand_lengths.shape[0]
        queries, cmask = _pad(cand, cand_lengths, int(cand_lengths.max()) if b else 0)  # (B, C, D)
        history, _ = _pad(hist, hist_lengths, int(hist_lengths.max()) if b else 0)  # (B, L, D), padding zero
        return self.history_encoder(history, hist_lengths, queries)[cmask]  # (N, D)

    def forward(self, batch: RankBatch) -> RankerOutput:
        seq = batch.sequence_features
        emb = self.item_embeddings(seq)  # {"hist_item", "cand_item"} JaggedTensors
        hist_jt, cand_jt = emb[HIST_KEY], emb[CAND_KEY]
        hist_lengths, cand_lengths = batch.hist_lengths, batch.cand_lengths  # (B,), (B,)
        n_hist = hist_jt.values().shape[0]
        if self.distilled_mode == "concat":  # one projection pass over history and candidates
            items = self._item_vectors(torch.cat([hist_jt.values(), cand_jt.values()]),
                                       torch.cat([seq[HIST_KEY].values(), seq[CAND_KEY].values()]))  # (sum L + N, D)
            hist, cand = items[:n_hist], items[n_hist:]  # (sum L, D), (N, D)
        else:  # the lookups as they are: no copy of a long history
            hist, cand = hist_jt.values(), cand_jt.values()  # (sum L, D), (N, D)
        b, n = cand_lengths.shape[0], cand.shape[0]

        mean = None
        if self.with_mean:
            # a segment mean (no padding needed), broadcast to the candidates
            seg = torch.repeat_interleave(torch.arange(b, device=hist.device), hist_lengths)  # (sum L,)
            total = hist.new_zeros(b, hist.shape[-1]).index_add(0, seg, hist)  # (B, D)
            mean = torch.repeat_interleave(total / hist_lengths.clamp_min(1).to(hist.dtype)[:, None],
                                           cand_lengths, dim=0)  # (N, D)
        if self.history_encoder is None:
            summary = mean  # (N, D)
        elif self._jagged_history(n_hist, b):
            queries, cmask = _pad(cand, cand_lengths, int(cand_lengths.max()))  # (B, C, D)
            out = self.history_encoder.forward_jagged(hist, hist_lengths, queries)  # (B, C, D)
            summary = out[cmask]  # (N, D) jagged order
        elif not (self._logits_per_event and b > 0
                  and b * int(hist_lengths.max()) * int(cand_lengths.max()) > LOGITS_BUDGET):
            summary = self._attend_padded(hist, hist_lengths, cand, cand_lengths)  # (N, D)
        else:  # (rows, C, L) logits over the budget: row chunks, each padded to its own maxima
            ho = [0, *torch.cumsum(hist_lengths, 0).tolist()]
            co = [0, *torch.cumsum(cand_lengths, 0).tolist()]
            summary = torch.cat([
                self._attend_padded(hist[ho[s]:ho[e]], hist_lengths[s:e], cand[co[s]:co[e]], cand_lengths[s:e])
                for s, e in row_chunks(hist_lengths.tolist(), cand_lengths.tolist(), LOGITS_BUDGET)
            ])  # (N, D)

        parts = [cand, summary, cand * summary]  # 3 x (N, D)
        if mean is not None and summary is not mean:
            parts += [mean, cand * mean]  # 2 x (N, D)
        if self.user_embeddings is not None:
            user_kjt = batch.user_features
            if len(self.user_keys) != len(user_kjt.keys()):
                user_kjt = user_kjt.permute([user_kjt.keys().index(k) for k in self.user_keys])
            pooled_user = _in_order(self.user_embeddings(user_kjt), self.user_keys)  # (B, K_u D)
            parts.append(torch.repeat_interleave(pooled_user, cand_lengths, dim=0))  # (N, K_u D)
        if self.item_features is not None:
            parts.append(_in_order(self.item_features(batch.item_features), self.item_keys))  # (N, K_i D)
        dense_out = self.dense_arch(batch.dense) if self.dense_arch is not None else None  # (N, F')
        if dense_out is not None:
            parts.append(dense_out)
        x = torch.cat(parts, dim=1)  # (N, in_features)
        assert x.shape[0] == n
        if self.cross is not None:
            x = self.cross(x)  # (N, in_features)
        h = self.over_arch(x)  # (N, H)
        h_lt = self.lt_tower(batch.dense) if self.lt_tower is not None else h  # (N, H)
        return RankerOutput(self.click_head(h).squeeze(-1), self.lt_head(h_lt).squeeze(-1))  # (N,), (N,)


class RankerLosses(NamedTuple):
    """Detached parts of the loss and the logits, for logging and metrics."""

    loss: Tensor
    click_loss: Tensor
    lt_loss: Tensor
    logits: RankerOutput


class RankerTrain(nn.Module):
    """Training wrapper (like torchrec DLRMTrain): multi-task loss over a Ranker.

    loss = click_weight * BCE(click, label) (every candidate, sampled negatives
    included) + lt_weight * BCE(lt, returned_1d) over rows with `lt_mask`
    (lt_observed and not sampled); 0 when a batch has none.
    """

    def __init__(self, model: Ranker) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: RankBatch) -> tuple[Tensor, RankerLosses]:
        out = self.model(batch)
        cfg = self.model.config
        click = nn.functional.binary_cross_entropy_with_logits(out.click, batch.labels)
        mask = batch.lt_mask.to(out.lt.dtype)  # (N,)
        lt_all = nn.functional.binary_cross_entropy_with_logits(out.lt, batch.lt_labels, reduction="none")  # (N,)
        lt = (lt_all * mask).sum() / mask.sum().clamp_min(1.0)
        loss = cfg.click_weight * click + cfg.lt_weight * lt
        logits = RankerOutput(out.click.detach(), out.lt.detach())
        return loss, RankerLosses(loss.detach(), click.detach(), lt.detach(), logits)


def probabilities(logits: Tensor) -> np.ndarray:
    """Logits -> float64 numpy probabilities (for metrics and predictions)."""
    return torch.sigmoid(logits.detach().double()).cpu().numpy()


__all__ = [
    "HISTORY_ENCODERS",
    "Ranker",
    "RankerConfig",
    "RankerLosses",
    "RankerOutput",
    "RankerTrain",
    "make_history_encoder",
    "probabilities",
]
