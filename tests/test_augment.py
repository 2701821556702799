"""upop.augment: drop-path hooks (exact in eval, per-sample branch drops at the configured rates in
training), BLIP's RandAugment, DeiT's timm transforms, Mixup, and defaults that keep the plain transforms."""

import pytest
import torch
import transformers as tf
from PIL import Image, ImageDraw
from torchvision import transforms as T

from upop.augment import BlipRandAugment, DropPathHook, Mixing, add_drop_path, eval_transform, train_transform
from upop.models import PRESETS
from upop.runconfig import TrainConfig


def _vit(depth: int = 3) -> tf.ViTForImageClassification:
    config = tf.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=depth,
                          num_attention_heads=2, intermediate_size=32, num_labels=3)
    return tf.ViTForImageClassification(config)


def test_drop_path_is_exact_in_eval_and_linear_over_depth():
    model = _vit()
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        before = model(pixel_values=x).logits
        assert add_drop_path(model, 0.2) == 2  # layer 0 gets rate 0
        after = model(pixel_values=x).logits
    assert torch.equal(before, after)
    rates = [[h.rate for h in layer.attention.o_proj._forward_hooks.values()] for layer in model.vit.layers]
    assert rates == [[0.0], [pytest.approx(0.1)], [pytest.approx(0.2)]]
    assert [h.rate for h in model.vit.layers[2].mlp.fc2._forward_hooks.values()] == [pytest.approx(0.2)]
    assert add_drop_path(_vit(), 0.0) == 0


def test_drop_path_drops_whole_samples_at_the_rate():
    lin = torch.nn.Linear(8, 8)
    lin.register_forward_hook(DropPathHook(0.3))
    x = torch.randn(20000, 5, 8)
    with torch.no_grad():
        plain = torch.nn.functional.linear(x, lin.weight, lin.bias)
        out = lin(x)
    dropped = (out == 0).all(dim=(1, 2))
    kept = ~dropped
    assert abs(dropped.float().mean().item() - 0.3) < 0.015
    assert torch.allclose(out[kept], plain[kept] / 0.7, atol=1e-6)  # survivors rescaled by 1 / keep
    lin.eval()
    with torch.no_grad():
        assert torch.equal(lin(x), plain)


def test_drop_path_finds_blip_and_segmenter_vision_layers_only():
    nlvr = PRESETS["tiny-blip-nlvr-twin"].build(16, None).model
    assert add_drop_path(nlvr, 0.1) == 1  # 2 vision layers, the first at rate 0; no text layer
    assert not any(m._forward_hooks for n, m in nlvr.named_modules() if n.startswith("text_encoder"))
    seg = PRESETS["tiny-segmenter"].build(16, 3).model
    assert add_drop_path(seg, 0.1) == 1
    assert not any(m._forward_hooks for n, m in seg.named_modules() if n.startswith("decoder"))
    with pytest.raises(ValueError, match="no vision encoder layers"):
        add_drop_path(torch.nn.Linear(2, 2), 0.1)


def test_timm_blocks_get_drop_path_modules():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, num_classes=2)
    assert add_drop_path(model, 0.2) == 2
    assert type(model.blocks[0].drop_path1).__name__ == "Identity"
    assert model.blocks[2].drop_path2.drop_prob == pytest.approx(0.2)


def _image() -> Image.Image:
    img = Image.new("RGB", (48, 40), "white")
    ImageDraw.Draw(img).ellipse((8, 8, 30, 30), fill="red")
    return img


def test_blip_randaugment_has_blips_ten_operations_and_magnitudes():
    aug = BlipRandAugment(2, 5)
    space = aug._augmentation_space(11, (40, 48))
    assert set(space) == {"Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
                          "TranslateX", "TranslateY", "Rotate"}
    level = {name: float(m[5]) if m.ndim else 0.0 for name, (m, _) in space.items()}
    assert level["ShearX"] == pytest.approx(0.15) and level["Rotate"] == pytest.approx(15.0)
    assert level["TranslateX"] == pytest.approx(5.0) and level["Brightness"] == pytest.approx(0.0)
    torch.manual_seed(0)
    outs = [T.functional.pil_to_tensor(aug(_image())) for _ in range(30)]
    unchanged = sum(torch.equal(o, T.functional.pil_to_tensor(_image())) for o in outs)
    assert 0 < unchanged < 30  # each drawn op applied with probability 0.5; some images change


def test_transforms_defaults_keep_the_plain_ones_and_recipes_build():
    cfg = TrainConfig()
    plain = T.Compose([T.ToTensor()])
    assert train_transform(cfg, 32, (0.5,) * 3, (0.5,) * 3, lambda: plain) is plain
    default_eval = eval_transform(cfg, 32, (0.5,) * 3, (0.5,) * 3)
    assert [type(t).__name__ for t in default_eval.transforms] == ["Resize", "ToTensor", "Normalize"]
    assert default_eval.transforms[0].size == (32, 32)
    deit_eval = eval_transform(TrainConfig(eval_crop=0.875), 224, (0.5,) * 3, (0.5,) * 3)
    assert deit_eval.transforms[0].size == 256 and deit_eval.transforms[1].size == (224, 224)
    assert tuple(deit_eval(_image()).shape) == (3, 224, 224)
    torch.manual_seed(0)
    blip = train_transform(TrainConfig(augment="blip"), 32, (0.5,) * 3, (0.5,) * 3, lambda: plain)
    assert tuple(blip(_image()).shape) == (3, 32, 32)
    pytest.importorskip("timm")
    deit = train_transform(TrainConfig(augment="deit", random_erasing=0.25), 32, (0.5,) * 3, (0.5,) * 3, lambda: plain)
    torch.manual_seed(3)
    first = deit(_image())
    torch.manual_seed(3)
    assert torch.equal(first, deit(_image()))  # timm's Python/NumPy draws follow torch's seed


def test_mixing_gives_soft_targets_and_is_off_by_default():
    assert not Mixing(0.0, 0.0, 0.1, 5).active
    pytest.importorskip("timm")
    mix = Mixing(0.8, 1.0, 0.1, 5)
    images, labels = torch.randn(7, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 0, 1])
    mixed, targets = mix(images, labels)
    assert mixed.shape == images.shape and targets.shape == (7, 5)
    assert torch.allclose(targets.sum(1), torch.ones(7))
    assert torch.allclose(targets[6], mix.smoothed(labels[6:])[0])  # the odd one out stays unmixed
    assert torch.equal(mixed[6], images[6])
    loss = mix.loss(torch.randn(7, 5), targets)
    assert loss.ndim == 0 and torch.isfinite(loss)
