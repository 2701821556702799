"""The Segmenter (Strudel et al. 2021, "Segmenter: Transformer for Semantic Segmentation") with its
mask-transformer decoder, as the UPop paper prunes it: both the ViT encoder and the decoder blocks.

Built from Hugging Face ViT parts so that the existing adapters find every structure:
`encoder` is a `transformers.ViTModel` (modality "vision") and `decoder.blocks` are `ViTLayer`s
(modality "decoder", from the module path).

Shapes (B images, h x w patch grid, N = h*w, D encoder width, E decoder width, K classes):

    pixel_values (B, 3, H, W) -> pad to a multiple of the patch -> encoder (B, 1+N, D), [CLS] dropped
    -> decoder.proj_dec (B, N, E) ++ cls_emb (1, K, E) -> blocks -> decoder_norm (B, N+K, E)
    -> patches @ proj_patch, classes @ proj_classes, both L2-normalised
    -> masks = patches @ classes^T (B, N, K) -> mask_norm -> (B, K, h, w)
    -> bilinear upsampling to the padded size, padding cropped -> logits (B, K, H, W)

The presets (`tiny-segmenter`, `demo-segmenter`) and `from_vit` follow the model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, ViTConfig, ViTModel
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.models.vit.modeling_vit import ViTLayer

from ..metrics.segmentation import IGNORE_INDEX
from ..runconfig import ConfigError
from ._common import BuiltModel, add_presets, register_architecture


class SegmenterConfig(PretrainedConfig):
    """Encoder fields follow ViTConfig's names; `decoder_*` describe the mask transformer."""

    model_type = "upop_segmenter"

    def __init__(self, image_size: int = 64, patch_size: int = 8, num_channels: int = 3, hidden_size: int = 192,
                 num_hidden_layers: int = 6, num_attention_heads: int = 3, intermediate_size: int = 768,
                 decoder_hidden_size: int = 192, decoder_num_layers: int = 2, decoder_num_heads: int = 3,
                 decoder_intermediate_size: int = 768, hidden_dropout_prob: float = 0.0,
                 attention_probs_dropout_prob: float = 0.0, layer_norm_eps: float = 1e-6,
                 initializer_range: float = 0.02, **kwargs: Any) -> None:
        self.image_size, self.patch_size, self.num_channels = image_size, patch_size, num_channels
        self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
        self.num_attention_heads, self.intermediate_size = num_attention_heads, intermediate_size
        self.decoder_hidden_size, self.decoder_num_layers = decoder_hidden_size, decoder_num_layers
        self.decoder_num_heads, self.decoder_intermediate_size = decoder_num_heads, decoder_intermediate_size
        self.hidden_dropout_prob, self.attention_probs_dropout_prob = hidden_dropout_prob, attention_probs_dropout_prob
        self.layer_norm_eps, self.initializer_range = layer_norm_eps, initializer_range
        super().__init__(**kwargs)

    def _vit(self, width: int, depth: int, heads: int, inner: int) -> ViTConfig:
        return ViTConfig(image_size=self.image_size, patch_size=self.patch_size, num_channels=self.num_channels,
                         hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                         intermediate_size=inner, hidden_dropout_prob=self.hidden_dropout_prob,
                         attention_probs_dropout_prob=self.attention_probs_dropout_prob,
                         layer_norm_eps=self.layer_norm_eps, initializer_range=self.initializer_range)

    def encoder_config(self) -> ViTConfig:
        return self._vit(self.hidden_size, self.num_hidden_layers, self.num_attention_heads, self.intermediate_size)

    def decoder_config(self) -> ViTConfig:
        return self._vit(self.decoder_hidden_size, self.decoder_num_layers, self.decoder_num_heads,
                         self.decoder_intermediate_size)


class MaskTransformer(nn.Module):
    """Segmenter's decoder: patch tokens and K class embeddings through transformer blocks, then
    class masks as scalar products of the L2-normalised patch and class embeddings."""

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        width, k = config.decoder_hidden_size, config.num_labels
        dec = config.decoder_config()
        dec._attn_implementation = "sdpa"  # standalone layers get no dispatch from a PreTrainedModel
        self.scale = width ** -0.5
        self.proj_dec = nn.Linear(config.hidden_size, width)
        self.cls_emb = nn.Parameter(torch.zeros(1, k, width))
        self.blocks = nn.ModuleList([ViTLayer(dec) for _ in range(config.decoder_num_layers)])
        self.decoder_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.proj_patch = nn.Parameter(self.scale * torch.randn(width, width))
        self.proj_classes = nn.Parameter(self.scale * torch.randn(width, width))
        self.mask_norm = nn.LayerNorm(k, eps=config.layer_norm_eps)

    def forward(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """patches (B, N, D) -> masks (B, K, h, w) with (h, w) = grid."""
        x = self.proj_dec(patches)  # (B, N, E)
        k = self.cls_emb.shape[1]
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)  # (B, N+K, E)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patch_emb, cls_emb = x[:, :-k] @ self.proj_patch, x[:, -k:] @ self.proj_classes
        patch_emb = F.normalize(patch_emb, dim=-1)
        cls_emb = F.normalize(cls_emb, dim=-1)
        masks = self.mask_norm(patch_emb @ cls_emb.transpose(1, 2))  # (B, N, K)
        return masks.transpose(1, 2).reshape(x.shape[0], k, *grid)


