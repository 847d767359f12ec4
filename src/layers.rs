//! The layers' forward and backward passes as free functions over row-major slices, in the
//! llm.c style: outputs first, then inputs, then dims. B is the batch, I and O a linear layer's
//! input and output widths, D the pixel count, Z the latent width.
//!
//! Matrix products go through `matmul` (bit-identical from run to run whatever the split).
//! Backward functions overwrite their gradients (one batch per step), they do not accumulate.

// Layer functions take their dims explicitly, as llm.c's do.
#![allow(clippy::too_many_arguments)]

use crate::config::Activation;
use crate::matmul::{matmul_on, product_threads, Op};
use crate::simd::{dispatch, exp_nonpositive, log1p_unit, LANES};
use rayon::prelude::*;

/// Rows per parallel task for an elementwise pass over a (rows, width) buffer.
fn rows_per_task(rows: usize, width: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    // At least ~16K elements per task so scheduling stays cheap; at most one task per thread.
    let by_size = (16_384 / width.max(1)).max(1);
    rows.div_ceil(threads).max(by_size).max(1)
}

/// Apply `f(row_index, row)` to each `width`-wide row of `buf`, in parallel.
pub fn for_rows(buf: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    for_row_chunks(buf, width, |r0, rows| {
        for (r, row) in rows.chunks_exact_mut(width).enumerate() {
            f(r0 + r, row);
        }
    });
}

/// Apply `f(first_row_index, rows)` to pieces of whole `width`-wide rows of `buf`, in
/// parallel, one piece per task.
pub fn for_row_chunks(buf: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if buf.is_empty() {
        return;
    }
    let chunk = rows_per_task(buf.len() / width, width);
    buf.par_chunks_mut(chunk * width)
        .enumerate()
        .for_each(|(c, rows)| f(c * chunk, rows));
}

/// out (B, O) = act(inp (B, I) weight^T + bias); weight (O, I), bias (O). Bias and activation
/// run on each piece of the product as soon as it is done.
pub fn linear_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    b: usize,
    i: usize,
    o: usize,
    act: Option<Activation>,
) {
    linear_forward_on(
        product_threads(b, i, o),
        out,
        inp,
        weight,
        bias,
        b,
        i,
        o,
        act,
    );
}

/// `linear_forward` on `parts` threads.
pub fn linear_forward_on(
    parts: usize,
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    b: usize,
    i: usize,
    o: usize,
    act: Option<Activation>,
) {
    let epi = |row: &mut [f32], c0: usize| bias_activation(row, &bias[c0..c0 + row.len()], act);
    matmul_on(
        parts,
        out,
        inp,
        Op::Plain,
        weight,
        Op::Transposed,
        b,
        i,
        o,
        Some(&epi),
    );
}

/// row += bias, then the activation, if any. Compiled for the CPU's vectors (`dispatch`):
/// as the epilogue of the output layer's forward product it runs on 128 x 392 values per
/// thread that the product has pushed out to L3 (AMD EPYC Zen 3: 13.9 us a piece in a
/// training step, 15.8 on the baseline x86-64 build).
pub fn bias_activation(row: &mut [f32], bias: &[f32], act: Option<Activation>) {
    match act {
        None => bias_add(row, bias),
        Some(Activation::Relu) => bias_relu(row, bias),
        Some(Activation::Tanh) => row
            .iter_mut()
            .zip(bias)
            .for_each(|(v, c)| *v = (*v + c).tanh()),
    }
}

#[inline(always)]
fn bias_add_generic(row: &mut [f32], bias: &[f32]) {
    row.iter_mut().zip(bias).for_each(|(v, c)| *v += c)
}

#[inline(always)]
fn bias_relu_generic(row: &mut [f32], bias: &[f32]) {
    row.iter_mut()
        .zip(bias)
        .for_each(|(v, c)| *v = (*v + c).max(0.0))
}

dispatch!(fn bias_add(row: &mut [f32], bias: &[f32]) -> () = bias_add_generic);
dispatch!(fn bias_relu(row: &mut [f32], bias: &[f32]) -> () = bias_relu_generic);

/// dpre (B, O) *= act'(pre) given the activation's output `out` (B, O); turns the gradient with
/// respect to a layer's output into the gradient with respect to its pre-activation.
pub fn activation_backward(dout: &mut [f32], out: &[f32], width: usize, act: Activation) {
    let out = &out[..dout.len()];
    let chunk = rows_per_task(dout.len() / width.max(1), width) * width;
    dout.par_chunks_mut(chunk)
        .zip(out.par_chunks(chunk))
        .for_each(|(d, y)| match act {
            Activation::Relu => relu_backward(d, y),
            Activation::Tanh => tanh_backward(d, y),
        });
}

