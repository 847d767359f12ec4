//! Every layer's backward pass, and the whole model's gradients, against finite differences
//! on tiny dims, as llm.c's test_gpt2.c checks its gradients (there against a PyTorch dump,
//! here against the core's own forward passes, so no Python is needed).
//!
//! The core computes in f32, so a difference quotient carries the objective's f32 rounding
//! divided by the step. The step is therefore large, h = 1/32, and the O(h^2) error of the
//! central difference is cancelled by Richardson extrapolation over steps h and 2h, leaving
//! O(h^4). An entry passes when |analytic - numeric| <= tol max(|analytic|, |numeric|) + atol,
//! with atol = 4 |L| 2^-24 / h from that rounding (|L| the objective's size, the sum of its
//! terms' magnitudes), so near-zero entries are held to what f32 can resolve and the rest to
//! tol. The differences measured here are at most an eighth of that bound.
//!
//! Under Miri the model and the costlier tests are ignored. The others use rayon, whose
//! crossbeam-epoch breaks Miri's Stacked Borrows and whose pool threads are never joined, so
//! they need MIRIFLAGS="-Zmiri-tree-borrows -Zmiri-ignore-leaks"; the KL test needs neither.

// Layer functions take their dims explicitly, as llm.c's do.
#![allow(clippy::too_many_arguments)]

use fastvae::config::{Likelihood, Objective};
use fastvae::dataset::Domain;
use fastvae::first_layer::{self, sparse_weight_backward, BatchNonzeros, GradSink};
use fastvae::layers::{
    activation_backward, bce_logits_forward_backward, bias_activation, bias_backward,
    linear_backward, linear_forward, reparam_kl_backward, reparam_kl_forward,
};
use fastvae::{Activation, Config, Dataset, Model, Workspace};

/// The difference step (see the module notes); a power of two, so v +- h rounds least.
const H: f32 = 1.0 / 32.0;

/// Relative tolerance of the layers, and of the whole model (more rounding in more steps).
const TOL: f64 = 1e-3;
const MODEL_TOL: f64 = 2e-3;

