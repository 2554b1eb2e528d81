"""The student: a content-only item encoder with gated late fusion.

Each modality (text vector, item-field tokens + numerics, image vector) is
projected to a common width H; a learned gate weighs the modalities per item
(softmax over modalities, so an item without an image leans on its text);
a linear map gives the item embedding z (D, default 64). One projection head
per (ID teacher, matryoshka prefix) maps z[:d] into that teacher's space for
L_id2i; the heads are training-only.

The student never sees an item ID: `ContentTensors` has no ID field and the
only learned lookup tables are for field *values* (a genre, a year bucket),
which cold items share with warm ones. That is what lets it embed items that
no one has interacted with.

Shape legend:
    I  items in the catalog
    B  items in a batch
    T  text vector dim
    F  tokens of one field per item (padded with 0)
    N  numeric columns (2 per numeric field)
    G  image vector dim
    H  hidden width per modality
    M  modalities present
    D  output dim; d a matryoshka prefix
    K  a teacher's dim
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.config import StudentConfig
from distill.encoders import ContentFeatures


@dataclass
class ContentTensors:
    """The student's input for a set of items (torch twin of ContentFeatures)."""

    text: torch.Tensor | None  # (B, T)
    tokens: list[torch.Tensor]  # per field (B, F) long, 0 = padding
    numeric: torch.Tensor  # (B, N)
    image: torch.Tensor | None  # (B, G)
    image_mask: torch.Tensor | None  # (B,) bool
    raw: torch.Tensor | None = None  # (B, R) the raw content embedding (residual students only)

    @classmethod
    def from_features(cls, cf: ContentFeatures, cfg: StudentConfig) -> "ContentTensors":
        def t(x: np.ndarray | None) -> torch.Tensor | None:
            return None if x is None else torch.from_numpy(np.ascontiguousarray(x))

        use_img = cfg.use_image and cf.image is not None
        return cls(
            text=t(cf.text) if cfg.use_text else None,
            tokens=[torch.from_numpy(x) for x in cf.fields.tokens] if cfg.use_fields else [],
            numeric=torch.from_numpy(cf.fields.numeric if cfg.use_fields else np.zeros((cf.n_items, 0), np.float32)),
            image=t(cf.image) if use_img else None,
            image_mask=t(cf.image_mask) if use_img else None,
            raw=t(cf.raw_embedding(cfg.use_fields).astype(np.float32)) if cfg.residual else None,
        )

    def __len__(self) -> int:
        return len(self.numeric)

    def take(self, idx: torch.Tensor) -> "ContentTensors":
        """Rows `idx` (B,) of every modality."""
        pick = lambda x: None if x is None else x.index_select(0, idx)  # noqa: E731
        return ContentTensors(
            pick(self.text), [x.index_select(0, idx) for x in self.tokens], pick(self.numeric), pick(self.image), pick(self.image_mask), pick(self.raw)
        )


@dataclass(frozen=True)
class ContentSpec:
    """Input sizes the student is built for (from the encoded catalog)."""

    text_dim: int
    field_vocab: int  # 0 when there are no field tokens
    n_fields: int
    numeric_dim: int
    image_dim: int
    raw_dim: int = 0  # R: the raw content embedding's size (residual students only)

    @classmethod
    def of(cls, x: ContentTensors, vocab_size: int) -> "ContentSpec":
        return cls(
            text_dim=0 if x.text is None else x.text.shape[1],
            field_vocab=vocab_size if x.tokens else 0,
            n_fields=len(x.tokens),
            numeric_dim=x.numeric.shape[1],
            image_dim=0 if x.image is None else x.image.shape[1],
            raw_dim=0 if x.raw is None else x.raw.shape[1],
        )


def _mlp(d_in: int, d_out: int, dropout: float) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_out, d_out), nn.LayerNorm(d_out))


