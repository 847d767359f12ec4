//! The one binding module: converts numpy arrays to core types and back, releases the GIL
//! around core work, and maps `VaeError` to fastvae's exception classes. No numerics here.

use crate::checkpoint;
use crate::config::{self, Activation, Config, Likelihood, Objective};
use crate::dataset::{self, Dataset, Domain};
use crate::error::VaeError;
use crate::infer::{EVAL_CHUNK, EVAL_PIECE_ROWS, LOG_LIKELIHOOD_CALL_ROWS};
use crate::params::TensorSpec;
use crate::pool;
use crate::train::{EpochRun, EpochSettings, Model};
use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::{PyFloatingPointError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::borrow::Cow;
use std::collections::HashMap;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pyo3::create_exception!(
    fastvae,
    FastVAEError,
    PyValueError,
    "Base class of fastvae's errors; a ValueError."
);
pyo3::create_exception!(
    fastvae,
    ConfigError,
    FastVAEError,
    "An invalid model or training setting."
);
pyo3::create_exception!(
    fastvae,
    InputError,
    FastVAEError,
    "Input data of the wrong shape, type or range."
);
pyo3::create_exception!(
    fastvae,
    DataError,
    FastVAEError,
    "A data file that is missing, corrupt or fails its checksum."
);
pyo3::create_exception!(
    fastvae,
    CheckpointError,
    FastVAEError,
    "A model file that cannot be read or does not match its configuration."
);

fn to_py(e: VaeError) -> PyErr {
    let msg = e.to_string();
    match e {
        VaeError::Config(_) => ConfigError::new_err(msg),
        VaeError::Input(_) => InputError::new_err(msg),
        VaeError::Checkpoint(_) => CheckpointError::new_err(msg),
        VaeError::NonFinite { .. } => PyFloatingPointError::new_err(msg),
    }
}

/// Copy a 2-D float32 or float64 array (any strides) into a row-major f32 buffer (n, d).
fn array_to_rows(x: &Bound<'_, PyAny>, name: &str) -> PyResult<(Vec<f32>, usize, usize)> {
    if let Ok(a) = x.extract::<PyReadonlyArray2<'_, f32>>() {
        let (n, d) = (a.shape()[0], a.shape()[1]);
        // as_slice() also accepts Fortran-contiguous memory, which is not row-major.
        let data = match a.as_slice() {
            Ok(s) if a.is_c_contiguous() => s.to_vec(),
            _ => a.as_array().iter().copied().collect(),
        };
        return Ok((data, n, d));
    }
    if let Ok(a) = x.extract::<PyReadonlyArray2<'_, f64>>() {
        let (n, d) = (a.shape()[0], a.shape()[1]);
        return Ok((a.as_array().iter().map(|&v| v as f32).collect(), n, d));
    }
    Err(InputError::new_err(format!(
        "{name} must be a 2-D float32 or float64 numpy array"
    )))
}

/// The rows `rows` of a 2-D float32 or float64 array (a memory-mapped one, say), gathered into
/// a row-major f32 batch (rows.len(), d), with the GIL held: Python owns the memory.
fn gather_array_rows(x: &Bound<'_, PyAny>, rows: &[u32]) -> PyResult<(Vec<f32>, usize)> {
    fn gather<T: numpy::Element + Copy>(
        a: &numpy::PyReadonlyArray2<'_, T>,
        rows: &[u32],
        f: impl Fn(T) -> f32,
    ) -> PyResult<(Vec<f32>, usize)> {
        let view = a.as_array();
        let (n, d) = view.dim();
        let mut out = Vec::with_capacity(rows.len() * d);
        for &r in rows {
            let r = r as usize;
            if r >= n {
                return Err(InputError::new_err(format!(
                    "x has {n} rows, the epoch asks for row {r}"
                )));
            }
            out.extend(view.row(r).iter().map(|&v| f(v)));
        }
        Ok((out, d))
    }
    if let Ok(a) = x.extract::<PyReadonlyArray2<'_, f32>>() {
        return gather(&a, rows, |v| v);
    }
    if let Ok(a) = x.extract::<PyReadonlyArray2<'_, f64>>() {
        return gather(&a, rows, |v| v as f32);
    }
    Err(InputError::new_err(
        "x must be a fastvae Dataset or a 2-D float32 or float64 numpy array",
    ))
}

