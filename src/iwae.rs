//! The k-sample objectives' passes (k samples of z per example): the importance-weighted
//! bound of Burda, Grosse & Salakhutdinov ("Importance Weighted Autoencoders", eq. 8, and its
//! gradient, eq. 14) and the k-sample ELBO.
//!
//! The encoder runs once, on the batch's B rows; sample j of row i is decoder row r = i k + j,
//! z_r = mu_i + sigma_i eps_r, so only the decoder and the loss run over B k rows.
//!
//! IWAE. With z = mu + sigma eps the Gaussian normalizers cancel, and each log weight is
//!   log w_r = log p(x_i | z_r) + beta (|eps_r|^2 / 2 - |z_r|^2 / 2 + sum(logvar_i) / 2)
//! (beta is the KL weight; 1 gives the bound). Row i's loss is log k - logsumexp_j log w_r, and
//! its gradient sums the samples' -d log w_r weighted by w~_r = softmax_j(log w_r):
//!   d out_r   = w~_r d(-log p(x_i | z_r)) / d out_r            (out: logits or means)
//!   g_r       = dz_r + beta w~_r z_r                            (dz_r weighted already)
//!   d mu_i    = sum_j g_r
//!   d logvar_i = sum_j g_r eps_r sigma_i / 2 - beta / 2          (sum_j w~_r = 1)
//! ELBO. The weights are 1/k and the KL is in closed form:
//!   loss_i    = (1/k) sum_j -log p(x_i | z_r) + beta KL_i
//!   d mu_i    = sum_j dz_r + beta mu_i
//!   d logvar_i = sum_j dz_r eps_r sigma_i / 2 + beta (exp(logvar_i) - 1) / 2
//! With k = 1 the ELBO here computes what `Vae::forward`, `loss` and `backward` do, up to the
//! order of the head's weight-gradient sums.

use crate::config::Objective;
use crate::layers::{
    bce_logits_forward_backward, for_rows, gaussian_logvar_backward, gaussian_nll_forward_backward,
    linear_backward,
};
use crate::model::{weight_grads, weights, FirstWeight, Vae, Workspace};
use crate::phases::{Phase, Timer};
use rayon::prelude::*;

impl Vae {
    /// A training step's forward pass and loss (summed over the n rows) on k samples per
    /// example: the one-sample ELBO path (`forward`, `loss`) for k = 1, else the k-sample one.
    pub fn step_loss(
        &self,
        ws: &mut Workspace,
        n: usize,
        sparse: bool,
        k: usize,
        objective: Objective,
    ) -> f64 {
        if k == 1 {
            self.forward(ws, n, sparse);
            let t = Timer::start();
            let loss = self.loss(ws, n);
            t.stop(Phase::Loss);
            loss
        } else {
            self.samples_forward(ws, n, k, sparse);
            self.samples_loss(ws, n, k, objective)
        }
    }

    /// After `step_loss`: the gradients of that loss, as `backward` or `samples_backward`.
    pub fn step_backward(
        &self,
        grads: &mut [f32],
        ws: &mut Workspace,
        n: usize,
        k: usize,
        objective: Objective,
        first: FirstWeight,
    ) {
        if k == 1 {
            self.backward(grads, ws, n, first);
        } else {
            self.samples_backward(grads, ws, n, k, objective, first);
        }
    }

