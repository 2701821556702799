"""Official checkpoints -> our models: tiny state dicts under the exact official key names (salesforce/BLIP
NLVR: visual_encoder.* timm-style ViT + nlvr_encoder.py BERT with twin cross-attention + cls_head;
rstrudel/segmenter: encoder.* ViT + decoder.* mask transformer). Every key is consumed, a wrong one is
named in one line, and the converted model computes what the official formulas compute (written out
here from the official code, independently of our modules)."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from upop.models.blip_nlvr import BlipNLVRTwinConfig
from upop.models.convert import (
    ConversionError,
    load_official_checkpoint,
    nlvr_from_official_state_dict,
    official_nlvr_config,
    segmenter_from_official_state_dict,
)
from upop.models.segmenter import SegmenterConfig

# ---- the official formulas ------------------------------------------------------------------------


def _lin(sd, p, x):
    return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])


def _ln(sd, p, x, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _timm_block(sd, p, x, heads, eps):
    """BLIP / Segmenter Block: x + proj(attn(norm1 x)); x + fc2(gelu(fc1(norm2 x))); fused qkv (B,N,3,H,d)."""
    h = _ln(sd, p + "norm1", x, eps)
    b, n, c = h.shape
    q, k, v = _lin(sd, p + "attn.qkv", h).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
    x = x + _lin(sd, p + "attn.proj", (attn @ v).transpose(1, 2).reshape(b, n, c))
    return x + _lin(sd, p + "mlp.fc2", F.gelu(_lin(sd, p + "mlp.fc1", _ln(sd, p + "norm2", x, eps))))


def _timm_vit(sd, prefix, images, patch, depth, heads, eps):
    x = F.conv2d(images, sd[prefix + "patch_embed.proj.weight"], sd[prefix + "patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[prefix + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + sd[prefix + "pos_embed"][:, : x.shape[1]]
    for n in range(depth):
        x = _timm_block(sd, f"{prefix}blocks.{n}.", x, heads, eps)
    return _ln(sd, prefix + "norm", x, eps)


def _bert_attention(sd, p, hidden, memory, additive, heads):
    """nlvr_encoder.BertSelfAttention: scores / sqrt(d) + mask, softmax, context."""
    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)
    q = split(_lin(sd, p + "query", hidden))
    k, v = split(_lin(sd, p + "key", memory)), split(_lin(sd, p + "value", memory))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if additive is not None:
        scores = scores + additive
    context = scores.softmax(dim=-1) @ v
    return context.permute(0, 2, 1, 3).reshape(hidden.shape[0], hidden.shape[1], -1)


def _official_nlvr(sd, ids, mask, left, right, c):
    """BLIP_NLVR.forward (train=False) with nlvr_encoder.BertModel, read off the official code."""
    v, t = c["vision"], c["text"]
    image = _timm_vit(sd, "visual_encoder.", torch.cat([left, right]), v["patch"], v["depth"], v["heads"], 1e-6)
    image0, image1 = image.split(left.shape[0])
    x = sd["text_encoder.embeddings.word_embeddings.weight"][ids]
    x = x + sd["text_encoder.embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = _ln(sd, "text_encoder.embeddings.LayerNorm", x, 1e-12)
    additive = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for n in range(t["depth"]):
        p = f"text_encoder.encoder.layer.{n}."
        ctx = _bert_attention(sd, p + "attention.self.", x, x, additive, t["heads"])
        a = _ln(sd, p + "attention.output.LayerNorm", _lin(sd, p + "attention.output.dense", ctx) + x, 1e-12)
        d0 = _lin(sd, p + "crossattention.output.dense0", _bert_attention(sd, p + "crossattention.self0.", a, image0,
                                                                          None, t["heads"]))
        d1 = _lin(sd, p + "crossattention.output.dense1", _bert_attention(sd, p + "crossattention.self1.", a, image1,
                                                                          None, t["heads"]))
        if n >= t["merge"]:
            merged = _lin(sd, p + "crossattention.output.merge_layer", torch.cat([d0, d1], dim=-1))
        else:
            merged = (d0 + d1) / 2
        b = _ln(sd, p + "crossattention.output.LayerNorm", merged + a, 1e-12)
        out = _lin(sd, p + "output.dense", F.gelu(_lin(sd, p + "intermediate.dense", b)))
        x = _ln(sd, p + "output.LayerNorm", out + b, 1e-12)
    return _lin(sd, "cls_head.2", F.relu(_lin(sd, "cls_head.0", x[:, 0])))


# ---- tiny official BLIP NLVR checkpoint -------------------------------------------------------------
NLVR = {"vision": dict(width=24, patch=4, image=16, depth=2, heads=4, mlp=40),
        "text": dict(width=32, depth=4, heads=4, mlp=37, vocab=99, positions=32, merge=2)}


def _official_nlvr_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v, t = NLVR["vision"], NLVR["text"]
    sd: dict[str, torch.Tensor] = {}

    def add(name, *shape, scale=0.2, centre=0.0):
        sd[name] = centre + scale * torch.randn(*shape, generator=g)

    def linear(p, n_in, n_out):
        add(p + ".weight", n_out, n_in, scale=n_in ** -0.5)
        add(p + ".bias", n_out, scale=0.05)

    def norm(p, width):
        add(p + ".weight", width, scale=0.1, centre=1.0)
        add(p + ".bias", width, scale=0.05)

    dv, dt = v["width"], t["width"]
    add("visual_encoder.cls_token", 1, 1, dv)
    add("visual_encoder.pos_embed", 1, (v["image"] // v["patch"]) ** 2 + 1, dv)
    add("visual_encoder.patch_embed.proj.weight", dv, 3, v["patch"], v["patch"])
    add("visual_encoder.patch_embed.proj.bias", dv, scale=0.05)
    for n in range(v["depth"]):
        p = f"visual_encoder.blocks.{n}."
        norm(p + "norm1", dv)
        linear(p + "attn.qkv", dv, 3 * dv)
        linear(p + "attn.proj", dv, dv)
        norm(p + "norm2", dv)
        linear(p + "mlp.fc1", dv, v["mlp"])
        linear(p + "mlp.fc2", v["mlp"], dv)
    norm("visual_encoder.norm", dv)
    sd["text_encoder.embeddings.position_ids"] = torch.arange(t["positions"]).expand(1, -1)
    add("text_encoder.embeddings.word_embeddings.weight", t["vocab"], dt)
    add("text_encoder.embeddings.position_embeddings.weight", t["positions"], dt)
    norm("text_encoder.embeddings.LayerNorm", dt)
    for n in range(t["depth"]):
        p = f"text_encoder.encoder.layer.{n}."
        for name in ("query", "key", "value"):
            linear(p + "attention.self." + name, dt, dt)
        linear(p + "attention.output.dense", dt, dt)
        norm(p + "attention.output.LayerNorm", dt)
        for branch in ("self0", "self1"):
            linear(f"{p}crossattention.{branch}.query", dt, dt)
            for name in ("key", "value"):  # cross-attention keys and values read the vision width
                linear(f"{p}crossattention.{branch}.{name}", dv, dt)
        linear(p + "crossattention.output.dense0", dt, dt)
        linear(p + "crossattention.output.dense1", dt, dt)
        if n >= t["merge"]:
            linear(p + "crossattention.output.merge_layer", 2 * dt, dt)
        norm(p + "crossattention.output.LayerNorm", dt)
        linear(p + "intermediate.dense", dt, t["mlp"])
        linear(p + "output.dense", t["mlp"], dt)
        norm(p + "output.LayerNorm", dt)
    linear("cls_head.0", dt, dt)
    linear("cls_head.2", dt, 2)
    return sd


def _nlvr_config(**vision_overrides) -> BlipNLVRTwinConfig:
    v, t = NLVR["vision"], NLVR["text"]
    vision = dict(image_size=v["image"], patch_size=v["patch"], hidden_size=v["width"], intermediate_size=v["mlp"],
                  num_hidden_layers=v["depth"], num_attention_heads=v["heads"],
                  **{"layer_norm_eps": 1e-6, **vision_overrides})
    text = dict(vocab_size=t["vocab"], hidden_size=t["width"], intermediate_size=t["mlp"], num_hidden_layers=t["depth"],
                num_attention_heads=t["heads"], max_position_embeddings=t["positions"], layer_norm_eps=1e-12,
                bos_token_id=None, sep_token_id=None, eos_token_id=None)
    return BlipNLVRTwinConfig(vision_config=vision, text_config=text, merge_from_layer=t["merge"])


def _nlvr_inputs():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, NLVR["text"]["vocab"], (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, -3:] = 0
    return ids, mask, torch.randn(3, 3, 16, 16, generator=g), torch.randn(3, 3, 16, 16, generator=g)


def test_nlvr_converted_model_computes_the_official_formulas():
    sd = _official_nlvr_state_dict()
    model = nlvr_from_official_state_dict(dict(sd), _nlvr_config())
    ids, mask, left, right = _nlvr_inputs()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, pixel_values_left=left, pixel_values_right=right).logits
        want = _official_nlvr(sd, ids, mask, left, right, NLVR)
        dense0_only = dict(sd)  # the two branches are really two: zeroing one moves the answer
        dense0_only["text_encoder.encoder.layer.0.crossattention.output.dense1.weight"] = torch.zeros(32, 32)
        other = _official_nlvr(dense0_only, ids, mask, left, right, NLVR)
    assert (got - want).abs().max() <= 1e-5
    assert (other - want).abs().max() > 1e-4
    ours = model.state_dict()
    assert torch.equal(ours["vision_model.encoder.layers.1.self_attn.qkv.weight"],
                       sd["visual_encoder.blocks.1.attn.qkv.weight"])
    assert torch.equal(ours["text_encoder.encoder.layer.3.crossattention.output.merge_layer.weight"],
                       sd["text_encoder.encoder.layer.3.crossattention.output.merge_layer.weight"])
    assert not model.training


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("text_encoder.encoder.layer.2.crossattention.output.merge_layer.weight"),
     "has no 'text_encoder.encoder.layer.2.crossattention.output.merge_layer.weight'"),
    (lambda sd: sd.pop("visual_encoder.blocks.1.attn.qkv.bias"), "has no 'visual_encoder.blocks.1.attn.qkv.bias'"),
    (lambda sd: sd.update({"text_encoder.encoder.layer.0.crossattention.output.merge_layer.bias": torch.zeros(32)}),
     "unexpected key 'text_encoder.encoder.layer.0.crossattention.output.merge_layer.bias'"),
    (lambda sd: sd.update({"visual_encoder.head.weight": torch.zeros(5, 24)}),
     "unexpected key 'visual_encoder.head.weight'"),
    (lambda sd: sd.update({"text_encoder.encoder.layer.1.crossattention.self1.key.weight": torch.zeros(32, 32)}),
     "'text_encoder.encoder.layer.1.crossattention.self1.key.weight' has shape (32, 32), the model expects (32, 24)"),
    (lambda sd: sd.update({"text_encoder.embeddings.position_ids": torch.arange(32).flip(0)[None]}),
     "position_ids' is not 0..31"),
])
def test_nlvr_bad_checkpoint_is_named_in_one_line(change, message):
    sd = _official_nlvr_state_dict()
    change(sd)
    with pytest.raises(ConversionError) as info:
        nlvr_from_official_state_dict(sd, _nlvr_config())
    assert message in str(info.value) and "\n" not in str(info.value)


def test_nlvr_config_must_carry_the_official_epsilons():
    with pytest.raises(ConversionError, match=r"vision_config.layer_norm_eps is 1e-05; the official .* use 1e-06"):
        nlvr_from_official_state_dict(_official_nlvr_state_dict(), _nlvr_config(layer_norm_eps=1e-5))
    config = official_nlvr_config()
    assert config.merge_from_layer == 6 and config.vision_config.layer_norm_eps == 1e-6
    assert config.text_config.vocab_size == 30524 and config.text_config.encoder_hidden_size == 768


def test_nlvr_position_table_of_another_grid_is_interpolated_as_blip_does():
    sd = _official_nlvr_state_dict()
    table = torch.randn(1, 5 * 5 + 1, 24)  # trained at 20 px: a 5x5 grid; the config says 4x4
    sd["visual_encoder.pos_embed"] = table
    model = nlvr_from_official_state_dict(sd, _nlvr_config())
    grid = F.interpolate(table[:, 1:].reshape(1, 5, 5, 24).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
                         align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, 24)
    assert torch.allclose(model.vision_model.embeddings.position_embedding, torch.cat([table[:, :1], grid], dim=1))


class _NotATensor:
    pass


def test_load_official_checkpoint_weights_only_and_safetensors(tmp_path):
    sd = _official_nlvr_state_dict()
    torch.save({"model": sd, "optimizer": {"lr": 3e-6}, "epoch": 4}, tmp_path / "model_base_nlvr.pth")
    loaded = load_official_checkpoint(tmp_path / "model_base_nlvr.pth")
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "nlvr.safetensors"))
    assert load_official_checkpoint(tmp_path / "nlvr.safetensors").keys() == sd.keys()
    torch.save({"model": sd, "extra": _NotATensor()}, tmp_path / "pickled.pth")  # arbitrary object: refused
    with pytest.raises(ConversionError, match="pickled.pth: not a weights-only torch checkpoint"):
        load_official_checkpoint(tmp_path / "pickled.pth")
    with pytest.raises(ConversionError, match="checkpoint file not found"):
        load_official_checkpoint(tmp_path / "missing.pth")
    torch.save({"epoch": 3, "w": torch.zeros(1)}, tmp_path / "odd.pt")
    with pytest.raises(ConversionError, match="entry 'epoch' is a int, not a tensor"):
        load_official_checkpoint(tmp_path / "odd.pt")


# ---- tiny official Segmenter checkpoint ---------------------------------------------------------------
SEG = dict(width=32, patch=4, image=16, depth=2, heads=4, mlp=64, dec_depth=1, classes=3, imagenet=5)


def _official_segmenter_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = SEG["width"]
    sd: dict[str, torch.Tensor] = {}

    def add(name, *shape, scale=0.2, centre=0.0):
        sd[name] = centre + scale * torch.randn(*shape, generator=g)

    def linear(p, n_in, n_out):
        add(p + ".weight", n_out, n_in, scale=n_in ** -0.5)
        add(p + ".bias", n_out, scale=0.05)

    def norm(p, width):
        add(p + ".weight", width, scale=0.1, centre=1.0)
        add(p + ".bias", width, scale=0.05)

    def block(p):
        norm(p + "norm1", d)
        linear(p + "attn.qkv", d, 3 * d)
        linear(p + "attn.proj", d, d)
        norm(p + "norm2", d)
        linear(p + "mlp.fc1", d, SEG["mlp"])
        linear(p + "mlp.fc2", SEG["mlp"], d)

    add("encoder.cls_token", 1, 1, d)
    add("encoder.pos_embed", 1, (SEG["image"] // SEG["patch"]) ** 2 + 1, d)
    add("encoder.patch_embed.proj.weight", d, 3, SEG["patch"], SEG["patch"])
    add("encoder.patch_embed.proj.bias", d, scale=0.05)
    for n in range(SEG["depth"]):
        block(f"encoder.blocks.{n}.")
    norm("encoder.norm", d)
    linear("encoder.head", d, SEG["imagenet"])
    add("decoder.cls_emb", 1, SEG["classes"], d)
    linear("decoder.proj_dec", d, d)
    for n in range(SEG["dec_depth"]):
        block(f"decoder.blocks.{n}.")
    add("decoder.proj_patch", d, d, scale=d ** -0.5)
    add("decoder.proj_classes", d, d, scale=d ** -0.5)
    norm("decoder.decoder_norm", d)
    norm("decoder.mask_norm", SEG["classes"])
    return sd


def _official_segmenter(sd, images):
    """Segmenter.forward: pad, encoder features, [CLS] dropped, MaskTransformer, upsample, unpad."""
    h0, w0 = images.shape[-2:]
    p = SEG["patch"]
    images = F.pad(images, (0, (-w0) % p, 0, (-h0) % p))
    h, w = images.shape[-2:]
    x = _timm_vit(sd, "encoder.", images, p, SEG["depth"], SEG["heads"], 1e-5)[:, 1:]
    x = _lin(sd, "decoder.proj_dec", x)
    k = SEG["classes"]
    x = torch.cat([x, sd["decoder.cls_emb"].expand(x.shape[0], -1, -1)], dim=1)
    for n in range(SEG["dec_depth"]):
        x = _timm_block(sd, f"decoder.blocks.{n}.", x, SEG["heads"], 1e-5)
    x = _ln(sd, "decoder.decoder_norm", x, 1e-5)
    patches, classes = x[:, :-k] @ sd["decoder.proj_patch"], x[:, -k:] @ sd["decoder.proj_classes"]
    patches = patches / patches.norm(dim=-1, keepdim=True)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    masks = _ln(sd, "decoder.mask_norm", patches @ classes.transpose(1, 2), 1e-5)
    masks = masks.transpose(1, 2).reshape(x.shape[0], k, h // p, w // p)
    return F.interpolate(masks, size=(h, w), mode="bilinear")[..., :h0, :w0]


def _segmenter_config(**overrides) -> SegmenterConfig:
    fields = dict(image_size=SEG["image"], patch_size=SEG["patch"], hidden_size=SEG["width"],
                  num_hidden_layers=SEG["depth"], num_attention_heads=SEG["heads"], intermediate_size=SEG["mlp"],
                  decoder_hidden_size=SEG["width"], decoder_num_layers=SEG["dec_depth"],
                  decoder_num_heads=SEG["heads"], decoder_intermediate_size=SEG["mlp"], layer_norm_eps=1e-5,
                  num_labels=SEG["classes"])
    return SegmenterConfig(**{**fields, **overrides})


def test_segmenter_converted_model_computes_the_official_formulas():
    sd = _official_segmenter_state_dict()
    model = segmenter_from_official_state_dict(dict(sd), _segmenter_config())
    images = torch.randn(2, 3, 14, 14, generator=torch.Generator().manual_seed(2))  # padded to 16, cropped back
    with torch.no_grad():
        got = model(pixel_values=images).logits
        want = _official_segmenter(sd, images)
    assert got.shape == (2, 3, 14, 14)
    assert (got - want).abs().max() <= 1e-5
    ours = model.state_dict()
    qkv = sd["decoder.blocks.0.attn.qkv.weight"]  # rows q | k | v
    assert torch.equal(ours["decoder.blocks.0.attention.k_proj.weight"], qkv[32:64])
    assert torch.equal(ours["encoder.layers.1.attention.v_proj.bias"], sd["encoder.blocks.1.attn.qkv.bias"][64:])


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("decoder.proj_classes"), "has no 'decoder.proj_classes'"),
    (lambda sd: sd.pop("encoder.blocks.1.norm2.bias"), "has no 'encoder.blocks.1.norm2.bias'"),
    (lambda sd: sd.update({"decoder.blocks.1.norm1.weight": torch.ones(32)}),
     "unexpected key 'decoder.blocks.1.norm1.weight'"),
    (lambda sd: sd.update({"decoder.cls_emb": torch.zeros(1, 4, 32)}),
     "'decoder.cls_emb' has shape (1, 4, 32), the model expects (1, 3, 32)"),
    (lambda sd: sd.update({"encoder.head.weight": torch.zeros(5, 16)}), "'encoder.head.weight' has shape (5, 16)"),
    (lambda sd: sd.update({"encoder.dist_token": torch.zeros(1, 1, 32)}), "distilled encoder"),
    (lambda sd: sd.update({"decoder.head.weight": torch.zeros(3, 32)}), "linear decoder"),
])
def test_segmenter_bad_checkpoint_is_named_in_one_line(change, message):
    sd = _official_segmenter_state_dict()
    change(sd)
    with pytest.raises(ConversionError) as info:
        segmenter_from_official_state_dict(sd, _segmenter_config())
    assert message in str(info.value) and "\n" not in str(info.value)


def test_segmenter_config_must_use_segmenters_epsilon():
    with pytest.raises(ConversionError, match="layer_norm_eps is 1e-06; the official model's LayerNorms use 1e-05"):
        segmenter_from_official_state_dict(_official_segmenter_state_dict(), _segmenter_config(layer_norm_eps=1e-6))