/// The number of rows of a Dataset or a 2-D array.
fn row_count(x: &Bound<'_, PyAny>) -> PyResult<usize> {
    if let Ok(ds) = x.cast::<PyDataset>() {
        return Ok(ds.get().inner.n);
    }
    let shape: Vec<usize> = x.getattr("shape")?.extract()?;
    match shape.as_slice() {
        [n, _] => Ok(*n),
        _ => Err(InputError::new_err(format!(
            "x must be 2-D, got shape {shape:?}"
        ))),
    }
}

type ArrayPair<'py> = (Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<f32>>);

fn rows_to_py<'py>(
    py: Python<'py>,
    v: Vec<f32>,
    n: usize,
    d: usize,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    PyArray1::from_vec(py, v).reshape([n, d])
}

fn parse_domain(domain: &str) -> PyResult<Domain> {
    match domain {
        "unit" => Ok(Domain::Unit),
        "real" => Ok(Domain::Real),
        other => Err(ConfigError::new_err(format!(
            "domain must be \"unit\" or \"real\", got {other:?}"
        ))),
    }
}

/// The values a model's data may hold.
fn model_domain(model: &Model) -> Domain {
    match model.vae.config.likelihood {
        Likelihood::Bernoulli => Domain::Unit,
        Likelihood::Gaussian => Domain::Real,
    }
}

/// Rows of finite values copied into memory the core owns, validated once.
#[pyclass(name = "Dataset", module = "fastvae._core", frozen)]
struct PyDataset {
    inner: Dataset,
}

#[pymethods]
impl PyDataset {
    /// `sparse`: None picks the first layer's path by density; True or False forces it.
    /// `name` and `first_row` locate bad values in error messages. `domain`: "unit" accepts
    /// values in [0, 1] only (Bernoulli models), "real" any finite value (Gaussian models).
    #[new]
    #[pyo3(signature = (x, sparse=None, name="x", first_row=0, domain="unit"))]
    fn new(
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        sparse: Option<bool>,
        name: &str,
        first_row: usize,
        domain: &str,
    ) -> PyResult<Self> {
        let domain = parse_domain(domain)?;
        let build = |data: Cow<'_, [f32]>, n, d| {
            pool::shared()
                .install(|| Dataset::with_layout(data, n, d, sparse, name, first_row, domain))
                .and_then(|r| r)
        };
        // A C-contiguous float32 array is read in place, with the GIL held so that no Python
        // code writes to it meanwhile (the pool's threads do the work and never take the GIL).
        if let Ok(a) = x.extract::<PyReadonlyArray2<'_, f32>>() {
            if let (true, Ok(s)) = (a.is_c_contiguous(), a.as_slice()) {
                let (n, d) = (a.shape()[0], a.shape()[1]);
                let inner = build(Cow::Borrowed(s), n, d).map_err(to_py)?;
                return Ok(PyDataset { inner });
            }
        }
        let (data, n, d) = array_to_rows(x, name)?;
        let inner = py.detach(|| build(data.into(), n, d)).map_err(to_py)?;
        Ok(PyDataset { inner })
    }

    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.inner.n, self.inner.d)
    }

    /// Whether training on this data uses the sparse first layer.
    #[getter]
    fn sparse(&self) -> bool {
        self.inner.sparse
    }

    /// Whether every value is in [0, 1].
    #[getter]
    fn unit(&self) -> bool {
        self.inner.unit
    }
}

/// Progress through one training epoch.
#[pyclass(name = "EpochRun", module = "fastvae._core")]
struct PyEpochRun {
    inner: EpochRun,
}

#[pymethods]
impl PyEpochRun {
    #[getter]
    fn done(&self) -> bool {
        self.inner.done()
    }
    #[getter]
    fn total_batches(&self) -> usize {
        self.inner.total_batches()
    }
    #[getter]
    fn batches_done(&self) -> usize {
        self.inner.batches_done()
    }
    #[getter]
    fn rows_done(&self) -> usize {
        self.inner.next
    }
    #[getter]
    fn mean_loss(&self) -> f64 {
        self.inner.mean_loss()
    }
}