/// Deterministic values in [-0.5, 0.5) (the generator of the layers' unit tests).
fn pseudo(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761);
            (h >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

/// Inputs in [0, 1] with about half zeros, and input column `zero_col` all zeros.
fn sparse_inputs(b: usize, d: usize, zero_col: usize, seed: u32) -> Vec<f32> {
    let (keep, val) = (pseudo(b * d, seed), pseudo(b * d, seed + 1));
    (0..b * d)
        .map(|k| {
            if keep[k] < 0.0 || k % d == zero_col {
                0.0
            } else {
                val[k] + 0.5
            }
        })
        .collect()
}

/// dL/dx[k] for each k in `at`, from `f`, by central differences with steps h and 2h
/// combined as (4 D(h) - D(2h)) / 3; x is left as it was.
fn numeric(x: &mut [f32], at: &[usize], h: f32, mut f: impl FnMut(&[f32]) -> f64) -> Vec<f64> {
    let mut central = |x: &mut [f32], k: usize, h: f32| {
        let v = x[k];
        x[k] = v + h;
        let (up, at_up) = (f(x), x[k]);
        x[k] = v - h;
        let (down, at_down) = (f(x), x[k]);
        x[k] = v;
        // Divided by the step actually taken in f32.
        (up - down) / (at_up as f64 - at_down as f64)
    };
    at.iter()
        .map(|&k| (4.0 * central(x, k, h) - central(x, k, 2.0 * h)) / 3.0)
        .collect()
}

/// The absolute tolerance for an objective of size `scale` differenced with step h.
fn atol(scale: f64, h: f32) -> f64 {
    4.0 * scale * f32::EPSILON as f64 / 2.0 / h as f64
}

/// Panics naming `what` unless each analytic[at[j]] is within tol (relative) + atol[j] of
/// numeric[j]; the message gives the worst entry and the largest differences.
fn check(what: &str, analytic: &[f32], at: &[usize], numeric: &[f64], tol: f64, atol: &[f64]) {
    if at.is_empty() {
        return;
    }
    let (mut worst, mut worst_j, mut max_rel, mut max_abs) = (0.0f64, 0, 0.0f64, 0.0f64);
    for (j, (&k, &n)) in at.iter().zip(numeric).enumerate() {
        let a = analytic[k] as f64;
        let (diff, size) = ((a - n).abs(), a.abs().max(n.abs()));
        let ratio = diff / (tol * size + atol[j]);
        if ratio > worst || !ratio.is_finite() {
            (worst, worst_j) = (ratio, j);
        }
        max_abs = max_abs.max(diff);
        max_rel = max_rel.max(if size > 0.0 { diff / size } else { 0.0 });
    }
    let (k, n) = (at[worst_j], numeric[worst_j]);
    assert!(
        worst <= 1.0,
        "{what}: entry {k} analytic {} vs numeric {n:.6e}, beyond {tol:e} relative + {:.1e} \
         absolute; over {} entries max rel diff {max_rel:.2e}, max abs diff {max_abs:.2e}",
        analytic[k],
        atol[worst_j],
        at.len()
    );
}

/// `check` with one atol for every entry.
fn check_all(what: &str, analytic: &[f32], numeric: &[f64], scale: f64) {
    let at: Vec<usize> = (0..numeric.len()).collect();
    check(
        what,
        analytic,
        &at,
        numeric,
        TOL,
        &vec![atol(scale, H); at.len()],
    );
}

fn all(n: usize) -> Vec<usize> {
    (0..n).collect()
}

/// sum(out * r) in f64.
fn dot(out: &[f32], r: &[f32]) -> f64 {
    out.iter().zip(r).map(|(&o, &w)| o as f64 * w as f64).sum()
}

/// sum(|out * r|): the size of `dot`'s rounding.
fn abs_dot(out: &[f32], r: &[f32]) -> f64 {
    out.iter()
        .zip(r)
        .map(|(&o, &w)| (o as f64 * w as f64).abs())
        .sum()
}

#[test]
fn linear_backward_matches_finite_differences() {
    for (b, i, o) in [(2, 5, 3), (4, 7, 6)] {
        let mut inp = pseudo(b * i, 1);
        let mut weight = pseudo(o * i, 2);
        let mut bias = pseudo(o, 3);
        let r = pseudo(b * o, 4);
        let forward = |inp: &[f32], weight: &[f32], bias: &[f32]| {
            let mut out = vec![0.0; b * o];
            linear_forward(&mut out, inp, weight, bias, b, i, o, None);
            out
        };
        let scale = abs_dot(&forward(&inp, &weight, &bias), &r);
        let (mut dinp, mut dweight, mut dbias) = (
            vec![f32::NAN; b * i],
            vec![f32::NAN; o * i],
            vec![f32::NAN; o],
        );
        let dout = &r;
        linear_backward(
            Some(&mut dinp),
            &mut dweight,
            &mut dbias,
            dout,
            &inp,
            &weight,
            b,
            i,
            o,
        );
        let what = |t: &str| format!("linear ({b}, {i}, {o}) {t}");
        let (w, c) = (weight.clone(), bias.clone());
        let n = numeric(&mut inp, &all(b * i), H, |x| dot(&forward(x, &w, &c), &r));
        check_all(&what("dinp"), &dinp, &n, scale);
        let n = numeric(&mut weight, &all(o * i), H, |w| {
            dot(&forward(&inp, w, &c), &r)
        });
        check_all(&what("dweight"), &dweight, &n, scale);
        let n = numeric(&mut bias, &all(o), H, |c| dot(&forward(&inp, &w, c), &r));
        check_all(&what("dbias"), &dbias, &n, scale);

        // bias_backward alone, as the first layer uses it.
        let mut db = vec![f32::NAN; o];
        bias_backward(&mut db, dout, b, o);
        check_all(&what("bias_backward"), &db, &n, scale);
    }
}

#[test]
fn activation_backward_matches_finite_differences() {
    let (b, w) = (3, 6);
    let r = pseudo(b * w, 5);
    for act in [Activation::Relu, Activation::Tanh] {
        // Pre-activations in (-2.1, 2.1), at least 0.1 from relu's kink: more than 2h.
        let mut pre: Vec<f32> = pseudo(b * w, 6)
            .iter()
            .map(|&v| 4.0 * v + 0.1 * v.signum())
            .collect();
        let zero = vec![0.0; w];
        let forward = |pre: &[f32]| {
            let mut out = pre.to_vec();
            out.chunks_exact_mut(w)
                .for_each(|row| bias_activation(row, &zero, Some(act)));
            out
        };
        let mut dpre = r.clone();
        activation_backward(&mut dpre, &forward(&pre), w, act);
        let scale = abs_dot(&forward(&pre), &r);
        let n = numeric(&mut pre, &all(b * w), H, |p| dot(&forward(p), &r));
        check_all(&format!("{act:?} backward"), &dpre, &n, scale);
    }
}

#[test]
fn bce_logits_backward_matches_finite_differences() {
    // D = 20, so each row runs through both the 16 vector lanes and the scalar tail.
    let (b, d) = (2, 20);
    // Logits in [-6, 6), targets at 0, 1 and between.
    let mut logits: Vec<f32> = pseudo(b * d, 7).iter().map(|v| 12.0 * v).collect();
    let x: Vec<f32> = pseudo(b * d, 8)
        .iter()
        .enumerate()
        .map(|(k, v)| match k % 3 {
            0 => 0.0,
            1 => 1.0,
            _ => v + 0.5,
        })
        .collect();
    let loss = |l: &[f32]| {
        let (mut rows, mut l) = (vec![0.0f64; b], l.to_vec());
        bce_logits_forward_backward(&mut rows, &mut l, &x, d, false);
        rows.iter().sum::<f64>()
    };
    let mut grad = logits.clone();
    let mut rows = vec![0.0f64; b];
    bce_logits_forward_backward(&mut rows, &mut grad, &x, d, true);
    let scale = rows.iter().sum::<f64>();
    assert!(
        (scale - loss(&logits)).abs() <= 1e-6 * scale,
        "BCE loss with and without grad"
    );
    let n = numeric(&mut logits, &all(b * d), H, loss);
    check_all("BCE dlogits", &grad, &n, scale);
}

#[test]
fn reparam_kl_backward_matches_finite_differences() {
    let (b, z) = (3, 2);
    // Rows of [mu | logvar], mu in [-1, 1) and logvar in [-2, 2).
    let mut head: Vec<f32> = pseudo(b * 2 * z, 9)
        .iter()
        .enumerate()
        .map(|(k, &v)| if k % (2 * z) < z { 2.0 * v } else { 4.0 * v })
        .collect();
    let eps: Vec<f32> = pseudo(b * z, 10).iter().map(|v| 3.0 * v).collect();
    let r = pseudo(b * z, 11);
    // L = sum(z * r) + sum(KL): dz = r, and the KL's own gradient.
    let forward = |head: &[f32]| {
        let (mut zs, mut kl) = (vec![0.0; b * z], vec![0.0f64; b]);
        reparam_kl_forward(&mut zs, &mut kl, head, &eps, z);
        (zs, kl.iter().sum::<f64>())
    };
    let (zs, kl) = forward(&head);
    let scale = abs_dot(&zs, &r) + kl;
    let mut dhead = vec![f32::NAN; b * 2 * z];
    reparam_kl_backward(&mut dhead, &r, &head, &eps, z, 1.0);
    let (mu, logvar): (Vec<usize>, Vec<usize>) = (0..b * 2 * z).partition(|k| k % (2 * z) < z);
    for (name, at) in [("dmu", mu), ("dlogvar", logvar)] {
        let n = numeric(&mut head, &at, H, |h| {
            let (zs, kl) = forward(h);
            dot(&zs, &r) + kl
        });
        let what = format!("reparam+KL {name}");
        check(&what, &dhead, &at, &n, TOL, &vec![atol(scale, H); at.len()]);
    }
}

/// The sparse first layer, out = tanh(x wt + bias) from the batch's nonzeros, and its weight
/// gradient through `first_layer::sparse_weight_backward`, on `threads` threads (so in that many parts).
fn check_first_layer(b: usize, i: usize, o: usize, threads: usize) {
    let x = sparse_inputs(b, i, 1, 12);
    let mut wt = pseudo(i * o, 14);
    let bias = pseudo(o, 15);
    let r = pseudo(b * o, 16);
    let act = Activation::Tanh;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let mut cols = BatchNonzeros::default();
        cols.build(&x, b, i, threads);
        let cols = cols.get().expect("just indexed");
        let forward = |wt: &[f32]| {
            let mut out = vec![0.0; b * o];
            first_layer::forward(&mut out, &x, Some(cols), wt, &bias, b, i, o, act);
            out
        };
        let out = forward(&wt);
        let mut dh = r.clone();
        activation_backward(&mut dh, &out, o, act);
        let mut dwt = vec![f32::NAN; i * o];
        sparse_weight_backward(GradSink::Store(&mut dwt), cols, &dh, i, o);
        let n = numeric(&mut wt, &all(i * o), H, |w| dot(&forward(w), &r));
        let what = format!("sparse first layer ({b}, {i}, {o}) on {threads} threads dwt");
        check_all(&what, &dwt, &n, abs_dot(&out, &r));
        // The all-zero input column gets exactly no gradient.
        assert!(dwt[o..2 * o].iter().all(|&g| g == 0.0), "{what}: column 1");
    });
}

