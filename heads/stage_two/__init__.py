"""Stage two: re-ranking heads (CrossTVR, T2V2T) over cached patch and text tokens: layers, models,
pair batches, scoring, hard negatives, contrastive pre-training, validation, trainer, checkpoints."""