/// The core model: weights, Adam state and a thread pool.
#[pyclass(name = "Model", module = "fastvae._core")]
struct PyModel {
    inner: Model,
}

fn tensors_to_dict<'py>(
    py: Python<'py>,
    specs: &[TensorSpec],
    flat: &[f32],
) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    for t in specs {
        let arr = PyArray1::from_vec(py, t.export(flat)).reshape(t.shape.clone())?;
        out.set_item(&t.name, arr)?;
    }
    Ok(out)
}

/// A flat buffer from a dict with exactly the named tensors, each of the right shape and finite.
fn dict_to_tensors(
    specs: &[TensorSpec],
    len: usize,
    d: &Bound<'_, PyDict>,
    what: &str,
) -> PyResult<Vec<f32>> {
    let mut flat = vec![0.0f32; len];
    for t in specs {
        let v = d.get_item(&t.name)?.ok_or_else(|| {
            InputError::new_err(format!("{what} is missing the tensor {:?}", t.name))
        })?;
        let arr = v
            .extract::<numpy::PyReadonlyArrayDyn<'_, f32>>()
            .map_err(|_| {
                InputError::new_err(format!("{what}[{:?}] must be a float32 array", t.name))
            })?;
        if arr.shape() != t.shape.as_slice() {
            return Err(InputError::new_err(format!(
                "{what}[{:?}] has shape {:?}, expected {:?}",
                t.name,
                arr.shape(),
                t.shape
            )));
        }
        let values: Vec<f32> = arr.as_array().iter().copied().collect();
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            return Err(InputError::new_err(format!(
                "{what}[{:?}] has a non-finite value at flat index {bad}",
                t.name
            )));
        }
        t.import(&values, &mut flat);
    }
    if d.len() != specs.len() {
        let known: Vec<&str> = specs.iter().map(|t| t.name.as_str()).collect();
        for k in d.keys() {
            let k: String = k.extract()?;
            if !known.contains(&k.as_str()) {
                return Err(InputError::new_err(format!(
                    "{what} has an unknown tensor {k:?}; expected {known:?}"
                )));
            }
        }
    }
    Ok(flat)
}

impl PyModel {
    fn from_checkpoint(
        ck: checkpoint::Checkpoint,
        threads: usize,
    ) -> PyResult<(PyModel, HashMap<String, String>, bool)> {
        let extra = ck.extra.clone();
        let has_optimizer = ck.adam.is_some();
        let inner = Model::from_checkpoint(ck, threads).map_err(to_py)?;
        Ok((PyModel { inner }, extra, has_optimizer))
    }

    /// z (n, Z) as a row-major buffer, with n.
    fn latent_rows(&self, z: &Bound<'_, PyAny>) -> PyResult<(Vec<f32>, usize)> {
        let (z, n, zdim) = array_to_rows(z, "z")?;
        let want = self.inner.vae.config.latent_dim;
        if zdim != want {
            return Err(InputError::new_err(format!(
                "z has {zdim} columns, expected shape (n, {want})"
            )));
        }
        Ok((z, n))
    }
}

#[pymethods]
impl PyModel {
    #[new]
    #[pyo3(signature = (input_dim, hidden_dims, latent_dim, activation, seed, threads, likelihood="bernoulli"))]
    fn new(
        input_dim: usize,
        hidden_dims: Vec<usize>,
        latent_dim: usize,
        activation: &str,
        seed: u64,
        threads: usize,
        likelihood: &str,
    ) -> PyResult<Self> {
        let act = Activation::parse(activation).map_err(to_py)?;
        let likelihood = Likelihood::parse(likelihood).map_err(to_py)?;
        let config = Config::with_likelihood(input_dim, hidden_dims, latent_dim, act, likelihood)
            .map_err(to_py)?;
        Ok(PyModel {
            inner: Model::new(config, seed, threads).map_err(to_py)?,
        })
    }

