"""open_clip towers: any open_clip architecture with weights from a tag, a file or the HF cache.

Specs (the weights half decides where the weights come from, never the architecture):

    openclip:ViT-B-32@laion2b_s34b_b79k     an open_clip pretrained tag; read from the local cache
    openclip:ViT-B-32@/path/to/ckpt.pt      a local checkpoint (.pt, .pth, .bin or .safetensors)
    openclip:hf-hub:timm/ViT-B-16-SigLIP    config and weights of a hub repo, from the HF cache
    openclip:local-dir:/path/to/folder      open_clip_config.json + weights in a folder (what
                                            `mmrag train` writes for an OpenCLIP-style tower)
    openclip:ViT-B-32                       RANDOM weights: only for tests and training from scratch

Weights are looked up before open_clip is asked for them, so that with `HF_HUB_OFFLINE=1` a
missing tag or hub repo fails at once with `ModelNotFoundError` (open_clip itself would retry,
or for `hf-hub:` silently fall back to random weights). When the hub is online, open_clip
downloads what is missing, as it normally does.

Preprocessing comes from the weights (`model.visual.preprocess_cfg`, which open_clip fills from
the tag or hub config); a local checkpoint carries none, so it gets open_clip's defaults (OpenAI
mean/std, bicubic, shortest side + centre crop), exactly as `open_clip.create_model` would.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .base import Encoder, ModelNotFoundError, check_texts
from .preprocess import PreprocessConfig, rgb_triple
from .registry import Spec, parse_spec, register_family

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_OPEN_CLIP_RESIZE_MODES = {"shortest": "shortest", "squash": "squash"}
#: open_clip treats "random" (a training augmentation) as bicubic at inference.
_OPEN_CLIP_INTERPOLATIONS = {"bicubic": "bicubic", "bilinear": "bilinear", "random": "bicubic"}


class OpenClipEncoder(Encoder):
    """An open_clip `CLIP`/`CustomTextCLIP` model and its tokenizer behind the mmrag contract.

    `text_layer` picks the transformer block whose output `encode_text_tokens` returns (after
    `ln_final`); -1 is the last block. It is an attribute, not a constructor flag, so the
    penultimate-layer option (clip_skip) can be added without touching the loaders.
    """

    text_layer: int = -1

    def __init__(self, model: torch.nn.Module, tokenizer: Any, spec: str, dim: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.dim = dim
        self.context_length = int(model.context_length)
        self.preprocess = preprocess_from_open_clip(model.visual.preprocess_cfg)

    # -- hooks ---------------------------------------------------------------------------------
    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenize(texts))

    def encode_text_tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (n, context_length, width) after `ln_final`, and a 0/1 long mask.

        The mask covers the start token through the end-of-text token, which open_clip's
        tokenizer keeps even when it truncates a long text.
        """
        ids = self.tokenize(check_texts(texts))
        with torch.no_grad():
            hidden = self._token_states(ids)
        return hidden, self.token_mask(ids)

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    # -- helpers -------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids (n, context_length) on the tower's device; over-long texts keep their EOT."""
        return self.tokenizer(texts, context_length=self.context_length).to(self.device)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Untruncated length with start and end tokens, for open_clip's BPE or a wrapped HF tokenizer."""
        wrapped = getattr(self.tokenizer, "tokenizer", None)
        if wrapped is not None:
            return [len(ids) for ids in wrapped(list(texts), truncation=False, verbose=False)["input_ids"]]
        return [len(self.tokenizer.encode(text)) + 2 for text in texts]

    def token_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """1 up to and including the end token. Pad id 0 is also a real BPE token ("!"), so the
        CLIP tokenizer's mask comes from the EOT position, not from `ids != 0`."""
        eot = getattr(self.tokenizer, "eot_token_id", None)
        if eot is None:
            pad = getattr(getattr(self.tokenizer, "tokenizer", None), "pad_token_id", None) or 0
            return (ids != pad).long()
        last = (ids == eot).int().argmax(dim=-1, keepdim=True)
        return (torch.arange(ids.shape[1], device=ids.device) <= last).long()

    def _token_states(self, ids: torch.Tensor) -> torch.Tensor:
        """Output of block `text_layer`, through `ln_final` (the final one is what encode_text pools)."""
        out = self.model.forward_intermediates(
            text=ids, text_indices=[self.text_layer], normalize_intermediates=True, intermediates_only=True
        )
        return out["text_intermediates"][0]


