//! Training and evaluation over a whole data set: shuffling, batching, the Adam step, and
//! chunked inference, all on the model's own rayon pool.
//!
//! Callers drive an epoch in slices of batches (`EpochRun::run`) so that a front end can report
//! progress and notice an interrupt between slices; the results do not depend on the slicing.

use crate::config::Config;
use crate::error::{Result, VaeError};
use crate::layers::for_rows;
use crate::model::{FirstWeight, Vae, Workspace};
use crate::optim::{adam_update, all_finite, all_within, AdamConfig, AdamKernel, AdamState};
use crate::rng::{binarize as binarize_row, fill_normal, permutation, stream, Purpose};
use crate::simd::{dispatch, LANES};
use crate::sparse::{first_layer_weight_grad, GradSink, MAX_DENSITY};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Rows per inference chunk; evaluation noise is keyed by chunk, so this fixes the results.
pub const EVAL_CHUNK: usize = 1024;

/// Rows of D values in [0, 1], owned by the core so work on them can run without the caller.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// (n, d) row-major.
    values: Values,
    pub n: usize,
    pub d: usize,
    /// Whether the first layer skips zero inputs (decided by density unless forced).
    pub sparse: bool,
}

impl Dataset {
    /// Checks every value is finite and in [0, 1]; the error names the first bad entry. The
    /// sparse first layer is used when the data are sparse enough.
    pub fn new(data: Vec<f32>, n: usize, d: usize) -> Result<Self> {
        Self::with_layout(data, n, d, None, "x", 0)
    }

    /// As `new`, with the first layer's path chosen: `Some(true)` sparse, `Some(false)` dense,
    /// `None` by density. Both give the same results up to float rounding.
    /// `name` is the argument's name in error messages, and `first_row` the index of the
    /// first row there (for a piece of a larger array).
    pub fn with_layout(
        data: Vec<f32>,
        n: usize,
        d: usize,
        sparse: Option<bool>,
        name: &str,
        first_row: usize,
    ) -> Result<Self> {
        if n == 0 || d == 0 {
            return Err(VaeError::Input(format!(
                "{name} is empty: got shape ({n}, {d}), need at least one row and one column"
            )));
        }
        if data.len() != n * d {
            return Err(VaeError::Input(format!(
                "data length {} does not match shape ({n}, {d})",
                data.len()
            )));
        }
        // A vectorized pass per chunk; the slow search for the position only on failure.
        let bad = data
            .par_chunks(1 << 16)
            .position_first(|c| !unit_interval(c))
            .and_then(|c| {
                let base = c << 16;
                data[base..(base + (1 << 16)).min(data.len())]
                    .iter()
                    .position(|v| !(*v >= 0.0 && *v <= 1.0))
                    .map(|i| base + i)
            });
        if let Some(i) = bad {
            let v = data[i];
            let what = if v.is_nan() {
                "NaN".to_string()
            } else if v.is_infinite() {
                format!("{v}")
            } else {
                format!("{v}, outside [0, 1]")
            };
            return Err(VaeError::Input(format!(
                "{name}[{}, {}] is {what}; inputs must be finite intensities in [0, 1]",
                first_row + i / d,
                i % d
            )));
        }
        let sparse = sparse.unwrap_or_else(|| {
            let nnz: usize = data.par_iter().filter(|&&v| v != 0.0).count();
            nnz as f64 <= MAX_DENSITY * data.len() as f64
        });
        let values = match Values::levels(&data) {
            Some(levels) => Values::Levels(levels),
            None => Values::F32(data),
        };
        Ok(Dataset {
            values,
            n,
            d,
            sparse,
        })
    }

    /// dst (count, d) = rows [first, first + count).
    pub fn copy_rows(&self, dst: &mut [f32], first: usize, count: usize) {
        let span = first * self.d..(first + count) * self.d;
        match &self.values {
            Values::F32(v) => dst.copy_from_slice(&v[span]),
            Values::Levels(k) => from_levels(dst, &k[span]),
        }
    }

    /// Whether the values are held as 8-bit levels.
    pub fn is_levels(&self) -> bool {
        matches!(self.values, Values::Levels(_))
    }
}

/// How a data set's values are held.
#[derive(Debug, Clone)]
enum Values {
    F32(Vec<f32>),
    /// Every value is exactly k / 255 for a byte k (8-bit images scaled to [0, 1] as
    /// `load_mnist` scales them), so the bytes are kept: a quarter of the memory, and a
    /// quarter of the bytes a batch gathers from random rows.
    Levels(Vec<u8>),
}

