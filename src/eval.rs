//! The importance-weighted estimate of log p(x) (Burda, Grosse & Salakhutdinov, "Importance
//! Weighted Autoencoders", eq. 8): log (1/k) sum_j p(x, z_j) / q(z_j | x), z_j ~ q(z | x).
//!
//! With z = mu + sigma * eps the Gaussian normalizers cancel, so each log weight is
//! log p(x|z) - |z|^2 / 2 + |eps|^2 / 2 + sum(logvar) / 2. The k samples of an example go
//! through the decoder in passes of at most `PASS_ROWS` rows (several examples per pass when k
//! is small), and a running log-sum-exp in f64 keeps memory bounded for any k.

use crate::config::MAX_K;
use crate::dataset::Dataset;
use crate::error::{Result, VaeError};
use crate::model::Workspace;
use crate::pool::keep_awake;
use crate::rng::{fill_normal, stream, Purpose};
use crate::train::Model;

/// Decoder rows per pass: large enough for efficient products, small enough for cache.
pub const PASS_ROWS: usize = 1024;

/// Running log-sum-exp over a stream of values.
#[derive(Clone, Copy)]
struct LogSumExp {
    max: f64,
    sum: f64,
}

impl LogSumExp {
    fn new() -> Self {
        LogSumExp {
            max: f64::NEG_INFINITY,
            sum: 0.0,
        }
    }
    fn add(&mut self, v: f64) {
        if v > self.max {
            self.sum = self.sum * (self.max - v).exp() + 1.0;
            self.max = v;
        } else {
            self.sum += (v - self.max).exp();
        }
    }
    fn value(self) -> f64 {
        self.max + self.sum.ln()
    }
}

impl Model {
    /// The k-sample importance-weighted log-likelihood of rows [start, end) of `data`, in nats,
    /// into `out`. Example e's noise is keyed by (seed, row_offset + e), where `row_offset` is
    /// where `data` starts in a larger array evaluated piece by piece; so a caller may compute
    /// the rows in
    /// slices; when k is below `PASS_ROWS`, how examples share a decoder pass (and so the
    /// rounding of the products) depends on the slice, at the 1e-7 relative level.
    #[allow(clippy::too_many_arguments)]
    pub fn log_likelihood_rows(
        &self,
        data: &Dataset,
        start: usize,
        end: usize,
        k: usize,
        seed: u64,
        row_offset: usize,
        out: &mut [f64],
    ) -> Result<()> {
        self.check_data(data)?;
        let cfg = &self.vae.config;
        if k == 0 || k > MAX_K {
            return Err(VaeError::Config(format!(
                "k must be between 1 and {MAX_K}, got {k}"
            )));
        }
        if start > end || end > data.n || out.len() != end - start {
            return Err(VaeError::Input("row range out of bounds".into()));
        }
        let (d, zdim) = (data.d, cfg.latent_dim);
        let group = (PASS_ROWS / k).max(1);
        let cap = if k <= PASS_ROWS { group * k } else { PASS_ROWS };
        let mut ws = Workspace::new(cfg, cap, false, self.threads());
        let mut head = vec![0.0f32; group * 2 * zdim];
        let ln_k = (k as f64).ln();
        self.install(|| {
            keep_awake(|| {
                for e0 in (start..end).step_by(group) {
                    let g = group.min(end - e0);
                    // q(z|x) for the group's examples.
                    data.read_rows(&mut ws.x[..g * d], e0, g);
                    self.vae.encode_forward(&mut ws, g, false);
                    head[..g * 2 * zdim].copy_from_slice(&ws.head[..g * 2 * zdim]);
                    let mut lse = vec![LogSumExp::new(); g];
                    let mut rngs: Vec<_> = (0..g)
                        .map(|i| {
                            stream(seed, Purpose::ImportanceNoise, (row_offset + e0 + i) as u64)
                        })
                        .collect();
                    // Passes: all k samples of g examples, or up to `cap` samples of one.
                    let mut done = 0;
                    while done < k {
                        let per = (k - done).min(cap / g);
                        let rows = g * per;
                        for i in 0..g {
                            let first = i * per * d;
                            data.read_rows(&mut ws.x[first..first + d], e0 + i, 1);
                            for j in 1..per {
                                let r = i * per + j;
                                ws.x.copy_within(first..first + d, r * d);
                            }
                            fill_normal(
                                &mut rngs[i],
                                &mut ws.eps[i * per * zdim..(i + 1) * per * zdim],
                            );
                            let (mu, lv) = head[i * 2 * zdim..(i + 1) * 2 * zdim].split_at(zdim);
                            for j in 0..per {
                                let r = i * per + j;
                                for c in 0..zdim {
                                    ws.z[r * zdim + c] =
                                        mu[c] + (0.5 * lv[c]).exp() * ws.eps[r * zdim + c];
                                }
                            }
                        }
                        self.vae.decode_forward(&mut ws, rows);
                        self.vae.reconstruction_loss(&mut ws, rows, false);
                        for i in 0..g {
                            let half_sum_lv: f64 = head[i * 2 * zdim + zdim..(i + 1) * 2 * zdim]
                                .iter()
                                .map(|&v| v as f64)
                                .sum::<f64>()
                                * 0.5;
                            for j in 0..per {
                                let r = i * per + j;
                                let z = &ws.z[r * zdim..(r + 1) * zdim];
                                let eps = &ws.eps[r * zdim..(r + 1) * zdim];
                                let zz: f64 = z.iter().map(|&v| (v as f64) * (v as f64)).sum();
                                let ee: f64 = eps.iter().map(|&v| (v as f64) * (v as f64)).sum();
                                lse[i].add(-ws.bce[r] - 0.5 * zz + 0.5 * ee + half_sum_lv);
                            }
                        }
                        done += per;
                    }
                    for i in 0..g {
                        out[e0 - start + i] = lse[i].value() - ln_k;
                    }
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Activation, Config};

    fn model_and_data() -> (Model, Dataset) {
        let cfg = Config::new(12, vec![8], 3, Activation::Tanh).unwrap();
        let model = Model::new(cfg, 5, 2).unwrap();
        let n = 7;
        let x: Vec<f32> = (0..n * 12)
            .map(|i| ((i * 7919) % 13) as f32 / 12.0)
            .collect();
        (model, Dataset::new(x, n, 12).unwrap())
    }

    #[test]
    #[cfg_attr(miri, ignore = "k up to 2500 samples: minutes under Miri")]
    fn slicing_changes_results_only_by_rounding() {
        let (model, data) = model_and_data();
        for k in [1, 3, 1000, 2500] {
            let mut whole = vec![0.0; 7];
            model
                .log_likelihood_rows(&data, 0, 7, k, 9, 0, &mut whole)
                .unwrap();
            let mut parts = vec![0.0; 7];
            model
                .log_likelihood_rows(&data, 0, 3, k, 9, 0, &mut parts[..3])
                .unwrap();
            model
                .log_likelihood_rows(&data, 3, 7, k, 9, 0, &mut parts[3..])
                .unwrap();
            for (a, b) in whole.iter().zip(&parts) {
                assert!((a - b).abs() <= 1e-6 * a.abs(), "k={k}: {a} vs {b}");
            }
            assert!(whole.iter().all(|v| v.is_finite() && *v < 0.0));
        }
    }

    #[test]
    fn log_sum_exp_is_stable() {
        let mut l = LogSumExp::new();
        for v in [-1000.0, -1000.0, -1001.0] {
            l.add(v);
        }
        let want = -1000.0 + (2.0 + (-1.0f64).exp()).ln();
        assert!((l.value() - want).abs() < 1e-12);
    }
}