#[test]
fn sparse_first_layer_weight_grad_matches_finite_differences() {
    check_first_layer(3, 7, 5, 1);
}

#[test]
#[cfg_attr(
    miri,
    ignore = "3,600 forward passes, on two threads: too slow for Miri"
)]
fn sparse_first_layer_blocks_and_threads() {
    // O = 70: a whole block of 64 outputs and a ragged one, in the forward pass and the weight
    // gradient; on two threads the batch is indexed, and the gradient summed, in two parts.
    for threads in [1, 2] {
        check_first_layer(4, 6, 70, threads);
        check_first_layer(3, 7, 5, threads);
    }
}

/// Up to `count` entries of `range`, spread over it.
fn sample(range: std::ops::Range<usize>, salt: usize, count: usize) -> Vec<usize> {
    let len = range.len();
    if len <= count {
        return range.collect();
    }
    let width = len / count;
    (0..count)
        .map(|s| range.start + s * width + (salt * 7 + s * 3) % width)
        .collect()
}

/// Whether each hidden unit of the encoder and decoder is positive after the activation.
fn active(model: &Model, data: &Dataset, eps: &[f32]) -> Vec<bool> {
    let vae = &model.vae;
    let mut ws = Workspace::new(&vae.config, data.n, false, model.threads());
    data.read_rows(&mut ws.x[..data.n * data.d], 0, data.n);
    ws.eps[..eps.len()].copy_from_slice(eps);
    model
        .install(|| vae.forward(&mut ws, data.n, data.sparse))
        .expect("the pool runs");
    let last = ws.dec.len() - 1;
    let hidden = ws.enc.iter().chain(&ws.dec[..last]);
    hidden.flat_map(|h| h.iter().map(|&v| v > 0.0)).collect()
}

