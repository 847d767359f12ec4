//! Inference over whole data sets in chunks, on the model's pool: the one-sample ELBO, q(z|x),
//! p(x|z) and draws from the prior. (The importance-weighted estimate is in `eval`.)

use crate::config::Likelihood;
use crate::dataset::Dataset;
use crate::error::{Result, VaeError};
use crate::model::Workspace;
use crate::rng::{binarize as binarize_row, fill_normal, stream, Purpose};
use crate::train::Model;
use rayon::prelude::*;

/// Rows per inference chunk; evaluation noise is keyed by chunk, so this fixes the results.
pub const EVAL_CHUNK: usize = 1024;
/// Rows per call a front end makes for the ELBO of a large array (memory-mapped pieces, and
/// the slices between checks for Ctrl-C): a multiple of EVAL_CHUNK, so pieces draw the noise
/// the whole array would.
pub const EVAL_PIECE_ROWS: usize = 16 * EVAL_CHUNK;
/// Decoder rows (examples times k) per call a front end makes for the importance-weighted
/// estimate: a fraction of a second of work between checks for Ctrl-C.
pub const LOG_LIKELIHOOD_CALL_ROWS: usize = 1 << 16;

/// Largest array the core returns, in elements (4 GiB of f32).
pub const MAX_OUTPUT: usize = 1 << 30;

/// n * width, when it is a size the core agrees to allocate.
pub fn output_len(n: usize, width: usize) -> Result<usize> {
    match n.checked_mul(width) {
        Some(len) if len <= MAX_OUTPUT => Ok(len),
        _ => Err(VaeError::Input(format!(
            "{n} rows of {width} values is more than the {MAX_OUTPUT} values fastvae returns at once; ask for fewer rows"
        ))),
    }
}

impl Model {
    /// Per-example ELBO (= -(-log p(x|z) + KL), one z sample each, beta = 1 whatever the
    /// model was trained with) for rows [start, end) of `data`,
    /// which must lie on EVAL_CHUNK boundaries except at the end; noise keyed by (seed, chunk).
    /// `row_offset` (a multiple of EVAL_CHUNK) is where `data` starts in a larger array
    /// evaluated piece by piece, so the pieces draw the noise the whole array would.
    pub fn elbo_rows(
        &self,
        data: &Dataset,
        start: usize,
        end: usize,
        seed: u64,
        row_offset: usize,
        out: &mut [f64],
    ) -> Result<()> {
        self.check_data(data)?;
        if !(start + row_offset).is_multiple_of(EVAL_CHUNK)
            || end > data.n
            || out.len() != end - start
        {
            return Err(VaeError::Input(format!(
                "evaluation rows must start on a multiple of {EVAL_CHUNK}"
            )));
        }
        let cap = EVAL_CHUNK.min(end - start).max(1);
        let mut ws = Workspace::new(&self.vae.config, cap, false, self.threads());
        let (d, zdim) = (data.d, self.vae.config.latent_dim);
        self.install(|| {
            for (c, lo) in (start..end).step_by(EVAL_CHUNK).enumerate() {
                let n = (end - lo).min(EVAL_CHUNK);
                data.read_rows(&mut ws.x[..n * d], lo, n);
                let chunk = ((row_offset + start) / EVAL_CHUNK + c) as u64;
                fill_normal(
                    &mut stream(seed, Purpose::EvalNoise, chunk),
                    &mut ws.eps[..n * zdim],
                );
                // The first layer skips zero inputs as training does on these data.
                self.vae.forward(&mut ws, n, data.sparse);
                self.vae.reconstruction_loss(&mut ws, n, false);
                let o = &mut out[lo - start..lo - start + n];
                for (r, v) in o.iter_mut().enumerate() {
                    *v = -(ws.bce[r] + ws.kl[r]);
                }
            }
        })
    }

