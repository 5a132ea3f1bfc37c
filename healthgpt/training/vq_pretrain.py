"""A short pretraining of a random image tokenizer, so that its codes mean something.

HealthGPT's image tokenizer is a pretrained VQGAN that stays frozen in all three stages; a model
built without ``image_tokenizer_path`` has a random one, whose codes decode to noise whatever the
LLM learns. ``pretrain_image_tokenizer`` gives it a small codebook that reconstructs the training
images, in three deterministic steps (no Gumbel noise, no codebook collapse to fight)::

    1. autoencoder:  min  mean((decoder(post_quant_conv(z)) - x)^2),  z = quant_conv(encoder(x))
                     (encoder, quant_conv, post_quant_conv, decoder; ``ae_steps`` Adam steps)
    2. codebook:     c_1..c_K = k-means (k-means++ seeded) of the latent vectors z[b, :, i, j] of the
                     training images and their mirror images; codebook[:K] = c
                     proj: logit_k(z) = 2 c_k . z - |c_k|^2   (argmax = the nearest centre)
                     the other ``num_vq_embeddings - K`` codes: proj rows 0, bias ``OFF_BIAS``
    3. decoder:      min  mean((decoder(post_quant_conv(c[id(x)])) - x)^2)   (``decoder_steps`` steps,
                     post_quant_conv + decoder; the encoder, codebook and proj stay as set)

Step 1 makes the latents carry the image (a random encoder's 8 numbers per 8 x 8 patch barely do),
step 2 is the codebook initialisation of k-means VQ training (k-means++, Lloyd iterations), step 3
teaches the decoder the quantised latents it will be given. ``encode`` is then the nearest-centre
assignment and only the K trained codes can come out. The vocabulary keeps all 8192 ``<idx_*>``
tokens. The goal is a tokenizer whose decoded codes resemble the image, not a sharp one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from healthgpt.data.images import load_image
from healthgpt.model.vq import VQTokenizer

__all__ = ["pretrain_image_tokenizer", "kmeans", "VQPretrainResult", "OFF_BIAS"]

OFF_BIAS = -1e4  # the code-logit bias of a switched-off code: never the argmax


@dataclass
class VQPretrainResult:
    steps: int  # autoencoder + decoder steps
    images: int
    active_codes: int  # K
    used_codes: int  # codes the training images (and mirrors) are encoded to
    loss_start: float  # pixel MSE of the first autoencoder step
    loss_end: float  # pixel MSE through the codebook, mean of the decoder's last tenth of steps
    seconds: float


def kmeans(vectors: torch.Tensor, k: int, iters: int = 20, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` centres [k, D] of ``vectors`` [N, D] (N >= k): k-means++ seeding, then ``iters`` Lloyd
    iterations; an empty cluster keeps its centre."""
    n = vectors.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= {n} vectors, got k={k}")
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [vectors[first]]
    dist = (vectors - centres[0]).pow(2).sum(1)
    for _ in range(k - 1):
        pick = int(torch.multinomial(dist / dist.sum(), 1, generator=generator)) if dist.sum() > 0 else int(dist.argmax())
        centres.append(vectors[pick])
        dist = torch.minimum(dist, (vectors - vectors[pick]).pow(2).sum(1))
    c = torch.stack(centres).clone()
    for _ in range(iters):
        assign = torch.cdist(vectors, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, vectors)
        counts = torch.bincount(assign, minlength=k).to(c.dtype)[:, None]
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
    return c


def pretrain_image_tokenizer(tokenizer: VQTokenizer, image_paths: list, ae_steps: int = 150, decoder_steps: int = 100,
                             active_codes: int = 64, lr: float = 3e-3, batch_size: int = 16, seed: int = 0,
                             log=None) -> VQPretrainResult:
    """Train ``tokenizer`` in place on ``image_paths`` (module docstring); it is left frozen, in eval mode."""
    n_codes = tokenizer.config.num_vq_embeddings
    if not 1 <= active_codes <= n_codes:
        raise ValueError(f"active_codes must lie in [1, {n_codes}], got {active_codes}")
    if not image_paths:
        raise ValueError("pretrain_image_tokenizer needs at least one image")
    t0 = time.time()
    pixels = tokenizer.preprocess([load_image(p) for p in image_paths])
    pixels = torch.cat([pixels, pixels.flip(-1)])  # mirror images: twice the patches for the codebook
    gen = torch.Generator().manual_seed(seed)
    vq = tokenizer.model
    codebook = vq.quantize.embedding.weight
    decoder_params = list(vq.post_quant_conv.parameters()) + list(vq.decoder.parameters())

    def decode(z):
        return vq.decoder(vq.post_quant_conv(z))

    def batches(steps):
        for _ in range(steps):
            yield pixels[torch.randint(len(pixels), (min(batch_size, len(pixels)),), generator=gen)]

    tokenizer.requires_grad_(True)
    tokenizer.train()
    ae_losses, dec_losses = [], []
    try:
        opt = torch.optim.Adam(list(vq.encoder.parameters()) + list(vq.quant_conv.parameters()) + decoder_params, lr=lr)
        for x in batches(ae_steps):
            loss = F.mse_loss(decode(vq.encode(x).latents), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ae_losses.append(loss.item())
        with torch.no_grad():
            z = vq.encode(pixels).latents
            vectors = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            k = min(active_codes, len(vectors))
            centres = kmeans(vectors, k, generator=gen)
            codebook[:k] = centres
            tokenizer.proj.weight.zero_()
            tokenizer.proj.bias.fill_(OFF_BIAS)
            tokenizer.proj.weight[:k, :, 0, 0] = 2.0 * centres
            tokenizer.proj.bias[:k] = -centres.pow(2).sum(1)
        tokenizer.eval()
        ids = tokenizer.encode(pixels)
        tokenizer.train()
        g = tokenizer.config.grid
        quantised = codebook[ids].reshape(len(pixels), g, g, -1).permute(0, 3, 1, 2).detach()
        opt = torch.optim.Adam(decoder_params, lr=lr)
        for _ in range(decoder_steps):
            idx = torch.randint(len(pixels), (min(batch_size, len(pixels)),), generator=gen)
            loss = F.mse_loss(decode(quantised[idx]), pixels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dec_losses.append(loss.item())
    finally:
        tokenizer.requires_grad_(False)
        tokenizer.eval()
    tail = dec_losses[-max(1, len(dec_losses) // 10):] if dec_losses else [float("nan")]
    result = VQPretrainResult(steps=ae_steps + decoder_steps, images=len(image_paths), active_codes=k,
                              used_codes=int(ids.unique().numel()), loss_start=ae_losses[0] if ae_losses else float("nan"),
                              loss_end=sum(tail) / len(tail), seconds=time.time() - t0)
    if log:
        log(f"[demo] image tokenizer: {ae_steps} autoencoder steps, k-means codebook of {k} codes "
            f"({result.used_codes} in use), {decoder_steps} decoder steps on {len(image_paths)} training images: "
            f"pixel MSE {result.loss_start:.4f} -> {result.loss_end:.4f} in {result.seconds:.0f}s")
    return result
