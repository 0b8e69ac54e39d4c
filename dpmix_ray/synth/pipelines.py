"""Model sources: where a diffusion model comes from, and how it turns (class, seed) rows into images.

``synth.model`` names one of three sources, all of which end as a local directory that the Ray
actors load with ``local_files_only=True`` and safetensors only:

* a built-in name: ``tiny-random`` (a tiny randomly initialised StableDiffusionPipeline, built in code;
  its images are noise, it exists to exercise the real loading and generation path offline) or
  ``digits-ddpm`` (a class-conditional DDPM trained once on scikit-learn's public digits);
* a local directory: a diffusers text-to-image pipeline (``model_index.json``) or a class-conditional
  model in this package's format (``dpmix_model.json``, see :mod:`dpmix_ray.synth.digits_ddpm`);
* a Hugging Face hub id: fetched into the hub cache by the driver (or found there offline), then loaded
  from that snapshot like a local directory.

Resolution happens once, in the driver, so a missing model fails with one line before any actor
starts, and the actors never touch the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from dpmix_ray.errors import DataError

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

TINY_RANDOM = "tiny-random"
DIGITS_DDPM = "digits-ddpm"
BUILTINS = (TINY_RANDOM, DIGITS_DDPM)
CLASS_CONDITIONAL_FILE = "dpmix_model.json"
TEXT_TO_IMAGE_GUIDANCE = 7.5  # diffusers' Stable Diffusion default, used when synth.guidance is null
# Bump when the code that builds a built-in changes, so an old cached copy is never reused.
_TINY_RANDOM_DIR = "tiny-random-sd-v1"
# Hub snapshots: pipeline configs and safetensors weights of the components a text-to-image pipeline
# loads; never .bin/.ckpt pickles, root-level single-file checkpoints or the safety checker.
_HUB_ALLOW = ["model_index.json", "*/*.json", "*/*.txt", "*/diffusion_pytorch_model.safetensors", "*/model.safetensors"]
_HUB_IGNORE = ["safety_checker/*"]
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def cache_root() -> Path:
    """``$DPMIX_CACHE`` or ``~/.cache/dpmix-ray``: built-in models and default synthetic-set dirs."""
    return Path(os.environ.get("DPMIX_CACHE") or Path.home() / ".cache" / "dpmix-ray").expanduser()


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: what the user named and the local directory every actor loads."""

    source: Literal["builtin", "local", "hub"]
    id: str
    path: str
    revision: str | None
    kind: Literal["text-to-image", "class-conditional"]
    classes: tuple[str, ...] | None  # the class names a class-conditional model knows
    default_guidance: float  # used when synth.guidance is null

    def manifest(self) -> dict[str, object]:
        return {"source": self.source, "id": self.id, "path": self.path, "revision": self.revision, "kind": self.kind}


_Kind = tuple[Literal["text-to-image", "class-conditional"], tuple[str, ...] | None, float]


def _kind_of(path: Path) -> _Kind:
    if (path / CLASS_CONDITIONAL_FILE).is_file():
        meta = json.loads((path / CLASS_CONDITIONAL_FILE).read_text())
        return "class-conditional", tuple(str(c) for c in meta["classes"]), float(meta.get("default_guidance", 1.0))
    if (path / "model_index.json").is_file():
        return "text-to-image", None, TEXT_TO_IMAGE_GUIDANCE
    raise DataError(f"synth.model: {path} is neither a diffusers pipeline (model_index.json) nor a {CLASS_CONDITIONAL_FILE} model")