class Student(nn.Module):
    """Content -> item embedding z (B, D). `heads` maps z prefixes to teachers.

    Example:
        >>> spec = ContentSpec(text_dim=8, field_vocab=5, n_fields=1, numeric_dim=2, image_dim=0)
        >>> s = Student(StudentConfig(dim=4, hidden_dim=6, field_dim=3), spec, {"id2item": 7}, (2,))
        >>> x = ContentTensors(torch.randn(3, 8), [torch.tensor([[1, 2], [3, 0], [4, 4]])], torch.randn(3, 2), None, None)
        >>> s(x).shape, s.project(s(x), "id2item", 2).shape
        (torch.Size([3, 4]), torch.Size([3, 7]))
    """

    def __init__(
        self,
        cfg: StudentConfig,
        spec: ContentSpec,
        teacher_dims: Mapping[str, int] | None = None,
        matryoshka_dims: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.cfg, self.spec = cfg, spec
        h = cfg.hidden_dim
        self.text = _mlp(spec.text_dim, h, cfg.dropout) if spec.text_dim else None
        has_fields = spec.n_fields > 0 or spec.numeric_dim > 0
        self.field_emb = nn.Embedding(spec.field_vocab, cfg.field_dim, padding_idx=0) if spec.n_fields else None
        field_in = spec.n_fields * cfg.field_dim + spec.numeric_dim
        self.fields = _mlp(field_in, h, cfg.dropout) if has_fields else None
        self.image = _mlp(spec.image_dim, h, cfg.dropout) if spec.image_dim else None
        n_mod = sum(m is not None for m in (self.text, self.fields, self.image))
        if n_mod == 0:
            raise ValueError("student: the catalog has none of the enabled modalities")
        self.gate = nn.Linear(n_mod * h, n_mod)
        self.out = nn.Linear(h, cfg.dim)
        self.base = None
        if cfg.residual:
            if not spec.raw_dim:
                raise ValueError("student: residual needs the raw content embedding (ContentTensors.raw)")
            # z = base(raw content) + correction: the correction starts at zero,
            # so training starts from the content geometry (see init_residual)
            self.base = nn.Linear(spec.raw_dim, cfg.dim)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        # the mean z of the training items, removed before normalising (cfg.center; zeros until set_center)
        self.register_buffer("center", torch.zeros(cfg.dim))
        self.prefixes = sorted({d for d in matryoshka_dims if 0 < d < cfg.dim} | {cfg.dim})
        self.heads = nn.ModuleDict(
            {f"{name}@{d}": nn.Linear(d, k) for name, k in (teacher_dims or {}).items() for d in self.prefixes}
        )

    def modalities(self, x: ContentTensors) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-modality vectors (B, M, H) and availability (B, M)."""
        hs, avail = [], []
        n = len(x)
        if self.text is not None:
            t = x.text
            if self.training and self.cfg.text_noise > 0:
                t = t + self.cfg.text_noise * torch.randn_like(t)
            hs.append(self.text(t))  # (B, H)
            avail.append(self._keep(n))
        if self.fields is not None:
            parts = []
            for tok in x.tokens:
                e = self.field_emb(tok)  # (B, F, E); padding rows are zero
                cnt = (tok > 0).sum(1, keepdim=True).clamp_min(1)  # (B, 1)
                parts.append(e.sum(1) / cnt)  # (B, E): mean over the field's values
            parts.append(x.numeric)  # (B, N)
            hs.append(self.fields(torch.cat(parts, 1)))  # (B, H)
            avail.append(torch.ones(n, dtype=torch.bool))
        if self.image is not None:
            hs.append(self.image(x.image))  # (B, H)
            avail.append(x.image_mask.bool() & self._keep(n))
        avail = torch.stack(avail, 1)  # (B, M)
        if self.fields is None:  # nothing to fall back on: never drop every modality
            avail[~avail.any(1), 0] = True
        return torch.stack(hs, 1), avail

    def _keep(self, n: int) -> torch.Tensor:
        """(n,) bool: which items keep a droppable modality in this step."""
        if not self.training or self.cfg.modality_dropout == 0:
            return torch.ones(n, dtype=torch.bool)
        return torch.rand(n) >= self.cfg.modality_dropout

    def forward(self, x: ContentTensors) -> torch.Tensor:
        h, avail = self.modalities(x)  # (B, M, H), (B, M)
        logits = self.gate(h.flatten(1))  # (B, M)
        # a missing modality (no image) gets no weight instead of a zero vector's
        w = logits.masked_fill(~avail, float("-inf")).softmax(-1)  # (B, M)
        fused = (w[..., None] * h).sum(1)  # (B, H)
        z = self.out(fused)  # (B, D)
        if self.base is not None:
            z = z + self.base(x.raw)  # (B, D)
        return z

    @torch.no_grad()
    def init_residual(self, raw: torch.Tensor) -> None:
        """Set the base map to the projection on the top-D principal directions
        of the catalog's centred raw content (I, R), which keeps the content's
        geometry as far as D dims allow. Unsupervised: no interaction is used."""
        if self.base is None:
            return
        mean = raw.double().mean(0)  # (R,)
        x = raw.double() - mean  # (I, R)
        _, s, vt = torch.linalg.svd(x, full_matrices=False)  # vt (min(I, R), R)
        d = min(self.cfg.dim, vt.shape[0])
        w = torch.zeros(self.cfg.dim, raw.shape[1], dtype=torch.float64)
        w[:d] = vt[:d]
        self.base.weight.copy_(w.float())
        self.base.bias.copy_(-(w @ mean).float())  # base(raw) = W (raw - mean)

    def gates(self, x: ContentTensors) -> torch.Tensor:
        """Modality weights (B, M), for inspection."""
        h, avail = self.modalities(x)
        return self.gate(h.flatten(1)).masked_fill(~avail, float("-inf")).softmax(-1)

    def project(self, z: torch.Tensor, teacher: str, d: int | None = None) -> torch.Tensor:
        """P_{teacher,d}(z[:, :d]) -> (B, K)."""
        d = d or self.cfg.dim
        return self.heads[f"{teacher}@{d}"](z[:, :d])

    @torch.no_grad()
    def raw_z(self, x: ContentTensors, batch_size: int = 4096) -> torch.Tensor:
        """z (I, D) of every item, eval mode, not centred or normalised."""
        was = self.training
        self.eval()
        n = len(x)
        outs = [self(x.take(torch.arange(s, min(s + batch_size, n)))) for s in range(0, n, batch_size)]
        self.train(was)
        return torch.cat(outs) if outs else torch.zeros(0, self.cfg.dim)  # (I, D)

    @torch.no_grad()
    def set_center(self, x: ContentTensors, train_items: np.ndarray) -> None:
        """center = mean z of `train_items` (indices into x) when cfg.center.

        Why: content the student never trained on maps near a common point,
        so without centring every unseen item sits close to every query and
        cold items crowd the top of a mixed ranking whatever their content
        says (a planted world with no content signal shows it: tests/distill/
        test_generalisation.py). Removing the mean spreads them out again."""
        if self.cfg.center and len(train_items):
            self.center.copy_(self.raw_z(x.take(torch.from_numpy(np.asarray(train_items, dtype=np.int64)))).mean(0))

    @torch.no_grad()
    def embed(self, x: ContentTensors, batch_size: int = 4096, dim: int | None = None) -> np.ndarray:
        """L2-normalised embeddings (I, d) of every item (z minus `center`), eval mode, float32."""
        d = dim or self.cfg.dim
        z = self.raw_z(x, batch_size)[:, :d]  # (I, d)
        zc = z - self.center[:d]
        # an item AT the mean (the only item of a catalog, or one content for
        # all) has no direction left after centring: F.normalize would give a
        # zero vector, or rounding noise. It keeps its uncentred direction.
        at_mean = zc.norm(dim=-1) <= 1e-4 * z.norm(dim=-1)
        return F.normalize(torch.where(at_mean[:, None], z, zc), dim=-1).numpy().astype(np.float32)


__all__ = ["StudentConfig", "ContentTensors", "ContentSpec", "Student"]