impl Values {
    /// The values as bytes k with k / 255 == value bit for bit, if they all are.
    fn levels(data: &[f32]) -> Option<Vec<u8>> {
        let mut out = vec![0u8; data.len()];
        let exact = out
            .par_chunks_mut(1 << 16)
            .zip(data.par_chunks(1 << 16))
            .all(|(k, v)| to_levels(k, v));
        exact.then_some(out)
    }
}

/// k = round(v * 255) for each value; true when every k / 255 gives v back bit for bit.
#[inline(always)]
fn to_levels_generic(k: &mut [u8], v: &[f32]) -> bool {
    let mut ok = true;
    for (k, &v) in k.iter_mut().zip(v) {
        let level = (v * 255.0).round().clamp(0.0, 255.0) as u8;
        ok &= (level as f32 / 255.0).to_bits() == v.to_bits();
        *k = level;
    }
    ok
}

dispatch!(fn to_levels(k: &mut [u8], v: &[f32]) -> bool = to_levels_generic);

/// dst = k / 255 for each byte k, rounded as float32 division rounds (as numpy's).
#[inline(always)]
fn from_levels_generic(dst: &mut [f32], k: &[u8]) {
    for (d, &k) in dst.iter_mut().zip(k) {
        *d = k as f32 / 255.0;
    }
}

dispatch!(fn from_levels(dst: &mut [f32], k: &[u8]) -> () = from_levels_generic);

/// True when every value is in [0, 1] (false for NaN).
#[inline(always)]
fn unit_interval_generic(values: &[f32]) -> bool {
    let mut ok = [true; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            ok[k] &= c[k] >= 0.0 && c[k] <= 1.0;
        }
    }
    ok.iter().all(|&o| o) && chunks.remainder().iter().all(|v| *v >= 0.0 && *v <= 1.0)
}

dispatch!(fn unit_interval(values: &[f32]) -> bool = unit_interval_generic);

/// A model with everything training needs: weights, Adam state, counters and a thread pool.
pub struct Model {
    pub vae: Vae,
    pub seed: u64,
    pub adam: AdamState,
    /// Completed epochs; keys each epoch's shuffle.
    pub epoch: u64,
    grads: Vec<f32>,
    train_ws: Option<Workspace>,
    pool: rayon::ThreadPool,
}

/// Build a pool of `threads` workers that flush subnormal floats to zero: subnormals appear as
/// weights and gradients shrink and slow every kernel by about a fifth; flushing them changes
/// results only below float rounding of any value that matters.
pub fn build_pool(threads: usize) -> Result<rayon::ThreadPool> {
    if threads == 0 || threads > 1024 {
        return Err(VaeError::Config(format!(
            "threads must be between 1 and 1024, got {threads}"
        )));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("fastvae-{i}"))
        .start_handler(|_| flush_denormals())
        .build()
        .map_err(|e| VaeError::Config(format!("cannot start {threads} threads: {e}")))
}

