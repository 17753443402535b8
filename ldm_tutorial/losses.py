"""The autoencoder objective of Latent Diffusion (Rombach et al. 2022, appendix G; taming-transformers):

    L = L1(x, x_hat) + w_p * perceptual(x, x_hat) + lambda_adapt * d_factor * L_GAN + w_kl * KL

* perceptual: LPIPS in the paper. Real LPIPS needs ImageNet-trained VGG16 weights, which cannot be
  downloaded offline. `Perceptual` therefore applies LPIPS's *formula* (unit-normalise each
  feature channel, squared difference, spatial mean, sum over layers) to a frozen, randomly
  initialised VGG-style trunk with a fixed seed: a random-feature perceptual distance. It is an
  honest substitute that still compares local structure at several scales, not a replica of
  LPIPS; where the `lpips` package and its weights are available (Colab), `Perceptual(kind="lpips")`
  uses the real thing.
* PatchGAN: a convolutional discriminator that scores overlapping patches, with hinge losses.
* adaptive weight: lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + 1e-4), G_L being the
  decoder's last layer, so the adversarial gradient never swamps the reconstruction gradient.
* warm-up: the discriminator term is switched on only after `disc_start` steps, once the
  reconstructions are good enough that the discriminator's signal is about detail, not layout.

Introduced in the VAE-losses chapter; used by `python -m ldm_tutorial.tinysd.train vae`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


PERCEPTUAL_KINDS = ("random-vgg", "photo-trained", "lpips")


def vgg_trunk(width: int = 32) -> nn.ModuleList:
    """The three-stage VGG-style trunk every offline `Perceptual` uses (two 3x3 convs per stage)."""
    chans = [3, width, 2 * width, 4 * width]
    return nn.ModuleList(nn.Sequential(
        *([nn.MaxPool2d(2)] if i else []),
        nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.ReLU(),
        nn.Conv2d(chans[i + 1], chans[i + 1], 3, padding=1), nn.ReLU(),
    ) for i in range(3))


class Perceptual(nn.Module):
    """LPIPS-style distance on a frozen trunk.

    kind="random-vgg": random He-initialised weights from `seed` (no training at all).
    kind="photo-trained": the trunk trained here to tell the training photographs apart
        (`ldm_tutorial.vae_lab.train_perceptual`), shipped for seeds 0 and 1; `width` is read
        from the weights.
    kind="lpips": the real LPIPS (VGG16), where the `lpips` package and its weights exist.
    """

    def __init__(self, kind: str = "random-vgg", width: int = 32, seed: int = 0):
        super().__init__()
        if kind not in PERCEPTUAL_KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, PERCEPTUAL_KINDS))}, "
                             f"got {kind!r}")
        self.kind, self.seed = kind, seed
        if kind == "lpips":
            import lpips  # noqa: PLC0415 - optional dependency, fetches VGG weights on first use

            self.net = lpips.LPIPS(net="vgg", verbose=False)
        elif kind == "photo-trained":
            from safetensors.torch import load_file  # noqa: PLC0415

            path = perceptual_weights_path(seed)
            if not path.exists():
                raise FileNotFoundError(
                    f"no photo-trained perceptual trunk for seed {seed} ({path}); seeds 0 and 1 "
                    f"ship, train others with `python -m ldm_tutorial.vae_lab --perceptual {seed}`")
            state = {k: v.float() for k, v in load_file(str(path)).items()}
            self.stages = vgg_trunk(state["0.0.weight"].shape[0])
            self.stages.load_state_dict(state)
        else:
            g = torch.Generator().manual_seed(seed)
            self.stages = vgg_trunk(width)
            for stage in self.stages:
                for m in stage:
                    if isinstance(m, nn.Conv2d):
                        # He initialisation from our own generator: reproducible on any machine
                        fan_in = m.in_channels * 9
                        m.weight.data = torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5
                        m.bias.data.zero_()
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance, shape (B,), for images in [-1, 1]."""
        if self.kind == "lpips":
            return self.net(x, y).flatten()
        total = x.new_zeros(x.shape[0])
        fx, fy = x, y
        for stage in self.stages:
            fx, fy = stage(fx), stage(fy)
            nx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)  # unit length along channels
            ny = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
            total = total + ((nx - ny) ** 2).sum(1).mean((1, 2))
        return total