/// `activation_backward` on this thread.
pub fn activation_backward_rows(dout: &mut [f32], out: &[f32], act: Activation) {
    match act {
        Activation::Relu => relu_backward(dout, &out[..dout.len()]),
        Activation::Tanh => tanh_backward(dout, &out[..dout.len()]),
    }
}

#[inline(always)]
fn relu_backward_generic(d: &mut [f32], y: &[f32]) {
    // A select, not a branch, so it vectorizes.
    d.iter_mut()
        .zip(y)
        .for_each(|(d, &y)| *d = if y > 0.0 { *d } else { 0.0 });
}

#[inline(always)]
fn tanh_backward_generic(d: &mut [f32], y: &[f32]) {
    d.iter_mut().zip(y).for_each(|(d, &y)| *d *= 1.0 - y * y);
}

dispatch!(fn relu_backward(d: &mut [f32], y: &[f32]) -> () = relu_backward_generic);
dispatch!(fn tanh_backward(d: &mut [f32], y: &[f32]) -> () = tanh_backward_generic);

/// Gradients of y = x W^T + b given dout (B, O) = dL/dy: dweight (O, I) = dout^T inp,
/// dbias (O) = column sums of dout, and dinp (B, I) = dout weight when asked for. The two
/// products have equal cost, so with two or more threads each takes half of the pool.
pub fn linear_backward(
    dinp: Option<&mut [f32]>,
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    b: usize,
    i: usize,
    o: usize,
) {
    let parts = product_threads(o, b, i);
    let weight_grads = |dweight: &mut [f32], dbias: &mut [f32], parts: usize| {
        let (lhs, rhs) = (Op::Transposed, Op::Plain);
        matmul_on(parts, dweight, dout, lhs, inp, rhs, o, b, i, None);
        bias_backward(dbias, dout, b, o);
    };
    let input_grad = |dinp: &mut [f32], parts: usize| {
        matmul_on(
            parts,
            dinp,
            dout,
            Op::Plain,
            weight,
            Op::Plain,
            b,
            o,
            i,
            None,
        )
    };
    match dinp {
        Some(dinp) if parts > 1 => {
            let half = parts / 2;
            rayon::join(
                || weight_grads(dweight, dbias, parts - half),
                || input_grad(dinp, half),
            );
        }
        Some(dinp) => {
            weight_grads(dweight, dbias, parts);
            input_grad(dinp, parts);
        }
        None => weight_grads(dweight, dbias, parts),
    }
}

/// dbias (O) = sum over the batch of dout (B, O), adding rows in order.
pub fn bias_backward(dbias: &mut [f32], dout: &[f32], b: usize, o: usize) {
    dbias.fill(0.0);
    for row in dout[..b * o].chunks_exact(o) {
        dbias.iter_mut().zip(row).for_each(|(acc, v)| *acc += v);
    }
}

/// Bernoulli negative log-likelihood of targets x in [0, 1] under logits l, summed per row,
/// in the stable form max(l, 0) - l x + log(1 + exp(-|l|)) (as torch's
/// binary_cross_entropy_with_logits). With `grad`, overwrites the logits (B, D) with
/// dL/dl = sigmoid(l) - x. Writes each row's sum into `row_loss` (B).
pub fn bce_logits_forward_backward(
    row_loss: &mut [f64],
    logits: &mut [f32],
    x: &[f32],
    d: usize,
    grad: bool,
) {
    let b = row_loss.len();
    let logits = &mut logits[..b * d];
    let chunk = rows_per_task(b, d);
    logits
        .par_chunks_mut(chunk * d)
        .zip(row_loss.par_chunks_mut(chunk))
        .zip(x[..b * d].par_chunks(chunk * d))
        .for_each(|((rows, losses), xs)| {
            for ((row, loss), xr) in rows.chunks_exact_mut(d).zip(losses).zip(xs.chunks_exact(d)) {
                *loss = if grad {
                    bce_row_grad(row, xr)
                } else {
                    bce_row(row, xr)
                } as f64;
            }
        });
}

