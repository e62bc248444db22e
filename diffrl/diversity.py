"""Diversity of a model's samples for one prompt: how different its images are across seeds.

Reward fine-tuning trades diversity for reward (mode collapse is the field's main failure), so every figure of reward
should come with one of these. Each metric is computed per prompt over that prompt's samples and then averaged over
prompts, with a standard error over prompts.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


def pairwise_distances(features: Tensor) -> Tensor:
    """Euclidean distances between all n(n−1)/2 pairs of rows of `features` [n, ...] (flattened), float32."""
    flat = features.detach().float().flatten(1)
    rows, cols = torch.triu_indices(len(flat), len(flat), offset=1)
    return (flat[rows] - flat[cols]).norm(dim=1)


def pixel_diversity(images: Tensor) -> float:
    """Mean pairwise RMS pixel distance between images [n, 3, H, W] in [0, 1] of the same prompt: 0 when all are
    identical, at most 1. Needs no weights and always works; sensitive to colour, brightness and layout, blind to
    whether two different-looking images show the same thing (use an embedding metric for that)."""
    if len(images) < 2:
        raise ValueError("diversity needs at least two samples per prompt")
    return float(pairwise_distances(images).mean() / math.sqrt(images[0].numel()))


def mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    """Mean over prompts and its standard error std/√n (sample std, n − 1); the error is 0 for a single prompt."""
    tensor = torch.tensor(values, dtype=torch.float64)
    error = float(tensor.std(correction=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(tensor.mean()), error


def latent_diversity(latents: Tensor) -> float:
    """Mean pairwise RMS distance between the final latents [n, C, h, w] of one prompt's samples (before decoding).

    Weight-free and cheap like the pixel metric, and like it sensitive to layout and colour rather than content. For
    latents of unit variance per element (roughly what SD's scaled VAE latents are), unrelated samples sit near √2."""
    if len(latents) < 2:
        raise ValueError("diversity needs at least two samples per prompt")
    return float(pairwise_distances(latents).mean() / math.sqrt(latents[0].numel()))


def pairwise_cosine_distances(embeddings: Tensor) -> Tensor:
    """1 − cos(a, b) for all n(n−1)/2 pairs of rows of `embeddings` [n, D], float32, each in [0, 2]."""
    unit = torch.nn.functional.normalize(embeddings.detach().float(), dim=-1)
    rows, cols = torch.triu_indices(len(unit), len(unit), offset=1)
    return 1 - (unit[rows] * unit[cols]).sum(dim=-1)


def embedding_diversity(embeddings: Tensor) -> float:
    """Mean pairwise cosine distance between image embeddings [n, D] of one prompt's samples: 0 when all embeddings
    point the same way. With a CLIP image tower it is sensitive to what the images show (subject, style, composition
    as CLIP sees them) and largely blind to small shifts, noise and colour changes that leave the content alone."""
    if len(embeddings) < 2:
        raise ValueError("diversity needs at least two samples per prompt")
    return float(pairwise_cosine_distances(embeddings).mean())


ImageEncoder = Callable[[Tensor], Tensor]   # images [B, 3, H, W] in [0, 1] -> embeddings [B, D]


def reward_image_encoder(reward) -> ImageEncoder | None:
    """The CLIP image tower of a CLIP-based reward (clip_score, pickscore, aesthetic, hps, or a mix holding one),
    with that reward's own preprocessing; None for any other reward. Reusing it costs no extra weights."""
    from rewards import AestheticReward, ClipScoreReward, HPSReward, MixReward, PickScoreReward
    from rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess_images

    if isinstance(reward, MixReward):
        encoders = (reward_image_encoder(component) for component, _ in reward.terms.values())
        return next((encoder for encoder in encoders if encoder is not None), None)
    if isinstance(reward, (ClipScoreReward, PickScoreReward)):
        return transformers_clip_encoder(reward.model)
    if isinstance(reward, AestheticReward):
        vision = reward.vision_model
        size = vision.config.image_size
        return lambda images: vision(
            pixel_values=preprocess_images(images, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).to(vision.dtype)
        ).image_embeds
    if isinstance(reward, HPSReward):
        model = reward.model
        size = model.visual.image_size[0]
        return lambda images: model.encode_image(preprocess_images(
            images, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, like_pil=False).to(model.visual.conv1.weight.dtype))
    return None


def transformers_clip_encoder(model) -> ImageEncoder:
    """The projected image embeddings of a transformers CLIPModel, with CLIP's own preprocessing."""
    from rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess_images

    size = model.config.vision_config.image_size
    return lambda images: model.get_image_features(
        pixel_values=preprocess_images(images, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).to(model.dtype)
    ).pooler_output


def named_clip_encoder(name_or_path: str, device="cpu") -> ImageEncoder:
    """A CLIP the user names (--clip-model): a local copy of a transformers CLIP repo, else a hub id, read from the
    Hugging Face cache or downloaded, as a user who names a model expects."""
    from transformers import CLIPModel

    from rewards.weights import load_pretrained

    local = name_or_path if Path(name_or_path).expanduser().exists() else None
    model = load_pretrained(CLIPModel.from_pretrained, name_or_path, "--clip-model", local, dtype=torch.float32)
    return transformers_clip_encoder(model.requires_grad_(False).eval().to(device))


# -- perceptual metrics from optional packages ----------------------------------------------------------------------
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"   # torchvision's ImageNet AlexNet, the backbone lpips.LPIPS(net="alex") uses


def lpips_unavailable() -> str | None:
    """Why LPIPS cannot run here (a sentence naming what to install or download), or None when it can."""
    if importlib.util.find_spec("lpips") is None:
        return "LPIPS diversity needs the lpips package: pip install lpips"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    if not weights.is_file():
        return (f"LPIPS diversity needs torchvision's AlexNet weights at {weights} (download "
                f"https://download.pytorch.org/models/{ALEXNET_FILE} there; set TORCH_HOME to move the folder)")
    return None


def lpips_distance() -> Callable[[Tensor, Tensor], Tensor]:
    """LPIPS (Zhang et al. 2018, AlexNet): pairs of images [B, 3, H, W] in [0, 1] -> distances [B]. Needs what
    lpips_unavailable checks for; nothing is downloaded."""
    import lpips

    model = lpips.LPIPS(net="alex", verbose=False).eval()
    return lambda a, b: model.to(a.device)(a * 2 - 1, b * 2 - 1).flatten()


def lpips_diversity(images: Tensor, distance: Callable[[Tensor, Tensor], Tensor]) -> float:
    """Mean pairwise LPIPS distance between one prompt's images [n, 3, H, W] in [0, 1]. Sensitive to texture and
    local structure as deep features see them (what people call "looks different"), less to global colour shifts
    than the pixel metric; it compares aligned positions, so the same object moved counts as different."""
    if len(images) < 2:
        raise ValueError("diversity needs at least two samples per prompt")
    rows, cols = torch.triu_indices(len(images), len(images), offset=1)
    with torch.no_grad():
        return float(distance(images[rows].float(), images[cols].float()).mean())


def dreamsim_cache() -> Path:
    return Path(os.environ.get("DREAMSIM_CACHE", Path.home() / ".cache" / "dreamsim"))


def dreamsim_unavailable() -> str | None:
    """Why DreamSim cannot run here (a sentence naming what to install or download), or None when it can."""
    if importlib.util.find_spec("dreamsim") is None:
        return "DreamSim diversity needs the dreamsim package: pip install dreamsim"
    cache = dreamsim_cache()
    if not cache.is_dir() or not any(cache.iterdir()):
        return (f"DreamSim diversity needs its weights in {cache} (run `python -c \"from dreamsim import dreamsim; "
                f"dreamsim(pretrained=True, cache_dir='{cache}')\"` once with network, or set DREAMSIM_CACHE)")
    return None


def dreamsim_encoder(device: torch.device | str = "cpu") -> ImageEncoder:
    """DreamSim's (Fu et al. 2023) ensemble embedding of images in [0, 1], resized to its 224 px input; DreamSim's
    distance is the cosine distance of these embeddings, so embedding_diversity gives mean pairwise DreamSim.
    Sensitive to layout, pose, colour and semantic content together, tuned to human similarity judgements.
    Unverified here (package not installed in CI): the `dreamsim(pretrained=True, cache_dir=...)` / `embed` API."""
    from dreamsim import dreamsim

    model, _ = dreamsim(pretrained=True, device=str(device), cache_dir=str(dreamsim_cache()))
    return lambda images: model.embed(torch.nn.functional.interpolate(
        images.float(), size=(224, 224), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1))


# -- the metrics of one evaluation ----------------------------------------------------------------------------------
DIVERSITY_METRICS = ("pixel", "latent", "clip", "lpips", "dreamsim")
CLIP_REWARDS = ("clip_score", "pickscore", "aesthetic", "hps")


@dataclass
class DiversityMetrics:
    """The metrics an evaluation computes for each prompt, and one note per metric skipped or worth explaining."""

    functions: dict[str, Callable[[Tensor, Tensor], float]]   # (images, final latents) of one prompt -> diversity
    notes: list[str]

    @torch.no_grad()
    def per_prompt(self, images: Tensor, latents: Tensor) -> dict[str, float]:
        return {name: function(images, latents) for name, function in self.functions.items()}


def build_diversity_metrics(names: list[str] | None, rewards: dict, device="cpu", clip_model: str | None = None
                            ) -> DiversityMetrics:
    """``names`` None: every metric that can run here, with a note for each that cannot; a list: exactly those, and
    a metric that cannot run is an error naming what to install or download. ``clip_model`` (a transformers CLIP
    hub id or folder) replaces the rewards' CLIP for the clip metric. Only a model named there may be downloaded."""
    from diffrl.errors import UserInputError, unknown_name

    for name in names or []:
        if name not in DIVERSITY_METRICS:
            raise unknown_name("diversity metric", name, DIVERSITY_METRICS)
    functions, notes = {}, []
    for name in DIVERSITY_METRICS if names is None else names:
        reason = None if name == "clip" and clip_model else _why_unavailable(name, rewards)
        if reason is not None and names is not None:
            raise UserInputError(reason)
        if reason is not None:
            notes.append(reason)
            continue
        if name == "clip":
            encoder, source = _clip_encoder(rewards, device, clip_model)
            functions[name] = lambda images, latents, encoder=encoder: embedding_diversity(encoder(images))
            notes.append(f"clip diversity uses the image encoder of {source}")
        else:
            functions[name] = _metric(name, device)
    return DiversityMetrics(functions, notes)


def _clip_reward_name(rewards: dict) -> str | None:
    return next((name for name, reward in rewards.items() if reward_image_encoder(reward) is not None), None)


def _why_unavailable(name: str, rewards: dict) -> str | None:
    if name == "clip" and _clip_reward_name(rewards) is None:
        return (f"clip diversity skipped: none of the rewards ({', '.join(rewards)}) has a CLIP image encoder; add "
                f"one of {', '.join(CLIP_REWARDS)} to --rewards (its weights must be on this machine) or name a CLIP "
                "with --clip-model")
    return {"lpips": lpips_unavailable, "dreamsim": dreamsim_unavailable}.get(name, lambda: None)()


def _clip_encoder(rewards: dict, device, clip_model: str | None) -> tuple[ImageEncoder, str]:
    if clip_model:
        return named_clip_encoder(clip_model, device), repr(clip_model)
    name = _clip_reward_name(rewards)
    return reward_image_encoder(rewards[name]), f"the {name!r} reward"


def _metric(name: str, device) -> Callable[[Tensor, Tensor], float]:
    if name == "pixel":
        return lambda images, latents: pixel_diversity(images)
    if name == "latent":
        return lambda images, latents: latent_diversity(latents)
    if name == "lpips":
        distance = lpips_distance()
        return lambda images, latents: lpips_diversity(images, distance)
    encoder = dreamsim_encoder(device)
    return lambda images, latents: embedding_diversity(encoder(images))