    /// mu and logvar (each (n, Z)) of q(z|x) for every row.
    pub fn encode(&self, data: &Dataset) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_data(data)?;
        let (d, zdim) = (data.d, self.vae.config.latent_dim);
        let mut mu = vec![0.0; data.n * zdim];
        let mut logvar = vec![0.0; data.n * zdim];
        let mut ws = Workspace::new(
            &self.vae.config,
            EVAL_CHUNK.min(data.n),
            false,
            self.threads(),
        );
        self.install(|| {
            for lo in (0..data.n).step_by(EVAL_CHUNK) {
                let n = (data.n - lo).min(EVAL_CHUNK);
                data.read_rows(&mut ws.x[..n * d], lo, n);
                self.vae.encode_forward(&mut ws, n, data.sparse);
                for r in 0..n {
                    let h = &ws.head[r * 2 * zdim..(r + 1) * 2 * zdim];
                    mu[(lo + r) * zdim..(lo + r + 1) * zdim].copy_from_slice(&h[..zdim]);
                    logvar[(lo + r) * zdim..(lo + r + 1) * zdim].copy_from_slice(&h[zdim..]);
                }
            }
        })?;
        Ok((mu, logvar))
    }

    /// The means (n, D) of p(x|z) for latent rows z (n, Z): pixel probabilities
    /// sigmoid(logits) for Bernoulli, the decoder's outputs for Gaussian.
    pub fn decode(&self, z: &[f32]) -> Result<Vec<f32>> {
        let (d, zdim) = (self.vae.config.input_dim, self.vae.config.latent_dim);
        if !z.len().is_multiple_of(zdim) || z.is_empty() {
            return Err(VaeError::Input(format!(
                "z must have shape (n, {zdim}) with n >= 1"
            )));
        }
        if let Some(i) = z.iter().position(|v| !v.is_finite()) {
            return Err(VaeError::Input(format!(
                "z[{}, {}] is {}; latent codes must be finite",
                i / zdim,
                i % zdim,
                z[i]
            )));
        }
        let n_all = z.len() / zdim;
        let mut out = vec![0.0; output_len(n_all, d)?];
        let mut ws = Workspace::new(
            &self.vae.config,
            EVAL_CHUNK.min(n_all),
            false,
            self.threads(),
        );
        self.install(|| {
            for lo in (0..n_all).step_by(EVAL_CHUNK) {
                let n = (n_all - lo).min(EVAL_CHUNK);
                ws.z[..n * zdim].copy_from_slice(&z[lo * zdim..(lo + n) * zdim]);
                self.vae.decode_forward(&mut ws, n);
                let dec = &ws.dec.last().expect("decoder output")[..n * d];
                let dst = &mut out[lo * d..(lo + n) * d];
                match self.vae.config.likelihood {
                    Likelihood::Bernoulli => dst
                        .par_iter_mut()
                        .zip(dec)
                        .for_each(|(p, &l)| *p = 1.0 / (1.0 + (-l).exp())),
                    Likelihood::Gaussian => dst.copy_from_slice(dec),
                }
            }
        })?;
        Ok(out)
    }

    /// Draws x ~ p(x|z) (n, D) for latent rows z (n, Z): 0 or 1 pixels for Bernoulli, means
    /// plus exp(logvar / 2) N(0, 1) noise for Gaussian; row r's draw keyed by (seed, r).
    pub fn decode_draw(&self, z: &[f32], seed: u64) -> Result<Vec<f32>> {
        let mut out = self.decode(z)?;
        let d = self.vae.config.input_dim;
        let sd: Option<Vec<f32>> = self.vae.layout.out_logvar.as_ref().map(|lv| {
            self.vae.params[lv.clone()]
                .iter()
                .map(|&v| (0.5 * v).exp())
                .collect()
        });
        self.install(|| {
            out.par_chunks_mut(d).enumerate().for_each(|(r, row)| {
                let mut rng = stream(seed, Purpose::Draw, r as u64);
                match &sd {
                    None => binarize_row(&mut rng, row),
                    Some(sd) => {
                        let mut noise = vec![0.0f32; d];
                        fill_normal(&mut rng, &mut noise);
                        for ((x, e), s) in row.iter_mut().zip(&noise).zip(sd) {
                            *x += s * e;
                        }
                    }
                }
            })
        })?;
        Ok(out)
    }

    /// n draws z ~ N(0, I) (n, Z), keyed by seed.
    pub fn prior_samples(&self, n: usize, seed: u64) -> Result<Vec<f32>> {
        let len = output_len(n, self.vae.config.latent_dim.max(self.vae.config.input_dim))
            .map(|_| n * self.vae.config.latent_dim)?;
        let mut z = vec![0.0; len];
        fill_normal(&mut stream(seed, Purpose::Prior, 0), &mut z);
        Ok(z)
    }
}