/// One row's BCE sum; with GRAD, the logits become sigmoid(l) - x. Partial sums run in
/// `LANES` fixed lanes so the compiler can vectorize them.
///
/// Blocks of the row take three passes: e = exp(-|l|), then the losses, then the gradients.
/// In one pass each vector chained two polynomials and a division, longer than the
/// out-of-order window overlaps across iterations (on Zen 3, one thread: 1.75 ns an element
/// against 1.42 in passes, before the polynomials' shorter chains). Each value is computed
/// as in one pass, so the passes change no bits.
#[inline(always)]
fn bce_row_generic<const GRAD: bool, const FMA: bool>(row: &mut [f32], x: &[f32]) -> f32 {
    #[inline(always)]
    fn e_of<const FMA: bool>(v: f32) -> f32 {
        exp_nonpositive::<FMA>(-v.abs())
    }
    #[inline(always)]
    fn loss_of<const FMA: bool>(v: f32, e: f32, t: f32) -> f32 {
        v.max(0.0) - v * t + log1p_unit::<FMA>(e)
    }
    #[inline(always)]
    fn grad_of(v: f32, e: f32, t: f32) -> f32 {
        let inv = 1.0 / (1.0 + e);
        let sig = if v >= 0.0 { inv } else { e * inv };
        sig - t
    }
    // 256 values: the block's e stays in L1.
    const BLOCK: usize = 16 * LANES;
    let n = row.len().min(x.len());
    let whole = n / LANES * LANES;
    let (row, x) = (&mut row[..n], &x[..n]);
    let mut acc = [0.0f32; LANES];
    let mut es = [0.0f32; BLOCK];
    for (lb, xb) in row[..whole].chunks_mut(BLOCK).zip(x[..whole].chunks(BLOCK)) {
        let es = &mut es[..lb.len()];
        for (e, &v) in es.iter_mut().zip(lb.iter()) {
            *e = e_of::<FMA>(v);
        }
        let chunks = lb.chunks_exact(LANES).zip(xb.chunks_exact(LANES));
        for ((lc, xc), ec) in chunks.zip(es.chunks_exact(LANES)) {
            for k in 0..LANES {
                acc[k] += loss_of::<FMA>(lc[k], ec[k], xc[k]);
            }
        }
        if GRAD {
            for ((v, &e), &t) in lb.iter_mut().zip(es.iter()).zip(xb) {
                *v = grad_of(*v, e, t);
            }
        }
    }
    let mut tail = 0.0f32;
    for (v, &t) in row[whole..].iter_mut().zip(&x[whole..]) {
        let e = e_of::<FMA>(*v);
        tail += loss_of::<FMA>(*v, e, t);
        if GRAD {
            *v = grad_of(*v, e, t);
        }
    }
    acc.iter().sum::<f32>() + tail
}

dispatch!(fn bce_row_grad(row: &mut [f32], x: &[f32]) -> f32 = bce_row_generic::<true, true>, bce_row_generic::<true, false>);
dispatch!(fn bce_row(row: &mut [f32], x: &[f32]) -> f32 = bce_row_generic::<false, true>, bce_row_generic::<false, false>);

/// Reparameterization and the Gaussian KL (Kingma & Welling, appendix B):
/// z = mu + exp(logvar / 2) eps and KL(N(mu, sigma^2) || N(0, I)) =
/// -1/2 sum(1 + logvar - mu^2 - exp(logvar)) per row. head (B, 2Z) holds [mu | logvar].
pub fn reparam_kl_forward(
    z: &mut [f32],
    row_kl: &mut [f64],
    head: &[f32],
    eps: &[f32],
    zdim: usize,
) {
    // B x Z is small: one thread, no scheduling.
    z.chunks_exact_mut(zdim)
        .zip(row_kl.iter_mut())
        .enumerate()
        .for_each(|(r, (zr, kl))| {
            let (mu, lv) = head[r * 2 * zdim..(r + 1) * 2 * zdim].split_at(zdim);
            let e = &eps[r * zdim..(r + 1) * zdim];
            let mut acc = 0.0f32;
            for j in 0..zdim {
                let var = lv[j].exp();
                zr[j] = mu[j] + var.sqrt() * e[j];
                acc += 1.0 + lv[j] - mu[j] * mu[j] - var;
            }
            *kl = -0.5 * acc as f64;
        });
}

