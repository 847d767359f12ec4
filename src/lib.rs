//! fastvae: a variational autoencoder (Kingma & Welling, "Auto-Encoding Variational Bayes")
//! trained on the CPU by hand-written forward and backward passes, multithreaded with rayon.
//!
//! The core (every module but `python`) holds no Python types; `python` is the one binding
//! module, built with the `python` feature.
//!
//! Where things are: `config` (shapes, limits, defaults), `params` (where each weight lives),
//! `matmul`, `narrow` and `amx` (matrix products), `layers` (each layer's forward and backward),
//! `first_layer` (the input layer, sparse or dense, forward and backward), `model` (the VAE's
//! passes), `optim` (Adam), `step` (one training step), `train` (the model and its epochs),
//! `infer` (ELBO, encoding, decoding), `eval` (importance-weighted log-likelihood), `dataset`,
//! `pool` (threads, fork), `phases` (a step's time by phase), `checkpoint` (model files),
//! `rng`, `simd`, `error`.

pub mod amx;
pub mod checkpoint;
pub mod config;
pub mod dataset;
pub mod error;
pub mod eval;
pub mod first_layer;
pub mod infer;
pub mod iwae;
pub mod layers;
pub mod matmul;
pub mod model;
pub mod narrow;
pub mod optim;
pub mod params;
pub mod phases;
pub mod pool;
pub mod rng;
pub mod simd;
pub mod step;
pub mod train;

#[cfg(feature = "python")]
mod python;

pub use config::{Activation, Config};
pub use dataset::Dataset;
pub use error::{Result, VaeError};
pub use model::{Vae, Workspace};
pub use train::{EpochRun, EpochSettings, Model};