def perceptual_weights_path(seed: int):
    """Where the photo-trained trunk of `seed` ships."""
    from .tinysd import WEIGHTS_DIR  # noqa: PLC0415 - the package's weights folder

    return WEIGHTS_DIR / "vae-lab" / "perceptual" / f"trunk-seed{seed}.safetensors"


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix): each output logit judges one overlapping patch of the input."""

    def __init__(self, in_channels: int = 3, width: int = 32, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, n_layers + 1):
            nxt = width * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, nxt, 4, stride, 1, bias=False), nn.GroupNorm(8, nxt), nn.LeakyReLU(0.2)]
            ch = nxt
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, h, w) patch logits


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """||d rec / d last_layer|| / (||d g / d last_layer|| + 1e-4), detached, clamped to [0, max_weight]."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()


@dataclass
class VAELossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6
    disc_weight: float = 0.5
    disc_start: int = 2000          # generator steps before the GAN term is switched on
    use_gan: bool = True
    # How the summed KL is put next to the per-pixel-mean reconstruction. LDM sums *both* terms over each
    # image (taming-transformers' LPIPSWithDiscriminator), so its kl_weight=1e-6 weighs a KL summed over
    # latent elements against a reconstruction summed over the 3*H*W pixel values. "ldm" keeps that ratio:
    # the summed KL is divided by 3*H*W because our reconstruction is a mean. "sum" adds the summed KL
    # to the mean reconstruction, which makes the same kl_weight 3*H*W times stronger (49,152x at 128x128).
    kl_reduction: str = "ldm"


class VAELoss(nn.Module):
    """Generator and discriminator losses of the LDM autoencoder, with every term logged."""

    def __init__(self, cfg: VAELossConfig | None = None, perceptual: Perceptual | None = None,
                 discriminator: PatchDiscriminator | None = None):
        super().__init__()
        self.cfg = cfg or VAELossConfig()
        self.perceptual = perceptual if perceptual is not None or self.cfg.perceptual_weight == 0 else Perceptual()
        self.discriminator = discriminator if discriminator is not None or not self.cfg.use_gan else PatchDiscriminator()

    def kl_term(self, kl: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """kl_weight * KL as added to the loss; kl: (B,) summed over latent elements, x: the input batch."""
        c = self.cfg
        if c.kl_reduction not in ("ldm", "sum"):
            raise ValueError(f"kl_reduction must be 'ldm' or 'sum', got {c.kl_reduction!r}")
        return c.kl_weight * kl.mean() / (x[0].numel() if c.kl_reduction == "ldm" else 1)

    def generator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, kl: torch.Tensor, step: int,
                       last_layer: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """x, x_hat: (B, 3, H, W) in [-1, 1]; kl: (B,) KL of each posterior to N(0, I)."""
        c = self.cfg
        rec = c.l1_weight * (x - x_hat).abs().mean() + c.l2_weight * ((x - x_hat) ** 2).mean()
        if c.perceptual_weight:
            rec = rec + c.perceptual_weight * self.perceptual(x, x_hat).mean()
        loss = rec + self.kl_term(kl, x)
        logs = {"rec": rec.item(), "kl": kl.mean().item()}
        if c.use_gan and step >= c.disc_start:
            g_loss = -self.discriminator(x_hat).mean()
            lam = adaptive_weight(rec, g_loss, last_layer) if last_layer is not None else torch.tensor(1.0)
            loss = loss + c.disc_weight * lam * g_loss
            logs.update(g=g_loss.item(), adaptive_weight=float(lam))
        logs["loss"] = loss.item()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, step: int) -> torch.Tensor | None:
        if not self.cfg.use_gan or step < self.cfg.disc_start:
            return None
        return hinge_d_loss(self.discriminator(x), self.discriminator(x_hat.detach()))