/// dhead (B, 2Z) = [dmu | dlogvar] from dz (B, Z) through z and the KL term weighted by
/// `beta` (1 for the ELBO): dmu = dz + beta mu, dlogvar = dz eps sigma / 2 + beta (exp(logvar)
/// - 1) / 2.
pub fn reparam_kl_backward(
    dhead: &mut [f32],
    dz: &[f32],
    head: &[f32],
    eps: &[f32],
    zdim: usize,
    beta: f32,
) {
    dhead
        .chunks_exact_mut(2 * zdim)
        .enumerate()
        .for_each(|(r, dh)| {
            let (mu, lv) = head[r * 2 * zdim..(r + 1) * 2 * zdim].split_at(zdim);
            let (dmu, dlv) = dh.split_at_mut(zdim);
            for j in 0..zdim {
                let g = dz[r * zdim + j];
                let var = lv[j].exp();
                dmu[j] = g + beta * mu[j];
                dlv[j] = 0.5 * g * eps[r * zdim + j] * var.sqrt() + beta * (0.5 * (var - 1.0));
            }
        });
}

/// 0.5 log(2 pi), the Gaussian density's constant per feature.
pub const HALF_LN_2PI: f64 = 0.918_938_533_204_672_8;

/// Gaussian negative log-likelihood of targets x under means m (B, D) and per-feature
/// log-variances lv (D), summed per row: sum_j 0.5 log(2 pi) + lv_j / 2 + (x - m)^2 / (2 exp(lv_j)).
/// With `grad`, overwrites the means with dL/dm = (m - x) exp(-lv). Writes each row's sum
/// into `row_loss` (B).
pub fn gaussian_nll_forward_backward(
    row_loss: &mut [f64],
    means: &mut [f32],
    x: &[f32],
    logvar: &[f32],
    d: usize,
    grad: bool,
) {
    let b = row_loss.len();
    let inv_var: Vec<f32> = logvar.iter().map(|&v| (-v).exp()).collect();
    let constant: f64 = logvar.iter().map(|&v| HALF_LN_2PI + 0.5 * v as f64).sum();
    let chunk = rows_per_task(b, d);
    means[..b * d]
        .par_chunks_mut(chunk * d)
        .zip(row_loss.par_chunks_mut(chunk))
        .zip(x[..b * d].par_chunks(chunk * d))
        .for_each(|((rows, losses), xs)| {
            for ((row, loss), xr) in rows.chunks_exact_mut(d).zip(losses).zip(xs.chunks_exact(d)) {
                let squares = if grad {
                    gaussian_row_grad(row, xr, &inv_var)
                } else {
                    gaussian_row(row, xr, &inv_var)
                };
                *loss = constant + 0.5 * squares as f64;
            }
        });
}

/// One row's sum of (m - x)^2 exp(-lv); with GRAD, the means become (m - x) exp(-lv). Partial
/// sums run in `LANES` fixed lanes so the compiler can vectorize them.
#[inline(always)]
fn gaussian_row_generic<const GRAD: bool>(row: &mut [f32], x: &[f32], inv_var: &[f32]) -> f32 {
    #[inline(always)]
    fn one<const GRAD: bool>(m: &mut f32, t: f32, iv: f32) -> f32 {
        let diff = *m - t;
        let scaled = diff * iv;
        if GRAD {
            *m = scaled;
        }
        diff * scaled
    }
    let mut acc = [0.0f32; LANES];
    let mut rows = row.chunks_exact_mut(LANES);
    let mut xs = x.chunks_exact(LANES);
    let mut ivs = inv_var.chunks_exact(LANES);
    for ((mc, xc), ic) in (&mut rows).zip(&mut xs).zip(&mut ivs) {
        for k in 0..LANES {
            acc[k] += one::<GRAD>(&mut mc[k], xc[k], ic[k]);
        }
    }
    let mut tail = 0.0f32;
    for ((m, &t), &iv) in rows
        .into_remainder()
        .iter_mut()
        .zip(xs.remainder())
        .zip(ivs.remainder())
    {
        tail += one::<GRAD>(m, t, iv);
    }
    acc.iter().sum::<f32>() + tail
}

dispatch!(fn gaussian_row_grad(row: &mut [f32], x: &[f32], inv_var: &[f32]) -> f32 = gaussian_row_generic::<true>);
dispatch!(fn gaussian_row(row: &mut [f32], x: &[f32], inv_var: &[f32]) -> f32 = gaussian_row_generic::<false>);

