"""A short reconstruction pretraining of a random image tokenizer, so that its codes mean something.

HealthGPT's image tokenizer is a pretrained VQGAN that stays frozen in all three stages; a model
built without ``image_tokenizer_path`` has a random one, whose codes decode to noise whatever the
LLM learns. ``pretrain_image_tokenizer`` trains it (encoder, code logits ``proj``, codebook,
decoder) as taming's Gumbel VQGAN is trained, without its GAN and perceptual terms::

    logits = proj(quant_conv(encoder(x)))[:, :K]                       K = active codes
    onehot = gumbel_softmax(logits, tau, hard=True)                     straight-through
    x_hat  = decoder(post_quant_conv(onehot . codebook[:K]))
    q      = mean over batch and positions of softmax(logits)           code usage
    loss   = mean((x_hat - x)^2) + usage_weight * (log K - H(q))         tau: 1 -> tau_min geometrically

with random horizontal flips. The usage term (taming's KL-to-uniform prior, on the batch's mean
code distribution) keeps the codebook from collapsing onto a handful of codes. It then switches the other ``num_vq_embeddings - K`` codes off (their ``proj`` rows zero, bias
``-1e4``) so ``encode``'s argmax only picks the K trained codes. Few images need few codes, and
an LLM learns to predict a few hundred codes far sooner than 8192. The vocabulary keeps all 8192
``<idx_*>`` tokens. The goal is a tokenizer whose decoded codes resemble the image, not a sharp one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from healthgpt.data.images import load_image
from healthgpt.model.vq import VQTokenizer

__all__ = ["pretrain_image_tokenizer", "VQPretrainResult", "OFF_BIAS"]

OFF_BIAS = -1e4  # the code-logit bias of a switched-off code: never the argmax


@dataclass
class VQPretrainResult:
    steps: int
    images: int
    active_codes: int
    loss_start: float  # mean of the first tenth of the steps' losses
    loss_end: float  # mean of the last tenth
    seconds: float


def pretrain_image_tokenizer(tokenizer: VQTokenizer, image_paths: list, steps: int = 200, active_codes: int = 256,
                             lr: float = 3e-3, batch_size: int = 16, tau_min: float = 0.1, usage_weight: float = 0.1, seed: int = 0,
                             log=None) -> VQPretrainResult:
    """Train ``tokenizer`` in place on ``image_paths`` (module docstring); it is left frozen, in eval mode."""
    n_codes = tokenizer.config.num_vq_embeddings
    if not 1 <= active_codes <= n_codes:
        raise ValueError(f"active_codes must lie in [1, {n_codes}], got {active_codes}")
    if not image_paths:
        raise ValueError("pretrain_image_tokenizer needs at least one image")
    t0 = time.time()
    pixels = tokenizer.preprocess([load_image(p) for p in image_paths])
    gen = torch.Generator().manual_seed(seed)
    vq = tokenizer.model
    codebook = vq.quantize.embedding.weight
    tokenizer.requires_grad_(True)
    tokenizer.train()
    opt = torch.optim.Adam(tokenizer.parameters(), lr=lr)
    losses = []
    try:
        for step in range(steps):
            idx = torch.randint(len(pixels), (min(batch_size, len(pixels)),), generator=gen)
            x = pixels[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            logits = tokenizer.proj(vq.encode(x).latents)[:, :active_codes]
            tau = max(tau_min, tau_min ** (step / max(1, steps - 1)))
            onehot = _gumbel_hard(logits, tau, gen)
            quant = torch.einsum("bkhw,kd->bdhw", onehot, codebook[:active_codes])
            usage = logits.softmax(dim=1).mean(dim=(0, 2, 3))
            spread = math.log(active_codes) + (usage * usage.clamp_min(1e-12).log()).sum()  # log K - H(q) >= 0
            loss = F.mse_loss(vq.decoder(vq.post_quant_conv(quant)), x) + usage_weight * spread
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        tokenizer.requires_grad_(False)
        tokenizer.eval()
    with torch.no_grad():
        tokenizer.proj.weight[active_codes:] = 0.0
        tokenizer.proj.bias[active_codes:] = OFF_BIAS
    k = max(1, steps // 10)
    result = VQPretrainResult(steps=steps, images=len(pixels), active_codes=active_codes,
                              loss_start=sum(losses[:k]) / k, loss_end=sum(losses[-k:]) / k, seconds=time.time() - t0)
    if log:
        log(f"[demo] image tokenizer: {steps} reconstruction steps on {len(pixels)} training images, {active_codes} "
            f"active codes: pixel MSE {result.loss_start:.4f} -> {result.loss_end:.4f} in {result.seconds:.0f}s")
    return result


def _gumbel_hard(logits: torch.Tensor, tau: float, generator: torch.Generator) -> torch.Tensor:
    """``F.gumbel_softmax(logits, tau, hard=True, dim=1)`` with a seeded generator."""
    u = torch.rand(logits.shape, generator=generator).clamp_(1e-9, 1.0 - 1e-9)
    soft = ((logits - torch.log(-torch.log(u))) / tau).softmax(dim=1)
    hard = torch.zeros_like(soft).scatter_(1, soft.argmax(dim=1, keepdim=True), 1.0)
    return hard - soft.detach() + soft
