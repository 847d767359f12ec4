//! Model configuration: the sizes of the encoder and decoder and their activation, validated
//! once, so the rest of the core can rely on non-zero dimensions and a parameter count that
//! fits in memory; and every limit and default the front ends share (Python reads them from
//! `_core`, so they are written here only).

use crate::error::{Result, VaeError};

/// Hidden-layer nonlinearity, used in both encoder and decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    Tanh,
}

/// The activations' names, as settings give them.
pub const ACTIVATIONS: [&str; 2] = ["relu", "tanh"];

impl Activation {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "relu" => Ok(Activation::Relu),
            "tanh" => Ok(Activation::Tanh),
            other => Err(VaeError::Config(format!(
                "activation must be one of {ACTIVATIONS:?}, got {other:?}"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Tanh => "tanh",
        }
    }
}

/// What p(x|z) is: the decoder's outputs are the logits of independent Bernoulli pixels, or the
/// means of independent Gaussians whose per-feature log-variances are parameters of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Likelihood {
    Bernoulli,
    Gaussian,
}

/// The likelihoods' names, as settings give them.
pub const LIKELIHOODS: [&str; 2] = ["bernoulli", "gaussian"];

/// Bounds of the Gaussian likelihood's learned log-variances, kept after every step: a
/// feature the decoder predicts exactly (a constant one, say) would otherwise drive its
/// log-variance to -inf and the loss with it. exp(-10 / 2) = 0.0067 and exp(10 / 2) = 148 bound
/// the standard deviation, ample for standardized features.
pub const LOGVAR_MIN: f32 = -10.0;
pub const LOGVAR_MAX: f32 = 10.0;

impl Likelihood {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "bernoulli" => Ok(Likelihood::Bernoulli),
            "gaussian" => Ok(Likelihood::Gaussian),
            other => Err(VaeError::Config(format!(
                "likelihood must be one of {LIKELIHOODS:?}, got {other:?}"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Likelihood::Bernoulli => "bernoulli",
            Likelihood::Gaussian => "gaussian",
        }
    }
}

/// How a training step combines the k samples of z it draws per example (k > 1; with one
/// sample both are the ELBO, trained with its closed-form KL).
/// - `Elbo`: the k-sample ELBO, the reconstruction averaged over the samples plus the
///   closed-form KL (the paper's "VAE" rows at k > 1).
/// - `Iwae`: the importance-weighted bound of Burda, Grosse & Salakhutdinov,
///   log (1/k) sum_j p(x, z_j) / q(z_j | x).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    Elbo,
    Iwae,
}

/// The objectives' names, as settings give them.
pub const OBJECTIVES: [&str; 2] = ["elbo", "iwae"];

impl Objective {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "elbo" => Ok(Objective::Elbo),
            "iwae" => Ok(Objective::Iwae),
            other => Err(VaeError::Config(format!(
                "objective must be one of {OBJECTIVES:?}, got {other:?}"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Objective::Elbo => "elbo",
            Objective::Iwae => "iwae",
        }
    }
}

/// Largest model the core agrees to allocate (parameters, f32): 2^28, about 1 GiB per copy,
/// and training keeps four copies (weights, gradients, two Adam moments).
pub const MAX_PARAMS: usize = 1 << 28;
/// Largest width of any one layer.
pub const MAX_WIDTH: usize = 1 << 20;
/// Most threads a model's pool may have.
pub const MAX_THREADS: usize = 1024;
/// Most importance samples per example in the log-likelihood estimate.
pub const MAX_K: usize = 1 << 24;
/// Most decoder rows a training step may hold (batch_size times the samples per example k):
/// the step's buffers grow with them, about 16 KB per row for the canonical model.
pub const MAX_STEP_ROWS: usize = 1 << 18;
/// Largest learning rate accepted: beyond it an Adam step (about lr per weight) can overflow
/// float32, and no useful training is anywhere near it.
pub const MAX_LR: f64 = 1e6;

/// Largest KL weight (beta) accepted; beta-VAEs use single digits.
pub const MAX_BETA: f64 = 1e6;

/// Training defaults: the canonical MNIST run (pytorch/examples' VAE).
pub const DEFAULT_EPOCHS: usize = 10;
pub const DEFAULT_BATCH_SIZE: usize = 128;
pub const DEFAULT_LR: f64 = 1e-3;

/// The VAE's shape: encoder D -> hidden_dims... -> (mu, logvar) of width Z,
/// decoder Z -> hidden_dims reversed... -> D logits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub input_dim: usize,
    pub hidden_dims: Vec<usize>,
    pub latent_dim: usize,
    pub activation: Activation,
    pub likelihood: Likelihood,
}

