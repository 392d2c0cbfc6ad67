"""The settings of a cross-entropy training run (``train``), kept in its state and bundle."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    encoder: str = "resnet50"
    decoder: str = "attention"
    epochs: int = 12
    batch_images: int = 32  # each with all its captions (~160 captions a batch)
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    grad_clip: float = 5.0
    patience: int = 3
    min_freq: int = 5
    max_words: int = 30  # captions longer than this are truncated for training
    seed: int = 0
    precision: str = "auto"  # encoder features and decoder autocast
    train_precision: str = "fp32"  # fp32 | bf16 autocast for the decoder in training
    dev_beam: int = 1  # dev decoding during training (greedy)
    checkpoint_minutes: float = 3.0
    max_minutes: float = 0.0  # stop (resumably) after this long; 0 = no limit
    decoder_cfg: dict = field(default_factory=dict)  # overrides of DecoderConfig fields
    finetune: str = ""  # "" = frozen encoder; "layer4"/"block5": tune it (training.finetune)
    finetune_lr: float = 0.0  # the tuned block's peak LR; 0 = lr / 10
    device: str = "auto"  # auto | cpu | cuda (core.machine.resolve_device)
    runtime: str = "torch"  # which feature cache: torch (reference) | openvino | auto
    init: str = ""  # "" = a fresh decoder; a bundle: start from its decoder (and block) weights
    label_smoothing: float = 0.0  # ε of the training loss (dev loss stays plain cross-entropy)
