//! The layers' forward and backward passes as free functions over row-major slices, in the
//! llm.c style: outputs first, then inputs, then dims. B is the batch, I and O a linear layer's
//! input and output widths, D the pixel count, Z the latent width.
//!
//! Matrix products go through `matmul`, which splits the output across the current rayon pool
//! and runs each part on one thread: on AMX tiles to float32 rounding (`amx`) when the CPU has
//! them and the product is large enough, else with the `gemm` crate (measured faster here
//! than gemm's own threading). Each output element is reduced by one thread in a fixed order,
//! the same whatever the split, so results are bit-identical from run to run. Backward functions overwrite their gradients (one batch per
//! step), they do not accumulate.

// Layer functions take their dims explicitly, as llm.c's do.
#![allow(clippy::too_many_arguments)]

use crate::amx;
use crate::config::Activation;
use crate::simd::{dispatch, exp_nonpositive, log1p_unit, LANES};
use rayon::prelude::*;

/// A strided matrix: element (i, j) at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

// SAFETY: a Mat is only handed to threads that touch disjoint parts of a destination, or that
// only read a source; `matmul` below is the only place that creates them.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

impl Mat {
    fn read(&self) -> amx::View {
        amx::View {
            ptr: self.ptr,
            rows: self.rows,
            cols: self.cols,
            rs: self.rs,
            cs: self.cs,
        }
    }
    fn rows(self, start: usize, len: usize) -> Mat {
        Mat {
            ptr: self.ptr.wrapping_offset(start as isize * self.rs),
            rows: len,
            ..self
        }
    }
    fn cols(self, start: usize, len: usize) -> Mat {
        Mat {
            ptr: self.ptr.wrapping_offset(start as isize * self.cs),
            cols: len,
            ..self
        }
    }
}

/// Smallest part of an output dimension worth giving to its own thread.
const MIN_SPLIT: usize = 32;
/// Products below this many multiply-adds run on one thread: splitting costs more than it saves
/// (with the pool kept awake during a step, a split costs a few microseconds).
const MIN_PARALLEL_MACS: usize = 1 << 18;

/// Work applied to each finished row piece of a product while it is in cache, given the
/// piece and the column it starts at (bias and activation, say).
pub type Epilogue<'a> = &'a (dyn Fn(&mut [f32], usize) + Sync);

/// dst (m, n) = a (m, k) b (k, n), split over `parts` threads along the larger output dim;
/// `col0` is dst's first column within the whole product, for the epilogue.
///
/// `tiles`: run on AMX, decided once for the whole product so that every element is summed
/// the same way whatever the split.
fn matmul_split(
    dst: Mat,
    a: Mat,
    b: Mat,
    parts: usize,
    col0: usize,
    tiles: bool,
    epi: Option<Epilogue<'_>>,
) {
    let (m, n) = (dst.rows, dst.cols);
    if parts > 1 && m.max(n) >= 2 * MIN_SPLIT {
        let left = parts / 2;
        // Row-major right-hand sides split best by rows even when n > m (measured at B = 128:
        // 282 us against 309 us for 128x784x400 on two threads); otherwise the larger side.
        // On AMX each part packs its share of the operand it splits and all of the other, so
        // the larger operand is split.
        let by_rows = if tiles {
            m >= 2 * MIN_SPLIT && (m >= n || a.rows * a.cols >= b.rows * b.cols)
        } else {
            m >= n || (b.cs == 1 && m >= 2 * MIN_SPLIT)
        };
        if by_rows {
            // Split rows at a multiple of 16 (the kernels' register tile), in proportion to parts.
            let cut = ((m * left / parts) / 16 * 16).clamp(16, m - 16);
            rayon::join(
                || matmul_split(dst.rows(0, cut), a.rows(0, cut), b, left, col0, tiles, epi),
                || {
                    let (d, a) = (dst.rows(cut, m - cut), a.rows(cut, m - cut));
                    matmul_split(d, a, b, parts - left, col0, tiles, epi)
                },
            );
        } else {
            let cut = ((n * left / parts) / 16 * 16).clamp(16, n - 16);
            rayon::join(
                || matmul_split(dst.cols(0, cut), a, b.cols(0, cut), left, col0, tiles, epi),
                || {
                    let (d, b) = (dst.cols(cut, n - cut), b.cols(cut, n - cut));
                    matmul_split(d, a, b, parts - left, col0 + cut, tiles, epi)
                },
            );
        }
        return;
    }
    if tiles {
        // SAFETY: the public wrappers check that every (i, j) addressed by dst, a and b lies
        // inside the slices they came from; splits only narrow those ranges. `use_amx` checked
        // that AMX is on and that the strides suit its packing.
        unsafe { amx::gemm(dst.ptr, dst.rs, dst.cs, a.read(), b.read()) };
    } else {
        // SAFETY: as above.
        unsafe { gemm_crate(dst, a, b) };
    }
    if let Some(f) = epi {
        debug_assert_eq!(dst.cs, 1);
        for r in 0..m {
            // SAFETY: row r of this tile: n contiguous elements (dst is row-major) that no
            // other task touches.
            let row =
                unsafe { std::slice::from_raw_parts_mut(dst.ptr.offset(r as isize * dst.rs), n) };
            f(row, col0);
        }
    }
}

