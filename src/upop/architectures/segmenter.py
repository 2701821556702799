"""The Segmenter (ViT encoder + mask-transformer decoder): built in the segmentation issue."""
