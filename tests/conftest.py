"""Shared fixtures: the real default tower (loaded once), real photos, and the shared data sets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: A tiny open_clip architecture with random weights: tests the wiring, not model quality.
TINY_ARCH = "mmrag-test-TinyViT"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def shared_dataset(name: str) -> Path:
    """A data set under ../shared/data, or a skip that says why (a user's fresh checkout lacks it)."""
    path = SHARED_DATA / name
    if not (path / "captions.jsonl").is_file():
        pytest.skip(f"needs {path} (the project's shared data beside the checkout); absent here")
    return path


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    return shared_dataset("coco_mini")


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    return shared_dataset("flickr8k")


@pytest.fixture(scope="session")
def encoder():
    """The default tower with its shipped heads (or $MMRAG_TEST_ENCODER), loaded once per session."""
    from mmrag.encoders import load_encoder

    return load_encoder(os.environ.get("MMRAG_TEST_ENCODER") or None)


@pytest.fixture(scope="session")
def sample_photos(tmp_path_factory) -> list[Path]:
    """scikit-image's bundled real photos, written as JPEG files."""
    from mmrag.samples import export_sample_photos

    return export_sample_photos(tmp_path_factory.mktemp("samples"))


@pytest.fixture()
def photo_folder(tmp_path, sample_photos) -> Path:
    """A fresh folder of real photos, with one nested subfolder, that a test may spoil."""
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for i, photo in enumerate(sample_photos[:6]):
        shutil.copy(photo, (folder / "nested" if i % 2 else folder) / photo.name)
    return folder


@pytest.fixture(scope="session")
def tiny_arch(tmp_path_factory) -> str:
    """Register TINY_ARCH with open_clip (from a JSON config, as users add their own)."""
    import json

    import open_clip

    config = tmp_path_factory.mktemp("open_clip_configs") / f"{TINY_ARCH}.json"
    config.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(config)
    return TINY_ARCH


#: A few sentences per language for the tiny multilingual tokenizer; tests reuse them as input.
MULTILINGUAL_SENTENCES = {
    "en": ["a dog runs on the beach", "two children play in the snow", "a man rides a red bicycle",
           "a cat sleeps on the sofa", "people walk down a busy street"],
    "de": ["ein Hund läuft am Strand", "zwei Kinder spielen im Schnee", "ein Mann fährt ein rotes Fahrrad",
           "eine Katze schläft auf dem Sofa", "Menschen gehen über eine belebte Straße"],
    "fr": ["un chien court sur la plage", "deux enfants jouent dans la neige", "un homme fait du vélo rouge",
           "un chat dort sur le canapé", "des gens marchent dans une rue animée"],
    "ja": ["犬が浜辺を走っている", "二人の子供が雪の中で遊んでいる", "男性が赤い自転車に乗っている",
           "猫がソファーで寝ている", "人々がにぎやかな通りを歩いている"],
    "ru": ["собака бежит по пляжу", "двое детей играют в снегу", "мужчина едет на красном велосипеде",
           "кошка спит на диване", "люди идут по оживлённой улице"],
}
#: XLM-RoBERTa's special tokens, in its id order (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4).
XLMR_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def build_tiny_xlmr(folder: Path, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised XLM-RoBERTa with a locally trained Unigram tokenizer into `folder`.

    The tokenizer follows XLM-R's layout (SentencePiece-style Metaspace pieces, `<s> ... </s>`),
    trained on MULTILINGUAL_SENTENCES, so German umlauts, Japanese and Cyrillic are real pieces.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    corpus = [s for sentences in MULTILINGUAL_SENTENCES.values() for s in sentences]
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=XLMR_SPECIALS, unk_token="<unk>")
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    assert [tok.token_to_id(t) for t in XLMR_SPECIALS] == list(range(5))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=64,
    )
    config = XLMRobertaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=64 + 2, type_vocab_size=1,
        bos_token_id=0, pad_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    XLMRobertaModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_xlmr_dir(tmp_path_factory) -> Path:
    """A local folder holding a tiny random XLM-RoBERTa and its multilingual tokenizer (built offline)."""
    return build_tiny_xlmr(tmp_path_factory.mktemp("tiny_xlmr"))
