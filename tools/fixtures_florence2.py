"""Tiny random-weight Florence-2 and the reference tensors the Rust parity tests compare against.

    python tools/make_fixtures.py florence2 --seed 0 --out tests/fixtures/florence2

Builds a transformers (>= 5.17) native `Florence2ForConditionalGeneration` with tiny vision and text
sizes but the real structure (4 DaViT stages, spatial + channel blocks, window padding in the last two
stages, BART encoder/decoder), and a tiny real-format BART byte-level BPE tokenizer trained offline
with the Florence special tokens (`<od>`, `<loc_0..999>`, `<cap>`, ...) and `<image>`.

Writes into OUT:
  native/      save_pretrained model (model.* keys, vocab padded to a multiple of 64, tied lm_head),
               processor files (tokenizer.json with the Florence tokens and <image>,
               preprocessor_config.json), generation_config.json
  original/    the same weights in the original remote-code layout (pytorch_model.bin with the
               original key names, config.json with `dim_embed`/`image_pos_embed`/..., a plain BART
               tokenizer.json without the Florence tokens, which the loader must add itself),
               vocabulary = 51289-analog (no <image>, no padding rows)
  caption.png  the image the generation references use (already at the processor size)
  resize.png   a non-square image for the resize parity test
  reference.safetensors  pixel values (caption.png, resize.png), each vision stage, vision features,
               projected image tokens, encoder output, decoder logits for fixed decoder ids
  expected.json  prompt ids per task, generated ids (greedy; beam 3 with no-repeat 3) with decoded
               text and caption per task, ids for other beam settings, ids of the original layout
"""
import json
import os
import random

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    BartConfig,
    BartTokenizer,
    CLIPImageProcessorPil,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    GenerationConfig,
)

IMAGE_SIZE = 96
VISION = dict(
    in_channels=3,
    depths=[1, 1, 2, 1],
    embed_dim=[16, 32, 48, 64],
    num_heads=[2, 2, 3, 4],
    num_groups=[2, 4, 3, 4],
    patch_size=[7, 3, 3, 3],
    patch_stride=[4, 2, 2, 2],
    patch_padding=[3, 1, 1, 1],
    patch_prenorm=[False, True, True, True],
    # 96 px -> stage maps 24, 12, 6, 3: windows of 4 pad the last two stages (6 -> 8, 3 -> 4).
    window_size=4,
    mlp_ratio=4.0,
    qkv_bias=True,
    activation_function="gelu",
    projection_dim=32,
    max_temporal_embeddings=100,
    max_position_embeddings=50,
    drop_path_rate=0.1,
)
TEXT = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    activation_function="gelu",
    scale_embedding=False,
    bos_token_id=0,
    pad_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=2,
    forced_bos_token_id=0,
    forced_eos_token_id=2,
    dropout=0.1,
    attention_dropout=0.1,
    activation_dropout=0.1,
)
GENERATION = dict(
    bos_token_id=0,
    pad_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=2,
    forced_bos_token_id=0,
    forced_eos_token_id=2,
    num_beams=3,
    no_repeat_ngram_size=3,
    early_stopping=True,
)
MAX_NEW_TOKENS = 24
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]

FLORENCE_TOKENS = (
    ["<od>", "</od>", "<ocr>", "</ocr>"]
    + [f"<loc_{i}>" for i in range(1000)]
    + [
        "<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>",
        "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>",
        "</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>",
    ]
)

CORPUS = [
    "What does the image describe?",
    "Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.",
    "The image shows a dog standing on green grass in a park.",
    "A brown dog on a leash is walking on a concrete sidewalk next to a person.",
    "The image shows a small white puppy lying on a wooden floor in a living room.",
    "A black and white dog is sitting on a red carpet with a blue leash attached to its collar.",
    "The dog is running across a sandy beach with the ocean in the background.",
    "A golden retriever walks on gray asphalt road with fallen leaves around it.",
    "The image shows a cat sitting on ceramic tiles in a kitchen.",
    "A man is holding the leash of a dog on a gravel path surrounded by trees.",
    "There is snow on the ground and the dog is wearing a red harness.",
    "The street is lined with buildings, trees, and people walking on the footpath.",
    "The sky is visible in the background. The grass is short and green.",
    "A dog lies on a brick patio next to a wooden bench.",
    "The puppy is playing in the dirt near a pond of water.",
]