/// dlv (D) = d/dlv of the Gaussian NLL summed over the batch, from dm (B, D) =
/// (m - x) exp(-lv) as `gaussian_nll_forward_backward` left it: sum over rows of
/// (1 - (x - m)^2 exp(-lv)) / 2 = (1 - dm^2 exp(lv)) / 2, each row's term times its weight
/// in `row_weights` (B) when given (the k-sample objectives; 1 without).
pub fn gaussian_logvar_backward(
    dlv: &mut [f32],
    dm: &[f32],
    logvar: &[f32],
    b: usize,
    row_weights: Option<&[f32]>,
) {
    let d = dlv.len();
    let var: Vec<f32> = logvar.iter().map(|&v| v.exp()).collect();
    // One column block per task, the rows summed in order: the same sum on any pool.
    let block = d.div_ceil(rayon::current_num_threads().max(1)).max(64);
    dlv.par_chunks_mut(block).enumerate().for_each(|(c, out)| {
        let lo = c * block;
        out.fill(0.0);
        for (r, row) in dm[..b * d].chunks_exact(d).enumerate() {
            let w = row_weights.map_or(1.0, |w| w[r]);
            logvar_grad_row(out, &row[lo..lo + out.len()], &var[lo..lo + out.len()], w);
        }
    });
}

#[inline(always)]
fn logvar_grad_row_generic(out: &mut [f32], dm: &[f32], var: &[f32], weight: f32) {
    for ((o, &g), &v) in out.iter_mut().zip(dm).zip(var) {
        // weight 1 multiplies exactly: the one-sample path rounds as it did without weights.
        *o += weight * (0.5 * (1.0 - g * g * v));
    }
}

dispatch!(fn logvar_grad_row(out: &mut [f32], dm: &[f32], var: &[f32], weight: f32) -> () = logvar_grad_row_generic);

/// The largest |v|, vectorized (NaN values are passed over: callers check finiteness apart).
pub fn max_abs(values: &[f32]) -> f32 {
    values
        .par_chunks(1 << 14)
        .map(max_abs_chunk)
        .reduce(|| 0.0, f32::max)
}

#[inline(always)]
fn max_abs_generic(values: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            acc[k] = acc[k].max(c[k].abs());
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()));
    acc.iter().fold(tail, |m, &v| m.max(v))
}

dispatch!(fn max_abs_chunk(values: &[f32]) -> f32 = max_abs_generic);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic values in [-0.5, 0.5).
    pub(crate) fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761);
                (h >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Whether a and b hold the same floats bit for bit (NaNs and signed zeros included).
    pub(crate) fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// A product epilogue for tests: adds each element's column in the whole product, so a
    /// part given the wrong first column shows.
    pub(crate) fn add_column(row: &mut [f32], c0: usize) {
        row.iter_mut()
            .enumerate()
            .for_each(|(j, v)| *v += (c0 + j) as f32);
    }

    #[test]
    fn bce_known_values() {
        // l = 0, x = 0.5: log 2; l = 2, x = 1: log(1 + e^-2); l = -3, x = 0: log(1 + e^-3).
        let mut logits = vec![0.0, 2.0, -3.0];
        let x = vec![0.5, 1.0, 0.0];
        let mut loss = vec![0.0; 3];
        bce_logits_forward_backward(&mut loss, &mut logits, &x, 1, true);
        let want = [
            2f64.ln(),
            (1.0 + (-2f64).exp()).ln(),
            (1.0 + (-3f64).exp()).ln(),
        ];
        for (a, b) in loss.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        assert!((logits[0] as f64 - 0.0).abs() < 1e-6);
        assert!((logits[1] as f64 - (sig(2.0) - 1.0)).abs() < 1e-6);
        assert!((logits[2] as f64 - sig(-3.0)).abs() < 1e-6);
    }

    #[test]
    fn kl_known_values() {
        // mu = (1, 0), logvar = (0, ln 4): KL = 0.5 * (1 + 0 - 0) + 0.5 * (4 - 1 - ln 4).
        let head = vec![1.0, 0.0, 0.0, 4f32.ln()];
        let eps = vec![0.5, -1.0];
        let mut z = vec![0.0; 2];
        let mut kl = vec![0.0];
        reparam_kl_forward(&mut z, &mut kl, &head, &eps, 2);
        let want = 0.5 + 0.5 * (3.0 - 4f64.ln());
        assert!((kl[0] - want).abs() < 1e-6, "{} vs {want}", kl[0]);
        assert!((z[0] - 1.5).abs() < 1e-6 && (z[1] + 2.0).abs() < 1e-6);
    }
}