impl Config {
    /// A Bernoulli model (the likelihood of every model before there was a choice).
    pub fn new(
        input_dim: usize,
        hidden_dims: Vec<usize>,
        latent_dim: usize,
        activation: Activation,
    ) -> Result<Self> {
        Self::with_likelihood(
            input_dim,
            hidden_dims,
            latent_dim,
            activation,
            Likelihood::Bernoulli,
        )
    }

    pub fn with_likelihood(
        input_dim: usize,
        hidden_dims: Vec<usize>,
        latent_dim: usize,
        activation: Activation,
        likelihood: Likelihood,
    ) -> Result<Self> {
        let config = Config {
            input_dim,
            hidden_dims,
            latent_dim,
            activation,
            likelihood,
        };
        config.validate()?;
        Ok(config)
    }

    /// Canonical MNIST model of Kingma & Welling as in pytorch/examples: 784-400-20.
    pub fn mnist() -> Self {
        Config {
            input_dim: 784,
            hidden_dims: vec![400],
            latent_dim: 20,
            activation: Activation::Relu,
            likelihood: Likelihood::Bernoulli,
        }
    }

    fn validate(&self) -> Result<()> {
        let check = |name: &str, v: usize| {
            if v == 0 || v > MAX_WIDTH {
                Err(VaeError::Config(format!(
                    "{name} must be between 1 and {MAX_WIDTH}, got {v}"
                )))
            } else {
                Ok(())
            }
        };
        check("input_dim", self.input_dim)?;
        check("latent_dim", self.latent_dim)?;
        for (i, &h) in self.hidden_dims.iter().enumerate() {
            check(&format!("hidden_dims[{i}]"), h)?;
        }
        match self.param_count() {
            Some(n) if n <= MAX_PARAMS => Ok(()),
            _ => Err(VaeError::Config(format!(
                "model too large: more than {MAX_PARAMS} parameters (input_dim={}, hidden_dims={:?}, latent_dim={})",
                self.input_dim, self.hidden_dims, self.latent_dim
            ))),
        }
    }

    /// Encoder layer widths: [D, h1, ..., hk].
    pub fn encoder_dims(&self) -> Vec<usize> {
        let mut dims = vec![self.input_dim];
        dims.extend(&self.hidden_dims);
        dims
    }

    /// Decoder layer widths: [Z, hk, ..., h1, D].
    pub fn decoder_dims(&self) -> Vec<usize> {
        let mut dims = vec![self.latent_dim];
        dims.extend(self.hidden_dims.iter().rev());
        dims.push(self.input_dim);
        dims
    }

    /// Total number of parameters (weights, biases, and the Gaussian likelihood's D
    /// log-variances), or None on overflow.
    pub fn param_count(&self) -> Option<usize> {
        let mut total = match self.likelihood {
            Likelihood::Bernoulli => 0usize,
            Likelihood::Gaussian => self.input_dim,
        };
        let mut add = |i: usize, o: usize| -> Option<()> {
            total = total.checked_add(i.checked_mul(o)?.checked_add(o)?)?;
            Some(())
        };
        let enc = self.encoder_dims();
        for w in enc.windows(2) {
            add(w[0], w[1])?;
        }
        add(*enc.last()?, 2 * self.latent_dim)?;
        for w in self.decoder_dims().windows(2) {
            add(w[0], w[1])?;
        }
        Some(total)
    }

    /// Widest layer, for sizing scratch buffers.
    pub fn max_width(&self) -> usize {
        self.decoder_dims()
            .into_iter()
            .chain([2 * self.latent_dim])
            .max()
            .unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mnist_param_count() {
        // 784*400+400 + 400*40+40 + 20*400+400 + 400*784+784
        assert_eq!(Config::mnist().param_count(), Some(652_824));
    }

    #[test]
    fn rejects_zero_and_huge() {
        assert!(Config::new(784, vec![400], 0, Activation::Relu).is_err());
        assert!(Config::new(784, vec![1_000_000_000], 20, Activation::Relu).is_err());
        assert!(Config::new(784, vec![100_000, 100_000], 20, Activation::Relu).is_err());
        assert!(Config::new(784, vec![], 20, Activation::Tanh).is_ok());
    }
}
