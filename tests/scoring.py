"""Teacher-forced scores of a caption under a bundle, for checks of what beam search reports."""

from __future__ import annotations

import torch
from PIL import Image

from captioning.data.vocab import END_ID, START_ID
from captioning.inference.captioner import Captioner, EnsembleCaptioner
from captioning.models.encoders import preprocess


def word_logprobs(cap: Captioner, img: Image.Image, tokens: list[int]) -> torch.Tensor:
    """[T] the log-prob the bundle's decoder gives each word of ``tokens`` and <end>, teacher
    forced; an ensemble's is the log of its members' weighted mean probability."""
    if isinstance(cap, EnsembleCaptioner):
        per = torch.stack([word_logprobs(m, img, tokens) for m in cap.members])  # [M, T]
        w = torch.tensor([m["weight"] for m in cap.config["members"]]).log()[:, None]
        return torch.logsumexp(per + w, 0)
    out = cap.encoder.encode(preprocess(img)[None])
    feats = (out.grid if cap.uses_grid else out.pooled).float()  # [1, L, C] or [1, D]
    seq = torch.tensor([[START_ID, *tokens, END_ID]])
    with torch.inference_mode():
        logits, _ = cap.decoder(cap.decoder.context(feats), seq)  # [1, T, V]
    return torch.log_softmax(logits.float(), -1)[0].gather(1, seq[0, 1:, None])[:, 0]
