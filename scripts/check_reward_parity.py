"""Compare diffrl's reward scores with the original implementations on the real weights (not used by the tests).

Needs the weights (Hugging Face cache or download) and runs each original path as its authors publish it:
- aesthetic: OpenAI `clip` ViT-L/14 + the MLP of improved-aesthetic-predictor/simple_inference.py (open_clip's
  identical `ViT-L-14`/`openai` weights when the `clip` package is absent); also checks that the hub copy of the head
  file is byte-identical to the GitHub original.
- clip_score: transformers CLIPProcessor + CLIPModel, 100 · cos (torchmetrics' CLIPScore before its clamp at 0).
- pickscore: the PickScore README (AutoProcessor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, AutoModel PickScore_v1).
- hps: `hpsv2.score` when the hpsv2 package is importable (install it in a separate environment: it pins old
  dependencies), else its steps written out (open_clip ViT-H-14, checkpoint['state_dict'], its tensor transform).
Images are scored one at a time, so they may differ in size. Expect differences of ~1e-3 relative: the originals see
PIL's uint8-rounded resize; on GPU the originals of aesthetic (fp16 CLIP) and hps (autocast) also run in half
precision.

    python scripts/check_reward_parity.py --images my_images/ --prompt "a photo of a cat" --device cuda
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

import diffrl  # noqa: E402,F401  (installs the torchvision fix before transformers / open_clip import it)
from diffrl.errors import UserInputError  # noqa: E402
from rewards import load_reward  # noqa: E402
from rewards.aesthetic import AestheticReward  # noqa: E402
from rewards.hps import CHECKPOINT_FILES, HUB_REPO  # noqa: E402
from rewards.weights import load_state_dict_file, resolve_weight_file  # noqa: E402

AESTHETIC_HEAD_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"  # the GitHub blob


def ours(name: str, images: list[Image.Image], prompt: str, device: str) -> list[float]:
    reward = load_reward(name).to(device)
    scores = []
    for image in images:
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float().div(255)
        with torch.no_grad():
            scores.append(reward(pixels.to(device), [prompt]).item())
    return scores


def original_aesthetic(images, prompt, device):
    head_path = resolve_weight_file(AestheticReward.HEAD_FILE, AestheticReward.HEAD_HUB_REPO,
                                    "reward_weights.aesthetic")
    print(f"  head file sha256 matches the GitHub original: "
          f"{hashlib.sha256(head_path.read_bytes()).hexdigest() == AESTHETIC_HEAD_SHA256}")
    try:
        import clip
        model, preprocess = clip.load("ViT-L/14", device=device)
    except ImportError:
        import open_clip
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-L-14", pretrained="openai", device=device)
    mlp = torch.nn.Sequential(torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                              torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                              torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    mlp.load_state_dict({k.removeprefix("layers."): v
                         for k, v in torch.load(head_path, map_location="cpu", weights_only=True).items()})
    mlp.to(device).eval()
    scores = []
    with torch.no_grad():
        for image in images:
            features = model.encode_image(preprocess(image).unsqueeze(0).to(device)).float()
            scores.append(mlp(features / features.norm(dim=-1, keepdim=True)).item())
    return scores


def _clip_like(model_id, processor_id, images, prompt, device, scale_of):
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(processor_id)
    model = AutoModel.from_pretrained(model_id).eval().to(device)
    scores = []
    with torch.no_grad():
        text = processor(text=[prompt], padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        text_embs = model.get_text_features(**text)
        text_embs = getattr(text_embs, "pooler_output", text_embs)
        for image in images:
            image_embs = model.get_image_features(**processor(images=image, return_tensors="pt").to(device))
            image_embs = getattr(image_embs, "pooler_output", image_embs)
            cos = torch.nn.functional.cosine_similarity(image_embs, text_embs)
            scores.append((scale_of(model) * cos).item())
    return scores


def original_clip_score(images, prompt, device):
    return _clip_like("openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14", images, prompt, device,
                      lambda model: 100.0)


def original_pickscore(images, prompt, device):
    return _clip_like("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", images, prompt, device,
                      lambda model: model.logit_scale.exp())


def original_hps(images, prompt, device, version="v2.1"):
    try:
        import hpsv2
        return [float(hpsv2.score(image, prompt, hps_version=version)[0]) for image in images]
    except ImportError:
        pass
    import open_clip
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    checkpoint = load_state_dict_file(resolve_weight_file(CHECKPOINT_FILES[version], HUB_REPO, "reward_weights.hps"))
    model = open_clip.create_model("ViT-H-14", pretrained=None)
    model.load_state_dict(checkpoint["state_dict"])
    model.to(device).eval()
    preprocess = Compose([ToTensor(), Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224),
                          Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)])
    text = open_clip.get_tokenizer("ViT-H-14")([prompt]).to(device)
    with torch.no_grad():
        text_features = model.encode_text(text, normalize=True)
        return [(model.encode_image(preprocess(image.convert("RGB"))[None].to(device), normalize=True)
                 @ text_features.T).item() for image in images]


ORIGINALS = {"aesthetic": original_aesthetic, "clip_score": original_clip_score, "pickscore": original_pickscore,
             "hps": original_hps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of .png / .jpg images")
    parser.add_argument("--prompt", required=True, help="the prompt the images are scored against")
    parser.add_argument("--rewards", nargs="+", default=list(ORIGINALS), choices=list(ORIGINALS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    images = [Image.open(p).convert("RGB") for p in paths]
    for name in args.rewards:
        print(f"{name}:")
        original = np.array(ORIGINALS[name](images, args.prompt, args.device))
        diffrl_scores = np.array(ours(name, images, args.prompt, args.device))
        for path, a, b in zip(paths, original, diffrl_scores):
            print(f"  {path.name:<30} original {a:10.5f}   diffrl {b:10.5f}   diff {b - a:+.2e}")
        relative = np.abs(diffrl_scores - original).max() / max(np.abs(original).max(), 1e-12)
        print(f"  max relative difference: {relative:.2e}")


if __name__ == "__main__":
    try:
        main()
    except UserInputError as error:   # missing weights: the one-sentence message says what to download
        sys.exit(f"check_reward_parity: {error}")