    #[getter]
    fn threads(&self) -> usize {
        self.inner.threads()
    }
    #[getter]
    fn epoch(&self) -> u64 {
        self.inner.epoch
    }
    #[getter]
    fn step(&self) -> u64 {
        self.inner.adam.t
    }
    #[getter]
    fn param_count(&self) -> usize {
        self.inner.vae.params.len()
    }
    /// The likelihood: "bernoulli" or "gaussian".
    #[getter]
    fn likelihood(&self) -> &'static str {
        self.inner.vae.config.likelihood.name()
    }

    /// Copies of the weights, named and shaped as PyTorch nn.Linear state_dict entries.
    fn weights<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        tensors_to_dict(py, &self.inner.vae.layout.tensors(), &self.inner.vae.params)
    }

    /// Replace all weights; the model is unchanged if anything is missing or malformed.
    fn set_weights(&mut self, weights: &Bound<'_, PyDict>) -> PyResult<()> {
        let flat = dict_to_tensors(
            &self.inner.vae.layout.tensors(),
            self.inner.vae.params.len(),
            weights,
            "weights",
        )?;
        if let Some(lv) = &self.inner.vae.layout.out_logvar {
            let (lo, hi) = (config::LOGVAR_MIN, config::LOGVAR_MAX);
            if let Some(v) = flat[lv.clone()].iter().find(|v| !(lo..=hi).contains(*v)) {
                return Err(InputError::new_err(format!(
                    "weights[\"decoder_logvar\"] holds {v}, outside the log-variances' range [{lo}, {hi}]"
                )));
            }
        }
        self.inner.vae.params = flat;
        Ok(())
    }

    /// Adam's moments (as weight-named dicts), its step count and the epoch count.
    fn optimizer_state<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyDict>, Bound<'py, PyDict>, u64, u64)> {
        let specs = self.inner.vae.layout.tensors();
        Ok((
            tensors_to_dict(py, &specs, &self.inner.adam.m)?,
            tensors_to_dict(py, &specs, &self.inner.adam.v)?,
            self.inner.adam.t,
            self.inner.epoch,
        ))
    }

    fn set_optimizer_state(
        &mut self,
        m: &Bound<'_, PyDict>,
        v: &Bound<'_, PyDict>,
        step: u64,
        epoch: u64,
    ) -> PyResult<()> {
        let specs = self.inner.vae.layout.tensors();
        let len = self.inner.vae.params.len();
        let m = dict_to_tensors(&specs, len, m, "adam m")?;
        let v = dict_to_tensors(&specs, len, v, "adam v")?;
        if v.iter().any(|&x| x < 0.0) {
            return Err(InputError::new_err("adam v must be non-negative"));
        }
        self.inner.adam.m = m;
        self.inner.adam.v = v;
        self.inner.adam.t = step;
        self.inner.epoch = epoch;
        Ok(())
    }

    /// Start the next epoch over `data`: a Dataset, or a 2-D array the core does not hold
    /// (memory-mapped), whose batches `run` then gathers one at a time. `beta` weights the KL
    /// term of the loss trained on (1: the ELBO); `adam_eps` is Adam's epsilon; `k` samples of
    /// z per example combine as `objective` says ("iwae" or "elbo") when k > 1.
    #[pyo3(signature = (data, batch_size, lr, binarize, beta=1.0, adam_eps=1e-8, k=1, objective="iwae"))]
    #[allow(clippy::too_many_arguments)]
    fn begin_epoch(
        &self,
        data: &Bound<'_, PyAny>,
        batch_size: usize,
        lr: f64,
        binarize: bool,
        beta: f64,
        adam_eps: f64,
        k: usize,
        objective: &str,
    ) -> PyResult<PyEpochRun> {
        let settings = EpochSettings {
            batch_size,
            lr,
            adam_eps,
            binarize,
            beta,
            samples: k,
            objective: Objective::parse(objective).map_err(to_py)?,
        };
        let inner = self
            .inner
            .begin_epoch(row_count(data)?, settings)
            .map_err(to_py)?;
        Ok(PyEpochRun { inner })
    }

    /// Train on up to max_batches further batches of the epoch, without the GIL. From a
    /// Dataset the core gathers them; from an array, each batch is gathered with the GIL held
    /// (Python owns that memory), checked, and trained on without it.
    fn run(
        &mut self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        run: &mut PyEpochRun,
        max_batches: usize,
    ) -> PyResult<()> {
        if let Ok(ds) = data.cast::<PyDataset>() {
            let data = &ds.get().inner;
            let model = &mut self.inner;
            return py
                .detach(|| model.run(data, &mut run.inner, max_batches))
                .map_err(to_py);
        }
        for _ in 0..max_batches {
            let rows = run.inner.next_rows();
            if rows.is_empty() {
                break;
            }
            let n = rows.len();
            let (values, d) = gather_array_rows(data, rows)?;
            let model = &mut self.inner;
            let epoch = &mut run.inner;
            let domain = model_domain(model);
            py.detach(|| {
                let name = "x (a gathered batch)";
                let batch = model.install(|| {
                    Dataset::with_layout(values.into(), n, d, None, name, 0, domain)
                })??;
                model.run_gathered(&batch, epoch)
            })
            .map_err(to_py)?;
            py.check_signals()?;
        }
        Ok(())
    }

    /// Count the finished epoch; its mean loss.
    fn end_epoch(&mut self, run: &PyEpochRun) -> PyResult<f64> {
        self.inner.end_epoch(&run.inner).map_err(to_py)
    }

    /// Per-example ELBO with one z sample each, noise keyed by seed; float64 (n,).
    /// `row_offset`: where `data` starts in a larger array evaluated in pieces (a multiple of
    /// EVAL_CHUNK), so each piece draws the noise the whole array would.
    #[pyo3(signature = (data, seed, row_offset=0))]
    fn elbo<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyDataset>,
        seed: u64,
        row_offset: usize,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let data = &data.get().inner;
        let mut out = vec![0.0f64; data.n];
        // Slices between checks for Ctrl-C.
        let slice = EVAL_PIECE_ROWS;
        for start in (0..data.n).step_by(slice) {
            let end = (start + slice).min(data.n);
            let model = &self.inner;
            let o = &mut out[start..end];
            py.detach(|| model.elbo_rows(data, start, end, seed, row_offset, o))
                .map_err(to_py)?;
            py.check_signals()?;
        }
        Ok(PyArray1::from_vec(py, out))
    }

    /// Importance-weighted log-likelihood (k samples) of rows [start, end); float64.
    #[pyo3(signature = (data, start, end, k, seed, row_offset=0))]
    #[allow(clippy::too_many_arguments)]
    fn log_likelihood<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyDataset>,
        start: usize,
        end: usize,
        k: usize,
        seed: u64,
        row_offset: usize,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let data = &data.get().inner;
        let mut out = vec![0.0f64; end.saturating_sub(start)];
        let model = &self.inner;
        py.detach(|| model.log_likelihood_rows(data, start, end, k, seed, row_offset, &mut out))
            .map_err(to_py)?;
        Ok(PyArray1::from_vec(py, out))
    }

    /// Loss and gradients (weight-named dict) for x (B, D) with the given noise eps (B k, Z),
    /// sample j of row i in eps row i k + j; the KL weighted by beta, the k samples combined as
    /// `objective` says when k > 1.
    #[pyo3(signature = (x, eps, beta=1.0, k=1, objective="iwae"))]
    fn loss_and_grads<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyDataset>,
        eps: &Bound<'py, PyAny>,
        beta: f64,
        k: usize,
        objective: &str,
    ) -> PyResult<(f64, Bound<'py, PyDict>)> {
        let objective = Objective::parse(objective).map_err(to_py)?;
        let (eps, _, _) = array_to_rows(eps, "eps")?;
        let x = &x.get().inner;
        let model = &self.inner;
        let (loss, grads) = py
            .detach(|| model.loss_and_grads(x, &eps, beta, k, objective))
            .map_err(to_py)?;
        Ok((
            loss,
            tensors_to_dict(py, &self.inner.vae.layout.tensors(), &grads)?,
        ))
    }

    /// One Adam step on x with the given noise (B k, Z); returns the batch loss (sum over rows).
    #[pyo3(signature = (x, eps, lr, adam_eps=1e-8, beta=1.0, k=1, objective="iwae"))]
    #[allow(clippy::too_many_arguments)]
    fn step_with_noise(
        &mut self,
        py: Python<'_>,
        x: &Bound<'_, PyDataset>,
        eps: &Bound<'_, PyAny>,
        lr: f64,
        adam_eps: f64,
        beta: f64,
        k: usize,
        objective: &str,
    ) -> PyResult<f64> {
        let settings = EpochSettings {
            lr,
            adam_eps,
            beta,
            samples: k,
            objective: Objective::parse(objective).map_err(to_py)?,
            ..EpochSettings::default()
        };
        let (eps, _, _) = array_to_rows(eps, "eps")?;
        let x = &x.get().inner;
        let model = &mut self.inner;
        py.detach(|| model.step_with_noise(x, &eps, settings))
            .map_err(to_py)
    }

    /// (mu, logvar), each float32 (n, Z).
    fn encode<'py>(
        &self,
        py: Python<'py>,
        data: &Bound<'py, PyDataset>,
    ) -> PyResult<ArrayPair<'py>> {
        let data = &data.get().inner;
        let model = &self.inner;
        let (mu, logvar) = py.detach(|| model.encode(data)).map_err(to_py)?;
        let z = model.vae.config.latent_dim;
        Ok((
            rows_to_py(py, mu, data.n, z)?,
            rows_to_py(py, logvar, data.n, z)?,
        ))
    }

    /// The means of p(x|z) (n, D) for latent codes z (n, Z): probabilities for Bernoulli.
    fn decode<'py>(
        &self,
        py: Python<'py>,
        z: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let (z, n) = self.latent_rows(z)?;
        let model = &self.inner;
        let means = py.detach(|| model.decode(&z)).map_err(to_py)?;
        rows_to_py(py, means, n, model.vae.config.input_dim)
    }

    /// Draws x ~ p(x|z) (n, D) for latent codes z (n, Z), row r keyed by (seed, r).
    fn decode_draw<'py>(
        &self,
        py: Python<'py>,
        z: &Bound<'py, PyAny>,
        seed: u64,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let (z, n) = self.latent_rows(z)?;
        let model = &self.inner;
        let draws = py.detach(|| model.decode_draw(&z, seed)).map_err(to_py)?;
        rows_to_py(py, draws, n, model.vae.config.input_dim)
    }

    /// The model file's bytes (as `save` writes them).
    fn to_bytes<'py>(
        &self,
        py: Python<'py>,
        include_optimizer: bool,
        extra: HashMap<String, String>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let model = &self.inner;
        let bytes = py
            .detach(|| checkpoint::to_bytes(model, include_optimizer, &extra))
            .map_err(to_py)?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// A model from a model file's bytes, checked as `load` checks a file: the model, its
    /// extra metadata, and whether it held optimizer state.
    #[staticmethod]
    fn from_bytes(
        py: Python<'_>,
        data: &[u8],
        threads: usize,
    ) -> PyResult<(PyModel, HashMap<String, String>, bool)> {
        let ck = py.detach(|| checkpoint::from_bytes(data)).map_err(to_py)?;
        Self::from_checkpoint(ck, threads)
    }

    /// Write a safetensors model file atomically; `extra` adds metadata entries.
    fn save(
        &self,
        py: Python<'_>,
        path: std::path::PathBuf,
        include_optimizer: bool,
        extra: HashMap<String, String>,
    ) -> PyResult<()> {
        let model = &self.inner;
        py.detach(|| checkpoint::save(&path, model, include_optimizer, &extra))
            .map_err(to_py)
    }

    /// Read a model file: the model, its extra metadata, and whether it held optimizer state.
    #[staticmethod]
    fn load(
        py: Python<'_>,
        path: std::path::PathBuf,
        threads: usize,
    ) -> PyResult<(PyModel, HashMap<String, String>, bool)> {
        let ck = py.detach(|| checkpoint::load(&path)).map_err(to_py)?;
        Self::from_checkpoint(ck, threads)
    }

    /// (input_dim, hidden_dims, latent_dim, activation, seed).
    #[getter]
    fn config(&self) -> (usize, Vec<usize>, usize, &'static str, u64) {
        let c = &self.inner.vae.config;
        (
            c.input_dim,
            c.hidden_dims.clone(),
            c.latent_dim,
            c.activation.name(),
            self.inner.seed,
        )
    }

    /// n draws from the prior N(0, I), float32 (n, Z).
    fn prior_samples<'py>(
        &self,
        py: Python<'py>,
        n: usize,
        seed: u64,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let z = self.inner.prior_samples(n, seed).map_err(to_py)?;
        rows_to_py(py, z, n, self.inner.vae.config.latent_dim)
    }
}