/// Run `f` on the current pool while its other workers poll for work instead of sleeping.
///
/// A step alternates short parallel regions with short serial stretches; a worker that fell
/// asleep in a serial stretch takes 30-80 us to wake for the next region (measured here), more
/// than many regions last. So for the duration of `f` each other worker runs a job that keeps
/// taking pending work with `rayon::yield_now` until `f` is done. A poller that starts on `f`'s
/// own thread (it can be popped there while `f` waits on a stolen job) returns at once, so
/// nothing ever waits on itself.
pub fn keep_awake<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let done = AtomicBool::new(false);
    let owner = rayon::current_thread_index();
    rayon::scope(|s| {
        for _ in 1..rayon::current_num_threads() {
            s.spawn(|_| {
                if rayon::current_thread_index() == owner {
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    if !matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        let result = f();
        done.store(true, Ordering::Release);
        result
    })
}

#[cfg(target_arch = "x86_64")]
fn flush_denormals() {
    // MXCSR bit 15 flush-to-zero, bit 6 denormals-are-zero.
    unsafe {
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
        csr |= (1 << 15) | (1 << 6);
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly));
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn flush_denormals() {}

/// Largest learning rate accepted: beyond it an Adam step (about lr per weight) can overflow
/// float32, and no useful training is anywhere near it.
pub const MAX_LR: f64 = 1e6;

fn check_lr(lr: f64) -> Result<()> {
    if lr.is_finite() && lr > 0.0 && lr <= MAX_LR {
        Ok(())
    } else {
        Err(VaeError::Config(format!(
            "lr must be positive, finite and at most {MAX_LR:e}, got {lr}"
        )))
    }
}

/// Progress through one epoch: its shuffled order and the running loss.
pub struct EpochRun {
    order: Vec<u32>,
    batch_size: usize,
    pub next: usize,
    pub loss_sum: f64,
    lr: f64,
    /// Dynamic binarization: every image is a fresh Bernoulli draw each time it is used.
    binarize: bool,
}

impl EpochRun {
    pub fn done(&self) -> bool {
        self.next >= self.order.len()
    }
    pub fn total_batches(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }
    pub fn batches_done(&self) -> usize {
        self.next.div_ceil(self.batch_size)
    }
    /// Mean per-example loss over the rows seen so far.
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.next.max(1) as f64
    }
}

impl Model {
    pub fn new(config: Config, seed: u64, threads: usize) -> Result<Self> {
        let pool = build_pool(threads)?;
        let vae = Vae::new(config, seed);
        let len = vae.params.len();
        Ok(Model {
            vae,
            seed,
            adam: AdamState::new(len),
            epoch: 0,
            grads: vec![0.0; len],
            train_ws: None,
            pool,
        })
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Run `f` on the model's pool.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    pub(crate) fn check_data(&self, data: &Dataset) -> Result<()> {
        if data.d != self.vae.config.input_dim {
            return Err(VaeError::Input(format!(
                "x has {} columns but the model's input_dim is {}: expected shape (n, {})",
                data.d, self.vae.config.input_dim, self.vae.config.input_dim
            )));
        }
        Ok(())
    }

    /// Start the next epoch: the shuffle is keyed by the seed and the epoch count.
    pub fn begin_epoch(
        &self,
        data: &Dataset,
        batch_size: usize,
        lr: f64,
        binarize: bool,
    ) -> Result<EpochRun> {
        self.check_data(data)?;
        if batch_size == 0 {
            return Err(VaeError::Config("batch_size must be positive".into()));
        }
        check_lr(lr)?;
        let order = permutation(&mut stream(self.seed, Purpose::Shuffle, self.epoch), data.n);
        Ok(EpochRun {
            order,
            batch_size: batch_size.min(data.n),
            next: 0,
            loss_sum: 0.0,
            lr,
            binarize,
        })
    }

    /// Train on up to `max_batches` further batches of the epoch. Each step checks its loss and
    /// gradients before moving the weights, so on divergence the model keeps its last finite
    /// weights.
    pub fn run(&mut self, data: &Dataset, run: &mut EpochRun, max_batches: usize) -> Result<()> {
        self.check_data(data)?;
        let bs = run.batch_size;
        let (mut trainer, pool) = self.trainer(bs, run.lr);
        pool.install(|| {
            keep_awake(|| {
                for _ in 0..max_batches {
                    if run.done() {
                        break;
                    }
                    let end = (run.next + bs).min(run.order.len());
                    let rows = &run.order[run.next..end];
                    let n = rows.len();
                    gather(&mut trainer.ws.x[..n * data.d], data, rows);
                    run.loss_sum += trainer.step(n, data.sparse, run.binarize)?;
                    run.next = end;
                }
                Ok(())
            })
        })
    }

    /// The parts of the model a training step changes, with the workspace for batches of
    /// `batch_size` rows (made anew only when the batch size changes), and the pool to run on.
    fn trainer(&mut self, batch_size: usize, lr: f64) -> (Trainer<'_>, &rayon::ThreadPool) {
        if self.train_ws.as_ref().is_none_or(|ws| ws.cap != batch_size) {
            self.train_ws = Some(Workspace::new(&self.vae.config, batch_size, true));
        }
        let trainer = Trainer {
            vae: &mut self.vae,
            grads: &mut self.grads,
            adam: &mut self.adam,
            ws: self.train_ws.as_mut().expect("workspace just made"),
            seed: self.seed,
            epoch: self.epoch,
            cfg: AdamConfig {
                lr,
                ..AdamConfig::default()
            },
        };
        (trainer, &self.pool)
    }

    /// The shuffled order of the next epoch over n rows, for callers that gather batches
    /// themselves (`train_batch`); the same order `begin_epoch` uses.
    pub fn epoch_order(&self, n: usize) -> Vec<u32> {
        permutation(&mut stream(self.seed, Purpose::Shuffle, self.epoch), n)
    }

    /// One training step on a batch the caller gathered (from a memory-mapped array larger
    /// than memory, say), drawing noise and binarization as `run` does; returns its loss sum.
    pub fn train_batch(&mut self, batch: &Dataset, lr: f64, binarize: bool) -> Result<f64> {
        self.check_data(batch)?;
        check_lr(lr)?;
        let n = batch.n;
        let (mut trainer, pool) = self.trainer(n, lr);
        batch.copy_rows(&mut trainer.ws.x[..n * batch.d], 0, n);
        pool.install(|| trainer.step(n, batch.sparse, binarize))
    }

    /// Count an epoch trained with `train_batch`.
    pub fn finish_epoch(&mut self) {
        self.epoch += 1;
    }

    /// Count a finished epoch.
    pub fn end_epoch(&mut self, run: &EpochRun) -> f64 {
        debug_assert!(run.done());
        self.epoch += 1;
        run.mean_loss()
    }

    /// A workspace holding batch x (B, D) and noise eps (B, Z), for the checks below.
    fn batch_with_noise(&self, x: &Dataset, eps: &[f32]) -> Result<Workspace> {
        self.check_data(x)?;
        let zdim = self.vae.config.latent_dim;
        if eps.len() != x.n * zdim {
            return Err(VaeError::Input(format!(
                "eps must have shape ({}, {zdim})",
                x.n
            )));
        }
        let mut ws = Workspace::new(&self.vae.config, x.n, true);
        x.copy_rows(&mut ws.x, 0, x.n);
        ws.eps.copy_from_slice(eps);
        Ok(ws)
    }

    /// Loss and gradients for one batch with the given noise, without changing the model
    /// (for tests and checks). x (B, D), eps (B, Z).
    pub fn loss_and_grads(&self, x: &Dataset, eps: &[f32]) -> Result<(f64, Vec<f32>)> {
        let mut ws = self.batch_with_noise(x, eps)?;
        let mut grads = vec![0.0; self.vae.params.len()];
        let vae = &self.vae;
        let loss = self.pool.install(|| {
            vae.forward_train(&mut ws, x.n, x.sparse);
            vae.loss_backward(&mut grads, &mut ws, x.n, false, FirstWeight::Compute)
        });
        Ok((loss.expect("only an update checks finiteness"), grads))
    }

    /// One training step on the given batch and noise, exactly as `run` takes it (for tests);
    /// returns the batch loss.
    pub fn step_with_noise(&mut self, x: &Dataset, eps: &[f32], lr: f64) -> Result<f64> {
        check_lr(lr)?;
        let mut ws = self.batch_with_noise(x, eps)?;
        let cfg = AdamConfig {
            lr,
            ..AdamConfig::default()
        };
        let (vae, grads, adam, epoch) =
            (&mut self.vae, &mut self.grads, &mut self.adam, self.epoch);
        self.pool
            .install(|| train_step(vae, grads, adam, &mut ws, x.n, x.sparse, cfg, epoch))
    }

    /// Per-example ELBO (= -(BCE + KL), one z sample each) for rows [start, end) of `data`,
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
        let mut ws = Workspace::new(&self.vae.config, cap, false);
        let (d, zdim) = (data.d, self.vae.config.latent_dim);
        self.pool.install(|| {
            for (c, lo) in (start..end).step_by(EVAL_CHUNK).enumerate() {
                let n = (end - lo).min(EVAL_CHUNK);
                data.copy_rows(&mut ws.x[..n * d], lo, n);
                let chunk = ((row_offset + start) / EVAL_CHUNK + c) as u64;
                fill_normal(
                    &mut stream(seed, Purpose::EvalNoise, chunk),
                    &mut ws.eps[..n * zdim],
                );
                self.vae.forward(&mut ws, n, false);
                self.vae.reconstruction_loss(&mut ws, n, false);
                let o = &mut out[lo - start..lo - start + n];
                for (r, v) in o.iter_mut().enumerate() {
                    *v = -(ws.bce[r] + ws.kl[r]);
                }
            }
        });
        Ok(())
    }

    /// mu and logvar (each (n, Z)) of q(z|x) for every row.
    pub fn encode(&self, data: &Dataset) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_data(data)?;
        let (d, zdim) = (data.d, self.vae.config.latent_dim);
        let mut mu = vec![0.0; data.n * zdim];
        let mut logvar = vec![0.0; data.n * zdim];
        let mut ws = Workspace::new(&self.vae.config, EVAL_CHUNK.min(data.n), false);
        self.pool.install(|| {
            for lo in (0..data.n).step_by(EVAL_CHUNK) {
                let n = (data.n - lo).min(EVAL_CHUNK);
                data.copy_rows(&mut ws.x[..n * d], lo, n);
                self.vae.encode_forward(&mut ws, n, false);
                for r in 0..n {
                    let h = &ws.head[r * 2 * zdim..(r + 1) * 2 * zdim];
                    mu[(lo + r) * zdim..(lo + r + 1) * zdim].copy_from_slice(&h[..zdim]);
                    logvar[(lo + r) * zdim..(lo + r + 1) * zdim].copy_from_slice(&h[zdim..]);
                }
            }
        });
        Ok((mu, logvar))
    }

    /// Bernoulli means sigmoid(logits) (n, D) of p(x|z) for latent rows z (n, Z).
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
        let mut ws = Workspace::new(&self.vae.config, EVAL_CHUNK.min(n_all), false);
        self.pool.install(|| {
            for lo in (0..n_all).step_by(EVAL_CHUNK) {
                let n = (n_all - lo).min(EVAL_CHUNK);
                ws.z[..n * zdim].copy_from_slice(&z[lo * zdim..(lo + n) * zdim]);
                self.vae.decode_forward(&mut ws, n);
                let logits = ws.dec.last().expect("decoder output");
                out[lo * d..(lo + n) * d]
                    .par_iter_mut()
                    .zip(&logits[..n * d])
                    .for_each(|(p, &l)| *p = 1.0 / (1.0 + (-l).exp()));
            }
        });
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

/// Mutable borrows of what a training step changes.
struct Trainer<'a> {
    vae: &'a mut Vae,
    grads: &'a mut [f32],
    adam: &'a mut AdamState,
    ws: &'a mut Workspace,
    seed: u64,
    epoch: u64,
    cfg: AdamConfig,
}

