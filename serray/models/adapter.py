"""Adapter with local attributes: masked prediction, self-distillation and
online-clustering objectives on top of frozen speech-encoder features.

A student :class:`WAPTransformer` sees span-masked embeddings; an EMA teacher
(same architecture, frozen, eval mode) sees the unmasked input. Both branches
carry a convolutional relative positional embedding applied after the mask
replacement (wav2vec 2.0 / data2vec), so masked frames of one utterance get
different outputs. At masked, non-padded frames the student is trained to

* ``mask``: reconstruct the standardised (CMVN) input frames (``recon_head``),
* ``distill``: regress the data2vec target: the mean of the teacher's top-k
  layer outputs, each instance-normalised over the valid frames of its
  utterance (``distill_head``),
* ``cluster``: classify the online k-means id of that target frame
  (``cluster_head``), i.e. the local attribute of the frame; its cross-entropy
  is divided by ``ln K`` so that it starts near 1, like the two MSE terms on
  unit-variance targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from serray.models.kmeans import OnlineKMeans, _entropy
from serray.models.masking import span_mask
from serray.models.wap import WAPTransformer


@dataclass
class AdapterOutput:
    """Result of :meth:`Adapter.forward`.

    Attributes:
        loss: Weighted sum of the enabled objectives (differentiable).
        losses: Detached float32 value per enabled objective
            (keys among ``"mask"``, ``"distill"``, ``"cluster"``).
        stats: Python floats: ``cos_ts``, ``mask_ratio`` and, when the cluster
            objective is enabled, ``cluster_entropy`` and ``dead_clusters``.
    """

    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    """Float32 MSE; a graph-connected zero when there are no rows."""
    if pred.shape[0] == 0:
        return pred.float().sum() * 0.0
    return F.mse_loss(pred.float(), target.float())


def _ce(logits: Tensor, target: Tensor) -> Tensor:
    """Float32 cross-entropy; a graph-connected zero when there are no rows."""
    if logits.shape[0] == 0:
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float(), target)


def instance_norm(x: Tensor, padding_mask: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-utterance, per-channel standardisation over the valid frames (data2vec's target norm).

    Args:
        x: ``[B, T, C]``.
        padding_mask: bool ``[B, T]``, True = padded frame.

    Returns:
        float32 ``[B, T, C]``: zero mean and unit variance over each utterance's valid frames
        (padded frames 0).
    """
    x = x.float()
    valid = (~padding_mask).float()[..., None]
    n = valid.sum(1, keepdim=True).clamp_min(1.0)
    mean = (x * valid).sum(1, keepdim=True) / n
    var = (((x - mean) * valid) ** 2).sum(1, keepdim=True) / n
    return ((x - mean) / torch.sqrt(var + eps)) * valid


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Parameters that get no weight decay: norms, biases, embeddings and logits (anything with
    fewer than 2 dimensions: LayerNorm weights, biases, the mask embedding, layer-weight logits)."""
    return param.ndim < 2 or name.endswith(".bias")


def param_groups(named_params, weight_decay: float, lr_scale: float = 1.0, tag: str = "") -> list[dict]:
    """AdamW groups: decayed weights and undecayed norms/biases/embeddings/logits.

    Args:
        named_params: ``(name, parameter)`` pairs; only those with ``requires_grad`` are used.
        weight_decay: decay of the decayed group.
        lr_scale: factor applied to the learning rate of both groups (the loop multiplies the
            scheduled rate by ``group["lr_scale"]``).
        tag: a name stored in each group (``group["name"]``), e.g. ``"body"``, ``"head"``.

    Returns:
        Up to two groups (empty ones are left out).
    """
    decay, plain = [], []
    for name, p in named_params:
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale, "name": f"{tag}decay"},
              {"params": plain, "weight_decay": 0.0, "lr_scale": lr_scale, "name": f"{tag}no_decay"}]
    return [g for g in groups if g["params"]]


#: The teacher's parameters that follow the EMA under ``layers_only`` (the rest are the student's).
EMA_LAYER_PARAMS = ("layers.", "out_norms.", "layer_logits")


class Adapter(nn.Module):
    """Student/teacher adapter trained with masked local-attribute objectives.

    Args:
        input_dim: Encoder feature dimension ``D``.
        num_input_layers: Number ``L`` of stacked encoder layers in the input.
        d_model: Transformer width.
        num_layers: Transformer layers of student and teacher.
        num_heads: Attention heads.
        ff_dim: Feed-forward hidden size.
        dropout: Dropout of the student (the teacher always runs in eval mode).
        mask_ratio: Fraction of valid frames masked per utterance.
        mask_span: Length of the mask spans in frames (the config gives milliseconds).
        num_clusters: k-means clusters ``K`` (local attributes).
        kmeans_decay: EMA decay of the online k-means.
        w_mask: Weight of the masked-reconstruction loss (0 disables it).
        w_distill: Weight of the self-distillation loss (0 disables it).
        w_cluster: Weight of the cluster-prediction loss (0 disables it).
        distill_top_k: how many of the teacher's top layers are averaged into the
            distillation target (each instance-normalised over time first);
            None = all layers.
        pos_conv_kernel: kernel (odd, frames) of the convolutional positional
            embedding of both branches (0: none).
        pos_conv_groups: groups of that convolution.
        attention_dropout: dropout on the attention weights (see :class:`WAPTransformer`).
    """

    def __init__(
        self,
        input_dim: int,
        num_input_layers: int = 1,
        d_model: int = 256,
        num_layers: int = 3,
        num_heads: int = 4,
        ff_dim: int = 1024,
        dropout: float = 0.1,
        mask_ratio: float = 0.5,
        mask_span: int = 5,
        num_clusters: int = 64,
        kmeans_decay: float = 0.99,
        w_mask: float = 1.0,
        w_distill: float = 1.0,
        w_cluster: float = 1.0,
        distill_top_k: int | None = None,
        pos_conv_kernel: int = 0,
        pos_conv_groups: int = 16,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        distill_top_k = num_layers if distill_top_k is None else distill_top_k
        if not 1 <= distill_top_k <= num_layers:
            raise ValueError(f"distill_top_k must be in [1, {num_layers}], got {distill_top_k}")
        self._config = dict(
            input_dim=input_dim, num_input_layers=num_input_layers, d_model=d_model,
            num_layers=num_layers, num_heads=num_heads, ff_dim=ff_dim, dropout=dropout,
            mask_ratio=mask_ratio, mask_span=mask_span, num_clusters=num_clusters,
            kmeans_decay=kmeans_decay, w_mask=w_mask, w_distill=w_distill,
            w_cluster=w_cluster, distill_top_k=distill_top_k, pos_conv_kernel=pos_conv_kernel,
            pos_conv_groups=pos_conv_groups, attention_dropout=attention_dropout,
        )
        self.input_dim = input_dim
        self.d_model = d_model
        self.mask_ratio = mask_ratio
        self.mask_span = mask_span
        self.distill_top_k = distill_top_k
        self.weights = {"mask": w_mask, "distill": w_distill, "cluster": w_cluster}
        self.student = self._make_wap()
        self.teacher = self._make_wap()
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.mask_emb = nn.Parameter(torch.empty(d_model).normal_(0.0, 0.02))
        self.recon_head = nn.Linear(d_model, input_dim) if w_mask > 0 else None
        self.distill_head = nn.Linear(d_model, d_model) if w_distill > 0 else None
        self.cluster_head = nn.Linear(d_model, num_clusters) if w_cluster > 0 else None
        self.kmeans = OnlineKMeans(num_clusters, d_model, decay=kmeans_decay)

    def _make_wap(self) -> WAPTransformer:
        """Build a student/teacher network from the stored config."""
        c = self._config
        return WAPTransformer(
            c["input_dim"], d_model=c["d_model"], num_layers=c["num_layers"],
            num_heads=c["num_heads"], ff_dim=c["ff_dim"], dropout=c["dropout"],
            num_input_layers=c["num_input_layers"], pos_conv_kernel=c["pos_conv_kernel"],
            pos_conv_groups=c["pos_conv_groups"], attention_dropout=c.get("attention_dropout", 0.0),
        )

    def config_dict(self) -> dict:
        """Constructor kwargs, so that ``Adapter(**cfg)`` rebuilds the model."""
        return dict(self._config)

    def train(self, mode: bool = True) -> "Adapter":
        """Set train/eval mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def set_feature_stats(self, mean, std) -> None:
        """Input standardisation statistics ([L, D]) of the pre-training data, for both branches."""
        self.student.input_norm.set_stats(mean, std)
        self.teacher.input_norm.set_stats(mean, std)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters with ``requires_grad`` (student, mask embedding, heads)."""
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no weight decay on norms, biases, the mask embedding and layer logits."""
        return param_groups(self.named_parameters(), weight_decay)

    def branch_parameters(self, branch: str) -> list[Tensor]:
        """The parameters of one branch (``"student"`` / ``"teacher"``), in a fixed order."""
        return [p for _, p in getattr(self, branch).named_parameters()]

    @torch.no_grad()
    def teacher_targets(self, x: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher output and the data2vec distillation/cluster target.

        Args:
            x: ``[B, T, D]`` or ``[B, L, T, D]`` encoder features (unmasked).
            padding_mask: bool ``[B, T]``, True = padded frame.

        Returns:
            ``(t, target)``: the teacher's WAP output ``[B, T, d_model]`` and the float32
            target ``[B, T, d_model]``: the mean of the teacher's top ``distill_top_k`` layer
            outputs, each instance-normalised over the valid frames of its utterance (data2vec);
            padded frames 0.
        """
        teacher = self.teacher.eval()
        layers = teacher.layer_outputs(teacher.embed(x), padding_mask)
        t = teacher.combine(layers, padding_mask)
        top = torch.stack([instance_norm(h, padding_mask) for h in layers[-self.distill_top_k:]]).mean(0)
        return t, top

    def _input_targets(self, x: Tensor, sel: Tensor) -> Tensor:
        """Standardised input frames (the student's CMVN; mean over L for stacked input) at ``sel``."""
        x = self.student.input_norm(x.float())
        if x.dim() == 4:
            x = x.mean(1)
        return x[sel]

    def _cluster_loss(
        self, s_m: Tensor, target: Tensor, valid: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """Cluster-prediction loss and k-means statistics."""
        feats = target[valid]
        if self.training:
            upd = self.kmeans.update(feats)
        ids = self.kmeans.assign(feats)
        if self.training:
            stats = {"cluster_entropy": upd["entropy"], "dead_clusters": float(upd["dead"])}
        else:
            stats = self._eval_cluster_stats(ids)
        # / ln K: a uniform guess costs 1, the scale of the MSE terms on unit-variance targets
        loss = _ce(self.cluster_head(s_m), ids[mask[valid]]) / math.log(self.kmeans.num_clusters)
        return loss, stats

    def _eval_cluster_stats(self, ids: Tensor) -> dict[str, float]:
        """Assignment entropy and EMA-dead cluster count without updating k-means."""
        hist = torch.bincount(ids, minlength=self.kmeans.num_clusters).float()
        counts = self.kmeans.counts
        dead = counts / counts.sum().clamp_min(1e-12) < self.kmeans.dead_threshold
        return {"cluster_entropy": _entropy(hist), "dead_clusters": float(dead.sum())}

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> AdapterOutput:
        """Compute the enabled objectives on one batch.

        Args:
            x: ``[B, T, D]`` or ``[B, L, T, D]`` encoder features.
            padding_mask: bool ``[B, T]``, True = padded frame (None = no padding).
            generator: Optional generator for the span mask.

        Returns:
            :class:`AdapterOutput`. Only masked, non-padded frames are scored.
            In training mode the online k-means is updated with the normalised
            teacher frames at all valid positions.
        """
        if padding_mask is None:
            padding_mask = torch.zeros(x.shape[0], x.shape[-2], dtype=torch.bool, device=x.device)
        valid = ~padding_mask
        mask = span_mask(padding_mask, self.mask_ratio, self.mask_span, generator) & valid
        h = self.student.embed(x)
        h = torch.where(mask[..., None], self.mask_emb.to(h.dtype), h)
        s = self.student.encode(h, padding_mask)
        t, target = self.teacher_targets(x, padding_mask)
        s_m = s[mask]
        losses: dict[str, Tensor] = {}
        stats: dict[str, float] = {}
        if self.weights["mask"] > 0:
            losses["mask"] = _mse(self.recon_head(s_m), self._input_targets(x, mask))
        if self.weights["distill"] > 0:
            losses["distill"] = _mse(self.distill_head(s_m), target[mask])
        if self.weights["cluster"] > 0:
            losses["cluster"], stats = self._cluster_loss(s_m, target, valid, mask)
        loss = sum((self.weights[k] * v for k, v in losses.items()), s.float().sum() * 0.0)
        stats.update(self._stats(s_m, t[mask], mask, valid))
        return AdapterOutput(loss, {k: v.detach().float() for k, v in losses.items()}, stats)

    @staticmethod
    def _stats(s_m: Tensor, t_m: Tensor, mask: Tensor, valid: Tensor) -> dict[str, float]:
        """Teacher/student cosine at masked frames and achieved mask ratio."""
        with torch.no_grad():
            cos = F.cosine_similarity(s_m.float(), t_m.float(), dim=-1)
            ratio = mask.sum().float() / valid.sum().clamp_min(1).float()
        return {
            "cos_ts": float(cos.mean()) if cos.numel() else 0.0,
            "mask_ratio": float(ratio),
        }

    @torch.no_grad()
    def update_teacher(self, momentum: float, layers_only: bool = False) -> None:
        """EMA update ``p_t = m * p_t + (1 - m) * p_s``; buffers are copied.

        Args:
            momentum: EMA momentum ``m`` in ``[0, 1]``.
            layers_only: data2vec's ``ema_layers_only``: only the Transformer layers, their output norms
                and the layer weights follow the EMA; the input projection, the positional convolution
                and the input-layer weights are the student's (copied), so the teacher reads its input
                as the student has learned to.
        """
        for (name, pt), ps in zip(self.teacher.named_parameters(), self.student.parameters()):
            if layers_only and not name.startswith(EMA_LAYER_PARAMS):
                pt.copy_(ps.detach())
            else:
                pt.copy_(momentum * pt + (1 - momentum) * ps.detach())
        for bt, bs in zip(self.teacher.buffers(), self.student.buffers()):
            bt.copy_(bs)

    def encode(self, x: Tensor, padding_mask: Tensor | None, branch: str = "teacher") -> Tensor:
        """Unmasked features for downstream use.

        The caller controls ``no_grad``/eval mode (the student's dropout is
        active in training mode; the teacher is always in eval mode).

        Args:
            x: ``[B, T, D]`` or ``[B, L, T, D]`` encoder features.
            padding_mask: bool ``[B, T]``, True = padded frame, or None.
            branch: ``"teacher"`` or ``"student"``.

        Returns:
            ``[B, T, d_model]`` features, zero at padded frames.
        """
        if branch not in ("teacher", "student"):
            raise ValueError(f"branch must be 'teacher' or 'student', got {branch!r}")
        return getattr(self, branch)(x, padding_mask)


__all__ = ["Adapter", "AdapterOutput"]