/// The whole model's gradient, in four entries of every tensor, against differences of its
/// loss. With relu, a step that would take any hidden unit across the kink (between any two
/// of the points differenced) is quartered, up to twice; an entry still at a kink (a unit's pre-activation
/// within 1/256 of 0, which B = 32 rows make likely) is not checked.
/// The Gaussian likelihood's inputs are real (signed, beyond 1) and its log-variances start
/// away from 0, so every term of their gradient counts; `beta` weights the KL.
fn check_model(act: Activation, hidden: &[usize], sparse: bool, threads: usize) {
    check_model_with(act, hidden, sparse, threads, Likelihood::Bernoulli, 1.0)
}

fn check_model_with(
    act: Activation,
    hidden: &[usize],
    sparse: bool,
    threads: usize,
    likelihood: Likelihood,
    beta: f64,
) {
    // On two threads B = 32, so that the latent block runs in two parts of 16 rows.
    let (b, d, z) = (if threads > 1 { 32 } else { 4 }, 9, 2);
    let config = Config::with_likelihood(d, hidden.to_vec(), z, act, likelihood).unwrap();
    let mut model = Model::new(config, 3, threads).unwrap();
    let mut x = sparse_inputs(b, d, 2, 17);
    let domain = match likelihood {
        Likelihood::Bernoulli => Domain::Unit,
        Likelihood::Gaussian => {
            for (i, v) in x.iter_mut().enumerate() {
                *v *= if i % 3 == 0 { -2.5 } else { 1.5 };
            }
            let lv = model
                .vae
                .layout
                .out_logvar
                .clone()
                .expect("a Gaussian model");
            let init = pseudo(lv.len(), 23);
            for (p, v) in model.vae.params[lv].iter_mut().zip(init) {
                *p = v;
            }
            Domain::Real
        }
    };
    let data = Dataset::with_layout(x.into(), b, d, Some(sparse), "x", 0, domain).unwrap();
    let eps: Vec<f32> = pseudo(b * z, 19).iter().map(|v| 3.0 * v).collect();
    let (loss, grads) = model
        .loss_and_grads(&data, &eps, beta, 1, Objective::Iwae)
        .unwrap();
    let what = format!(
        "{act:?} hidden {hidden:?} sparse {sparse} on {threads} threads, {likelihood:?}, beta {beta}"
    );

    // The point differenced about; each evaluation copies it into the model.
    let mut params = model.vae.params.clone();
    let (mut checked, mut skipped) = (0, 0);
    for (t, tensor) in model.vae.layout.tensors().iter().enumerate() {
        let (mut at, mut n, mut tols) = (vec![], vec![], vec![]);
        for k in sample(tensor.range.clone(), t, 4) {
            let v = params[k];
            let step = [H, H / 4.0, H / 16.0].into_iter().find(|&h| {
                act != Activation::Relu || {
                    let masks: Vec<_> = [-2.0, -1.0, 0.0, 1.0, 2.0]
                        .iter()
                        .map(|s| {
                            params[k] = v + s * h;
                            model.vae.params.copy_from_slice(&params);
                            active(&model, &data, &eps)
                        })
                        .collect();
                    params[k] = v;
                    masks.windows(2).all(|w| w[0] == w[1])
                }
            });
            let Some(h) = step else {
                skipped += 1;
                continue;
            };
            at.push(k);
            n.extend(numeric(&mut params, &[k], h, |p| {
                model.vae.params.copy_from_slice(p);
                model
                    .loss_and_grads(&data, &eps, beta, 1, Objective::Iwae)
                    .unwrap()
                    .0
            }));
            tols.push(atol(loss, h));
        }
        let name = format!("{what}: {}", tensor.name);
        assert!(
            !at.is_empty(),
            "{name}: every entry sampled is at relu's kink"
        );
        checked += at.len();
        check(&name, &grads, &at, &n, MODEL_TOL, &tols);
    }
    let total = checked + skipped;
    assert!(
        skipped * 5 <= total,
        "{what}: {skipped} of {total} entries at relu's kink"
    );
}

#[test]
#[cfg_attr(
    miri,
    ignore = "Model::new's pool sets MXCSR by inline asm, which Miri cannot run"
)]
fn model_gradients_match_finite_differences() {
    // Without hidden layers there is no first layer to run sparse or dense; both still run.
    for act in [Activation::Tanh, Activation::Relu] {
        for hidden in [&[][..], &[5, 3]] {
            for sparse in [true, false] {
                for threads in [1, 2] {
                    check_model(act, hidden, sparse, threads);
                }
            }
        }
    }
}

#[test]
#[cfg_attr(
    miri,
    ignore = "Model::new's pool sets MXCSR by inline asm, which Miri cannot run"
)]
fn gaussian_and_beta_gradients_match_finite_differences() {
    for act in [Activation::Tanh, Activation::Relu] {
        for hidden in [&[][..], &[5, 3]] {
            for sparse in [true, false] {
                for threads in [1, 2] {
                    check_model_with(act, hidden, sparse, threads, Likelihood::Gaussian, 1.0);
                }
            }
        }
        check_model_with(act, &[5], true, 2, Likelihood::Bernoulli, 0.25);
        check_model_with(act, &[5], false, 1, Likelihood::Gaussian, 3.0);
    }
}