def weights_digest(path: Path) -> str:
    """sha256 over a directory's safetensors and JSON files: the revision of a local or built-in model."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")):
        h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()[:16]


def _local(source: Literal["builtin", "local"], model_id: str, path: Path) -> ModelSpec:
    return ModelSpec(source, model_id, str(path), weights_digest(path), *_kind_of(path))


def _short(e: BaseException, limit: int = 100) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def _hub(model_id: str, revision: str | None) -> ModelSpec:
    """Find ``model_id`` in the hub cache, else download it; any failure is one DataError line."""
    from huggingface_hub import snapshot_download

    kwargs = _hub_kwargs(model_id, revision)
    try:
        path = Path(snapshot_download(**kwargs, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss in the cache means "try the network"
        try:  # the model card too, so synth.provenance can read its declared training data offline later
            path = Path(snapshot_download(**kwargs | {"allow_patterns": [*_HUB_ALLOW, "README.md"]}))
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, bad revision: all one message
            raise DataError(
                f"synth.model: '{model_id}' is not a built-in ({', '.join(BUILTINS)}), not a local directory, "
                f"and neither in the Hugging Face cache nor downloadable ({_short(e)})"
            ) from None
    return ModelSpec("hub", model_id, str(path), path.name, *_kind_of(path))


def _hub_kwargs(model_id: str, revision: str | None) -> dict[str, object]:
    return {"repo_id": model_id, "revision": revision, "allow_patterns": _HUB_ALLOW, "ignore_patterns": _HUB_IGNORE}


def path_on_this_node(spec: ModelSpec) -> str:
    """The model directory on the node an actor runs on.

    The driver resolved ``spec`` on its own node; on another node without a shared cache, a hub model
    is fetched at the exact commit the driver saw, and a built-in is rebuilt (trained) locally.
    """
    if Path(spec.path).is_dir():
        return spec.path
    if spec.source == "hub":
        from huggingface_hub import snapshot_download

        return snapshot_download(**_hub_kwargs(spec.id, spec.revision))
    if spec.source == "builtin":
        return resolve_model(spec.id, progress=False).path
    raise DataError(f"synth.model: {spec.path} is not on this node; put local models on a filesystem every node mounts")


def resolve_model(model: str, revision: str | None = None, *, progress: bool = True) -> ModelSpec:
    """Turn ``synth.model`` into a local directory, building or training a built-in on first use."""
    if model == TINY_RANDOM:
        return _local("builtin", model, ensure_tiny_random())
    if model == DIGITS_DDPM:
        from dpmix_ray.synth.digits_ddpm import ensure_digits_ddpm

        return _local("builtin", model, ensure_digits_ddpm(progress=progress))
    path = Path(model).expanduser()
    if path.is_dir():
        return _local("local", model, path.resolve())
    if path.exists() or not _HUB_ID.match(model) or model.startswith((".", "~")):
        raise DataError(f"synth.model: '{model}' is not a built-in ({', '.join(BUILTINS)}), a model directory or a hub id")
    return _hub(model, revision)


# --------------------------------------------------------------------------- tiny-random


def atomic_save_dir(final: Path, save: Callable[[Path], None]) -> Path:
    """Build into a sibling temp dir, then rename: a crash never leaves a half-saved model to trust."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        save(tmp)
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():  # else another process finished the same build first: use theirs
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_tiny_random() -> Path:
    """The tiny random StableDiffusionPipeline, saved once with ``save_pretrained`` into the cache."""
    final = cache_root() / "models" / _TINY_RANDOM_DIR
    if (final / "model_index.json").is_file():
        return final
    return atomic_save_dir(final, lambda d: build_tiny_random().save_pretrained(d, safe_serialization=True))


def build_tiny_random() -> StableDiffusionPipeline:
    """A seeded, randomly initialised SD pipeline (32×32 output, 16×16 latents): real code path, noise out.

    The tokenizer is CLIP's byte-level BPE with no merges: every byte is a token, so any prompt works.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet + [c + "</w>" for c in alphabet])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# --------------------------------------------------------------------------- image sources


class ImageSource(Protocol):
    """A loaded model: class indices (into ``class_names``) and per-image seeds → float [0, 1] N×C×H×W."""

    def __call__(self, labels: list[int], seeds: list[int]) -> torch.Tensor: ...


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    # CPU generators: the same seed gives the same starting noise on CPU and GPU.
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


class TextToImage:
    """A diffusers text-to-image pipeline prompted with ``prompt.format(label=class name)``."""

    def __init__(self, spec: ModelSpec, *, class_names: list[str], prompt: str, steps: int, guidance: float, device: str) -> None:
        from diffusers import DiffusionPipeline

        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        kwargs: dict[str, object] = {"local_files_only": True, "use_safetensors": True, "dtype": dtype}
        path = path_on_this_node(spec)
        index = json.loads((Path(path) / "model_index.json").read_text())
        if "safety_checker" in index:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            self.pipe = DiffusionPipeline.from_pretrained(path, **kwargs).to(device)
        except (OSError, ValueError) as e:
            raise DataError(f"synth.model: cannot load {path} offline as safetensors ({_short(e)})") from None
        self.pipe.set_progress_bar_config(disable=True)
        self.prompts = [prompt.format(label=name) for name in class_names]
        self.steps, self.guidance = steps, guidance

    def __call__(self, labels: list[int], seeds: list[int]) -> torch.Tensor:
        out = self.pipe(
            prompt=[self.prompts[i] for i in labels], num_inference_steps=self.steps, guidance_scale=self.guidance,
            generator=seeded_generators(seeds), output_type="pt",
        )
        return out.images.float().clamp(0, 1).cpu()


def _quiet_hf() -> None:
    """Actors load the model once each; per-component load bars and advice would repeat per worker."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def load_source(spec: ModelSpec, *, class_names: list[str], prompt: str, steps: int, guidance: float, device: str) -> ImageSource:
    """Load ``spec`` onto ``device`` (fp16 on GPU) as a callable image source."""
    _quiet_hf()
    if spec.kind == "class-conditional":
        from dpmix_ray.synth.digits_ddpm import ClassConditional

        return ClassConditional(path_on_this_node(spec), class_names=class_names, steps=steps, guidance=guidance, device=device)
    return TextToImage(spec, class_names=class_names, prompt=prompt, steps=steps, guidance=guidance, device=device)


def to_uint8(images: torch.Tensor, *, image_size: int, channels: int) -> np.ndarray:
    """Float [0, 1] N×C×H×W at the model's resolution → uint8 N×channels×image_size×image_size.

    Antialiased bilinear resizing either way; RGB → grey by ITU-R 601 luma, grey → RGB by repetition.
    """
    x = images.float()
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    if x.shape[1] == 3 and channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return x.clamp(0, 1).mul(255).round().to(torch.uint8).contiguous().numpy()
