"""nnU-Net v2 extension for unpaired multi-modal segmentation with class-specific
affinity (Chen et al., "Deep Class-specific Affinity-Guided Convolutional Network for
Multimodal Unpaired Image Segmentation", MICCAI 2020)."""

__version__ = "0.1.0"