/// Products of at least this many multiply-adds run on AMX when it is there. Below it the
/// packing costs more than the tiles save: with the threshold at 2^16, the small products of
/// the latent block made a training step slower (1828 us against 1715 with `gemm` alone); at
/// 2^23 only the output layer's three products (and a dense first layer's) go to AMX, and the
/// step took 1572-1583 us against 1687-1720.
const MIN_AMX_MACS: usize = 1 << 23;
/// And every side at least this long: each packed element must serve enough multiply-adds.
/// At batch 32 the output layer's products on AMX made training slower (33,000 samples/s
/// against 43,000 with `gemm`); at batch 64 both gave 53,000, at 128 AMX is ahead.
const MIN_AMX_SIDE: usize = 128;

fn use_amx(a: &Mat, b: &Mat) -> bool {
    a.rows * a.cols * b.cols >= MIN_AMX_MACS
        && a.rows.min(a.cols).min(b.cols) >= MIN_AMX_SIDE
        && amx::available()
        && amx::supports(&a.read(), &b.read())
}

/// dst = a b by the `gemm` crate on this thread.
///
/// # Safety
/// Every element the three matrices address must be valid, and dst's free of other access.
unsafe fn gemm_crate(dst: Mat, a: Mat, b: Mat) {
    gemm::gemm(
        dst.rows,
        dst.cols,
        a.cols,
        dst.ptr,
        dst.cs,
        dst.rs,
        false,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        0.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// How a matrix sits in its slice.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Layout {
    /// (rows, cols) row-major.
    Normal,
    /// The transpose of a (cols, rows) row-major matrix.
    Transposed,
}

fn view(s: &[f32], rows: usize, cols: usize, layout: Layout) -> Mat {
    assert_eq!(s.len(), rows * cols, "matrix slice length");
    let (rs, cs) = match layout {
        Layout::Normal => (cols as isize, 1),
        Layout::Transposed => (1, rows as isize),
    };
    Mat {
        ptr: s.as_ptr() as *mut f32,
        rows,
        cols,
        rs,
        cs,
    }
}

/// Threads worth using for a product of m * k * n multiply-adds.
pub fn product_threads(m: usize, k: usize, n: usize) -> usize {
    if m * n * k < MIN_PARALLEL_MACS {
        1
    } else {
        rayon::current_num_threads().max(1)
    }
}

/// dst (m, n) = op(a) (m, k) op(b) (k, n), over the current rayon pool.
pub fn matmul(
    dst: &mut [f32],
    a: &[f32],
    a_layout: Layout,
    b: &[f32],
    b_layout: Layout,
    m: usize,
    k: usize,
    n: usize,
) {
    let parts = product_threads(m, k, n);
    matmul_on(parts, dst, a, a_layout, b, b_layout, m, k, n, None);
}

/// `matmul` on `parts` threads, then `epi` on each finished row piece.
pub fn matmul_on(
    parts: usize,
    dst: &mut [f32],
    a: &[f32],
    a_layout: Layout,
    b: &[f32],
    b_layout: Layout,
    m: usize,
    k: usize,
    n: usize,
    epi: Option<Epilogue<'_>>,
) {
    let d = view(dst, m, n, Layout::Normal);
    let a = view(a, m, k, a_layout);
    let b = view(b, k, n, b_layout);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst.fill(0.0);
        if let Some(f) = epi {
            dst.chunks_exact_mut(n).for_each(|row| f(row, 0));
        }
        return;
    }
    let tiles = use_amx(&a, &b);
    matmul_split(d, a, b, parts.max(1), 0, tiles, epi);
}

/// Reference product for tests: f64 accumulation, no blocking.
pub fn matmul_naive(
    dst: &mut [f32],
    a: &[f32],
    a_layout: Layout,
    b: &[f32],
    b_layout: Layout,
    m: usize,
    k: usize,
    n: usize,
) {
    let at = |i: usize, p: usize| match a_layout {
        Layout::Normal => a[i * k + p],
        Layout::Transposed => a[p * m + i],
    };
    let bt = |p: usize, j: usize| match b_layout {
        Layout::Normal => b[p * n + j],
        Layout::Transposed => b[j * k + p],
    };
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for p in 0..k {
                acc += at(i, p) as f64 * bt(p, j) as f64;
            }
            dst[i * n + j] = acc as f32;
        }
    }
}

