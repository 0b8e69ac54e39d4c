"""``digits-ddpm``: a small class-conditional DDPM trained once, on CPU, on scikit-learn's digits.

Why this model: DP-Mix_Diff needs synthetic images from a model that never saw the private data.
scikit-learn's 1,797 8×8 digits are public and a different source from the private MNIST-5k (UCI
pen-scanned digits vs NIST), so mixing with them leaks nothing about MNIST. Training takes a few
minutes on two CPU cores and happens once; the result is cached under
``$DPMIX_CACHE/models/digits-ddpm-v1``.

Model format (``dpmix_model.json`` + ``unet/`` + ``scheduler/``, safetensors): a diffusers
``UNet2DModel`` with a class embedding of ``len(classes) + 1`` entries, the last being the "no class"
token used for classifier-free guidance, and the DDPM scheduler config it was trained with. Sampling
uses DDIM (η = 0) so an image depends only on its seed; ``synth.guidance`` is the CFG scale (null: the
model's ``default_guidance``, 1.5 here; the text-to-image default of 7.5 ruins digits).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from dpmix_ray.errors import DataError
from dpmix_ray.synth.pipelines import CLASS_CONDITIONAL_FILE, atomic_save_dir, cache_root, seeded_generators

MODEL_DIR = "digits-ddpm-v1"  # bump when the recipe below changes
TRAIN_STEPS = 2000
BATCH = 128
NULL_LABEL_RATE = 0.1  # share of training labels replaced by "no class" for classifier-free guidance
# The guidance scale for synth.guidance: null. Measured with a logistic regression fitted on the digits
# themselves, on 200 samples at 25 DDIM steps: 94% recognised at 1.0, 98% at 1.5, 88% at 2, 36% at 3,
# 10% (chance) at 7.5. A model this small saturates under strong guidance.
DEFAULT_GUIDANCE = 1.5


def ensure_digits_ddpm(*, progress: bool = True) -> Path:
    """The cached model dir, training it first if it is not there."""
    final = cache_root() / "models" / MODEL_DIR
    if (final / CLASS_CONDITIONAL_FILE).is_file():
        return final
    return atomic_save_dir(final, lambda d: train(d, progress=progress))


def _unet(num_classes: int) -> "torch.nn.Module":
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=num_classes + 1, norm_num_groups=16, attention_head_dim=16,
    )


def train(out: Path, *, steps: int = TRAIN_STEPS, seed: int = 0, progress: bool = True) -> None:
    """Train on all of sklearn's digits (pixels 0..16 → [-1, 1]) and save into ``out``.

    Noise-prediction loss, AdamW with a one-cycle schedule and an EMA of the weights (the EMA is what is
    saved: on a few thousand steps it gives visibly cleaner digits).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(16.0).mul(2.0).sub(1.0)[:, None]
    y = torch.from_numpy(digits.target).long()
    classes = [str(c) for c in digits.target_names]

    threads = torch.get_num_threads()
    # One core stays free: on a shared two-core machine a second OpenMP thread spin-waits behind
    # other processes and makes training several times slower, not faster.
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - 1)))
    try:
        _fit(out, x, y, classes, steps=steps, seed=seed, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _fit(out: Path, x: torch.Tensor, y: torch.Tensor, classes: list[str], *, steps: int, seed: int, progress: bool) -> None:
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    null = len(classes)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    unet = _unet(len(classes))
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0.0)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    bar = tqdm(range(steps), desc="training digits-ddpm (once)", disable=not progress, unit="step")
    for step in bar:
        idx = torch.randint(0, len(x), (BATCH,), generator=gen)
        xb, yb = x[idx], y[idx].clone()
        yb[torch.rand(BATCH, generator=gen) < NULL_LABEL_RATE] = null
        noise = torch.randn(xb.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH,), generator=gen)
        loss = F.mse_loss(unet(scheduler.add_noise(xb, noise, t), t, class_labels=yb).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1.0 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    meta = {
        "format": "dpmix-class-conditional-ddpm/1",
        "classes": classes,
        "null_class": null,
        "default_guidance": DEFAULT_GUIDANCE,
        "channels": 1,
        "native_size": 8,
        "trained_on": ["sklearn-digits"],  # read by synth.provenance: a copy of this model keeps its record
        "trained_on_detail": "sklearn.datasets.load_digits (public UCI optical digits, 1797 images)",
        "train_steps": steps,
        "seed": seed,
    }
    (out / CLASS_CONDITIONAL_FILE).write_text(json.dumps(meta, indent=2) + "\n")


class ClassConditional:
    """Sample a ``dpmix_model.json`` model: DDIM (η = 0) with classifier-free guidance.

    Class names are matched to the model's own classes by name; a name it does not know is a DataError.
    """

    def __init__(self, path: str, *, class_names: list[str], steps: int, guidance: float, device: str) -> None:
        from diffusers import DDIMScheduler, UNet2DModel

        root = Path(path)
        meta = json.loads((root / CLASS_CONDITIONAL_FILE).read_text())
        known = [str(c) for c in meta["classes"]]
        unknown = [c for c in class_names if c not in known]
        if unknown:
            raise DataError(f"synth.classes: {root.name} only knows classes {', '.join(known)} (asked for {', '.join(unknown[:5])})")
        self.index = [known.index(c) for c in class_names]
        self.null = int(meta["null_class"])
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.device = device
        self.unet = UNet2DModel.from_pretrained(root / "unet", local_files_only=True, use_safetensors=True, dtype=self.dtype)
        self.unet.to(device).eval()
        self.scheduler = DDIMScheduler.from_pretrained(root / "scheduler", local_files_only=True)
        self.steps, self.guidance = steps, guidance
        size = int(self.unet.config.sample_size)
        self.shape = (1, int(self.unet.config.in_channels), size, size)

    @torch.no_grad()
    def __call__(self, labels: list[int], seeds: list[int]) -> torch.Tensor:
        x = torch.cat([torch.randn(self.shape, generator=g) for g in seeded_generators(seeds)]).to(self.device, self.dtype)
        cond = torch.tensor([self.index[i] for i in labels], device=self.device)
        both = torch.cat([cond, torch.full_like(cond, self.null)])
        self.scheduler.set_timesteps(self.steps)
        for t in self.scheduler.timesteps:
            eps_c, eps_u = self.unet(torch.cat([x, x]), t, class_labels=both).sample.chunk(2)
            x = self.scheduler.step(eps_u + self.guidance * (eps_c - eps_u), t, x, eta=0.0).prev_sample
        return x.float().clamp(-1, 1).add(1).div(2).cpu()
