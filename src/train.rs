//! The model a front end trains, and the epoch driver: shuffling, batching and the running
//! loss, on the model's own pool. The step itself is in `step`, inference in `infer`.
//!
//! Callers drive an epoch in slices of batches (`Model::run`) so that a front end can report
//! progress and notice an interrupt between slices; the results do not depend on the slicing.
//! Data in core memory are gathered by the core; data the core cannot hold (a memory-mapped
//! array larger than memory) are gathered by the caller batch by batch, in the order the
//! epoch gives (`EpochRun::next_rows`, `Model::run_gathered`), with the same results.

use crate::config::{
    Config, Likelihood, Objective, DEFAULT_BATCH_SIZE, DEFAULT_LR, MAX_BETA, MAX_LR, MAX_STEP_ROWS,
};
use crate::dataset::{gather, Dataset};
use crate::error::{Result, VaeError};
use crate::model::{FirstWeight, Vae, Workspace};
use crate::optim::{AdamConfig, AdamState};
use crate::phases::{Phase, Timer};
use crate::pool::{keep_awake, Pool, PoolChoice};
use crate::rng::{permutation, stream, Purpose};
use crate::step::Trainer;

/// A model with everything training needs: weights, Adam state, counters and a thread pool.
pub struct Model {
    pub vae: Vae,
    pub seed: u64,
    pub adam: AdamState,
    /// Completed epochs; keys each epoch's shuffle.
    pub epoch: u64,
    grads: Vec<f32>,
    train_ws: Option<Workspace>,
    pool: Pool,
    /// One thread, for training when other processes take the cores (None with one thread).
    solo: Option<Pool>,
    /// Which of the two a slice of training runs on.
    pub choice: PoolChoice,
}

/// The pool training is held to: the full one with one thread (there is no other), else
/// FASTVAE_POOL=full or solo (to measure each), else None: chosen by measurement.
fn forced_pool(threads: usize) -> Option<usize> {
    if threads == 1 {
        return Some(0);
    }
    match std::env::var("FASTVAE_POOL").as_deref() {
        Ok("full") => Some(0),
        Ok("solo") => Some(1),
        _ => None,
    }
}

fn check_beta(beta: f64) -> Result<()> {
    if beta.is_finite() && (0.0..=MAX_BETA).contains(&beta) {
        Ok(())
    } else {
        Err(VaeError::Config(format!(
            "beta must be finite, at least 0 and at most {MAX_BETA:e}, got {beta}"
        )))
    }
}

fn check_adam_eps(eps: f64) -> Result<()> {
    if eps.is_finite() && eps > 0.0 && eps <= 1.0 {
        Ok(())
    } else {
        Err(VaeError::Config(format!(
            "adam_eps must be positive, finite and at most 1, got {eps}"
        )))
    }
}

fn check_lr(lr: f64) -> Result<()> {
    if lr.is_finite() && lr > 0.0 && lr <= MAX_LR {
        Ok(())
    } else {
        Err(VaeError::Config(format!(
            "lr must be positive, finite and at most {MAX_LR:e}, got {lr}"
        )))
    }
}

/// How an epoch trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochSettings {
    pub batch_size: usize,
    pub lr: f64,
    /// Adam's epsilon.
    pub adam_eps: f64,
    /// Dynamic binarization: every image is a fresh Bernoulli draw each time it is used.
    pub binarize: bool,
    /// The KL term's weight (1: the ELBO, or the importance-weighted bound).
    pub beta: f64,
    /// Samples of z per example (k), and how a step combines them when there are several.
    pub samples: usize,
    pub objective: Objective,
}

impl Default for EpochSettings {
    fn default() -> Self {
        EpochSettings {
            batch_size: DEFAULT_BATCH_SIZE,
            lr: DEFAULT_LR,
            adam_eps: 1e-8,
            binarize: false,
            beta: 1.0,
            samples: 1,
            objective: Objective::Iwae,
        }
    }
}

