//! One training step on a batch already in the workspace: noise, optional binarization,
//! forward, loss, backward, the finiteness check and Adam, with the first layer's weight
//! gradient fused into its Adam update when the batch's nonzeros are indexed.

use crate::config::{Objective, LOGVAR_MAX, LOGVAR_MIN};
use crate::error::{Result, VaeError};
use crate::first_layer::{sparse_weight_backward, GradSink};
use crate::layers::{for_rows, max_abs};
use crate::model::{FirstWeight, Vae, Workspace};
use crate::optim::{adam_update, all_finite, all_within, AdamConfig, AdamKernel, AdamState};
use crate::phases::{Phase, Timer};
use crate::rng::{binarize as binarize_row, fill_normal, stream, Purpose};

/// Mutable borrows of what a training step changes, with the workspace it runs in.
pub struct Trainer<'a> {
    pub vae: &'a mut Vae,
    pub grads: &'a mut [f32],
    pub adam: &'a mut AdamState,
    pub ws: &'a mut Workspace,
    pub seed: u64,
    /// Completed epochs, for error messages.
    pub epoch: u64,
    pub cfg: AdamConfig,
    /// Samples of z per example (k), and how they combine when k > 1.
    pub samples: usize,
    pub objective: Objective,
}

impl Trainer<'_> {
    /// One step on the n rows already in ws.x: draws the noise (and, with `binarize`, the
    /// binarization) keyed by the step, then `step_with_noise`. Returns the batch's loss sum.
    pub fn step(&mut self, n: usize, sparse: bool, binarize: bool) -> Result<f64> {
        let t = Timer::start();
        let (seed, step) = (self.seed, self.adam.t);
        let (d, zdim) = (self.vae.config.input_dim, self.vae.config.latent_dim);
        fill_normal(
            &mut stream(seed, Purpose::TrainNoise, step),
            &mut self.ws.eps[..n * self.samples * zdim],
        );
        if binarize {
            // One stream per (step, row), so rows binarize in parallel.
            for_rows(&mut self.ws.x[..n * d], d, |r, row| {
                let key = (step << 24) ^ r as u64;
                binarize_row(&mut stream(seed, Purpose::Binarize, key), row)
            });
        }
        t.stop(Phase::Noise);
        self.step_with_noise(n, sparse)
    }

    /// One step on the batch in ws.x with the noise in ws.eps: forward, backward, Adam. On a
    /// non-finite loss or gradient no weight moves; the error names the epoch and step.
    ///
    /// When the batch's nonzeros are indexed, the first layer's weight gradient is never
    /// stored: each block of it is summed and goes straight into that block's Adam update. The
    /// other gradients are checked first, and that one is finite by a bound on its inputs
    /// (`gradients_finite`), so no weight moves on a step that would have failed the check.
    pub fn step_with_noise(&mut self, n: usize, sparse: bool) -> Result<f64> {
        let Trainer {
            vae,
            grads,
            adam,
            ws,
            epoch,
            cfg,
            samples: k,
            objective,
            ..
        } = self;
        let (k, objective) = (*k, *objective);
        let step = adam.t + 1;
        let nonfinite = |what: String| VaeError::NonFinite {
            epoch: *epoch + 1,
            step,
            what,
        };
        let loss = vae.step_loss(ws, n, sparse, k, objective);
        if !loss.is_finite() {
            return Err(nonfinite(format!("the loss is {loss}")));
        }
        let fused = ws.nonzeros.get().is_some();
        let first = if fused {
            FirstWeight::Defer
        } else {
            FirstWeight::Compute
        };
        vae.step_backward(grads, ws, n, k, objective, first);
        let kernel = AdamKernel::new(step, *cfg);
        let t = Timer::start();
        let finite = gradients_finite(vae, grads, ws, n, n * k);
        t.stop(Phase::Check);
        if finite {
            let mut from = 0;
            if fused {
                let l = &vae.layout.encoder[0];
                let w1 = l.weight.clone();
                let sink = GradSink::Adam {
                    wt: &mut vae.params[w1.clone()],
                    m: &mut adam.m[w1.clone()],
                    v: &mut adam.v[w1.clone()],
                    kernel,
                };
                let (nz, dh) = (
                    ws.nonzeros.get().expect("indexed"),
                    &ws.denc[0][..n * l.out_dim],
                );
                let t = Timer::start();
                sparse_weight_backward(sink, nz, dh, l.in_dim, l.out_dim);
                t.stop(Phase::FirstUpdate);
                // The first layer's weight leads the parameters.
                debug_assert_eq!(w1.start, 0);
                from = w1.end;
            }
            let t = Timer::start();
            adam_from(vae, grads, adam, kernel, from);
            t.stop(Phase::Update);
            adam.t = step;
            return Ok(loss);
        }
        // Outside the bounds (or a gradient is not finite): every gradient, then the check.
        if fused {
            vae.first_weight_backward(grads, ws, n);
        }
        if !all_finite(grads) {
            return Err(nonfinite("a gradient is not finite".into()));
        }
        adam_from(vae, grads, adam, kernel, 0);
        adam.t = step;
        Ok(loss)
    }
}