def preprocess_from_open_clip(cfg: Mapping[str, Any]) -> PreprocessConfig:
    """Map open_clip's preprocess dict onto mmrag's; refuse what PreprocessConfig cannot express."""
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"open_clip input size {tuple(size)} is not square; mmrag towers take square inputs")
        size = size[0]
    resize_mode = cfg.get("resize_mode", "shortest")
    if resize_mode not in _OPEN_CLIP_RESIZE_MODES:
        raise ValueError(f"open_clip resize_mode {resize_mode!r} is not supported; mmrag has 'shortest' and 'squash'")
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in _OPEN_CLIP_INTERPOLATIONS:
        raise ValueError(f"open_clip interpolation {interpolation!r} is not supported")
    return PreprocessConfig(
        size=int(size),
        mean=rgb_triple(cfg["mean"]),
        std=rgb_triple(cfg["std"]),
        interpolation=_OPEN_CLIP_INTERPOLATIONS[interpolation],
        resize_mode=_OPEN_CLIP_RESIZE_MODES[resize_mode],
    )


# -- loading ---------------------------------------------------------------------------------
@register_family("openclip")
def load_openclip(spec: str) -> OpenClipEncoder:
    """`openclip:ARCH[@TAG|@PATH]` or `openclip:hf-hub:ORG/NAME` -> an encoder (CPU, eval mode)."""
    import open_clip

    parsed = parse_spec(spec)
    if parsed.family != "openclip":
        raise ValueError(f"spec {spec!r} is not an openclip spec")
    try:
        model = _create_model(parsed)
    except ModelNotFoundError:
        raise
    except OSError as error:  # e.g. an HF text tower's config that is not in the cache
        raise ModelNotFoundError(f"open_clip could not find what {spec!r} needs on disk: {error}") from error
    tokenizer = _load_tokenizer(parsed.name)
    dim = int(open_clip.get_model_config(parsed.name)["embed_dim"])
    return OpenClipEncoder(model.eval(), tokenizer, spec=str(parsed), dim=dim)


def _create_model(parsed: Spec) -> torch.nn.Module:
    """Check the weights are reachable, then let open_clip build and load the model."""
    import open_clip

    if parsed.name.startswith(HF_HUB_PREFIX):
        _require_hub_repo(parsed.name[len(HF_HUB_PREFIX) :])
        return open_clip.create_model(parsed.name, require_pretrained=True)
    if parsed.name.startswith(LOCAL_DIR_PREFIX):
        _require_local_dir(Path(parsed.name[len(LOCAL_DIR_PREFIX) :]))
        return open_clip.create_model(parsed.name, require_pretrained=True)
    _require_architecture(parsed.name)
    if not parsed.weights:
        # Random init, on purpose: no base-tower downloads either.
        return open_clip.create_model(parsed.name, pretrained=None, pretrained_text=False)
    if _looks_like_path(parsed.weights):
        path = _require_checkpoint(parsed.weights)
        return open_clip.create_model(parsed.name, pretrained=str(path), require_pretrained=True)
    _require_tag(parsed.name, parsed.weights)
    return open_clip.create_model(parsed.name, pretrained=parsed.weights, require_pretrained=True)


def _load_tokenizer(name: str) -> Any:
    """open_clip's tokenizer for `name`; the CLIP BPE ships with open_clip, others need the HF cache."""
    import open_clip

    try:
        return open_clip.get_tokenizer(name)
    except OSError as error:
        raise ModelNotFoundError(
            f"the tokenizer for open_clip model {name!r} is not on disk ({error}); "
            "download it once with the hub online (unset HF_HUB_OFFLINE)"
        ) from error


def _looks_like_path(weights: str) -> bool:
    """Tags are bare words (`laion2b_s34b_b79k`); anything with a separator or suffix is a file."""
    return (
        "/" in weights or os.sep in weights or weights.startswith(("~", ".")) or weights.endswith(CHECKPOINT_SUFFIXES)
    )


