"""The diffusers bridge, offline on CPU: conversion parity with diffusers' own open_clip ->
CLIPTextModel conversion, and a tiny StableDiffusionPipeline (random weights) run end to end."""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("diffusers")
open_clip = pytest.importorskip("open_clip")

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from mmrag.encoders import load_encoder  # noqa: E402
from mmrag.integrations.diffusers import (  # noqa: E402
    TextAdapter,
    encode_prompt,
    enable_memory_efficient_attention,
    split_prompt,
    swap_text_encoder,
    train_adapter,
)

#: A text tower as wide as the tiny UNet's cross_attention_dim (32); 3 blocks so -2 differs from -1.
TINY32 = "mmrag-test-TinyText32"
TINY32_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 3},
}
LONG = " ".join(f"a red fox number {i} jumps over the lazy dog," for i in range(20))  # ~200 tokens
RUN = dict(num_inference_steps=2, height=32, width=32, output_type="np")


@pytest.fixture(scope="module")
def tower32(tmp_path_factory):
    config = tmp_path_factory.mktemp("open_clip_configs") / f"{TINY32}.json"
    config.write_text(json.dumps(TINY32_CFG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    return load_encoder(f"openclip:{TINY32}")


@pytest.fixture(scope="module")
def tower64(tiny_arch):
    torch.manual_seed(1)
    return load_encoder(f"openclip:{tiny_arch}")


@pytest.fixture(scope="module")
def pipe():
    """The diffusers test-suite's tiny SD components, with no tokenizer or text encoder at all."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, norm_num_groups=2,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None, safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def converted_clip_text_model(encoder) -> CLIPTextModel:
    """The tower's weights through diffusers' SD 2.x conversion into a transformers CLIPTextModel."""
    cfg = TINY32_CFG["text_cfg"]
    model = CLIPTextModel(CLIPTextConfig(
        hidden_size=cfg["width"], intermediate_size=4 * cfg["width"], num_attention_heads=cfg["heads"],
        num_hidden_layers=cfg["layers"], vocab_size=cfg["vocab_size"], max_position_embeddings=cfg["context_length"],
        hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=TINY32_CFG["embed_dim"],
    )).eval()
    checkpoint = {f"cond_stage_model.model.{k}": v for k, v in encoder.model.state_dict().items()}
    state = convert_open_clip_checkpoint(model, checkpoint)
    own = model.state_dict()
    if not any(k.startswith("text_model.") for k in own):  # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in own}  # text_projection belongs to the *WithProjection model
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize("layer", [-1, "penultimate"])
def test_prompt_embeds_match_diffusers_converted_clip_text_model(tower32, layer):
    prompts = ["a photo of a cat", "an astronaut riding a horse on the moon, oil painting"]
    ours = encode_prompt(tower32, prompts, layer=layer).prompt_embeds
    model = converted_clip_text_model(tower32)
    with torch.no_grad():
        out = model(tower32.tokenize(prompts), output_hidden_states=True)
    final_layer_norm = getattr(model, "text_model", model).final_layer_norm
    theirs = out.last_hidden_state if layer == -1 else final_layer_norm(out.hidden_states[-2])
    assert ours.shape == theirs.shape == (2, 77, 32)
    assert (ours - theirs).abs().max().item() < 1e-4
    if layer == "penultimate":  # and it is a different layer
        assert (ours - out.last_hidden_state).abs().max().item() > 1e-3


def test_chunking_pads_batch_and_keeps_short_prompt_standalone(tower32):
    chunks = split_prompt(tower32, LONG)
    assert len(chunks) >= 3 and all(n <= 77 for n in tower32.count_tokens(chunks))
    assert " ".join(chunks) == " ".join(LONG.split())
    short = "a small blue bird"
    alone = encode_prompt(tower32, short).prompt_embeds
    batch = encode_prompt(tower32, [short, LONG], negative_prompts="blurry")
    assert alone.shape == (1, 77, 32)
    assert batch.prompt_embeds.shape == (2, 77 * len(chunks), 32)
    assert batch.negative_prompt_embeds.shape == batch.prompt_embeds.shape
    assert torch.equal(batch.prompt_embeds[0, :77], alone[0])
    empty = encode_prompt(tower32, short).negative_prompt_embeds[0]  # the empty prompt pads the rest
    assert torch.equal(batch.prompt_embeds[0, 77:154], empty)
    long_first = encode_prompt(tower32, chunks[0]).prompt_embeds[0]
    assert torch.equal(batch.prompt_embeds[1, :77], long_first)


def test_num_images_per_prompt_and_layer_checks(tower32):
    embeds = encode_prompt(tower32, ["a", "b c"], num_images_per_prompt=3)
    assert embeds.prompt_embeds.shape == embeds.negative_prompt_embeds.shape == (6, 77, 32)
    assert torch.equal(embeds.prompt_embeds[0], embeds.prompt_embeds[2])
    assert not torch.equal(embeds.prompt_embeds[2], embeds.prompt_embeds[3])
    with pytest.raises(ValueError, match="out of range"):
        encode_prompt(tower32, "a", layer=7)
    with pytest.raises(ValueError, match="negative prompts"):
        encode_prompt(tower32, ["a", "b"], negative_prompts=["x"])
    assert tower32.text_layer == -1  # restored after a penultimate call


def test_pipeline_runs_with_swapped_tower(pipe, tower32, caplog):
    with caplog.at_level(logging.INFO, logger="mmrag.integrations.diffusers"):
        swapped = swap_text_encoder(pipe, tower32)
    assert "keeping" in caplog.text  # no xformers or no CUDA here: said, and carried on
    seed = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731
    cat = swapped("a photo of a cat", generator=seed(), **RUN).images
    dog = swapped("a photo of a dog", generator=seed(), **RUN).images
    neg = swapped("a photo of a cat", negative_prompt="blurry", generator=seed(), **RUN).images
    assert cat.shape == dog.shape == neg.shape == (1, 32, 32, 3)
    assert abs(cat - dog).max() > 0 and abs(cat - neg).max() > 0

    long = swapped(LONG, generator=seed(), **RUN).images
    batch = swapped(["a cat", LONG], negative_prompt=["", "ugly"], generator=seed(), **RUN).images
    assert long.shape == (1, 32, 32, 3) and batch.shape == (2, 32, 32, 3)
    assert abs(batch[0] - batch[1]).max() > 0

    three = swapped(["a cat", "a dog"], num_images_per_prompt=3, generator=seed(), **RUN).images
    assert three.shape == (6, 32, 32, 3)
    with pytest.raises(ValueError, match="computes"):
        swapped("a cat", prompt_embeds=torch.zeros(1, 77, 32))


def test_width_mismatch_needs_adapter(pipe, tower64, tmp_path):
    with pytest.raises(ValueError, match=r"64 wide.*cross_attention_dim is 32"):
        swap_text_encoder(pipe, tower64)
    with pytest.raises(ValueError, match="adapter maps 64 -> 16"):
        swap_text_encoder(pipe, tower64, adapter=TextAdapter(64, 16))
    torch.manual_seed(0)
    adapter = TextAdapter(64, 32)
    swapped = swap_text_encoder(pipe, tower64, adapter=adapter, layer="penultimate")
    images = swapped("a photo of a cat", **RUN).images
    assert images.shape == (1, 32, 32, 3)

    path = adapter.save(tmp_path / "adapter.safetensors")
    again = TextAdapter.load(path)
    assert (again.in_dim, again.out_dim) == (64, 32)
    for key, value in adapter.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    x = torch.randn(2, 5, 64)
    assert torch.equal(adapter(x), again(x))


def test_train_adapter_regresses_onto_target_states(tower64, tower32):
    prompts = ["a photo of a cat", "a red car", "two dogs on a beach", "a bowl of soup"]
    target = lambda texts: encode_prompt(tower32, texts).prompt_embeds  # noqa: E731  a 32-wide "UNet encoder"
    torch.manual_seed(0)
    adapter, losses = train_adapter(tower64, target, prompts, steps=60, lr=1e-2)
    assert (adapter.in_dim, adapter.out_dim) == (64, 32)
    assert losses[-1] < 0.5 * losses[0]


def test_memory_efficient_attention_on_cpu_is_a_logged_no(pipe, caplog):
    with caplog.at_level(logging.INFO, logger="mmrag.integrations.diffusers"):
        assert enable_memory_efficient_attention(pipe) is False
    assert "xformers" in caplog.text or "CUDA" in caplog.text


def test_default_tower_pads_chunks_with_zeros_and_needs_an_adapter(encoder, pipe):
    """The default tower (MiniLM states, 384 wide, per-batch padding): zeroed pad states, its own
    context (256) per chunk, last layer only, and a width adapter for a 32-wide UNet. (The default
    ensemble's token states are its first member's.)"""
    if not encoder.spec.startswith(("mmrag:", "ensemble:mmrag:")):
        pytest.skip(f"written for the default tower, not {encoder.spec}")
    context, width = encoder.context_length, 384
    long = " ".join(f"a red fox number {i} jumps over the lazy dog," for i in range(40))
    assert encoder.count_tokens([long])[0] > context
    alone = encode_prompt(encoder, "a small bird").prompt_embeds
    batch = encode_prompt(encoder, ["a small bird", long], negative_prompts="blurry")
    assert alone.shape == (1, context, width)
    assert batch.prompt_embeds.shape == batch.negative_prompt_embeds.shape == (2, 2 * context, width)
    # equal up to float noise: BERT runs the short prompt in a longer padded batch here
    torch.testing.assert_close(batch.prompt_embeds[0, :context], alone[0], atol=1e-5, rtol=0)
    assert torch.count_nonzero(batch.prompt_embeds[0, context:]) == 0  # padded with zeros
    with pytest.raises(ValueError, match="only its last text layer"):
        encode_prompt(encoder, "a", layer="penultimate")
    with pytest.raises(ValueError, match=r"384 wide.*cross_attention_dim is 32"):
        swap_text_encoder(pipe, encoder)
    torch.manual_seed(0)
    swapped = swap_text_encoder(pipe, encoder, adapter=TextAdapter(width, 32))
    assert swapped(["a cat", long], **RUN).images.shape == (2, 32, 32, 3)


def test_sdxl_layout_is_refused_clearly(tower32):
    class FakeXL:
        text_encoder_2 = None

    with pytest.raises(NotImplementedError, match="SDXL"):
        swap_text_encoder(FakeXL(), tower32)
    with pytest.raises(ValueError, match="layer must be"):
        encode_prompt(tower32, "a", layer="first")
