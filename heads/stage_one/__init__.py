"""Stage one: cosine heads (meanP, seqTransf, CLIP2Video) over cached frame and text embeddings,
their contrastive loss, trainer and checkpoints."""