impl Trainer<'_> {
    /// One step on the n rows already in ws.x: draws the noise (and, with `binarize`, the
    /// binarization) keyed by the step, then `train_step`.
    fn step(&mut self, n: usize, sparse: bool, binarize: bool) -> Result<f64> {
        let (seed, step) = (self.seed, self.adam.t);
        let (d, zdim) = (self.vae.config.input_dim, self.vae.config.latent_dim);
        fill_normal(
            &mut stream(seed, Purpose::TrainNoise, step),
            &mut self.ws.eps[..n * zdim],
        );
        if binarize {
            // One stream per (step, row), so rows binarize in parallel.
            for_rows(&mut self.ws.x[..n * d], d, |r, row| {
                let key = (step << 24) ^ r as u64;
                binarize_row(&mut stream(seed, Purpose::Binarize, key), row)
            });
        }
        let Trainer {
            vae,
            grads,
            adam,
            ws,
            cfg,
            epoch,
            ..
        } = self;
        train_step(vae, grads, adam, ws, n, sparse, *cfg, *epoch)
    }
}

/// Bound on n * max |a| under which a weight gradient that sums n products a * c with
/// |c| <= 1 is finite however its float sums round.
const GRAD_SUM_LIMIT: f32 = 1e37;

/// Whether every gradient is certainly finite, reading the two largest weight gradients'
/// inputs instead of the gradients. Once the loss is finite every logit is, so the output
/// layer's weight gradient sums dl * inp with |dl| = |sigmoid(l) - x| <= 1; the first layer's
/// sums x * dh with x in [0, 1]. Each is finite when n * max of its other factor is bounded.
/// The first layer's weight gradient need not have been computed.
fn gradients_finite(vae: &Vae, grads: &[f32], ws: &Workspace, n: usize) -> bool {
    let limit = GRAD_SUM_LIMIT / n as f32;
    let layout = &vae.layout;
    let out = layout.decoder.last().expect("decoder has an output layer");
    let out_inp = match layout.decoder.len() {
        1 => &ws.z[..n * out.in_dim],
        k => &ws.dec[k - 2][..n * out.in_dim],
    };
    let mut skip = [out.weight.clone(), 0..0];
    if let Some(first) = layout.encoder.first().filter(|l| l.transposed) {
        if !all_within(&ws.denc[0][..n * first.out_dim], limit) {
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
    all_within(out_inp, limit) && all_finite(&grads[from..])
}

#[allow(clippy::too_many_arguments)]
/// One step on the batch in ws.x with the noise in ws.eps: forward, backward, Adam. On a
/// non-finite loss or gradient no weight moves; the error names the epoch and step.
///
/// When the batch's nonzeros are indexed, the first layer's weight gradient is never stored:
/// each block of it is summed and goes straight into that block's Adam update. The other
/// gradients are checked first, and that one is finite by a bound on its inputs
/// (`gradients_finite`), so no weight moves on a step that would have failed the check.
fn train_step(
    vae: &mut Vae,
    grads: &mut [f32],
    adam: &mut AdamState,
    ws: &mut Workspace,
    n: usize,
    sparse: bool,
    cfg: AdamConfig,
    epoch: u64,
) -> Result<f64> {
    vae.forward_train(ws, n, sparse);
    let step = adam.t + 1;
    let nonfinite = |what: String| VaeError::NonFinite {
        epoch: epoch + 1,
        step,
        what,
    };
    let fused = ws.cols.get().is_some();
    let first = if fused {
        FirstWeight::Defer
    } else {
        FirstWeight::Compute
    };
    let loss = vae
        .loss_backward(grads, ws, n, true, first)
        .map_err(nonfinite)?;
    let kernel = AdamKernel::new(step, cfg);
    if gradients_finite(vae, grads, ws, n) {
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
            let (cols, dh) = (
                ws.cols.get().expect("indexed"),
                &ws.denc[0][..n * l.out_dim],
            );
            first_layer_weight_grad(sink, cols, dh, l.in_dim, l.out_dim);
            // The first layer's weight leads the parameters.
            debug_assert_eq!(w1.start, 0);
            from = w1.end;
        }
        adam_from(vae, grads, adam, kernel, from);
        adam.t = step;
        return Ok(loss);
    }
    // Outside the bounds (or a gradient is not finite): every gradient, then the check.
    if fused {
        vae.first_layer_weight_grad(grads, ws, n);
    }
    if !all_finite(grads) {
        return Err(nonfinite("a gradient is not finite".into()));
    }
    adam_from(vae, grads, adam, kernel, 0);
    adam.t = step;
    Ok(loss)
}

/// Adam on every parameter from `from` on (past the first layer's weight when that was
/// updated already), in one parallel pass: the small layers' ranges, each too short to split,
/// then go along with the large ones.
fn adam_from(vae: &mut Vae, grads: &[f32], adam: &mut AdamState, kernel: AdamKernel, from: usize) {
    let (p, g) = (&mut vae.params[from..], &grads[from..]);
    adam_update(p, g, &mut adam.m[from..], &mut adam.v[from..], kernel);
}

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

/// x (B, D) = the data rows named by `rows`, in one contiguous piece per thread: the same
/// pieces the first layer's index is built from next (`BatchColumns::build`), so each thread
/// tends to find its rows in its own cache.
fn gather(x: &mut [f32], data: &Dataset, rows: &[u32]) {
    let d = data.d;
    let per_thread = rows.len().div_ceil(rayon::current_num_threads()).max(1);
    x.par_chunks_mut(d * per_thread)
        .zip(rows.par_chunks(per_thread))
        .for_each(|(dst, idx)| {
            for (row, &i) in dst.chunks_exact_mut(d).zip(idx) {
                data.copy_rows(row, i as usize, 1);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_hold_8_bit_images_exactly() {
        // Every byte scaled as numpy scales it, in an odd-sized data set: kept as bytes, and
        // given back bit for bit.
        let (n, d) = (3, 173);
        let data: Vec<f32> = (0..n * d).map(|i| (i % 256) as u8 as f32 / 255.0).collect();
        let set = Dataset::new(data.clone(), n, d).unwrap();
        assert!(set.is_levels());
        let mut back = vec![f32::NAN; n * d];
        set.copy_rows(&mut back, 0, n);
        assert!(back
            .iter()
            .zip(&data)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let mut row = vec![f32::NAN; d];
        set.copy_rows(&mut row, 2, 1);
        assert_eq!(row, data[2 * d..]);

        // One value a hair off a level (or -0.0, whose sign a byte would lose): kept as given.
        for odd in [f32::from_bits((7.0f32 / 255.0).to_bits() + 1), -0.0] {
            let mut data = data.clone();
            data[100] = odd;
            let set = Dataset::new(data.clone(), n, d).unwrap();
            assert!(!set.is_levels());
            set.copy_rows(&mut back, 0, n);
            assert!(back
                .iter()
                .zip(&data)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}
