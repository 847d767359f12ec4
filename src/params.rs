//! Where each layer's weights live in one flat `Vec<f32>`. Parameters, gradients and both Adam
//! moments share this layout, so the optimizer is one loop over four slices.
//!
//! Weights are stored (out, in) row-major, as torch.nn.Linear stores them. The encoder's mu and
//! logvar heads are one (2Z, H) matrix whose first Z rows are fc_mu and last Z rows fc_logvar,
//! so both heads are one product; each named tensor is still a contiguous range.

use crate::config::{Config, Likelihood};
use crate::rng::{stream, Purpose};
use rand::RngExt;
use std::ops::Range;

/// One linear layer y = x W^T + b: W at `weight` (out_dim, in_dim), or (in_dim, out_dim) when
/// `transposed` (the storage order only: `ParamLayout::new` stores the first layer's weight so),
/// b at `bias` (out_dim).
#[derive(Debug, Clone)]
pub struct LinearLayout {
    pub in_dim: usize,
    pub out_dim: usize,
    pub weight: Range<usize>,
    pub bias: Range<usize>,
    pub transposed: bool,
}

/// A named tensor as the equivalent PyTorch module's state_dict would hold it. When
/// `transposed`, the buffer holds the `(shape[1], shape[0])` transpose.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
    pub transposed: bool,
}

impl TensorSpec {
    /// The tensor's values in PyTorch's row-major order, from the flat buffer.
    pub fn export(&self, flat: &[f32]) -> Vec<f32> {
        let src = &flat[self.range.clone()];
        if !self.transposed {
            return src.to_vec();
        }
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let mut out = vec![0.0; src.len()];
        for r in 0..rows {
            for c in 0..cols {
                out[r * cols + c] = src[c * rows + r];
            }
        }
        out
    }

    /// Store values given in PyTorch's row-major order into the flat buffer.
    pub fn import(&self, values: &[f32], flat: &mut [f32]) {
        let dst = &mut flat[self.range.clone()];
        if !self.transposed {
            dst.copy_from_slice(values);
            return;
        }
        let (rows, cols) = (self.shape[0], self.shape[1]);
        for r in 0..rows {
            for c in 0..cols {
                dst[c * rows + r] = values[r * cols + c];
            }
        }
    }
}

/// Offsets of every layer in the flat parameter buffer. The first encoder layer's weight is
/// stored transposed, (D, h1), for its sparse passes (see `first_layer`), and leads the buffer.
#[derive(Debug, Clone)]
pub struct ParamLayout {
    /// D -> h1 -> ... -> hk, activation after each.
    pub encoder: Vec<LinearLayout>,
    /// hk -> 2Z: [mu | logvar].
    pub head: LinearLayout,
    /// Z -> hk -> ... -> h1 -> D; activation after all but the last (logits, or Gaussian means).
    pub decoder: Vec<LinearLayout>,
    /// The Gaussian likelihood's per-feature log-variances (D), last in the buffer.
    pub out_logvar: Option<Range<usize>>,
    pub len: usize,
}

impl ParamLayout {
    pub fn new(config: &Config) -> Self {
        let mut len = 0;
        let mut linear = |in_dim: usize, out_dim: usize, transposed: bool| {
            let weight = len..len + in_dim * out_dim;
            let bias = weight.end..weight.end + out_dim;
            len = bias.end;
            LinearLayout {
                in_dim,
                out_dim,
                weight,
                bias,
                transposed,
            }
        };
        let enc_dims = config.encoder_dims();
        let encoder: Vec<_> = enc_dims
            .windows(2)
            .enumerate()
            .map(|(i, w)| linear(w[0], w[1], i == 0))
            .collect();
        let head = linear(*enc_dims.last().unwrap(), 2 * config.latent_dim, false);
        let decoder: Vec<_> = config
            .decoder_dims()
            .windows(2)
            .map(|w| linear(w[0], w[1], false))
            .collect();
        let out_logvar = (config.likelihood == Likelihood::Gaussian).then(|| {
            let r = len..len + config.input_dim;
            len = r.end;
            r
        });
        ParamLayout {
            encoder,
            head,
            decoder,
            out_logvar,
            len,
        }
    }

