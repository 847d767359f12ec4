//! Products with a narrow output, n <= 64 columns: the latent block's (h Wh^T: 128x400x40,
//! dy Wd0: 128x400x20, dy^T z: 400x128x20 in the canonical model).
//!
//! The `gemm` crate runs these at 40-75 GFLOP/s on one Zen 5 core: its register tiles and
//! packing are sized for wide outputs. Here each output row is n columns held in registers
//! (on AVX2, above 32 columns, 16 at a time), (rows, n) blocks of sums grow by one rank-1
//! update per k: a broadcast of a's column entry times b's row, which the caller has packed
//! once, zero-padded to a multiple of 16 columns.
//! Every output is a single chain of fused multiply-adds over k in order, whatever the block,
//! split or instruction set, so AVX-512 and AVX2 give the same bits.

use crate::amx::View;

/// Widest output this module takes.
pub const MAX_COLS: usize = 64;

/// Widest output the AVX2 kernel sums in one pass: 4 vectors of 8.
#[cfg(target_arch = "x86_64")]
const AVX2_ONE_PASS: usize = 32;
/// Columns per pass of the AVX2 kernel for wider outputs.
#[cfg(target_arch = "x86_64")]
const AVX2_GROUP: usize = 16;

/// Padded width of b's packed rows for n output columns: whole 16-float vectors.
pub fn packed_width(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// Whether `gemm` runs a product of n output columns here: narrow, and a CPU with FMA vectors
/// (elsewhere `gemm`'s own kernels are kept).
pub fn takes(n: usize) -> bool {
    n <= MAX_COLS && crate::simd::isa() != crate::simd::Isa::Generic
}

/// dst (a.rows, b.cols) = a b, with b packed: unit column stride, row stride a multiple of 16
/// at least `packed_width(b.cols)`, zeros in the padding.
///
/// # Safety
/// Every element a addresses, and every padded row of b, must be readable; dst's rows
/// (`dst_rs` apart, unit column stride) writable and touched by no other thread meanwhile.
/// `takes(b.cols)` must hold.
pub unsafe fn gemm(dst: *mut f32, dst_rs: isize, a: View, b: View) {
    debug_assert!(b.cs == 1 && b.cols <= MAX_COLS && b.rs as usize >= packed_width(b.cols));
    #[cfg(target_arch = "x86_64")]
    {
        match crate::simd::isa() {
            // SAFETY: the CPU has AVX-512 F; the caller's promises carry over.
            crate::simd::Isa::Avx512 => return unsafe { avx512::gemm(dst, dst_rs, a, b) },
            // SAFETY: the CPU has AVX2 and FMA.
            crate::simd::Isa::Avx2 => return unsafe { avx2_grouped(dst, dst_rs, a, b) },
            crate::simd::Isa::Generic => {}
        }
    }
    let _ = (dst, dst_rs, a);
    unreachable!("narrow products need FMA vectors (`takes`)");
}

/// The AVX2 kernel, by groups of columns when the output is wide. More than 4 vectors of sums
/// leave room for only one or two rows in 16 registers (one row alone waits on its FMA
/// latency): then 16 columns at a time, each group passing over all of a. On one Zen 3 core,
/// n = 48: 108 us in one pass of single rows (122 in pairs of rows with a sum spilled), 70 in
/// groups; n = 64: 149 against 95. Each output is the same chain either way.
///
/// # Safety
/// As `gemm`; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
unsafe fn avx2_grouped(dst: *mut f32, dst_rs: isize, a: View, b: View) {
    if b.cols <= AVX2_ONE_PASS {
        // SAFETY: the caller's promises.
        return unsafe { avx2::gemm(dst, dst_rs, a, b) };
    }
    for j0 in (0..b.cols).step_by(AVX2_GROUP) {
        let cols = (b.cols - j0).min(AVX2_GROUP);
        let group = View {
            ptr: b.ptr.wrapping_add(j0),
            cols,
            ..b
        };
        // SAFETY: the group is columns j0..j0 + cols of b (rows still padded to whole vectors
        // past them, inside the packed row) and of dst; the caller's promises carry over.
        unsafe { avx2::gemm(dst.wrapping_add(j0), dst_rs, a, group) };
    }
}

/// One instruction set's kernel: `$width` lanes per `$vec`, blocks of R rows by V vectors.
#[cfg(target_arch = "x86_64")]
macro_rules! kernel {
    ($isa:ident, $feature:literal, $vec:ty, $width:literal, $zero:ident, $set1:ident,
     $load:ident, $store:ident, $fmadd:ident, [$($v:literal => $r:literal),*]) => {
        mod $isa {
            use crate::amx::View;
            use std::arch::x86_64::*;

            /// Sums of rows i0..i0 + R, all V vectors of b's columns.
            ///
            /// # Safety
            /// As `super::gemm`, for those rows; the CPU has `$feature`.
            #[target_feature(enable = $feature)]
            #[inline]
            unsafe fn block<const R: usize, const V: usize>(
                dst: *mut f32,
                dst_rs: isize,
                a: &View,
                b: &View,
                i0: usize,
            ) {
                let mut acc = [[$zero(); V]; R];
                let rows: [*const f32; R] =
                    std::array::from_fn(|r| a.ptr.wrapping_offset((i0 + r) as isize * a.rs));
                for p in 0..a.cols as isize {
                    // SAFETY: row p of packed b holds V whole vectors (the caller's promise).
                    let brow = unsafe { b.ptr.offset(p * b.rs) };
                    let mut bv = [$zero(); V];
                    for (v, x) in bv.iter_mut().enumerate() {
                        // SAFETY: as above.
                        *x = unsafe { $load(brow.add(v * $width)) };
                    }
                    for r in 0..R {
                        // SAFETY: a(i0 + r, p) is inside a.
                        let x = $set1(unsafe { *rows[r].offset(p * a.cs) });
                        for v in 0..V {
                            acc[r][v] = $fmadd(x, bv[v], acc[r][v]);
                        }
                    }
                }
                let n = b.cols;
                for (r, sums) in acc.iter().enumerate() {
                    let mut row = [0.0f32; super::MAX_COLS];
                    for (v, s) in sums.iter().enumerate() {
                        // SAFETY: V * $width <= MAX_COLS floats of the local row.
                        unsafe { $store(row.as_mut_ptr().add(v * $width), *s) };
                    }
                    // SAFETY: row i0 + r of dst has n writable elements, this thread's alone.
                    let out = unsafe { dst.offset((i0 + r) as isize * dst_rs) };
                    unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out, n) };
                }
            }

            /// All of a's rows: blocks of R (sized so sums and b's vectors fit the register
            /// file), then a block of the rest.
            ///
            /// # Safety
            /// As `super::gemm`; the CPU has `$feature`.
            #[target_feature(enable = $feature)]
            unsafe fn rows<const R: usize, const V: usize>(dst: *mut f32, dst_rs: isize, a: View, b: View) {
                let whole = a.rows / R * R;
                for i0 in (0..whole).step_by(R) {
                    // SAFETY: rows i0..i0 + R are a's and dst's.
                    unsafe { block::<R, V>(dst, dst_rs, &a, &b, i0) };
                }
                // The rest in one block too: one row alone would wait on its FMA latency.
                // SAFETY: as above, for the rows left.
                unsafe {
                    match a.rows - whole {
                        0 => {}
                        1 => block::<1, V>(dst, dst_rs, &a, &b, whole),
                        2 => block::<2, V>(dst, dst_rs, &a, &b, whole),
                        3 => block::<3, V>(dst, dst_rs, &a, &b, whole),
                        4 => block::<4, V>(dst, dst_rs, &a, &b, whole),
                        5 => block::<5, V>(dst, dst_rs, &a, &b, whole),
                        6 => block::<6, V>(dst, dst_rs, &a, &b, whole),
                        7 => block::<7, V>(dst, dst_rs, &a, &b, whole),
                        _ => unreachable!("blocks are at most 8 rows"),
                    }
                }
            }

            /// # Safety
            /// As `super::gemm`; the CPU has `$feature`.
            pub unsafe fn gemm(dst: *mut f32, dst_rs: isize, a: View, b: View) {
                match b.cols.div_ceil($width) {
                    // SAFETY: the caller's promises; V vectors cover b's columns.
                    $($v => unsafe { rows::<$r, $v>(dst, dst_rs, a, b) },)*
                    _ => unreachable!("at most {} columns", super::MAX_COLS),
                }
            }
        }
    };
}