def _require_architecture(arch: str) -> None:
    import open_clip

    if arch not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
        raise ValueError(
            f"unknown open_clip architecture {arch!r}; close matches: {close}. "
            "A custom architecture needs its JSON config registered with open_clip.add_model_config(path)."
        )


def _require_local_dir(folder: Path) -> None:
    """A `local-dir:` folder needs open_clip's config and one weights file."""
    config = folder / "open_clip_config.json"
    if not config.is_file():
        raise ModelNotFoundError(f"open_clip folder config not found: {config}")
    if not any(folder.glob(f"*{suffix}") for suffix in CHECKPOINT_SUFFIXES):
        raise ModelNotFoundError(f"no open_clip weights file ({', '.join(CHECKPOINT_SUFFIXES)}) in {folder}")


def _require_checkpoint(weights: str) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"open_clip checkpoint not found: {path} (from the spec's '@{weights}')")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"open_clip checkpoint {path} should end in one of {CHECKPOINT_SUFFIXES}")
    return path


def _require_tag(arch: str, tag: str) -> None:
    """The tag must be known to open_clip and, when the hub is offline, its file must be cached."""
    import open_clip

    pretrained_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not pretrained_cfg:
        known = open_clip.list_pretrained_tags_by_model(arch)
        raise ModelNotFoundError(f"open_clip has no pretrained tag {tag!r} for {arch!r}; known tags: {known}")
    if _hub_offline() and not _tag_is_cached(pretrained_cfg):
        raise ModelNotFoundError(
            f"weights for openclip:{arch}@{tag} are not in the local cache and HF_HUB_OFFLINE is set; "
            f"they come from {_tag_source(pretrained_cfg)}. Fetch them once online, e.g. "
            f"python -c \"import open_clip; open_clip.create_model('{arch}', pretrained='{tag}')\""
        )


def _tag_hub_files(pretrained_cfg: Mapping[str, Any]) -> tuple[str, list[str]]:
    """(repo id, candidate filenames) as open_clip's `download_pretrained` would try them."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo_id, filename = os.path.split(pretrained_cfg["hf_hub"])
    filename = filename or HF_WEIGHTS_NAME
    candidates = [filename]
    if filename == HF_WEIGHTS_NAME:
        candidates.insert(0, HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        candidates.insert(0, filename[:-4] + ".safetensors")
    return repo_id, candidates


def _tag_is_cached(pretrained_cfg: Mapping[str, Any]) -> bool:
    if pretrained_cfg.get("file"):
        return os.path.isfile(pretrained_cfg["file"])
    if pretrained_cfg.get("hf_hub"):
        repo_id, filenames = _tag_hub_files(pretrained_cfg)
        return any(_in_hub_cache(repo_id, name) for name in filenames)
    url = pretrained_cfg.get("url", "")
    return bool(url) and os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))


def _tag_source(pretrained_cfg: Mapping[str, Any]) -> str:
    if pretrained_cfg.get("hf_hub"):
        repo_id, filenames = _tag_hub_files(pretrained_cfg)
        return f"the HF hub repo {repo_id!r} (file {filenames[-1]!r})"
    return f"{pretrained_cfg.get('url') or pretrained_cfg.get('file')!r}"


def _require_hub_repo(repo_id: str) -> None:
    """With the hub offline, an `hf-hub:` model needs its config and weights already cached."""
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if not _hub_offline():
        return
    missing = [HF_CONFIG_NAME] if not _in_hub_cache(repo_id, HF_CONFIG_NAME) else []
    if not any(_in_hub_cache(repo_id, name) for name in (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)):
        missing.append(f"{HF_SAFE_WEIGHTS_NAME} or {HF_WEIGHTS_NAME}")
    if missing:
        raise ModelNotFoundError(
            f"open_clip model hf-hub:{repo_id} is not in the HF cache ({_hub_cache_dir()}): missing {missing}, "
            f"and HF_HUB_OFFLINE is set. Fetch it once online: hf download {repo_id}"
        )


def _in_hub_cache(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hub_offline() -> bool:
    """Offline if huggingface_hub says so, or the variable was set after it was imported."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return bool(constants.HF_HUB_OFFLINE) or flag
