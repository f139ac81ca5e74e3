"""megadigpt: D-iGPT pretraining (autoregressive + discriminative feature prediction) at scale.

Layout (each subpackage knows nothing about the ones to its right):

    model/        plain PyTorch: ViT encoder, segment masks, attention backends, decoders, the D-iGPT loss
    targets/      frozen teachers that turn an image into target tokens (OpenCLIP, timm, EfficientNet, pixels)
    data/         image sources (webdataset shards, folders, demo photos) and the augmentation pipelines
    distributed/  launcher environment, DeepSpeed engine and config, activation checkpointing
    checkpoint/   DeepSpeed checkpoints in a run directory, automatic resume
    train/        the training loops, optimizer and schedule, metrics
    cli.py        `megadigpt <command>`
"""

__version__ = "0.1.0"