// 32 registers: R * V sums plus V of b's vectors and a broadcast.
#[cfg(target_arch = "x86_64")]
kernel!(avx512, "avx512f", __m512, 16, _mm512_setzero_ps, _mm512_set1_ps, _mm512_loadu_ps,
    _mm512_storeu_ps, _mm512_fmadd_ps, [1 => 8, 2 => 8, 3 => 6, 4 => 6]);
// 16 registers: R * V sums, V of b's vectors and a broadcast must fit, or a sum is spilled to
// the stack and reloaded every k (3 vectors by 4 rows did: 61 us for dy Wd0 on one Zen 3 core,
// 31 us by 3 rows).
#[cfg(target_arch = "x86_64")]
kernel!(avx2, "avx2,fma", __m256, 8, _mm256_setzero_ps, _mm256_set1_ps, _mm256_loadu_ps,
    _mm256_storeu_ps, _mm256_fmadd_ps,
    [1 => 8, 2 => 6, 3 => 3, 4 => 2, 5 => 2, 6 => 1, 7 => 1, 8 => 1]);

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::layers::tests::{add_column, pseudo, same_bits};
    use crate::matmul::{matmul_on, Op};

    /// a (m, k) b (k, n) as one fused multiply-add chain per output, in k order.
    fn chain(a: &[f32], a_op: Op, b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f32;
                for p in 0..k {
                    let x = match a_op {
                        Op::Plain => a[i * k + p],
                        Op::Transposed => a[p * m + i],
                    };
                    acc = x.mul_add(b[p * n + j], acc);
                }
                out[i * n + j] = acc;
            }
        }
        out
    }

    const SHAPES: [(usize, usize, usize); 8] = [
        (1, 1, 1),
        (7, 13, 5),
        (9, 37, 16),
        (13, 40, 17),
        (128, 400, 20),
        (25, 11, 40),
        (17, 3, 49),
        (31, 64, 64),
    ];

    #[test]
    #[cfg_attr(miri, ignore = "SIMD intrinsics")]
    fn each_kernel_sums_each_output_as_one_chain() {
        // Both instruction sets this CPU has, called directly, so the AVX2 kernel is checked
        // on AVX-512 machines too: every block size and tail gives the chain's exact bits.
        use std::arch::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma");
        let avx512 = avx2 && has!("avx512f");
        for (m, k, n) in SHAPES {
            for a_op in [Op::Plain, Op::Transposed] {
                let (a, b) = (pseudo(m * k, 1), pseudo(k * n, 2));
                let want = chain(&a, a_op, &b, m, k, n);
                let width = packed_width(n);
                let mut packed = vec![0.0f32; k * width];
                for p in 0..k {
                    packed[p * width..p * width + n].copy_from_slice(&b[p * n..(p + 1) * n]);
                }
                let (rs, cs) = match a_op {
                    Op::Plain => (k as isize, 1),
                    Op::Transposed => (1, m as isize),
                };
                let av = View {
                    ptr: a.as_ptr(),
                    rows: m,
                    cols: k,
                    rs,
                    cs,
                };
                let bv = View {
                    ptr: packed.as_ptr(),
                    rows: k,
                    cols: n,
                    rs: width as isize,
                    cs: 1,
                };
                type Kernel = unsafe fn(*mut f32, isize, View, View);
                let kernels: [(&str, bool, Kernel); 3] = [
                    ("avx512", avx512, avx512::gemm),
                    ("avx2", avx2, avx2::gemm),
                    ("avx2 by groups", avx2, avx2_grouped),
                ];
                for (name, present, kernel) in kernels {
                    if !present {
                        continue;
                    }
                    let mut got = vec![f32::NAN; m * n];
                    // SAFETY: the views address a's and packed's elements, got has m rows of
                    // n, and the CPU has the kernel's instruction set.
                    unsafe { kernel(got.as_mut_ptr(), n as isize, av, bv) };
                    assert!(same_bits(&got, &want), "{name} {m}x{k}x{n} {a_op:?}");
                }
            }
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "SIMD intrinsics")]
    fn products_through_matmul_split_and_pack() {
        // Through `matmul_on`: b packed from either layout, the rows (or, for 64 columns and
        // few rows, the columns) split over two threads, the epilogue on each part.
        if !takes(1) {
            return;
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for (m, k, n) in SHAPES.into_iter().chain([(70, 5, 64), (200, 9, 33)]) {
            let a = pseudo(m * k, 3);
            let b = pseudo(k * n, 4);
            let mut bt = vec![0.0; k * n];
            for p in 0..k {
                for j in 0..n {
                    bt[j * k + p] = b[p * n + j];
                }
            }
            for a_op in [Op::Plain, Op::Transposed] {
                let mut want = chain(&a, a_op, &b, m, k, n);
                want.chunks_exact_mut(n).for_each(|row| add_column(row, 0));
                for (b_op, bs) in [(Op::Plain, &b), (Op::Transposed, &bt)] {
                    for parts in [1, 2] {
                        let mut got = vec![f32::NAN; m * n];
                        pool.install(|| {
                            matmul_on(
                                parts,
                                &mut got,
                                &a,
                                a_op,
                                bs,
                                b_op,
                                m,
                                k,
                                n,
                                Some(&add_column),
                            )
                        });
                        let same = same_bits(&got, &want);
                        assert!(same, "{m}x{k}x{n} {a_op:?} {b_op:?} on {parts}");
                    }
                }
            }
        }
    }
}