    /// The forward pass of the k-sample objectives for n rows: ws.x (B, D) and ws.eps (B k, Z)
    /// give ws.head (B, 2Z), ws.z (B k, Z), ws.x_rep (B k, D) and the decoder's outputs
    /// (B k, D). The workspace holds at least B k rows.
    pub fn samples_forward(&self, ws: &mut Workspace, n: usize, k: usize, sparse: bool) {
        let (d, zd) = (self.config.input_dim, self.config.latent_dim);
        let rows = n * k;
        debug_assert!(rows <= ws.cap);
        self.encode_forward(ws, n, sparse);
        if ws.x_rep.len() < rows * d {
            ws.x_rep.resize(rows * d, 0.0);
        }
        ws.x_rep[..rows * d]
            .par_chunks_mut(k * d)
            .zip(ws.x[..n * d].par_chunks(d))
            .for_each(|(rep, x)| rep.chunks_exact_mut(d).for_each(|r| r.copy_from_slice(x)));
        ws.z[..rows * zd]
            .par_chunks_mut(k * zd)
            .zip(ws.eps[..rows * zd].par_chunks(k * zd))
            .zip(ws.head[..n * 2 * zd].par_chunks(2 * zd))
            .for_each(|((z, eps), head)| {
                let (mu, lv) = head.split_at(zd);
                for (zr, er) in z.chunks_exact_mut(zd).zip(eps.chunks_exact(zd)) {
                    for c in 0..zd {
                        // As `reparam_kl_forward` rounds it.
                        zr[c] = mu[c] + lv[c].exp().sqrt() * er[c];
                    }
                }
            });
        self.decode_from(ws, rows, 0);
    }

    /// After `samples_forward`: the loss summed over the n rows (each row's in ws.kl), each
    /// sample's weight in ws.sample_weights, and the decoder's outputs turned into the
    /// gradient of -log p(x|z) (unweighted: `samples_backward` weights them).
    pub fn samples_loss(
        &self,
        ws: &mut Workspace,
        n: usize,
        k: usize,
        objective: Objective,
    ) -> f64 {
        let (d, zd) = (self.config.input_dim, self.config.latent_dim);
        let rows = n * k;
        let out = ws.dec.last_mut().expect("decoder has an output layer");
        let (loss, out, x) = (
            &mut ws.bce[..rows],
            &mut out[..rows * d],
            &ws.x_rep[..rows * d],
        );
        match &self.layout.out_logvar {
            None => bce_logits_forward_backward(loss, out, x, d, true),
            Some(lv) => {
                gaussian_nll_forward_backward(loss, out, x, &self.params[lv.clone()], d, true)
            }
        }
        if ws.sample_weights.len() < rows {
            ws.sample_weights.resize(rows, 0.0);
        }
        let beta = f64::from(ws.kl_weight);
        let ln_k = (k as f64).ln();
        ws.kl[..n]
            .par_iter_mut()
            .zip(ws.sample_weights[..rows].par_chunks_mut(k))
            .zip(ws.bce[..rows].par_chunks(k))
            .zip(ws.z[..rows * zd].par_chunks(k * zd))
            .zip(ws.eps[..rows * zd].par_chunks(k * zd))
            .zip(ws.head[..n * 2 * zd].par_chunks(2 * zd))
            // The log weights, kept in f64 until normalized, in one buffer per task.
            .for_each_init(
                Vec::<f64>::new,
                |log_w, (((((row_loss, w), nll), z), eps), head)| {
                    let (mu, lv) = head.split_at(zd);
                    match objective {
                        Objective::Iwae => {
                            let half_sum_lv = 0.5 * lv.iter().map(|&v| f64::from(v)).sum::<f64>();
                            let squares =
                                |v: &[f32]| v.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>();
                            log_w.clear();
                            log_w.extend((0..k).map(|j| {
                                let (zr, er) =
                                    (&z[j * zd..(j + 1) * zd], &eps[j * zd..(j + 1) * zd]);
                                let prior_ratio =
                                    0.5 * squares(er) - 0.5 * squares(zr) + half_sum_lv;
                                -nll[j] + beta * prior_ratio
                            }));
                            let max = log_w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                            let sum: f64 = log_w.iter().map(|&v| (v - max).exp()).sum();
                            *row_loss = ln_k - (max + sum.ln());
                            for (wj, &v) in w.iter_mut().zip(log_w.iter()) {
                                *wj = ((v - max).exp() / sum) as f32;
                            }
                        }
                        Objective::Elbo => {
                            let mut acc = 0.0f32;
                            for c in 0..zd {
                                acc += 1.0 + lv[c] - mu[c] * mu[c] - lv[c].exp();
                            }
                            let kl = -0.5 * f64::from(acc);
                            let kl = if beta == 1.0 { kl } else { beta * kl };
                            *row_loss = nll.iter().sum::<f64>() / k as f64 + kl;
                            w.fill(1.0 / k as f32);
                        }
                    }
                },
            );
        // In row order, so the sum does not depend on the pool.
        ws.kl[..n].iter().sum()
    }

