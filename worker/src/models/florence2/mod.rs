//! Florence-2-base (DaViT vision tower, projector, BART language model, generation, processor).