/// Rows per parallel task for an elementwise pass over a (rows, width) buffer.
fn rows_per_task(rows: usize, width: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    // At least ~16K elements per task so scheduling stays cheap; at most one task per thread.
    let by_size = (16_384 / width.max(1)).max(1);
    rows.div_ceil(threads).max(by_size).max(1)
}

/// Apply `f(row_index, row)` to each `width`-wide row of `buf`, in parallel.
pub fn for_rows(buf: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if buf.is_empty() {
        return;
    }
    let chunk = rows_per_task(buf.len() / width, width);
    buf.par_chunks_mut(chunk * width)
        .enumerate()
        .for_each(|(c, rows)| {
            for (r, row) in rows.chunks_exact_mut(width).enumerate() {
                f(c * chunk + r, row);
            }
        });
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
        Layout::Normal,
        weight,
        Layout::Transposed,
        b,
        i,
        o,
        Some(&epi),
    );
}

/// row += bias, then the activation, if any.
pub fn bias_activation(row: &mut [f32], bias: &[f32], act: Option<Activation>) {
    match act {
        None => row.iter_mut().zip(bias).for_each(|(v, c)| *v += c),
        Some(Activation::Relu) => row
            .iter_mut()
            .zip(bias)
            .for_each(|(v, c)| *v = (*v + c).max(0.0)),
        Some(Activation::Tanh) => row
            .iter_mut()
            .zip(bias)
            .for_each(|(v, c)| *v = (*v + c).tanh()),
    }
}

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
        let (lhs, rhs) = (Layout::Transposed, Layout::Normal);
        matmul_on(parts, dweight, dout, lhs, inp, rhs, o, b, i, None);
        bias_backward(dbias, dout, b, o);
    };
    let input_grad = |dinp: &mut [f32], parts: usize| {
        matmul_on(
            parts,
            dinp,
            dout,
            Layout::Normal,
            weight,
            Layout::Normal,
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
#[inline(always)]
fn bce_row_generic<const GRAD: bool, const FMA: bool>(row: &mut [f32], x: &[f32]) -> f32 {
    #[inline(always)]
    fn one<const GRAD: bool, const FMA: bool>(l: &mut f32, t: f32) -> f32 {
        let v = *l;
        let e = exp_nonpositive::<FMA>(-v.abs());
        if GRAD {
            let inv = 1.0 / (1.0 + e);
            let sig = if v >= 0.0 { inv } else { e * inv };
            *l = sig - t;
        }
        v.max(0.0) - v * t + log1p_unit::<FMA>(e)
    }
    let mut acc = [0.0f32; LANES];
    let mut rows = row.chunks_exact_mut(LANES);
    let mut xs = x.chunks_exact(LANES);
    for (lc, xc) in (&mut rows).zip(&mut xs) {
        for k in 0..LANES {
            acc[k] += one::<GRAD, FMA>(&mut lc[k], xc[k]);
        }
    }
    let mut tail = 0.0f32;
    for (l, &t) in rows.into_remainder().iter_mut().zip(xs.remainder()) {
        tail += one::<GRAD, FMA>(l, t);
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

/// dhead (B, 2Z) = [dmu | dlogvar] from dz (B, Z) through z and the KL term:
/// dmu = dz + mu, dlogvar = dz eps sigma / 2 + (exp(logvar) - 1) / 2.
pub fn reparam_kl_backward(dhead: &mut [f32], dz: &[f32], head: &[f32], eps: &[f32], zdim: usize) {
    dhead
        .chunks_exact_mut(2 * zdim)
        .enumerate()
        .for_each(|(r, dh)| {
            let (mu, lv) = head[r * 2 * zdim..(r + 1) * 2 * zdim].split_at(zdim);
            let (dmu, dlv) = dh.split_at_mut(zdim);
            for j in 0..zdim {
                let g = dz[r * zdim + j];
                let var = lv[j].exp();
                dmu[j] = g + mu[j];
                dlv[j] = 0.5 * g * eps[r * zdim + j] * var.sqrt() + 0.5 * (var - 1.0);
            }
        });
}

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

    #[test]
    fn matmul_matches_naive_all_layouts() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        // The last three reach AMX where it is there (the first two with odd sizes).
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 2),
            (70, 33, 130),
            (200, 301, 150),
            (784, 128, 400),
            (128, 784, 400),
        ] {
            for la in [Layout::Normal, Layout::Transposed] {
                for lb in [Layout::Normal, Layout::Transposed] {
                    let a = pseudo(m * k, 1);
                    let b = pseudo(k * n, 2);
                    let mut fast = vec![0.0; m * n];
                    let mut slow = vec![0.0; m * n];
                    pool.install(|| matmul(&mut fast, &a, la, &b, lb, m, k, n));
                    matmul_naive(&mut slow, &a, la, &b, lb, m, k, n);
                    let err = fast
                        .iter()
                        .zip(&slow)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0.0, f32::max);
                    assert!(err < 1e-4, "{m}x{k}x{n} {la:?} {lb:?}: {err}");
                }
            }
        }
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
