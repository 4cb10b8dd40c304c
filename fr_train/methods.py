"""The method presets that `fr_train BACKBONE METHOD` names: one table, read by config.build_config
(and listed by `fr_train list`).

A preset sets the head (margin, VPL, the loss) and, for the pair losses, the P×K sampler — nothing
else, so that `--set` overrides and a TOML file compose with it predictably. Values follow the
papers' published defaults (docs/methods.md).
"""

from __future__ import annotations

from typing import Any

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "softmax": ("plain softmax cross-entropy over a linear layer (no normalisation)",
                {"head.margin": "softmax", "head.s": 1.0, "head.m1": 1.0, "head.m2": 0.0, "head.m3": 0.0}),
    "sphereface": ("SphereFace: multiplicative angular margin cos(m1·θ), m1=1.7, with the monotone ψ",
                   {"head.margin": "sphereface", "head.s": 64.0, "head.m1": 1.7, "head.m2": 0.0,
                    "head.m3": 0.0}),
    "cosface": ("CosFace: additive cosine margin s·(cos θ − 0.4)",
                {"head.margin": "cosface", "head.s": 64.0, "head.m1": 1.0, "head.m2": 0.0, "head.m3": 0.4}),
    "arcface": ("ArcFace: additive angular margin s·cos(θ + 0.5)",
                {"head.margin": "arcface", "head.s": 64.0, "head.m1": 1.0, "head.m2": 0.5, "head.m3": 0.0}),
    "combined": ("combined margin s·(cos(m1·θ + m2) − m3) = (1, 0.3, 0.2) as in insightface",
                 {"head.margin": "combined", "head.s": 64.0, "head.m1": 1.0, "head.m2": 0.3,
                  "head.m3": 0.2}),
    "vpl": ("VPL (Deng et al. 2021): ArcFace with variational prototypes from a sharded memory bank",
            {"head.margin": "arcface", "head.s": 64.0, "head.m1": 1.0, "head.m2": 0.5, "head.m3": 0.0,
             "head.vpl": True}),
    "unpg": ("UNPG (Jung et al.): ArcFace + filtered in-batch negative pairs of the global batch",
             {"head.loss": "unpg", "head.margin": "arcface", "head.s": 64.0, "head.m1": 1.0, "head.m2": 0.5,
              "head.m3": 0.0}),
    "epl": ("EPL: CosFace + empirical prototypes (class feature expectations) with an adaptive margin",
            {"head.loss": "epl", "head.margin": "cosface", "head.s": 64.0, "head.m1": 1.0, "head.m2": 0.0,
             "head.m3": 0.4}),
    "bce": ("BCE with one learned unified threshold (UniFace): s·(cos − 0.4) against a bias b",
            {"head.loss": "bce", "head.margin": "cosface", "head.s": 64.0, "head.m1": 1.0, "head.m2": 0.0,
             "head.m3": 0.4}),
    "uss": ("USS (UniTSFace): CosFace + unified-threshold sample-to-sample loss after epoch 1",
            {"head.loss": "uss", "head.margin": "cosface", "head.s": 64.0, "head.m1": 1.0, "head.m2": 0.0,
             "head.m3": 0.4}),
    "distill": ("EKD distillation (Huang et al. 2022): ArcFace + rank terms matching a teacher's verification "
                "decisions; set distill.teacher=RUN/final",
                {"head.margin": "arcface", "head.s": 64.0, "head.m1": 1.0, "head.m2": 0.5, "head.m3": 0.0,
                 "distill.ekd_pos_weight": 0.02, "distill.ekd_neg_weight": 0.01}),
    "triplet": ("triplet loss with batch-hard mining over the global batch (FaceNet), margin 0.2, P×K batches",
                {"head.loss": "triplet", "head.pair_margin": 0.2, "data.sampler": "pk"}),
    "contrastive": ("contrastive loss over all pairs of the global batch, negative margin 0.3, P×K batches",
                    {"head.loss": "contrastive", "head.pair_margin": 0.3, "data.sampler": "pk"}),
}