impl EpochSettings {
    /// Every setting in range; `batch_size` taken at most n.
    fn checked(mut self, n: usize, likelihood: Likelihood) -> Result<Self> {
        if n == 0 {
            return Err(VaeError::Input("x is empty: need at least one row".into()));
        }
        if self.batch_size == 0 {
            return Err(VaeError::Config("batch_size must be positive".into()));
        }
        self.batch_size = self.batch_size.min(n);
        check_lr(self.lr)?;
        check_beta(self.beta)?;
        check_adam_eps(self.adam_eps)?;
        check_samples(self.samples, self.batch_size)?;
        if self.binarize && likelihood != Likelihood::Bernoulli {
            return Err(VaeError::Config(
                "binarize=\"dynamic\" draws Bernoulli pixels: it needs likelihood=\"bernoulli\""
                    .into(),
            ));
        }
        Ok(self)
    }
}

/// k samples per example for batches of `batch_size` rows: at least 1, and the step's decoder
/// rows (batch_size k) within MAX_STEP_ROWS.
fn check_samples(k: usize, batch_size: usize) -> Result<()> {
    if k == 0 {
        return Err(VaeError::Config("k must be at least 1, got 0".into()));
    }
    match batch_size.checked_mul(k) {
        Some(rows) if rows <= MAX_STEP_ROWS => Ok(()),
        _ => Err(VaeError::Config(format!(
            "batch_size * k must be at most {MAX_STEP_ROWS} (the decoder rows of one step), got {batch_size} * {k}"
        ))),
    }
}

/// Progress through one epoch: its shuffled order and the running loss.
pub struct EpochRun {
    order: Vec<u32>,
    /// Rows of the order trained on so far.
    pub next: usize,
    pub loss_sum: f64,
    pub settings: EpochSettings,
}

impl EpochRun {
    pub fn done(&self) -> bool {
        self.next >= self.order.len()
    }
    pub fn total_batches(&self) -> usize {
        self.order.len().div_ceil(self.settings.batch_size)
    }
    pub fn batches_done(&self) -> usize {
        self.next.div_ceil(self.settings.batch_size)
    }
    /// Mean per-example loss over the rows seen so far.
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.next.max(1) as f64
    }
    /// The data rows of the next batch (empty when the epoch is done).
    pub fn next_rows(&self) -> &[u32] {
        let end = (self.next + self.settings.batch_size).min(self.order.len());
        &self.order[self.next..end]
    }
}