    /// After `samples_loss`: the gradient of its loss with respect to every parameter, into
    /// `grads`; `first` says whether the first layer's weight gradient is computed or left to
    /// the caller.
    #[allow(clippy::too_many_arguments)]
    pub fn samples_backward(
        &self,
        grads: &mut [f32],
        ws: &mut Workspace,
        n: usize,
        k: usize,
        objective: Objective,
        first: FirstWeight,
    ) {
        debug_assert_eq!(grads.len(), self.params.len());
        let (d, zd) = (self.config.input_dim, self.config.latent_dim);
        let rows = n * k;
        let sample_weights = &ws.sample_weights[..rows];
        let dout = &mut ws.dec.last_mut().expect("decoder has an output layer")[..rows * d];
        if let Some(lv) = &self.layout.out_logvar {
            // From the unweighted mean gradients, each row's term weighted.
            let (g, p) = (&mut grads[lv.clone()], &self.params[lv.clone()]);
            gaussian_logvar_backward(g, dout, p, rows, Some(sample_weights));
        }
        for_rows(dout, d, |r, row| {
            let w = sample_weights[r];
            row.iter_mut().for_each(|v| *v *= w);
        });
        self.decoder_backward(grads, ws, rows, 0);

        // dhead (B, 2Z) from dz (B k, Z), by example.
        let beta = ws.kl_weight;
        ws.dhead[..n * 2 * zd]
            .par_chunks_mut(2 * zd)
            .zip(ws.head[..n * 2 * zd].par_chunks(2 * zd))
            .zip(ws.dz[..rows * zd].par_chunks(k * zd))
            .zip(ws.z[..rows * zd].par_chunks(k * zd))
            .zip(ws.eps[..rows * zd].par_chunks(k * zd))
            .zip(ws.sample_weights[..rows].par_chunks(k))
            .for_each(|(((((dh, head), dz), z), eps), w)| {
                let (mu, lv) = head.split_at(zd);
                let (dmu, dlv) = dh.split_at_mut(zd);
                for c in 0..zd {
                    let sigma = lv[c].exp().sqrt();
                    let (mut gm, mut gl) = (0.0f32, 0.0f32);
                    for (j, &wj) in w.iter().enumerate() {
                        let r = j * zd + c;
                        let g = match objective {
                            Objective::Iwae => dz[r] + beta * wj * z[r],
                            Objective::Elbo => dz[r],
                        };
                        gm += g;
                        gl += 0.5 * g * eps[r] * sigma;
                    }
                    (dmu[c], dlv[c]) = match objective {
                        Objective::Iwae => (gm, gl - 0.5 * beta),
                        Objective::Elbo => {
                            (gm + beta * mu[c], gl + beta * (0.5 * (lv[c].exp() - 1.0)))
                        }
                    };
                }
            });

        // The head, then the encoder.
        let h = &self.layout.head;
        let inp = match self.layout.encoder.len() {
            0 => &ws.x[..n * h.in_dim],
            e => &ws.enc[e - 1][..n * h.in_dim],
        };
        let dinp = ws.denc.last_mut().map(|g| &mut g[..n * h.in_dim]);
        let (dw, db) = weight_grads(grads, h);
        let (w, _) = weights(&self.params, h);
        let dhead = &ws.dhead[..n * h.out_dim];
        linear_backward(dinp, dw, db, dhead, inp, w, n, h.in_dim, h.out_dim);
        self.encoder_backward(grads, ws, n, first);
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Activation, Config, Likelihood, Objective};
    use crate::model::{FirstWeight, Vae, Workspace};
    use crate::rng::{fill_normal, stream, Purpose};

