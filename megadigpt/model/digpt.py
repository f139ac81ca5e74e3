"""D-iGPT: block-causal ViT encoder over randomly ordered segments, a generative decoder that predicts the next
segment's teacher tokens and a discriminative decoder that predicts the visible segments' teacher tokens.

``objective`` selects the paper's ablations (spec §4, the paper's decoder study):

- ``digpt``   : both decoders (the method);
- ``dis_only``: the same block-causal encoder and the discriminative decoder alone (no next-segment prediction);
- ``distill`` : plain feature distillation: full attention over the whole image, no decoder, a LayerNorm and a
  Linear on the last block predict every teacher token (and CLS from the CLS token).

With ``num_classes`` (discrete targets: iGPT's palette, DiGIT's k-means tokens) the teacher tokens are codebook
indices and every head predicts logits, trained with cross-entropy instead of ``2 - 2 cos``. Where the teacher's
grid is r times finer than the student's (a palette over every pixel), each student token predicts its r x r
teacher tokens (r*r*num_classes logits, unshuffled like a pixel-shuffle); other ratios resample the logits
bilinearly, as features are.
"""

import functools
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionMask
from .decoder import Decoder, FeatureTaps
from .masks import SegmentLayout, random_segment_order
from .pos_embed import sincos_2d
from .vit import ViTEncoder, default_taps


def take_segments(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x: (B, S, T, C), order: (B, K) segment ids -> (B, K, T, C)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], order]


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token ``2 - 2 cos(pred, target)`` in fp32. (..., D) -> (...)."""
    pred, target = F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1)
    return 2 - 2 * (pred * target).sum(dim=-1)


def token_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32 (nats). logits (..., K), target (...) int64 -> (...)."""
    k = logits.shape[-1]
    return F.cross_entropy(logits.float().reshape(-1, k), target.reshape(-1), reduction="none").view(target.shape)


