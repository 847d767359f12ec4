//! Matrix products over row-major slices, split across the current rayon pool.
//!
//! `matmul` splits the output along its larger side and runs each part on one thread: on AMX
//! tiles to float32 rounding (`amx`) when the CPU has them and the product is large enough,
//! by `narrow` when the output has at most 64 columns, else with the `gemm` crate (measured
//! faster here than gemm's own threading). Each output
//! element is reduced by one thread in a fixed order, the same whatever the split, so results
//! are bit-identical from run to run. This is the one module that turns slices into raw
//! pointers for the kernels: the destination only from `&mut [f32]`, the operands from `&[f32]`.

// Products take their dims explicitly, as llm.c's do.
#![allow(clippy::too_many_arguments)]

use crate::{amx, narrow};
use std::cell::Cell;

/// How an operand sits in its slice.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Op {
    /// (rows, cols) row-major.
    Plain,
    /// The transpose of a (cols, rows) row-major matrix.
    Transposed,
}

/// The strided matrix a product writes: element (i, j) at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
struct Dst {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

/// A strided operand a product reads.
#[derive(Clone, Copy)]
struct Src(amx::View);

// SAFETY: a Dst is made only from a `&mut [f32]` that `matmul_on` holds for the whole product,
// and is split into parts that address disjoint elements, each written by one thread. A Src is
// made only from a `&[f32]` borrowed for the whole product and is only read.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}
unsafe impl Send for Src {}
unsafe impl Sync for Src {}

impl Dst {
    fn from_slice(s: &mut [f32], rows: usize, cols: usize) -> Dst {
        assert_eq!(s.len(), rows * cols, "destination slice length");
        Dst {
            ptr: s.as_mut_ptr(),
            rows,
            cols,
            rs: cols as isize,
            cs: 1,
        }
    }
    fn rows(self, start: usize, len: usize) -> Dst {
        Dst {
            ptr: self.ptr.wrapping_offset(start as isize * self.rs),
            rows: len,
            ..self
        }
    }
    fn cols(self, start: usize, len: usize) -> Dst {
        Dst {
            ptr: self.ptr.wrapping_offset(start as isize * self.cs),
            cols: len,
            ..self
        }
    }
}

impl Src {
    fn from_slice(s: &[f32], rows: usize, cols: usize, op: Op) -> Src {
        assert_eq!(s.len(), rows * cols, "operand slice length");
        let (rs, cs) = match op {
            Op::Plain => (cols as isize, 1),
            Op::Transposed => (1, rows as isize),
        };
        Src(amx::View {
            ptr: s.as_ptr(),
            rows,
            cols,
            rs,
            cs,
        })
    }
    fn rows(self, start: usize, len: usize) -> Src {
        let v = self.0;
        Src(amx::View {
            ptr: v.ptr.wrapping_offset(start as isize * v.rs),
            rows: len,
            ..v
        })
    }
    fn cols(self, start: usize, len: usize) -> Src {
        let v = self.0;
        Src(amx::View {
            ptr: v.ptr.wrapping_offset(start as isize * v.cs),
            cols: len,
            ..v
        })
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

/// Which kernel runs a product's parts: decided once for the whole product, so that every
/// element is summed the same way whatever the split.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// The `gemm` crate.
    Gemm,
    /// AMX tiles (`amx`).
    Tiles,
    /// `narrow`, b packed.
    Narrow,
}

/// dst (m, n) = a (m, k) b (k, n), split over `parts` threads along the larger output dim;
/// `col0` is dst's first column within the whole product, for the epilogue.
fn matmul_split(
    dst: Dst,
    a: Src,
    b: Src,
    parts: usize,
    col0: usize,
    kernel: Kernel,
    epi: Option<Epilogue<'_>>,
) {
    let (m, n) = (dst.rows, dst.cols);
    if parts > 1 && m.max(n) >= 2 * MIN_SPLIT {
        let left = parts / 2;
        // Row-major right-hand sides split best by rows even when n > m (measured at B = 128:
        // 282 us against 309 us for 128x784x400 on two threads); otherwise the larger side.
        // On AMX each part packs its share of the operand it splits and all of the other, so
        // the larger operand is split.
        let (av, bv) = (a.0, b.0);
        let by_rows = match kernel {
            Kernel::Tiles => {
                m >= 2 * MIN_SPLIT && (m >= n || av.rows * av.cols >= bv.rows * bv.cols)
            }
            Kernel::Gemm | Kernel::Narrow => m >= n || (bv.cs == 1 && m >= 2 * MIN_SPLIT),
        };
        if by_rows {
            // Split rows at a multiple of 16 (the kernels' register tile), in proportion to parts.
            let cut = ((m * left / parts) / 16 * 16).clamp(16, m - 16);
            rayon::join(
                || matmul_split(dst.rows(0, cut), a.rows(0, cut), b, left, col0, kernel, epi),
                || {
                    let (d, a) = (dst.rows(cut, m - cut), a.rows(cut, m - cut));
                    matmul_split(d, a, b, parts - left, col0, kernel, epi)
                },
            );
        } else {
            let cut = ((n * left / parts) / 16 * 16).clamp(16, n - 16);
            rayon::join(
                || matmul_split(dst.cols(0, cut), a, b.cols(0, cut), left, col0, kernel, epi),
                || {
                    let (d, b) = (dst.cols(cut, n - cut), b.cols(cut, n - cut));
                    matmul_split(d, a, b, parts - left, col0 + cut, kernel, epi)
                },
            );
        }
        return;
    }
    match kernel {
        // SAFETY: `matmul_on` made dst, a and b from slices whose lengths it checked against
        // the dims, and splits only narrow them, so every element addressed is inside its
        // slice; this part's elements of dst are touched by no other thread. `use_amx` checked
        // that AMX is on and that the strides suit its packing.
        Kernel::Tiles => unsafe { amx::gemm(dst.ptr, dst.rs, dst.cs, a.0, b.0) },
        // SAFETY: as above; b is `matmul_on`'s packed copy (unit column stride, rows padded
        // with zeros to whole vectors, cut only at multiples of 16 columns), dst's column
        // stride is 1 (made by `Dst::from_slice`), and `narrow::takes` held.
        Kernel::Narrow => unsafe { narrow::gemm(dst.ptr, dst.rs, a.0, b.0) },
        // SAFETY: as for the tiles.
        Kernel::Gemm => unsafe { product_on_thread(dst, a, b) },
    }
    if let Some(f) = epi {
        debug_assert_eq!(dst.cs, 1);
        for r in 0..m {
            // SAFETY: row r of this part: n contiguous elements (dst is row-major) inside the
            // destination slice, which no other task touches.
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

fn use_amx(a: &Src, b: &Src) -> bool {
    let (a, b) = (&a.0, &b.0);
    a.rows * a.cols * b.cols >= MIN_AMX_MACS
        && a.rows.min(a.cols).min(b.cols) >= MIN_AMX_SIDE
        && amx::available()
        && amx::supports(a, b)
}

/// dst = a b by the `gemm` crate on this thread.
///
/// # Safety
/// Every element the three matrices address must be valid for reads (a, b) and writes (dst),
/// and no other thread may access dst's elements meanwhile.
#[cfg(not(miri))]
unsafe fn product_on_thread(dst: Dst, a: Src, b: Src) {
    let (a, b) = (a.0, b.0);
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

/// Under Miri, which cannot run the `gemm` crate's SIMD kernels: the same product in plain
/// loops, so the pointer arithmetic of the splits and the epilogue is still checked.
///
/// # Safety
/// As the `gemm` version.
#[cfg(miri)]
unsafe fn product_on_thread(dst: Dst, a: Src, b: Src) {
    let (a, b) = (a.0, b.0);
    for i in 0..dst.rows as isize {
        for j in 0..dst.cols as isize {
            let mut acc = 0.0f32;
            for p in 0..a.cols as isize {
                acc += *a.ptr.offset(i * a.rs + p * a.cs) * *b.ptr.offset(p * b.rs + j * b.cs);
            }
            *dst.ptr.offset(i * dst.rs + j * dst.cs) = acc;
        }
    }
}

/// The instruction set the `gemm` crate's kernels use on this CPU: AVX-512 when the build has
/// the `avx512` feature and the CPU has AVX-512F, else AVX2+FMA where there is FMA.
pub fn gemm_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if cfg!(feature = "avx512") && std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return "avx2";
        }
    }
    "generic"
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
    a_op: Op,
    b: &[f32],
    b_op: Op,
    m: usize,
    k: usize,
    n: usize,
) {
    let parts = product_threads(m, k, n);
    matmul_on(parts, dst, a, a_op, b, b_op, m, k, n, None);
}

/// `matmul` on `parts` threads, then `epi` on each finished row piece.
pub fn matmul_on(
    parts: usize,
    dst: &mut [f32],
    a: &[f32],
    a_op: Op,
    b: &[f32],
    b_op: Op,
    m: usize,
    k: usize,
    n: usize,
    epi: Option<Epilogue<'_>>,
) {
    let a = Src::from_slice(a, m, k, a_op);
    let b = Src::from_slice(b, k, n, b_op);
    if m == 0 || n == 0 {
        assert!(dst.is_empty(), "destination slice length");
        return;
    }
    if k == 0 {
        assert_eq!(dst.len(), m * n, "destination slice length");
        dst.fill(0.0);
        if let Some(f) = epi {
            dst.chunks_exact_mut(n).for_each(|row| f(row, 0));
        }
        return;
    }
    let d = Dst::from_slice(dst, m, n);
    if use_amx(&a, &b) {
        matmul_split(d, a, b, parts.max(1), 0, Kernel::Tiles, epi);
    } else if narrow::takes(n) {
        narrow_packed(d, a, b, parts.max(1), 0, epi);
    } else {
        gemm_with_tail(d, a, b, parts.max(1), gemm_tail(k, n), epi);
    }
}

/// dst = a b on `gemm`, but for its last `tail` columns on `narrow` (`narrow::takes(tail)`).
fn gemm_with_tail(d: Dst, a: Src, b: Src, parts: usize, tail: usize, epi: Option<Epilogue<'_>>) {
    let (m, k, n) = (a.0.rows, a.0.cols, b.0.cols);
    let main = n - tail;
    matmul_split(
        d.cols(0, main),
        a,
        b.cols(0, main),
        parts,
        0,
        Kernel::Gemm,
        epi,
    );
    if tail > 0 {
        let parts = product_threads(m, k, tail).min(parts);
        narrow_packed(d.cols(main, tail), a, b.cols(main, tail), parts, main, epi);
    }
}

/// The last output columns of a wide product that go to `narrow` instead of `gemm`: with its
/// AVX-512 kernels `gemm` works on dst's transpose, 64 of our columns at a time, and runs a
/// last piece of 16-48 on kernels of 1-3 vectors at a fraction of the speed (the output
/// layer's 784 = 12 x 64 + 16 and 400 = 6 x 64 + 16). Measured on AMD EPYC Zen 5, 2 threads
/// (`cargo bench --bench train_step -- matmul/`, medians of 6-8 interleaved runs): h W4^T
/// 228 -> 199 us (its two column halves now equal), dy^T h 191 -> 188 us; 1 thread 1-4% less.
/// Only for k <= `TAIL_MAX_K`:
/// `narrow` sums each output in one chain in k order, as `gemm` does up to its depth block
/// (512 there); dy W4 (k = 784), which `gemm` sums in two blocks, measured no faster.
const TAIL_MAX_K: usize = 512;

fn gemm_tail(k: usize, n: usize) -> usize {
    let tail = n % 64;
    let wide = n > narrow::MAX_COLS && k <= TAIL_MAX_K && gemm_isa() == "avx512";
    if wide && tail > 0 && narrow::takes(tail) {
        tail
    } else {
        0
    }
}

/// dst = a b on `narrow` (`narrow::takes(b.cols)`), b packed once for all threads, rows padded
/// with zeros to whole vectors; `col0` is dst's first column in the whole product.
fn narrow_packed(d: Dst, a: Src, b: Src, parts: usize, col0: usize, epi: Option<Epilogue<'_>>) {
    let (k, n) = (b.0.rows, b.0.cols);
    // The buffer is taken from the thread's cell, not borrowed: a product nested in this
    // one's rayon joins (work stolen while waiting) finds it empty and allocates its own.
    let width = narrow::packed_width(n);
    let mut packed = PACKED.take();
    packed.clear();
    packed.resize(k * width, 0.0);
    let bv = b.0;
    // By 16 rows of b at a time, so that a transposed b is read along its rows and the 16
    // packed rows written stay in L1.
    for (p0, rows) in packed.chunks_mut(16 * width).enumerate() {
        for j in 0..n {
            for (dp, row) in rows.chunks_exact_mut(width).enumerate() {
                let p = (p0 * 16 + dp) as isize;
                // SAFETY: (p, j) is inside b, whose slice `Src::from_slice` checked.
                row[j] = unsafe { *bv.ptr.offset(p * bv.rs + j as isize * bv.cs) };
            }
        }
    }
    let b = Src::from_slice(&packed, k, width, Op::Plain).cols(0, n);
    matmul_split(d, a, b, parts, col0, Kernel::Narrow, epi);
    PACKED.set(packed);
}

thread_local! {
    /// `matmul_on`'s packed copy of a narrow product's b, kept between products.
    static PACKED: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Reference product for tests: f64 accumulation, no blocking.
pub fn matmul_naive(
    dst: &mut [f32],
    a: &[f32],
    a_op: Op,
    b: &[f32],
    b_op: Op,
    m: usize,
    k: usize,
    n: usize,
) {
    let at = |i: usize, p: usize| match a_op {
        Op::Plain => a[i * k + p],
        Op::Transposed => a[p * m + i],
    };
    let bt = |p: usize, j: usize| match b_op {
        Op::Plain => b[p * n + j],
        Op::Transposed => b[j * k + p],
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::tests::{add_column, pseudo};

    fn check(m: usize, k: usize, n: usize, threads: usize) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for la in [Op::Plain, Op::Transposed] {
            for lb in [Op::Plain, Op::Transposed] {
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

    /// The first element of `got` (m, n) farther than 1e-4 from the plain product a b (a
    /// row-major) plus its column (`add_column`'s epilogue), if any.
    fn first_off_plain_plus_column(
        got: &[f32],
        a: &[f32],
        b: &[f32],
        b_op: Op,
        m: usize,
        k: usize,
        n: usize,
    ) -> Option<usize> {
        let mut plain = vec![0.0; m * n];
        matmul_naive(&mut plain, a, Op::Plain, b, b_op, m, k, n);
        got.iter().zip(&plain).enumerate().position(|(i, (x, y))| {
            let close = (x - y - (i % n) as f32).abs() < 1e-4;
            !close
        })
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "large products: minutes under Miri (small_products runs there)"
    )]
    fn matmul_matches_naive_all_layouts() {
        // The last three reach AMX where it is there (the first two with odd sizes).
        for (m, k, n) in [
            (1, 1, 1),
            (3, 5, 2),
            (70, 33, 130),
            (200, 301, 150),
            (784, 128, 400),
            (128, 784, 400),
        ] {
            check(m, k, n, 2);
        }
    }

    /// A wide product's last columns on `narrow` (as `gemm`'s AVX-512 build takes them): every
    /// column against the plain product, both b layouts, 1 and 2 threads, with the epilogue
    /// given each piece's first column.
    #[test]
    #[cfg_attr(miri, ignore = "vector kernels")]
    fn gemm_tail_on_narrow() {
        if !narrow::takes(16) {
            return;
        }
        for (m, k, n, tail) in [(70, 33, 130, 2), (128, 40, 80, 16), (50, 9, 100, 36)] {
            let (a, b) = (pseudo(m * k, 5), pseudo(k * n, 6));
            for b_op in [Op::Plain, Op::Transposed] {
                for threads in [1, 2] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut got = vec![f32::NAN; m * n];
                    let d = Dst::from_slice(&mut got, m, n);
                    let (sa, sb) = (
                        Src::from_slice(&a, m, k, Op::Plain),
                        Src::from_slice(&b, k, n, b_op),
                    );
                    pool.install(|| gemm_with_tail(d, sa, sb, threads, tail, Some(&add_column)));
                    let bad = first_off_plain_plus_column(&got, &a, &b, b_op, m, k, n);
                    assert!(
                        bad.is_none(),
                        "{m}x{k}x{n} tail {tail} {b_op:?} {threads} threads: element {bad:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn small_products_split_and_epilogue() {
        // Small enough for Miri, large enough that both outputs sides split (>= 64): the
        // pointer arithmetic of the parts, and the epilogue over each part's rows.
        check(64, 3, 80, 2);
        check(2, 0, 3, 1);
        let (m, k, n) = (66, 2, 70);
        let (a, b) = (pseudo(m * k, 3), pseudo(k * n, 4));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        // A row-major b splits the rows, a transposed one the columns (m < n).
        for b_op in [Op::Plain, Op::Transposed] {
            let mut with_epi = vec![0.0; m * n];
            pool.install(|| {
                matmul_on(
                    2,
                    &mut with_epi,
                    &a,
                    Op::Plain,
                    &b,
                    b_op,
                    m,
                    k,
                    n,
                    Some(&add_column),
                )
            });
            let bad = first_off_plain_plus_column(&with_epi, &a, &b, b_op, m, k, n);
            assert!(bad.is_none(), "{b_op:?} element {bad:?}");
        }
    }
}
