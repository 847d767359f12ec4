//! fastvae: a variational autoencoder (Kingma & Welling, "Auto-Encoding Variational Bayes")
//! trained on the CPU by hand-written forward and backward passes, multithreaded with rayon.
//!
//! The core (every module but `python`) holds no Python types; `python` is the one binding
//! module, built with the `python` feature.

pub mod amx;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod eval;
pub mod layers;
pub mod model;
pub mod optim;
pub mod params;
pub mod rng;
pub mod simd;
pub mod sparse;
pub mod train;

#[cfg(feature = "python")]
mod python;

pub use config::{Activation, Config};
pub use error::{Result, VaeError};
pub use model::{Vae, Workspace};
pub use train::{Dataset, Model};
