"""DINO: self-distillation with no labels, a student matching an EMA teacher across crops.

Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin: *Emerging Properties in
Self-Supervised Vision Transformers*, ICCV 2021.  A student (timm backbone + lightly's
``DINOProjectionHead``) sees 2 global and ``dino.n_local`` small local views of each
image; a teacher of the same shape sees the global views only, and the student is
trained to give the teacher's output distribution for every other view (lightly's
``DINOLoss``: the teacher's outputs are centred and sharpened, its temperature warmed
up over ``dino.warmup_teacher_temp_epochs``; the centre is averaged across DDP
processes).  With ``metadata_heads.weight > 0`` the archive's metadata heads (body part, age,
sex, view) are trained on the student's features of the global views too.  The teacher gets no gradients: after each optimiser step it becomes an
exponential moving average of the student (lightly's ``update_momentum``), with a
momentum going from ``dino.momentum_teacher`` to 1 along a cosine over the run's steps
(lightly's ``cosine_schedule``).  The last layer of the student head is frozen for the
first ``dino.freeze_last_layer`` epochs, as in the paper.

Views are grey :class:`~radpretrain.transforms.GreyAugment` views (keys under
``augment.``; local views: ``dino.local_crop_scale`` at ``dino.local_size`` px) drawn
from the step's seeded generator, so a resumed run sees the same views.

Exported encoder: the *teacher* backbone (DINO evaluates the teacher).  ``self.encoder``
is the student, the module that trains, which ``model.freeze_bn_stats`` and
``channels_last`` act on; with ``freeze_bn_stats`` the teacher's BatchNorm layers keep
their start statistics too, otherwise both run in train mode (batch statistics) as in
the paper's code.  DINO has no validation loss: its loss is no measure of the features
(a collapsed model scores low), and the centre update is an all-reduce per batch that
uneven validation shards would leave unmatched across processes.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from radpretrain.config import get
from radpretrain.errors import UserError
from radpretrain.methods.base import Paper, PretrainMethod, Supervision, register
from radpretrain.methods.metadata import MetadataHeads, MetadataHeadsSection
from radpretrain.settings import probability
from radpretrain.transforms import AugmentSection, GreyAugment


@dataclass
class DINOSection:
    output_dim: int = field(default=65536, metadata={"ge": 1})  # prototypes K
    hidden_dim: int = field(default=2048, metadata={"ge": 1})
    bottleneck_dim: int = field(default=256, metadata={"ge": 1})
    n_local: int = field(default=4, metadata={"ge": 0})  # local views per image
    local_size: int | None = field(default=None, metadata={"ge": 8, "help": "a side in pixels, or null (data.image_size // 2)"})
    local_crop_scale: tuple[float, float] = field(default=(0.05, 0.4), metadata={"gt": 0.0, "le": 1.0})
    momentum_teacher: float = field(default=0.996, metadata=probability())
    teacher_temp: float = field(default=0.04, metadata={"gt": 0.0})
    warmup_teacher_temp: float | None = field(default=None, metadata={"gt": 0.0, "help": "a temperature, or null (teacher_temp)"})
    warmup_teacher_temp_epochs: int = field(default=0, metadata={"ge": 0})
    student_temp: float = field(default=0.1, metadata={"gt": 0.0})
    center_momentum: float = field(default=0.9, metadata=probability())
    freeze_last_layer: int = field(default=1, metadata={"ge": 0})  # epochs


@register("dino")
class DINO(PretrainMethod):
    """DINO on any timm backbone; config keys under ``dino.`` and ``augment.``."""

    display_name = "DINO (self-distillation, teacher exported)"
    paper = Paper("Emerging Properties in Self-Supervised Vision Transformers",
                  ("Caron", "Touvron", "Misra", "Jégou", "Mairal", "Bojanowski", "Joulin"), 2021, "ICCV",
                  "https://arxiv.org/abs/2104.14294")
    supervision = Supervision.SELF_DISTILLATION
    config_sections = {"dino": DINOSection, "augment": AugmentSection, "metadata_heads": MetadataHeadsSection}
    preview_name = "dino_views"

    def __init__(self, cfg: dict, store=None):
        super().__init__(cfg, store)
        from lightly.loss import DINOLoss  # heavy (torchvision): imported when a DINO model is built
        from lightly.models.modules import DINOProjectionHead  # heavy, as above
        from lightly.models.utils import deactivate_requires_grad  # heavy, as above

        image_size = int(get(cfg, "data.image_size", 224))
        self.n_local = int(get(cfg, "dino.n_local", 4))
        self.local_size = int(get(cfg, "dino.local_size", None) or max(8, image_size // 2))
        if self.backbone_is_vit():
            patch = int(get(cfg, "model.patch_size", 16) or 16)
            if self.n_local and self.local_size % patch:
                raise UserError(f"dino.local_size={self.local_size} must be a multiple of model.patch_size={patch}")
        # a ViT student sees global and local views: timm resamples the position embeddings
        self.build_encoder(dynamic_img_size=True)
        dim = self.encoder.num_features
        self.output_dim = int(get(cfg, "dino.output_dim", 65536))
        head_kw = dict(input_dim=dim, hidden_dim=int(get(cfg, "dino.hidden_dim", 2048)),
                       bottleneck_dim=int(get(cfg, "dino.bottleneck_dim", 256)), output_dim=self.output_dim,
                       freeze_last_layer=int(get(cfg, "dino.freeze_last_layer", 1)))
        with warnings.catch_warnings():  # lightly uses torch's older weight_norm (deprecated, still exact)
            warnings.filterwarnings("ignore", message=r".*weight_norm.* is deprecated", category=FutureWarning)
            self.head = DINOProjectionHead(**head_kw)
            # weight_norm modules cannot be deep-copied: build a twin and copy the weights
            self.teacher_head = DINOProjectionHead(**head_kw)
        self.teacher_head.load_state_dict(self.head.state_dict())
        self.teacher = copy.deepcopy(self.encoder)  # keeps radpretrain_arch / radpretrain_kwargs
        deactivate_requires_grad(self.teacher)
        deactivate_requires_grad(self.teacher_head)
        self.metadata_heads = MetadataHeads.from_section(cfg, store, dim)

        self.momentum_teacher = float(get(cfg, "dino.momentum_teacher", 0.996))
        self.teacher_temp = float(get(cfg, "dino.teacher_temp", 0.04))
        self.criterion = DINOLoss(output_dim=self.output_dim,
                                  warmup_teacher_temp=float(get(cfg, "dino.warmup_teacher_temp", None) or self.teacher_temp),
                                  teacher_temp=self.teacher_temp,
                                  warmup_teacher_temp_epochs=int(get(cfg, "dino.warmup_teacher_temp_epochs", 0)),
                                  student_temp=float(get(cfg, "dino.student_temp", 0.1)),
                                  center_momentum=float(get(cfg, "dino.center_momentum", 0.9)))
        aug = dict(get(cfg, "augment", {}) or {})
        self.augment = GreyAugment.from_config(aug)
        self.local_augment = GreyAugment.from_config(
            {**aug, "crop_scale": tuple(get(cfg, "dino.local_crop_scale", (0.05, 0.4))), "view_size": self.local_size})

    @property
    def has_val_loss(self) -> bool:
        return False  # see the module docstring

    def compile_modules(self) -> list[nn.Module]:
        return [self.encoder, self.teacher]  # student and teacher backbones (heads are small)

    def views(self, img: torch.Tensor, g: torch.Generator | None) -> tuple[list, list]:
        """Two global views at the input's size and ``n_local`` local views at ``local_size``."""
        glob = [self.augment(img, g) for _ in range(2)]
        return glob, [self.local_augment(img, g) for _ in range(self.n_local)]

    def compute_loss(self, batch, batch_idx):
        glob, loc = self.views(batch["image"], self.step_generator(batch_idx))
        b = batch["image"].shape[0]
        with torch.no_grad():
            t = self.teacher_head(self.teacher(self.normalize(torch.cat(glob))))
        # one backbone pass per resolution (BatchNorm statistics per resolution, as in the paper)
        feats = [self.encoder(self.normalize(torch.cat(v))) for v in (glob, loc) if v]
        s = self.head(torch.cat(feats))
        loss = self.criterion(list(t.split(b)), list(s.split(b)), epoch=self.current_epoch)
        if self.metadata_heads is None:
            return loss
        return self.metadata_heads.join(loss, feats[0], torch.as_tensor(batch["index"]).repeat(2))

    # -- teacher: EMA of the student after each optimiser step ---------------
    def momentum(self, step: int | None = None) -> float:
        from lightly.utils.scheduler import cosine_schedule  # heavy (torchvision), see __init__

        step = self.global_step if step is None else int(step)
        total = self.total_steps()
        return cosine_schedule(min(step, total), total, self.momentum_teacher, 1.0)

    @torch.no_grad()
    def update_teacher(self, m: float | None = None) -> None:
        from lightly.models.utils import update_momentum  # heavy (torchvision), see __init__

        m = self.momentum() if m is None else float(m)
        update_momentum(self.encoder, self.teacher, m)
        update_momentum(self.head, self.teacher_head, m)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.update_teacher()

    def on_after_backward(self):
        self.head.cancel_last_layer_gradients(self.current_epoch)  # no-op after dino.freeze_last_layer epochs

    def _freeze_bn(self) -> None:
        super()._freeze_bn()
        if self.freeze_bn_stats:
            for m in self.teacher.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def export_encoder_module(self) -> nn.Module:
        return self.teacher

    def preview_rows(self, batch: dict, generator: torch.Generator) -> list[torch.Tensor]:
        """Rows: input, a global view, a local view (shown at the input's size)."""
        img = batch["image"]
        glob, loc = self.views(img, generator)
        rows = [img, glob[0]]
        if loc:
            rows.append(F.interpolate(loc[0], size=img.shape[-2:], mode="nearest"))
        return rows

    def encoder_meta(self) -> dict:
        meta = super().encoder_meta()
        meta["dino"] = {"exported": "teacher", "output_dim": self.output_dim, "n_local": self.n_local,
                        "local_size": self.local_size, "teacher_temp": self.teacher_temp,
                        "momentum_teacher": self.momentum_teacher}
        if self.metadata_heads is not None:
            meta["metadata"] = self.metadata_heads.describe()
        return meta
