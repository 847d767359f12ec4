//! Errors of the core. Every failure a caller can cause is a `VaeError`, never a panic;
//! `python.rs` maps each variant to a fastvae exception class.

use thiserror::Error;

/// What went wrong, in words a user can act on.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum VaeError {
    /// An invalid model or training setting (a zero dimension, a model too large to allocate).
    #[error("{0}")]
    Config(String),
    /// Input data with the wrong shape, non-finite values or values outside [0, 1].
    #[error("{0}")]
    Input(String),
    /// The loss or a gradient became NaN or infinite during training.
    #[error("training diverged at epoch {epoch}, step {step}: {what}; the weights are those of the last finite step (try a smaller lr)")]
    NonFinite { epoch: u64, step: u64, what: String },
    /// A model file that cannot be read or does not match its configuration.
    #[error("{0}")]
    Checkpoint(String),
}

pub type Result<T> = std::result::Result<T, VaeError>;
