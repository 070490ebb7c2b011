//! FLUX.1-Fill-dev (transformer, text encoders, VAE, sampling, pipeline).
