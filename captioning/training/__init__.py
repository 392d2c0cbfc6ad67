"""Training: one run skeleton (``run``) that drives an objective (``xe`` cross-entropy, ``scst``
self-critical), with its checkpoint (``checkpoint``), data (``data``), encoder-block fine-tuning
(``finetune``), warm starts (``warmstart``) and multi-process training (``distributed``);
``train.main`` and ``scst.main_scst`` are the entry points of ``captioning train``."""