    fn batch(vae: &Vae, n: usize, k: usize) -> Workspace {
        let (d, zd) = (vae.config.input_dim, vae.config.latent_dim);
        let mut ws = Workspace::new(&vae.config, n * k, true, 2);
        for (i, v) in ws.x[..n * d].iter_mut().enumerate() {
            *v = ((i * 7919) % 13) as f32 / 12.0;
        }
        fill_normal(
            &mut stream(3, Purpose::TrainNoise, 0),
            &mut ws.eps[..n * k * zd],
        );
        ws
    }

    #[test]
    fn one_sample_elbo_is_the_elbo_path() {
        for (hidden, likelihood) in [
            (vec![8], Likelihood::Bernoulli),
            (vec![8, 6], Likelihood::Gaussian),
            (vec![], Likelihood::Bernoulli),
        ] {
            let cfg = Config::with_likelihood(12, hidden, 3, Activation::Tanh, likelihood).unwrap();
            let vae = Vae::new(cfg, 5);
            let n = 40;
            let mut ws = batch(&vae, n, 1);
            ws.kl_weight = 0.7;
            let mut grads = vec![0.0; vae.params.len()];
            vae.forward(&mut ws, n, false);
            let loss = vae.loss(&mut ws, n);
            vae.backward(&mut grads, &mut ws, n, FirstWeight::Compute);

            let mut ws1 = batch(&vae, n, 1);
            ws1.kl_weight = 0.7;
            let mut grads1 = vec![0.0; vae.params.len()];
            vae.samples_forward(&mut ws1, n, 1, false);
            let loss1 = vae.samples_loss(&mut ws1, n, 1, Objective::Elbo);
            vae.samples_backward(
                &mut grads1,
                &mut ws1,
                n,
                1,
                Objective::Elbo,
                FirstWeight::Compute,
            );
            // The head is one product here and one per part there: float32 rounding apart.
            assert!(
                (loss - loss1).abs() <= 1e-6 * loss.abs(),
                "{loss} vs {loss1}"
            );
            let scale = grads.iter().fold(0.0f32, |m, g| m.max(g.abs()));
            for (a, b) in grads.iter().zip(&grads1) {
                assert!((a - b).abs() <= 1e-5 * scale, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn iwae_weights_are_normalized_and_the_bound_is_above_the_elbo_estimate() {
        let cfg = Config::new(12, vec![8], 3, Activation::Relu).unwrap();
        let vae = Vae::new(cfg, 9);
        let (n, k) = (6, 5);
        let mut ws = batch(&vae, n, k);
        vae.samples_forward(&mut ws, n, k, false);
        let iw = vae.samples_loss(&mut ws, n, k, Objective::Iwae);
        for w in ws.sample_weights[..n * k].chunks(k) {
            assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            assert!(w.iter().all(|&v| (0.0..=1.0).contains(&v)));
        }
        // Each row's loss is at most minus the mean of its log weights (Jensen), and
        // equals it up to rounding where one weight dominates.
        let zd = 3;
        let mut total = 0.0;
        for i in 0..n {
            let head = &ws.head[i * 2 * zd..(i + 1) * 2 * zd];
            let half_sum_lv: f64 = head[zd..].iter().map(|&v| 0.5 * f64::from(v)).sum();
            let mut mean = 0.0;
            for r in i * k..(i + 1) * k {
                let sq = |v: &[f32]| v.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>();
                let (z, e) = (&ws.z[r * zd..(r + 1) * zd], &ws.eps[r * zd..(r + 1) * zd]);
                mean += (-ws.bce[r] + 0.5 * sq(e) - 0.5 * sq(z) + half_sum_lv) / k as f64;
            }
            assert!(
                ws.kl[i] <= -mean + 1e-9,
                "row {i}: {} > {}",
                ws.kl[i],
                -mean
            );
            total += ws.kl[i];
        }
        assert!((total - iw).abs() <= 1e-12 * iw.abs());
    }
}