@register_architecture
class SegmenterForSemanticSegmentation(PreTrainedModel):
    """forward(pixel_values (B, 3, H, W), labels (B, H, W) | None) -> logits (B, K, H, W) [+ loss].

    Any H, W works: the input is padded to a multiple of the patch and the position table is
    interpolated when the padded size differs from `config.image_size`.
    """

    config_class = SegmenterConfig
    base_model_prefix = "segmenter"
    main_input_name = "pixel_values"
    _no_split_modules = ["ViTEmbeddings", "ViTLayer"]

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__(config)
        self.encoder = ViTModel(config.encoder_config(), add_pooling_layer=False)
        self.decoder = MaskTransformer(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif type(module).__name__ == "ViTEmbeddings":
            nn.init.trunc_normal_(module.position_embeddings, std=std)
            nn.init.trunc_normal_(module.cls_token, std=std)
        elif isinstance(module, MaskTransformer):
            nn.init.trunc_normal_(module.cls_emb, std=std)
            with torch.no_grad():
                module.proj_patch.copy_(module.scale * torch.randn_like(module.proj_patch))
                module.proj_classes.copy_(module.scale * torch.randn_like(module.proj_classes))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                **kwargs: Any) -> SemanticSegmenterOutput:
        height, width = pixel_values.shape[-2:]
        p = self.config.patch_size
        pad_h, pad_w = (-height) % p, (-width) % p
        if pad_h or pad_w:  # zero padding at the bottom/right, cropped off the logits again
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
        padded = pixel_values.shape[-2:]
        interpolate = tuple(padded) != (self.config.image_size, self.config.image_size)
        hidden = self.encoder(pixel_values, interpolate_pos_encoding=interpolate).last_hidden_state
        masks = self.decoder(hidden[:, 1:], (padded[0] // p, padded[1] // p))
        logits = F.interpolate(masks, size=padded, mode="bilinear", align_corners=False)[..., :height, :width]
        loss = segmentation_loss(logits, labels) if labels is not None else None
        return SemanticSegmenterOutput(loss=loss, logits=logits)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy ignoring IGNORE_INDEX; a batch with no labelled pixel gives 0 (not NaN)."""
    valid = labels != IGNORE_INDEX
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE_INDEX)


SEGMENTER_MEAN = SEGMENTER_STD = (0.5, 0.5, 0.5)  # the statistics of timm's ViT weights Segmenter starts from


def _segmenter(width: int, depth: int, heads: int, patch: int, dec_width: int, dec_depth: int, dec_heads: int):
    def build(image_size: int, num_labels: int | None) -> BuiltModel:
        if not num_labels:
            raise ConfigError("a segmentation preset needs the number of classes")
        config = SegmenterConfig(image_size=image_size, patch_size=patch, hidden_size=width, num_hidden_layers=depth,
                                 num_attention_heads=heads, intermediate_size=4 * width,
                                 decoder_hidden_size=dec_width, decoder_num_layers=dec_depth,
                                 decoder_num_heads=dec_heads, decoder_intermediate_size=4 * dec_width,
                                 num_labels=num_labels)
        return BuiltModel(SegmenterForSemanticSegmentation(config), None, image_size, SEGMENTER_MEAN, SEGMENTER_STD)
    return build


def from_vit(source: str, num_labels: int, decoder: dict[str, int] | None = None,
             **kwargs: Any) -> SegmenterForSemanticSegmentation:
    """A Segmenter whose encoder is a Hugging Face ViT checkpoint (folder or hub name) and whose
    decoder is new: `decoder` sets decoder_hidden_size / decoder_num_layers / decoder_num_heads
    (default: the encoder's width and heads, 2 layers, as Segmenter-S/16's mask transformer)."""
    from transformers import ViTModel

    vit = ViTModel.from_pretrained(source, add_pooling_layer=False, **kwargs)
    enc = vit.config
    dec = {"decoder_hidden_size": enc.hidden_size, "decoder_num_layers": 2,
           "decoder_num_heads": enc.num_attention_heads, **(decoder or {})}
    dec.setdefault("decoder_intermediate_size", 4 * dec["decoder_hidden_size"])
    config = SegmenterConfig(image_size=enc.image_size, patch_size=enc.patch_size, num_channels=enc.num_channels,
                             hidden_size=enc.hidden_size, num_hidden_layers=enc.num_hidden_layers,
                             num_attention_heads=enc.num_attention_heads, intermediate_size=enc.intermediate_size,
                             layer_norm_eps=enc.layer_norm_eps, num_labels=num_labels, **dec)
    model = SegmenterForSemanticSegmentation(config)
    model.encoder.load_state_dict(vit.state_dict())
    return model


add_presets({
    "demo-segmenter": ("segmentation", _segmenter(96, 4, 3, 8, 96, 2, 3),
                       "Segmenter: 4-layer ViT encoder 96 wide, patch 8; 2-layer mask transformer"),
    "tiny-segmenter": ("segmentation", _segmenter(32, 2, 4, 8, 32, 1, 4),
                       "Segmenter: 2-layer ViT encoder, 1-layer mask transformer (tests)"),
})