/// Number of logical cores, the default thread count.
#[pyfunction]
fn default_threads() -> usize {
    pool::default_threads()
}

/// Whether matrix products run on AMX tiles in this process.
#[pyfunction]
fn amx_available() -> bool {
    crate::amx::available()
}

/// The instruction sets this process runs on: fastvae's own kernels ("avx512", "avx2" or
/// "generic", capped by FASTVAE_ISA), the gemm crate's, and whether AMX takes the large
/// products ("on" or "off").
#[pyfunction]
fn isa_paths() -> HashMap<&'static str, &'static str> {
    let amx = if crate::amx::available() { "on" } else { "off" };
    HashMap::from([
        ("kernels", crate::simd::isa().name()),
        ("gemm", crate::matmul::gemm_isa()),
        ("amx", amx),
    ])
}

/// Switch the timers of a training step's phases on or off (process-wide; off by default).
#[pyfunction]
fn set_phase_timers(on: bool) {
    crate::phases::set_enabled(on)
}

/// The training steps timed since the last call and each phase's seconds over them, in the
/// order the phases run (process-wide: every model's steps count); resets both.
#[pyfunction]
fn take_phase_times() -> (u64, Vec<(&'static str, f64)>) {
    crate::phases::take()
}

/// A fixed Bernoulli draw of intensities x (n, d) in [0, 1]: 1.0 with probability x, else
/// 0.0, keyed by (seed, row); float32 (n, d).
#[pyfunction]
#[pyo3(signature = (x, seed=0))]
fn binarize<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    seed: u64,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (mut values, n, d) = array_to_rows(x, "x")?;
    py.detach(|| {
        pool::shared().install(|| {
            dataset::check_values(&values, d.max(1), "x", 0)?;
            dataset::binarize_fixed(&mut values, d, seed);
            Ok(())
        })
    })
    .and_then(|r| r)
    .map_err(to_py)?;
    rows_to_py(py, values, n, d)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("EVAL_CHUNK", EVAL_CHUNK)?;
    m.add("EVAL_PIECE_ROWS", EVAL_PIECE_ROWS)?;
    m.add("LOG_LIKELIHOOD_CALL_ROWS", LOG_LIKELIHOOD_CALL_ROWS)?;
    m.add("MAX_PARAMS", config::MAX_PARAMS)?;
    m.add("MAX_LR", config::MAX_LR)?;
    m.add("MAX_WIDTH", config::MAX_WIDTH)?;
    m.add("MAX_THREADS", config::MAX_THREADS)?;
    m.add("MAX_K", config::MAX_K)?;
    m.add("MAX_STEP_ROWS", config::MAX_STEP_ROWS)?;
    m.add("OBJECTIVES", config::OBJECTIVES.to_vec())?;
    m.add("ACTIVATIONS", config::ACTIVATIONS.to_vec())?;
    m.add("LIKELIHOODS", config::LIKELIHOODS.to_vec())?;
    m.add("LOGVAR_MIN", config::LOGVAR_MIN)?;
    m.add("LOGVAR_MAX", config::LOGVAR_MAX)?;
    m.add("MAX_BETA", config::MAX_BETA)?;
    m.add("DEFAULT_EPOCHS", config::DEFAULT_EPOCHS)?;
    m.add("DEFAULT_BATCH_SIZE", config::DEFAULT_BATCH_SIZE)?;
    m.add("DEFAULT_LR", config::DEFAULT_LR)?;
    m.add_class::<PyModel>()?;
    m.add_class::<PyDataset>()?;
    m.add_class::<PyEpochRun>()?;
    m.add_function(wrap_pyfunction!(default_threads, m)?)?;
    m.add_function(wrap_pyfunction!(amx_available, m)?)?;
    m.add_function(wrap_pyfunction!(isa_paths, m)?)?;
    m.add_function(wrap_pyfunction!(set_phase_timers, m)?)?;
    m.add_function(wrap_pyfunction!(take_phase_times, m)?)?;
    m.add_function(wrap_pyfunction!(binarize, m)?)?;
    m.add("FastVAEError", py.get_type::<FastVAEError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("InputError", py.get_type::<InputError>())?;
    m.add("DataError", py.get_type::<DataError>())?;
    m.add("CheckpointError", py.get_type::<CheckpointError>())?;
    Ok(())
}