impl Model {
    pub fn new(config: Config, seed: u64, threads: usize) -> Result<Self> {
        let pool = Pool::new(threads)?;
        let solo = if threads > 1 {
            Some(Pool::new(1)?)
        } else {
            None
        };
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
            solo,
            choice: PoolChoice::new(forced_pool(threads)),
        })
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Run `f` on the model's pool (rebuilt first if this process is a fork of the one that
    /// made it).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        self.pool.install(f)
    }

    pub(crate) fn check_data(&self, data: &Dataset) -> Result<()> {
        if data.d != self.vae.config.input_dim {
            return Err(VaeError::Input(format!(
                "x has {} columns but the model's input_dim is {}: expected shape (n, {})",
                data.d, self.vae.config.input_dim, self.vae.config.input_dim
            )));
        }
        if self.vae.config.likelihood == Likelihood::Bernoulli {
            data.check_unit("x").map_err(|e| match e {
                VaeError::Input(m) => VaeError::Input(format!(
                    "{m} for the Bernoulli likelihood (a likelihood=\"gaussian\" model takes any real values)"
                )),
                e => e,
            })?;
        }
        Ok(())
    }

    /// Start the next epoch over n rows, trained as `settings` say: the shuffle is keyed by the
    /// seed and the epoch count.
    pub fn begin_epoch(&self, n: usize, settings: EpochSettings) -> Result<EpochRun> {
        let settings = settings.checked(n, self.vae.config.likelihood)?;
        let order = permutation(&mut stream(self.seed, Purpose::Shuffle, self.epoch), n);
        Ok(EpochRun {
            order,
            next: 0,
            loss_sum: 0.0,
            settings,
        })
    }

    /// Train on up to `max_batches` further batches of the epoch, gathered from `data`. Each
    /// step checks its loss and gradients before moving the weights, so on divergence the
    /// model keeps its last finite weights.
    pub fn run(&mut self, data: &Dataset, run: &mut EpochRun, max_batches: usize) -> Result<()> {
        self.check_data(data)?;
        if data.n != run.order.len() {
            return Err(VaeError::Input(format!(
                "the epoch was begun over {} rows, not {}",
                run.order.len(),
                data.n
            )));
        }
        let d = data.d;
        let which = self.choice.pick();
        let (mut trainer, pool) = self.trainer(run, which)?;
        let (t0, rows0) = (std::time::Instant::now(), run.next);
        let slice = || {
            for _ in 0..max_batches {
                let rows = run.next_rows();
                if rows.is_empty() {
                    break;
                }
                let n = rows.len();
                let (step, t) = (Timer::start(), Timer::start());
                gather(&mut trainer.ws.x[..n * d], data, rows);
                t.stop(Phase::Gather);
                run.loss_sum += trainer.step(n, data.sparse, run.settings.binarize)?;
                step.stop(Phase::Step);
                run.next += n;
            }
            Ok(())
        };
        let result = pool.install(|| keep_awake(slice));
        let rows = run.next - rows0;
        self.choice.record(which, t0.elapsed().as_secs_f64(), rows);
        result
    }

    /// Train on the epoch's next batch, which the caller gathered: the rows `next_rows` named,
    /// in that order.
    pub fn run_gathered(&mut self, batch: &Dataset, run: &mut EpochRun) -> Result<()> {
        self.check_data(batch)?;
        let n = run.next_rows().len();
        if batch.n != n {
            return Err(VaeError::Input(format!(
                "the epoch's next batch has {n} rows, got {}",
                batch.n
            )));
        }
        let which = self.choice.pick();
        let (mut trainer, pool) = self.trainer(run, which)?;
        let t0 = std::time::Instant::now();
        let (step, t) = (Timer::start(), Timer::start());
        batch.read_rows(&mut trainer.ws.x[..n * batch.d], 0, n);
        t.stop(Phase::Gather);
        run.loss_sum += pool.install(|| trainer.step(n, batch.sparse, run.settings.binarize))?;
        step.stop(Phase::Step);
        run.next += n;
        self.choice.record(which, t0.elapsed().as_secs_f64(), n);
        Ok(())
    }

    /// Count a finished epoch; its mean loss.
    pub fn end_epoch(&mut self, run: &EpochRun) -> Result<f64> {
        if !run.done() {
            return Err(VaeError::Config(
                "end_epoch called before the epoch finished".into(),
            ));
        }
        self.epoch += 1;
        Ok(run.mean_loss())
    }

    /// The parts of the model a training step changes, set up for the epoch `run` (its lr, Adam
    /// epsilon, KL weight and samples per example), with the workspace for its steps (made anew
    /// only when their rows change), and the pool to run on (`which`: 0 the full pool, 1 the
    /// one-thread pool where there is one).
    fn trainer(
        &mut self,
        run: &EpochRun,
        which: usize,
    ) -> Result<(Trainer<'_>, std::sync::Arc<rayon::ThreadPool>)> {
        let s = &run.settings;
        let pool = match (&self.solo, which) {
            (Some(solo), 1) => solo.get()?,
            _ => self.pool.get()?,
        };
        let rows = s.batch_size * s.samples;
        if self.train_ws.as_ref().is_none_or(|ws| ws.cap != rows) {
            self.train_ws = Some(Workspace::new(&self.vae.config, rows, true, self.threads()));
        }
        let ws = self.train_ws.as_mut().expect("workspace just made");
        ws.kl_weight = s.beta as f32;
        let trainer = Trainer {
            vae: &mut self.vae,
            grads: &mut self.grads,
            adam: &mut self.adam,
            ws,
            seed: self.seed,
            epoch: self.epoch,
            cfg: AdamConfig {
                lr: s.lr,
                eps: s.adam_eps,
                ..AdamConfig::default()
            },
            samples: s.samples,
            objective: s.objective,
        };
        Ok((trainer, pool))
    }

    /// A workspace holding batch x (B, D) and noise eps (B k, Z), for the checks below.
    fn batch_with_noise(&self, x: &Dataset, eps: &[f32], k: usize) -> Result<Workspace> {
        self.check_data(x)?;
        let zdim = self.vae.config.latent_dim;
        if eps.len() != x.n * k * zdim {
            return Err(VaeError::Input(format!(
                "eps must have shape ({}, {zdim}) for {} rows with k = {k} samples each",
                x.n * k,
                x.n
            )));
        }
        let mut ws = Workspace::new(&self.vae.config, x.n * k, true, self.threads());
        x.read_rows(&mut ws.x[..x.n * x.d], 0, x.n);
        ws.eps.copy_from_slice(eps);
        Ok(ws)
    }

    /// Loss and gradients for one batch with the given noise, without changing the model (for
    /// tests and checks). x (B, D), eps (B k, Z): sample j of row i is eps row i k + j. The
    /// loss is the one training would take with these settings (`objective` used when k > 1).
    pub fn loss_and_grads(
        &self,
        x: &Dataset,
        eps: &[f32],
        beta: f64,
        k: usize,
        objective: Objective,
    ) -> Result<(f64, Vec<f32>)> {
        check_beta(beta)?;
        check_samples(k, x.n)?;
        let mut ws = self.batch_with_noise(x, eps, k)?;
        ws.kl_weight = beta as f32;
        let mut grads = vec![0.0; self.vae.params.len()];
        let vae = &self.vae;
        let n = x.n;
        let loss = self.install(|| {
            let loss = vae.step_loss(&mut ws, n, x.sparse, k, objective);
            vae.step_backward(&mut grads, &mut ws, n, k, objective, FirstWeight::Compute);
            loss
        })?;
        Ok((loss, grads))
    }

    /// One training step on the given batch and noise (eps (B k, Z)), exactly as `run` takes
    /// it (for tests); returns the batch loss. Only `lr`, `adam_eps`, `beta`, `samples` and
    /// `objective` of the settings apply.
    pub fn step_with_noise(
        &mut self,
        x: &Dataset,
        eps: &[f32],
        settings: EpochSettings,
    ) -> Result<f64> {
        let s = EpochSettings {
            batch_size: x.n.max(1),
            binarize: false,
            ..settings
        }
        .checked(x.n, self.vae.config.likelihood)?;
        let mut ws = self.batch_with_noise(x, eps, s.samples)?;
        ws.kl_weight = s.beta as f32;
        let pool = self.pool.get()?;
        let mut trainer = Trainer {
            vae: &mut self.vae,
            grads: &mut self.grads,
            adam: &mut self.adam,
            ws: &mut ws,
            seed: self.seed,
            epoch: self.epoch,
            cfg: AdamConfig {
                lr: s.lr,
                eps: s.adam_eps,
                ..AdamConfig::default()
            },
            samples: s.samples,
            objective: s.objective,
        };
        pool.install(|| trainer.step_with_noise(x.n, x.sparse))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Activation;

    #[test]
    fn results_do_not_depend_on_the_pool_that_runs_them() {
        // A 2-thread model trained on its full pool and on its one-thread pool: the same
        // weights bit for bit, sparse first layer and latent block by parts included.
        let (n, d) = (300, 64);
        let data: Vec<f32> = (0..n * d)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761) >> 8;
                if h % 10 < 7 {
                    0.0
                } else {
                    (h % 255) as f32 / 255.0
                }
            })
            .collect();
        let data = Dataset::new(data, n, d).unwrap();
        assert!(data.sparse);
        let train = |which: usize| {
            let cfg = Config::new(d, vec![24], 3, Activation::Relu).unwrap();
            let mut model = Model::new(cfg, 7, 2).unwrap();
            model.choice = PoolChoice::new(Some(which));
            let settings = EpochSettings {
                batch_size: 64,
                binarize: true,
                ..EpochSettings::default()
            };
            let mut run = model.begin_epoch(n, settings).unwrap();
            model.run(&data, &mut run, usize::MAX).unwrap();
            model.end_epoch(&run).unwrap();
            model.vae.params
        };
        let (full, solo) = (train(0), train(1));
        assert!(crate::layers::tests::same_bits(&full, &solo));
    }
}