class DiGPT(nn.Module):
    def __init__(self, encoder: ViTEncoder, segment_grid: int, teacher_dim: int, teacher_grid: int,
                 taps: Optional[Sequence[int]] = None, decoder_dim: int = 1024, decoder_depth: int = 2,
                 decoder_heads: int = 32, decoder_mlp_ratio: float = 4.0, attention: str = "sdpa",
                 objective: str = "digpt", num_classes: Optional[int] = None, init_weights: bool = True):
        """``init_weights=False`` leaves the initialisation (:meth:`init_steps`) to the caller."""
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        self.objective = objective
        self.classes = num_classes
        self.encoder = encoder
        self.layout = SegmentLayout(encoder.grid, segment_grid)
        self.taps = list(taps) if taps else default_taps(encoder.depth)
        if not all(1 <= t <= encoder.depth for t in self.taps):
            raise ValueError(f"feature taps {self.taps} must lie in 1..{encoder.depth}")
        if teacher_grid % segment_grid:
            raise ValueError(f"the teacher's {teacher_grid}x{teacher_grid} token grid cannot be cut into "
                             f"{segment_grid}x{segment_grid} segments")
        self.teacher_grid = teacher_grid
        self.teacher_layout = SegmentLayout(teacher_grid, segment_grid)
        # discrete targets on a grid r times finer: r*r tokens' logits per student token (else r = None: bilinear)
        self.unshuffle = teacher_grid // encoder.grid if num_classes and teacher_grid % encoder.grid == 0 else None
        out_dim = teacher_dim if not num_classes else num_classes * (self.unshuffle or 1) ** 2

        self.mask = AttentionMask(self.layout.mask(), structure=self.layout.mask(device="cpu"))
        self.register_buffer("patch_index", self.layout.patch_index(), persistent=False)
        self.register_buffer("teacher_patch_index", self.teacher_layout.patch_index(), persistent=False)
        self.register_buffer("decoder_pos_embed", sincos_2d(decoder_dim, encoder.grid, cls_token=False),
                             persistent=False)

        C = encoder.embed_dim
        # creation order = parameter order = initialisation order (kept as it was before the ablations existed)
        if objective == "digpt":
            self.gen_taps = FeatureTaps(C, len(self.taps), decoder_dim, decoder_depth)
        if objective in ("digpt", "dis_only"):
            self.dis_taps = FeatureTaps(C, len(self.taps), decoder_dim, decoder_depth)
        if objective == "digpt":
            self.gen_decoder = Decoder(decoder_dim, decoder_depth, decoder_heads, decoder_mlp_ratio, out_dim,
                                       attention)
        if objective in ("digpt", "dis_only"):
            self.dis_decoder = Decoder(decoder_dim, decoder_depth, decoder_heads, decoder_mlp_ratio, out_dim,
                                       attention)
        if objective == "distill":
            self.distill_norm = nn.LayerNorm(C, eps=1e-6)
            self.distill_head = nn.Linear(C, out_dim)
        if init_weights:
            self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self):
        for _, init in self.init_steps():
            init()

    def init_steps(self):
        """The initialisation as ``(parameters, init)`` steps, in the fixed order that defines the initial weights
        for a seed (the random draws happen in this order). :meth:`reset_parameters` runs them; a partitioned
        build (``distributed.partitioned``) runs each one with only its parameters gathered."""
        def linear(m):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

        def norm(m):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

        def patch(proj):
            nn.init.xavier_uniform_(proj.weight.data.view(proj.weight.shape[0], -1))  # a Linear over the patch
            nn.init.zeros_(proj.bias)

        for m in self.modules():
            if isinstance(m, nn.Linear):
                yield list(m.parameters(recurse=False)), functools.partial(linear, m)
            elif isinstance(m, nn.LayerNorm):
                yield list(m.parameters(recurse=False)), functools.partial(norm, m)
        proj = self.encoder.patch_embed.proj
        yield list(proj.parameters(recurse=False)), functools.partial(patch, proj)
        yield [self.encoder.cls_token], functools.partial(nn.init.zeros_, self.encoder.cls_token)
        for name in ("gen_decoder", "dis_decoder"):
            if hasattr(self, name):
                q = getattr(self, name).query_token
                yield [q], functools.partial(nn.init.trunc_normal_, q, std=0.02)

    # ------------------------------------------------------------------ encoder
    def random_order(self, batch: int, device=None, generator=None) -> torch.Tensor:
        return random_segment_order(batch, self.layout.num_segments, generator, device)

    def encode(self, images: torch.Tensor, order: torch.Tensor) -> List[torch.Tensor]:
        """Encode the first S-1 segments of ``order`` (+ CLS last); returns the tapped block outputs (B, L, C)."""
        enc, lay = self.encoder, self.layout
        x = enc.embed_patches(images)  # (B, N, C)
        B, _, C = x.shape
        x = take_segments(x[:, self.patch_index], order[:, :lay.num_visible])  # (B, S-1, T, C)
        x = torch.cat([x.reshape(B, -1, C), enc.cls_token.expand(B, -1, -1).to(x.dtype)], dim=1)
        want, taps = set(self.taps), {}
        for i, blk in enumerate(enc.blocks, start=1):
            x = blk(x, self.mask)
            if i in want:
                taps[i] = x
        return [taps[t] for t in self.taps]

    # ------------------------------------------------------------------ decoders
    def _query_positions(self, order: torch.Tensor, dtype) -> torch.Tensor:
        """(B, S, T, D) decoder position of each segment, in the sample's order."""
        pos = self.decoder_pos_embed[self.patch_index].to(dtype)  # (S, T, D)
        return pos[order]

    def predict(self, images: torch.Tensor, order: torch.Tensor):
        """Raw predictions (B, L, head width) of both decoders; row-block k of Gen predicts segment k+1 of
        ``order``, of Dis segment k; the last row predicts the teacher's CLS token."""
        taps = self.encode(images, order)
        B, nv = images.shape[0], self.layout.num_visible
        pos = self._query_positions(order, taps[0].dtype)
        cls_pos = pos.new_zeros(B, 1, pos.shape[-1])
        gen_pos = torch.cat([pos[:, 1:].reshape(B, -1, pos.shape[-1]), cls_pos], dim=1)
        dis_pos = torch.cat([pos[:, :nv].reshape(B, -1, pos.shape[-1]), cls_pos], dim=1)
        gen = self.gen_decoder(gen_pos, self.gen_taps(taps), self.mask)
        dis = self.dis_decoder(dis_pos, self.dis_taps(taps), self.mask)
        return gen, dis

    # ------------------------------------------------------------------ loss
    def to_teacher_grid(self, pred: torch.Tensor) -> torch.Tensor:
        """(B, (S-1)*T, D') segment predictions -> (B, S-1, Tt, D) on the teacher's grid, per segment."""
        return self._resample(pred, self.layout.num_visible, self.layout.segment_side,
                              self.teacher_layout.segment_side)

    def _resample(self, pred: torch.Tensor, n: int, s: int, st: int) -> torch.Tensor:
        """(B, n*s*s, D') predictions for n square s x s blocks of student tokens -> (B, n, st*st, D) for the same
        blocks on the teacher's grid: unshuffled (discrete targets, st = r*s) or bilinear (fp32)."""
        B = pred.shape[0]
        pred = pred.float()
        if self.unshuffle:
            r, k = self.unshuffle, self.classes
            pred = pred.reshape(B * n, s, s, r, r, k).permute(0, 1, 3, 2, 4, 5)  # (i, a, j, b): row i*r+a, col j*r+b
            return pred.reshape(B, n, st * st, k)
        D = pred.shape[-1]
        pred = pred.reshape(B * n, s, s, D)
        if s != st:
            pred = F.interpolate(pred.permute(0, 3, 1, 2), size=(st, st), mode="bilinear", align_corners=False)
            pred = pred.permute(0, 2, 3, 1)
        return pred.reshape(B, n, st * st, D)

    def token_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-token loss: cross-entropy against codebook indices, else ``2 - 2 cos`` against features."""
        return token_cross_entropy(pred, target) if self.classes else cosine_loss(pred, target)

    def targets(self, teacher_tokens: torch.Tensor, order: torch.Tensor):
        """Teacher patch tokens (B, Nt, D) or indices (B, Nt), row-major on the teacher grid -> Gen and Dis
        targets (B, S-1, Tt[, D])."""
        segs = take_segments(teacher_tokens[:, self.teacher_patch_index], order)  # (B, S, Tt, D)
        return segs[:, 1:], segs[:, :-1]

    def forward(self, images: torch.Tensor, teacher_tokens: torch.Tensor, teacher_cls: Optional[torch.Tensor] = None,
                order: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """images: (B, 3, H, W) student view; teacher_tokens: (B, Gt*Gt, D); teacher_cls: (B, D) or None;
        order: (B, S) segment order (a fresh random one per sample when None).

        Discrete targets: teacher_tokens (B, Gt*Gt) int64 codebook indices, teacher_cls None.

        Returns per-sample (B,) Gen and Dis losses, each the mean of the token loss (``2 - 2 cos``, or
        cross-entropy for discrete targets) over the sample's predicted tokens (CLS counting as one token); the
        caller reduces over the batch."""
        if teacher_tokens.shape[1] != self.teacher_grid ** 2:
            raise ValueError(f"expected {self.teacher_grid ** 2} teacher tokens, got {teacher_tokens.shape[1]}")
        if self.objective == "distill":
            return self._distill_loss(images, teacher_tokens, teacher_cls)
        if order is None:
            order = self.random_order(images.shape[0], images.device)
        if self.objective == "dis_only":
            return self._dis_only_loss(images, teacher_tokens, teacher_cls, order)
        gen, dis = self.predict(images, order)
        gen_t, dis_t = self.targets(teacher_tokens, order)
        nv_tokens = self.layout.num_visible * self.layout.tokens_per_segment
        return tuple(self._token_losses(self.to_teacher_grid(pred[:, :nv_tokens]), tgt, pred[:, -1], teacher_cls)
                     for pred, tgt in ((gen, gen_t), (dis, dis_t)))

    def _token_losses(self, pred, tgt, cls_pred, teacher_cls):
        """Mean over the sample's tokens (+ CLS as one more token) -> (B,)."""
        tok = self.token_loss(pred, tgt).flatten(1)
        if teacher_cls is not None:
            tok = torch.cat([tok, cosine_loss(cls_pred, teacher_cls)[:, None]], dim=1)
        return tok.mean(dim=1)

    def _dis_only_loss(self, images, teacher_tokens, teacher_cls, order):
        taps = self.encode(images, order)
        B, nv = images.shape[0], self.layout.num_visible
        pos = self._query_positions(order, taps[0].dtype)
        dis_pos = torch.cat([pos[:, :nv].reshape(B, -1, pos.shape[-1]), pos.new_zeros(B, 1, pos.shape[-1])], dim=1)
        dis = self.dis_decoder(dis_pos, self.dis_taps(taps), self.mask)
        _, dis_t = self.targets(teacher_tokens, order)
        nv_tokens = nv * self.layout.tokens_per_segment
        loss = self._token_losses(self.to_teacher_grid(dis[:, :nv_tokens]), dis_t, dis[:, -1], teacher_cls)
        return torch.zeros_like(loss), loss

    def _distill_loss(self, images, teacher_tokens, teacher_cls):
        x = self.distill_head(self.distill_norm(self.encoder.forward_features(images)))  # (B, 1 + N, D')
        B, G, Gt = images.shape[0], self.encoder.grid, self.teacher_grid
        pred = self._resample(x[:, 1:], 1, G, Gt).reshape(B, Gt * Gt, -1)
        loss = self._token_losses(pred, teacher_tokens, x[:, 0], teacher_cls)
        return torch.zeros_like(loss), loss


OBJECTIVES = ("digpt", "dis_only", "distill")


def build_model(model_cfg, teacher_dim: int, teacher_grid: int, num_classes: Optional[int] = None,
                init_weights: bool = True) -> DiGPT:
    """Build the student from a :class:`megadigpt.config.ModelConfig` (``num_classes``: a discrete target's
    codebook size, :attr:`megadigpt.targets.TargetSpec.classes`; ``init_weights=False``: see :class:`DiGPT`)."""
    size = model_cfg.resolved_size()
    encoder = ViTEncoder(model_cfg.img_size, model_cfg.patch_size, size.embed_dim, size.depth, size.num_heads,
                         size.mlp_ratio, model_cfg.drop_path, model_cfg.attention)
    return DiGPT(encoder, model_cfg.segment_grid, teacher_dim, teacher_grid, taps=model_cfg.resolved_taps(),
                 decoder_dim=model_cfg.decoder_dim, decoder_depth=model_cfg.decoder_depth,
                 decoder_heads=model_cfg.decoder_heads, decoder_mlp_ratio=model_cfg.decoder_mlp_ratio,
                 attention=model_cfg.attention, objective=model_cfg.objective, num_classes=num_classes,
                 init_weights=init_weights)