/// Bound on n * max |a| under which a weight gradient that sums n products a * c with
/// |c| <= 1 is finite however its float sums round.
const GRAD_SUM_LIMIT: f32 = 1e37;

/// Whether every gradient is certainly finite, reading the two largest weight gradients'
/// inputs instead of the gradients. The output layer's weight gradient sums dl * inp, where
/// |dl| = |sigmoid(l) - x| <= 1 for Bernoulli pixels (Gaussian: the largest |dl|, read); the
/// first layer's sums x * dh, where |x| <= 1 for Bernoulli pixels (Gaussian: the largest |x|).
/// Each is finite when its row count * max of its one factor * max of the other is bounded:
/// n rows for the first layer, n_dec for the output layer (n k with k samples per example,
/// whose weights keep |dl| within the same bounds). The first layer's weight gradient need
/// not have been computed.
fn gradients_finite(vae: &Vae, grads: &[f32], ws: &Workspace, n: usize, n_dec: usize) -> bool {
    let (limit, out_limit) = (GRAD_SUM_LIMIT / n as f32, GRAD_SUM_LIMIT / n_dec as f32);
    let layout = &vae.layout;
    let out = layout.decoder.last().expect("decoder has an output layer");
    let d = vae.config.input_dim;
    let (out_scale, in_scale) = match layout.out_logvar {
        None => (1.0, 1.0),
        Some(_) => {
            let dl = &ws.dec.last().expect("decoder has an output layer")[..n_dec * d];
            (max_abs(dl), max_abs(&ws.x[..n * d]))
        }
    };
    // The loss is finite, so every dl is; x was checked finite when it arrived. An infinite
    // scale (or NaN, which fails every comparison) fails the check.
    if !(out_scale < f32::MAX && in_scale < f32::MAX) {
        return false;
    }
    let out_inp = match layout.decoder.len() {
        1 => &ws.z[..n_dec * out.in_dim],
        k => &ws.dec[k - 2][..n_dec * out.in_dim],
    };
    let mut skip = [out.weight.clone(), 0..0];
    if let Some(first) = layout.encoder.first() {
        if !all_within(&ws.denc[0][..n * first.out_dim], limit / in_scale.max(1.0)) {
            return false;
        }
        skip[1] = first.weight.clone();
    }
    skip.sort_by_key(|r| r.start);
    let mut from = 0;
    for r in &skip {
        if !all_finite(&grads[from..r.start]) {
            return false;
        }
        from = r.end.max(from);
    }
    all_within(out_inp, out_limit / out_scale.max(1.0)) && all_finite(&grads[from..])
}

/// Adam on every parameter from `from` on (past the first layer's weight when that was
/// updated already), in one parallel pass: the small layers' ranges, each too short to split,
/// then go along with the large ones.
/// The Gaussian log-variances are then put back into [LOGVAR_MIN, LOGVAR_MAX].
fn adam_from(vae: &mut Vae, grads: &[f32], adam: &mut AdamState, kernel: AdamKernel, from: usize) {
    let (p, g) = (&mut vae.params[from..], &grads[from..]);
    adam_update(p, g, &mut adam.m[from..], &mut adam.v[from..], kernel);
    if let Some(lv) = &vae.layout.out_logvar {
        for v in &mut vae.params[lv.clone()] {
            *v = v.clamp(LOGVAR_MIN, LOGVAR_MAX);
        }
    }
}