def _tokenizer(florence: bool) -> BartTokenizer:
    """A tiny BART tokenizer in the real format (byte-level BPE, RoBERTa post-processor)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 4, trainer)
    spec = json.loads(bpe.to_str())["model"]
    vocab = dict(spec["vocab"])
    vocab["<mask>"] = len(vocab)  # as in BART: <mask> is the last base token
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = BartTokenizer(vocab=vocab, merges=merges, add_prefix_space=False)
    tok.model_max_length = 1024
    if florence:
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in FLORENCE_TOKENS], special_tokens=True)
        tok.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
        # Named model-specific token (what the converted checkpoints carry as extra_special_tokens).
        tok._set_model_specific_special_tokens(special_tokens={"image_token": "<image>"})
    return tok


def _image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A synthetic photo-like RGB image: gradients, a few blobs, noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        a, b, ph = rng.uniform(0.02, 0.2, 3)
        img[..., c] = 128 + 80 * np.sin(a * x + ph * 7) * np.cos(b * y)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 25)
        col = rng.uniform(0, 255, 3)
        m = ((x - cx) ** 2 + (y - cy) ** 2) < r * r
        img[m] = col
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every weight so the tiny model's outputs are peaked (clear argmax and beam choices)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "pos_idx_to_embed" in name:
            continue
        if name.endswith("norm.weight") or "layer_norm.weight" in name or "layernorm_embedding.weight" in name or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif p.ndim == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif "embed" in name or "shared" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) * (1.3 / fan_in**0.5))


@torch.no_grad()
def _tune_eos(model, processor, image) -> float:
    """Point the </s> embedding along the mean decoder output, as little as needed for beam search to end
    on </s> before max_new_tokens (a random model otherwise never stops by itself, which would leave the
    finished-hypothesis logic of beam search untested). Returns the scale used."""
    emb = model.model.language_model.shared.weight
    inp = processor(text="<DETAILED_CAPTION>", images=image, return_tensors="pt")
    ids = _generate(model, inp, num_beams=1)
    h = model(**inp, decoder_input_ids=torch.tensor([ids]), output_hidden_states=True).decoder_hidden_states[-1][0]
    u = h[2:].mean(0)
    u = u / u.norm() * emb[2].norm()
    eos0 = emb[2].clone()
    for beta in [i / 100 for i in range(5, 60)]:
        emb[2] = beta * u
        n = len(_generate(model, inp, num_beams=3)) - 1
        if 6 <= n < MAX_NEW_TOKENS:
            return beta
    emb[2] = eos0
    return 0.0


NATIVE_TO_ORIGINAL = [
    # (native substring, original substring); applied in order on vision keys
    (".spatial_block.norm1.", ".spatial_block.window_attn.norm."),
    (".spatial_block.norm2.", ".spatial_block.ffn.norm."),
    (".channel_block.norm1.", ".channel_block.channel_attn.norm."),
    (".channel_block.norm2.", ".channel_block.ffn.norm."),
    (".window_attn.qkv.", ".window_attn.fn.qkv."),
    (".window_attn.proj.", ".window_attn.fn.proj."),
    (".channel_attn.qkv.", ".channel_attn.fn.qkv."),
    (".channel_attn.proj.", ".channel_attn.fn.proj."),
    (".ffn.fc1.", ".ffn.fn.net.fc1."),
    (".ffn.fc2.", ".ffn.fn.net.fc2."),
    (".conv1.", ".conv1.fn.dw."),
    (".conv2.", ".conv2.fn.dw."),
]


def _to_original_key(k: str) -> str:
    if k.startswith("model.vision_tower."):
        k = k[len("model."):]
        if ".convs." in k:
            return k.replace(".conv.", ".proj.")
        for a, b in NATIVE_TO_ORIGINAL:
            if a in k:
                k = k.replace(a, b)
        return k
    if k.startswith("model.multi_modal_projector."):
        k = k[len("model.multi_modal_projector."):]
        if k == "image_projection.weight":
            return "image_projection"
        return k.replace("image_position_embed.", "image_pos_embed.")
    if k.startswith("model.language_model."):
        return "language_model.model." + k[len("model.language_model."):]
    if k == "lm_head.weight":
        return "language_model.lm_head.weight"
    raise KeyError(k)


def _original_config(vocab: int) -> dict:
    v = VISION
    text = dict(TEXT, vocab_size=vocab, num_beams=GENERATION["num_beams"],
                no_repeat_ngram_size=GENERATION["no_repeat_ngram_size"], early_stopping=True,
                is_encoder_decoder=True, normalize_before=False, add_final_layer_norm=False,
                add_bias_logits=False)
    return {
        "architectures": ["Florence2ForConditionalGeneration"],
        "model_type": "florence2",
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        "projection_dim": v["projection_dim"],
        "vocab_size": vocab,
        "is_encoder_decoder": True,
        "torch_dtype": "float32",
        "text_config": text,
        "vision_config": {
            "model_type": "davit",
            "drop_path_rate": v["drop_path_rate"],
            "patch_size": v["patch_size"], "patch_stride": v["patch_stride"],
            "patch_padding": v["patch_padding"], "patch_prenorm": v["patch_prenorm"],
            "enable_checkpoint": False,
            "dim_embed": v["embed_dim"], "num_heads": v["num_heads"], "num_groups": v["num_groups"],
            "depths": v["depths"], "window_size": v["window_size"],
            "projection_dim": v["projection_dim"],
            "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": v["max_temporal_embeddings"]},
            "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": v["max_position_embeddings"]},
            "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
        },
    }


def _generate(model, inputs, **kw) -> list[int]:
    out = model.generate(
        input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
        attention_mask=inputs["attention_mask"], max_new_tokens=MAX_NEW_TOKENS, **kw,
    )
    return out[0].tolist()


def main(seed: int, out: str) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    native_dir, orig_dir = os.path.join(out, "native"), os.path.join(out, "original")

    tok = _tokenizer(florence=True)
    base_tok = _tokenizer(florence=False)
    n_tokens = len(tok)  # base + Florence tokens + <image>
    orig_vocab = n_tokens - 1  # the 51289 analog: everything but <image>
    native_vocab = (n_tokens + 63) // 64 * 64  # the 51328 analog

    n_image_tokens = 1 + (IMAGE_SIZE // 32) ** 2
    image_processor = CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3, do_resize=True, do_center_crop=False,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=MEAN, image_std=STD,
        do_convert_rgb=True, image_seq_length=n_image_tokens,
    )
    post_processor_config = {
        k: {} for k in ("pure_text", "description_with_bboxes", "description_with_polygons", "polygons", "bboxes",
                        "description_with_bboxes_or_polygons")
    }
    processor = Florence2Processor(
        image_processor=image_processor, tokenizer=tok, post_processor_config=post_processor_config
    )

    config = Florence2Config(
        vision_config=dict(VISION),
        text_config=BartConfig(vocab_size=native_vocab, **TEXT).to_dict(),
        image_token_id=tok.image_token_id,
    )
    model = Florence2ForConditionalGeneration(config).eval()
    _randomize(model, seed)
    model.generation_config = GenerationConfig(**GENERATION)

    caption_img = _image(rng, IMAGE_SIZE, IMAGE_SIZE)
    resize_img = _image(rng, 150, 80)
    eos_beta = _tune_eos(model, processor, caption_img)
    caption_img.save(os.path.join(out, "caption.png"))
    resize_img.save(os.path.join(out, "resize.png"))

    model.save_pretrained(native_dir)
    processor.save_pretrained(native_dir)
    model.generation_config.save_pretrained(native_dir)

    ref: dict[str, torch.Tensor] = {}
    expected: dict = {
        "seed": seed, "image_size": IMAGE_SIZE, "n_image_tokens": n_image_tokens,
        "native_vocab": native_vocab, "original_vocab": orig_vocab, "max_new_tokens": MAX_NEW_TOKENS,
        "eos_beta": eos_beta, "tasks": {},
    }
    ref["pixel_values_resize"] = processor.image_processor(resize_img, return_tensors="pt")["pixel_values"]

    with torch.no_grad():
        inputs = processor(text="<DETAILED_CAPTION>", images=caption_img, return_tensors="pt")
        pv = inputs["pixel_values"]
        ref["pixel_values"] = pv
        ref["input_ids"] = inputs["input_ids"].to(torch.int64)
        stages = []
        hooks = [
            blk[-1].register_forward_hook(lambda m, i, o: stages.append(o.detach().clone()))
            for blk in model.model.vision_tower.blocks
        ]
        vis = model.model.vision_tower(pv).last_hidden_state
        for h in hooks:
            h.remove()
        for i, s in enumerate(stages):
            ref[f"vision_stage{i}"] = s
        ref["vision_features"] = vis
        img_feats = model.model.multi_modal_projector(vis)
        ref["image_features"] = img_feats
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        mask = (inputs["input_ids"] == config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, img_feats)
        enc = model.model.language_model.encoder(inputs_embeds=embeds).last_hidden_state
        ref["encoder_output"] = enc
        dec_ids = torch.tensor([[2, 0, 7, 150, 300, 41, 513, 9]])
        ref["decoder_input_ids"] = dec_ids
        lm_out = model(
            input_ids=inputs["input_ids"], pixel_values=pv, decoder_input_ids=dec_ids, use_cache=False,
        )
        ref["decoder_logits"] = lm_out.logits

        for task in ["<DETAILED_CAPTION>", "<CAPTION>", "<MORE_DETAILED_CAPTION>"]:
            inp = processor(text=task, images=caption_img, return_tensors="pt")
            ids = inp["input_ids"][0].tolist()
            prompt_ids = ids[n_image_tokens:]
            entry = {"prompt_ids": prompt_ids}
            for mode, kw in [("greedy", dict(num_beams=1)), ("beam3", dict(num_beams=3))]:
                gen = _generate(model, inp, **kw)
                text = processor.batch_decode([gen], skip_special_tokens=False)[0]
                parsed = processor.post_process_generation(text, task=task, image_size=caption_img.size)[task]
                entry[mode] = {"ids": gen, "decoded": text, "caption": parsed}
            expected["tasks"][task] = entry

        # Other beam-search settings (length penalty, the early-stopping heuristics, no n-gram ban).
        inp = processor(text="<DETAILED_CAPTION>", images=caption_img, return_tensors="pt")
        expected["variants"] = []
        for kw in [
            dict(num_beams=4, early_stopping="never", length_penalty=2.0),
            dict(num_beams=2, early_stopping=False, length_penalty=0.5),
            dict(num_beams=3, early_stopping=False, length_penalty=-1.0),
            dict(num_beams=3, no_repeat_ngram_size=0),
            dict(num_beams=1, no_repeat_ngram_size=0),
        ]:
            expected["variants"].append({"settings": kw, "ids": _generate(model, inp, **kw)})

    save_file({k: v.contiguous().float() if v.is_floating_point() else v.contiguous() for k, v in ref.items()},
              os.path.join(out, "reference.safetensors"))

    # Original remote-code layout: same weights (vocabulary cut to the 51289 analog), original key names.
    os.makedirs(orig_dir, exist_ok=True)
    sd = model.state_dict()
    orig_sd = {}
    for k, v in sd.items():
        ok = _to_original_key(k)
        if ok == "image_projection":
            v = v.t()
        if k in ("model.language_model.shared.weight", "lm_head.weight",
                 "model.language_model.encoder.embed_tokens.weight",
                 "model.language_model.decoder.embed_tokens.weight"):
            v = v[:orig_vocab]
        orig_sd[ok] = v.detach().clone().contiguous()
    orig_sd["language_model.final_logits_bias"] = torch.zeros(1, orig_vocab)
    torch.save(orig_sd, os.path.join(orig_dir, "pytorch_model.bin"))
    with open(os.path.join(orig_dir, "config.json"), "w") as f:
        json.dump(_original_config(orig_vocab), f, indent=2)
    base_tok.save_pretrained(orig_dir)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        p = os.path.join(orig_dir, name)
        if os.path.exists(p) and name != "tokenizer_config.json":
            os.remove(p)
    image_processor.save_pretrained(orig_dir)

    # Reference ids for the original layout come from transformers on a model with the cut vocabulary
    # (the original checkpoint has no <image> row and no padding rows, which changes the softmax).
    unk = tok.convert_tokens_to_ids("<unk>")
    cut_cfg = Florence2Config(
        vision_config=dict(VISION),
        text_config=BartConfig(vocab_size=orig_vocab, **TEXT).to_dict(),
        image_token_id=unk,
    )
    cut = Florence2ForConditionalGeneration(cut_cfg).eval()
    cut_sd = {k: (v[:orig_vocab] if v.shape[:1] == (native_vocab,) else v) for k, v in sd.items()}
    cut.load_state_dict(cut_sd, strict=True)
    cut.generation_config = GenerationConfig(**GENERATION)
    with torch.no_grad():
        inp = processor(text="<DETAILED_CAPTION>", images=caption_img, return_tensors="pt")
        # <image> is outside the cut vocabulary; the placeholders only mark where the image features go,
        # so let <unk> (never in a task prompt) mark them.
        ids = inp["input_ids"].clone()
        ids[ids == tok.image_token_id] = unk
        cut_inp = {"input_ids": ids, "pixel_values": inp["pixel_values"], "attention_mask": inp["attention_mask"]}
        expected["original"] = {
            mode: _generate(cut, cut_inp, **kw) for mode, kw in [("greedy", dict(num_beams=1)), ("beam3", dict(num_beams=3))]
        }

    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