    /// Every tensor by its PyTorch name, in a fixed order: encoder.{i}, fc_mu, fc_logvar,
    /// decoder.{j}; weights (out, in), biases (out,).
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let mut out = Vec::new();
        let mut push = |name: String, shape: Vec<usize>, range: Range<usize>, transposed| {
            out.push(TensorSpec {
                name,
                shape,
                range,
                transposed,
            })
        };
        let mut linear = |prefix: String, l: &LinearLayout| {
            push(
                format!("{prefix}.weight"),
                vec![l.out_dim, l.in_dim],
                l.weight.clone(),
                l.transposed,
            );
            push(
                format!("{prefix}.bias"),
                vec![l.out_dim],
                l.bias.clone(),
                false,
            );
        };
        for (i, l) in self.encoder.iter().enumerate() {
            linear(format!("encoder.{i}"), l);
        }
        let h = &self.head;
        let z = h.out_dim / 2;
        let (w, b) = (h.weight.start, h.bias.start);
        let half = |w0: usize, b0: usize| LinearLayout {
            in_dim: h.in_dim,
            out_dim: z,
            weight: w0..w0 + z * h.in_dim,
            bias: b0..b0 + z,
            transposed: false,
        };
        linear("fc_mu".into(), &half(w, b));
        linear("fc_logvar".into(), &half(w + z * h.in_dim, b + z));
        for (j, l) in self.decoder.iter().enumerate() {
            linear(format!("decoder.{j}"), l);
        }
        if let Some(r) = &self.out_logvar {
            push("decoder_logvar".into(), vec![r.len()], r.clone(), false);
        }
        out
    }

    /// Every layer, in buffer order.
    pub fn layers(&self) -> impl Iterator<Item = &LinearLayout> {
        self.encoder
            .iter()
            .chain(std::iter::once(&self.head))
            .chain(self.decoder.iter())
    }

    /// torch.nn.Linear's default init: weights and biases U(-1/sqrt(in), 1/sqrt(in)); the
    /// Gaussian log-variances start at 0 (unit variance, the scale of standardized data).
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut params = vec![0.0f32; self.len];
        for (i, l) in self.layers().enumerate() {
            let mut rng = stream(seed, Purpose::Init, i as u64);
            let bound = 1.0 / (l.in_dim as f32).sqrt();
            for v in &mut params[l.weight.start..l.bias.end] {
                *v = rng.random_range(-bound..bound);
            }
        }
        params
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_tile_the_buffer() {
        let layout = ParamLayout::new(&Config::mnist());
        let mut tensors = layout.tensors();
        tensors.sort_by_key(|t| t.range.start);
        let mut covered = 0;
        for t in tensors {
            assert_eq!(t.range.start, covered, "{}", t.name);
            assert_eq!(t.range.len(), t.shape.iter().product::<usize>());
            covered = t.range.end;
        }
        assert_eq!(covered, layout.len);
        assert_eq!(layout.len, 652_824);
    }

    #[test]
    #[cfg_attr(miri, ignore = "the MNIST-sized buffer takes minutes under Miri")]
    fn transposed_export_import_round_trip() {
        let layout = ParamLayout::new(&Config::mnist());
        let flat: Vec<f32> = (0..layout.len).map(|i| i as f32).collect();
        let w1 = &layout.tensors()[0];
        assert!(w1.transposed && w1.shape == vec![400, 784]);
        let torch_order = w1.export(&flat);
        // PyTorch's W1[o, i] is the buffer's (i, o) entry.
        assert_eq!(torch_order[3 * 784 + 5], flat[5 * 400 + 3]);
        let mut back = vec![0.0; layout.len];
        w1.import(&torch_order, &mut back);
        assert_eq!(&back[w1.range.clone()], &flat[w1.range.clone()]);
    }
}
