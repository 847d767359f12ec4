//! Float32 matrix products on AMX tiles, to float32 rounding.
//!
//! AMX multiplies bfloat16 (8-bit significand) and sums in float32. Each float32 operand x is
//! split into three bfloat16 parts by truncation, x = hi + mid + lo exactly (8 + 8 + 8 bits of
//! the 24-bit significand; only |x| < 2^-110 loses its last part). A product a b then is
//! the sum of six part products, hi hi + hi mid + mid hi + hi lo + lo hi + mid mid; the three
//! left out are each below 2^-24 |a b|, so every term of the sum is the float32 product to
//! within about an ulp. The part products are exact in float32 and are summed in float32,
//! as a float32 product sums its terms, so the result matches a float32 product to rounding
//! (the tests hold it within 4e-7 of sum |a b| of a float64 reference, about the error of a
//! float32 dot product of those sizes).
//! Like the pool's threads, AMX flushes subnormals to zero.
//!
//! Six tile products per 16 x 16 x 32 block still beat AVX-512 FMA on this hardware: at
//! B = 128 the tile products run at 290-420 GFLOP/s per core, 190-330 with the packing,
//! against 150-180 for `gemm`.
//!
//! Layout of the packed operands, all 64-byte aligned:
//! - A (m, k): for each block of 16 rows, for each chunk of 32 columns, three tiles (hi, mid,
//!   lo) of 16 rows x 32 bfloat16.
//! - B (k, n): for each block of 16 columns, for each chunk of 32 rows, three tiles of 16 rows
//!   of row pairs x 16 columns x 2 (the pair (2p, 2p + 1) of column j at row p, place j), the
//!   layout TDPBF16PS reads.
//!
//! Only Linux on x86-64 grants the tile state (arch_prctl), so elsewhere `available` is false
//! and products go to `gemm`. `FASTVAE_AMX=0` in the environment turns AMX off.

// The kernels take their dims explicitly and index the three parts' lane blocks by position.
#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]
// Each unsafe operation, inside unsafe functions too, sits in a block that says why it is sound.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::cell::RefCell;
use std::sync::OnceLock;

/// Whether products may run on AMX: the CPU has AMX-BF16, the kernel granted the tile state,
/// and FASTVAE_AMX is not "0". Decided once per process.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    // The packing runs on AVX-512, so a cap below it (FASTVAE_ISA=avx2) turns AMX off too.
    *AVAILABLE.get_or_init(|| {
        std::env::var("FASTVAE_AMX").map_or(true, |v| v != "0")
            && crate::simd::isa() == crate::simd::Isa::Avx512
            && detect()
    })
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    let (max_leaf, leaf7) = (__cpuid_count(0, 0).eax, __cpuid_count(7, 0));
    let amx_bf16 = leaf7.edx & (1 << 22) != 0;
    let amx_tile = leaf7.edx & (1 << 24) != 0;
    let avx512 = std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw");
    if max_leaf < 7 || !amx_bf16 || !amx_tile || !avx512 {
        return false;
    }
    // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): ask for the tile data state for the
    // whole process (Linux 5.16 on); any error means no AMX.
    let ret: i64;
    // SAFETY: arch_prctl takes integers here (a code and a feature number, no pointer) and
    // only changes which xsave features the kernel lets this process use; it reads and writes
    // none of our memory or stack, and the registers the instruction overwrites (rax with the
    // result, rcx, r11) are declared.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") 158i64 => ret,
            in("rdi") 0x1023i64,
            in("rsi") 18i64,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// A tile holds 16 rows of 64 bytes.
const TILE_U16: usize = 512;

/// One cache line of bfloat16, so buffers are 64-byte aligned (a tile load across lines runs
/// at half speed or worse).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; 32]);

thread_local! {
    /// This thread's packed A and B, kept between calls.
    static PACKS: RefCell<(Vec<Line>, Vec<Line>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The first `tiles` tiles of `buf`, grown when short (never shrunk: the products of a step
/// alternate in size, and regrowing would zero the difference every time).
fn lines(buf: &mut Vec<Line>, tiles: usize) -> &mut [u16] {
    let need = tiles * TILE_U16 / 32;
    if buf.len() < need {
        buf.resize(need, Line([0; 32]));
    }
    // SAFETY: a Line is exactly 32 initialized u16 (64 bytes, no padding) and aligned for
    // u16; the vector holds at least `need` lines, and the slice reborrows it mutably for as
    // long as the slice lives, so nothing else reads or writes them meanwhile.
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u16>(), need * 32) }
}

/// A strided read-only matrix: element (i, j) at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub struct View {
    pub ptr: *const f32,
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
}

/// Whether `gemm` can pack these operands: each must have unit stride along one dimension.
pub fn supports(a: &View, b: &View) -> bool {
    (a.cs == 1 || a.rs == 1) && (b.cs == 1 || b.rs == 1)
}

/// dst (m, n) = a (m, k) b (k, n); dst element (i, j) at `dst + i * drs + j * dcs`.
///
/// # Safety
/// - `available()` must have returned true: the CPU has AMX-TILE, AMX-BF16, AVX-512F and
///   AVX-512BW, and the kernel granted this process the tile state.
/// - `supports(a, b)`, `b.rows == a.cols`, and m, k and n are at least 1.
/// - Every element (i, j) of a and of b, i < rows and j < cols at their strides, must be
///   valid for reads, and every element (i, j) of dst, i < m and j < n, valid for reads
///   and writes.
/// - dst's elements must not overlap a's or b's, and until the call returns no other thread
///   may access dst's elements or write a's or b's.
pub unsafe fn gemm(dst: *mut f32, drs: isize, dcs: isize, a: View, b: View) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    debug_assert_eq!(b.rows, k);
    let (mb, kc, nb) = (m.div_ceil(16), k.div_ceil(32), n.div_ceil(16));
    PACKS.with(|packs| {
        let mut packs = packs.borrow_mut();
        let (pa, pb) = &mut *packs;
        let pa = lines(pa, mb * kc * 3);
        // SAFETY: `available()` means AVX-512F and BW; a is readable and has a unit stride
        // (the caller's word); pa is 64-byte aligned (made of Lines), and its length is checked.
        unsafe { pack_a(pa, a) };
        // B a panel of two column blocks at a time, packed just before its products: as fast
        // as packing it whole (measured), with a buffer of one panel.
        let pb = lines(pb, 2 * kc * 3);
        for j0 in (0..nb).step_by(2).map(|jb| jb * 16) {
            let w = (n - j0).min(32);
            // SAFETY: j0 < n and k >= 1, so this is element (0, j0) of b, inside its allocation.
            let ptr = unsafe { b.ptr.offset(j0 as isize * b.cs) };
            let panel = View { ptr, cols: w, ..b };
            // SAFETY: as for pack_a; the panel is columns j0..j0 + w of b, so readable.
            unsafe { pack_b(pb, panel) };
            if w <= 16 {
                pb[kc * 3 * TILE_U16..].fill(0);
            }
            // SAFETY: element (0, j0) of dst, as above. The tile state is granted; pa holds
            // all mb row blocks and pb the panel's two column blocks (the second zeroed when
            // the panel is one block wide), kc chunks each; columns j0..j0 + w of dst are
            // writable and ours alone (the caller's word).
            unsafe {
                let d = dst.offset(j0 as isize * dcs);
                multiply(d, drs, dcs, pa, pb, m, w, kc);
            }
        }
    });
}

/// The three bfloat16 parts of 16 floats, each in the high half of a 32-bit lane (low half 0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn split3(x: std::arch::x86_64::__m512) -> [std::arch::x86_64::__m512i; 3] {
    use std::arch::x86_64::*;
    let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let hi = _mm512_and_si512(_mm512_castps_si512(x), high);
    let r = _mm512_sub_ps(x, _mm512_castsi512_ps(hi));
    let mid = _mm512_and_si512(_mm512_castps_si512(r), high);
    let r2 = _mm512_sub_ps(r, _mm512_castsi512_ps(mid));
    let lo = _mm512_and_si512(_mm512_castps_si512(r2), high);
    [hi, mid, lo]
}

/// 16 bfloat16 pairs (x0[i], x1[i]) as 32-bit lanes: x0's part low, x1's high.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn pairs(
    p0: std::arch::x86_64::__m512i,
    p1: std::arch::x86_64::__m512i,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    _mm512_or_si512(_mm512_srli_epi32::<16>(p0), p1)
}

/// Load up to 16 floats from a unit-stride run of `len`, zeros past it.
///
/// # Safety
/// The CPU must have AVX-512F and BW, and the first min(len, 16) floats at p must be valid
/// for reads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn load16(p: *const f32, len: usize) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    if len >= 16 {
        // SAFETY: 16 readable floats at p (the caller's word); loadu needs no alignment.
        unsafe { _mm512_loadu_ps(p) }
    } else {
        // SAFETY: the mask enables the first len lanes only, and a masked load does not
        // access the memory of lanes it leaves off.
        unsafe { _mm512_maskz_loadu_ps(((1u32 << len) - 1) as u16, p) }
    }
}

/// Transpose 16 rows of 16 32-bit lanes in place.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn transpose16(r: &mut [std::arch::x86_64::__m512i; 16]) {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    // u[4g + e]: rows 4g..4g + 4, element 4L + e in 128-bit lane L.
    let mut u = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
        u[4 * g] = _mm512_unpacklo_epi64(a, c);
        u[4 * g + 1] = _mm512_unpackhi_epi64(a, c);
        u[4 * g + 2] = _mm512_unpacklo_epi64(b, d);
        u[4 * g + 3] = _mm512_unpackhi_epi64(b, d);
    }
    let mut v = [_mm512_setzero_si512(); 16];
    for e in 0..4 {
        v[e] = _mm512_shuffle_i32x4::<0x88>(u[e], u[4 + e]);
        v[4 + e] = _mm512_shuffle_i32x4::<0xdd>(u[e], u[4 + e]);
        v[8 + e] = _mm512_shuffle_i32x4::<0x88>(u[8 + e], u[12 + e]);
        v[12 + e] = _mm512_shuffle_i32x4::<0xdd>(u[8 + e], u[12 + e]);
    }
    for e in 0..4 {
        r[e] = _mm512_shuffle_i32x4::<0x88>(v[e], v[8 + e]);
        r[8 + e] = _mm512_shuffle_i32x4::<0xdd>(v[e], v[8 + e]);
        r[4 + e] = _mm512_shuffle_i32x4::<0x88>(v[4 + e], v[12 + e]);
        r[12 + e] = _mm512_shuffle_i32x4::<0xdd>(v[4 + e], v[12 + e]);
    }
}

/// Store row r (64 bytes) of each part's tile at `o`.
///
/// # Safety
/// The CPU must have AVX-512F and BW; r < 16, and o must be 64-byte aligned and start three
/// tiles (3 * TILE_U16 u16) valid for writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn put3(o: *mut u16, r: usize, v: [std::arch::x86_64::__m512i; 3]) {
    use std::arch::x86_64::*;
    for (part, v) in v.into_iter().enumerate() {
        // SAFETY: row r of tile `part` lies within the three tiles at o, and starts a
        // multiple of 32 u16 (64 bytes) past it, so the aligned store is aligned.
        unsafe { _mm512_store_si512(o.add(part * TILE_U16 + r * 32).cast(), v) };
    }
}

/// 32 floats' parts in order, each narrowed to 16 bits: one tile row per part.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn narrow32(
    x0: std::arch::x86_64::__m512,
    x1: std::arch::x86_64::__m512,
) -> [std::arch::x86_64::__m512i; 3] {
    use std::arch::x86_64::*;
    let (s0, s1) = (split3(x0), split3(x1));
    let mut out = [_mm512_setzero_si512(); 3];
    for part in 0..3 {
        let lo = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(s0[part]));
        let hi = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(s1[part]));
        out[part] = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
    }
    out
}

/// Two runs of up to 16 floats (either may be absent: zeros) as 16 pairs per part.
///
/// # Safety
/// The CPU must have AVX-512F and BW, and each run given must have min(len, 16) floats valid
/// for reads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn pair_runs(
    p0: Option<*const f32>,
    p1: Option<*const f32>,
    len: usize,
) -> [std::arch::x86_64::__m512i; 3] {
    use std::arch::x86_64::*;
    let zero = _mm512_setzero_ps();
    // SAFETY: the caller's word, for each run given.
    let s0 = split3(p0.map_or(zero, |p| unsafe { load16(p, len) }));
    // SAFETY: as above.
    let s1 = split3(p1.map_or(zero, |p| unsafe { load16(p, len) }));
    [
        pairs(s0[0], s1[0]),
        pairs(s0[1], s1[1]),
        pairs(s0[2], s1[2]),
    ]
}

/// Transpose the three parts' 16 x 16 lane blocks and store them as tiles at `o`.
///
/// # Safety
/// As `put3`: AVX-512F and BW, and o 64-byte aligned at three tiles valid for writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn put_transposed(o: *mut u16, blocks: &mut [[std::arch::x86_64::__m512i; 16]; 3]) {
    use std::arch::x86_64::*;
    for (part, block) in blocks.iter_mut().enumerate() {
        transpose16(block);
        for (r, v) in block.iter().enumerate() {
            // SAFETY: as in `put3`, r < 16.
            unsafe { _mm512_store_si512(o.add(part * TILE_U16 + r * 32).cast(), *v) };
        }
    }
}

/// Pack A (m, k) as described in the module notes. Rows and columns past the ends are zeros.
///
/// # Safety
/// The CPU must have AVX-512F and BW; a must have unit stride along one dimension
/// (`supports`) and every element (i, j), i < m and j < k, valid for reads; `out` must be
/// 64-byte aligned (its length is checked).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_a(out: &mut [u16], a: View) {
    use std::arch::x86_64::*;
    let (m, k) = (a.rows, a.cols);
    let kc = k.div_ceil(32);
    assert!(out.len() >= m.div_ceil(16) * kc * 3 * TILE_U16);
    let zero = [_mm512_setzero_si512(); 3];
    for ib in 0..m.div_ceil(16) {
        let mw = (m - ib * 16).min(16);
        for c in 0..kc {
            // SAFETY: group (ib, c) of three tiles, inside `out` by the assert.
            let o = unsafe { out.as_mut_ptr().add((ib * kc + c) * 3 * TILE_U16) };
            let k0 = c * 32;
            let kw = (k - k0).min(32);
            if a.cs == 1 {
                for r in 0..16 {
                    if r < mw {
                        // SAFETY: row ib * 16 + r < m of a, from column k0 < k: a run of kw
                        // readable floats at unit stride, the second 16 of them from p + 16
                        // when kw > 16. o starts three tiles at a multiple of 3 * TILE_U16
                        // u16 into 64-byte aligned `out`, so it is aligned too; r < 16.
                        unsafe {
                            let p = a.ptr.offset((ib * 16 + r) as isize * a.rs + k0 as isize);
                            let x1 = if kw > 16 {
                                load16(p.add(16), kw - 16)
                            } else {
                                _mm512_setzero_ps()
                            };
                            put3(o, r, narrow32(load16(p, kw), x1));
                        }
                    } else {
                        // SAFETY: o as above, r < 16.
                        unsafe { put3(o, r, zero) };
                    }
                }
            } else {
                // Unit stride down the rows (rs == 1): pair columns (2p, 2p + 1) for the 16
                // rows, lane = row, then transpose so lane = pair.
                let mut blocks = [[_mm512_setzero_si512(); 16]; 3];
                for p in 0..16 {
                    let col = |j: usize| {
                        // SAFETY: for j < k only: element (ib * 16, j) of a.
                        (j < k).then(|| unsafe {
                            a.ptr.offset(j as isize * a.cs + (ib * 16) as isize)
                        })
                    };
                    // SAFETY: `supports` and cs != 1 leave rs == 1, so each column given
                    // has rows ib * 16 .. ib * 16 + mw, all < m, at unit stride.
                    let v = unsafe { pair_runs(col(k0 + 2 * p), col(k0 + 2 * p + 1), mw) };
                    for part in 0..3 {
                        blocks[part][p] = v[part];
                    }
                }
                // SAFETY: o as above.
                unsafe { put_transposed(o, &mut blocks) };
            }
        }
    }
}

/// Pack B (k, n) as described in the module notes. Rows and columns past the ends are zeros.
///
/// # Safety
/// As `pack_a`, for b (k, n).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_b(out: &mut [u16], b: View) {
    use std::arch::x86_64::*;
    let (k, n) = (b.rows, b.cols);
    let kc = k.div_ceil(32);
    assert!(out.len() >= n.div_ceil(16) * kc * 3 * TILE_U16);
    for jb in 0..n.div_ceil(16) {
        let j0 = jb * 16;
        let nw = (n - j0).min(16);
        for c in 0..kc {
            // SAFETY: group (jb, c) of three tiles, inside `out` by the assert.
            let o = unsafe { out.as_mut_ptr().add((jb * kc + c) * 3 * TILE_U16) };
            let k0 = c * 32;
            if b.cs == 1 {
                // Tile row p: rows 2p and 2p + 1 of B across the 16 columns, paired by lane.
                let row = |i: usize| {
                    // SAFETY: for i < k only: element (i, j0) of b.
                    (i < k).then(|| unsafe { b.ptr.offset(i as isize * b.rs + j0 as isize) })
                };
                for p in 0..16 {
                    // SAFETY: each row given has columns j0 .. j0 + nw, all < n, at unit
                    // stride. o starts three tiles at a multiple of 3 * TILE_U16 u16 into
                    // 64-byte aligned `out`, so it is aligned too; p < 16.
                    unsafe { put3(o, p, pair_runs(row(k0 + 2 * p), row(k0 + 2 * p + 1), nw)) };
                }
            } else {
                // Unit stride down each column (rs == 1): its 32 rows narrowed in order are
                // already the 16 pairs, lane = pair; one column per block row, then transpose.
                let kw = (k - k0).min(32);
                let mut blocks = [[_mm512_setzero_si512(); 16]; 3];
                for jj in 0..nw {
                    // SAFETY: `supports` and cs != 1 leave rs == 1, so column j0 + jj < n
                    // from row k0 < k is a run of kw readable floats at unit stride, the
                    // second 16 of them from q + 16 when kw > 16.
                    let v = unsafe {
                        let q = b.ptr.offset((j0 + jj) as isize * b.cs + k0 as isize);
                        let x1 = if kw > 16 {
                            load16(q.add(16), kw - 16)
                        } else {
                            _mm512_setzero_ps()
                        };
                        narrow32(load16(q, kw), x1)
                    };
                    for part in 0..3 {
                        blocks[part][jj] = v[part];
                    }
                }
                // SAFETY: o as above.
                unsafe { put_transposed(o, &mut blocks) };
            }
        }
    }
}

/// Chunks of 32 summed per pass over the row blocks (see `multiply`).
#[cfg(target_arch = "x86_64")]
const KB: usize = 4;

/// The tile configuration: palette 1, eight tiles of 16 rows x 64 bytes.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// dst = A B from the packs, by pairs of 16-column blocks down all row blocks.
///
/// The tile registers carry sums from one `asm!` block to the next. The compiler allocates
/// no tile registers of its own (nothing here uses AMX intrinsics), so nothing else writes
/// them in between; Rust's rules for inline assembly do not promise that for registers a
/// block does not name, and tile registers can only be named as clobbers, so this rests on
/// how the compiler works rather than on a guarantee.
///
/// # Safety
/// `available()` must have returned true (AVX-512F and BW, and the tile state granted). pa
/// must hold m.div_ceil(16) row blocks and pb n.div_ceil(32) pairs of column blocks, each of
/// kc chunks of three tiles, packed by `pack_a` and `pack_b` (their lengths are checked).
/// Every element (i, j) of dst, i < m and j < n, must be valid for reads and writes,
/// outside pa and pb, and accessed by nothing else until the call returns (whole tiles are
/// summed in dst, read back after this call has stored them).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn multiply(
    dst: *mut f32,
    drs: isize,
    dcs: isize,
    pa: &[u16],
    pb: &[u16],
    m: usize,
    n: usize,
    kc: usize,
) {
    use std::arch::asm;
    let (mb, nb) = (m.div_ceil(16), n.div_ceil(16));
    let stride = 64usize;
    let block = kc * 3 * TILE_U16;
    assert!(pa.len() >= mb * block && pb.len() >= nb.div_ceil(2) * 2 * block);
    let mut config = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    config.colsb[..8].fill(64);
    config.rows[..8].fill(16);
    // SAFETY: the tile state is granted (the caller's word), and config is a valid palette 1
    // configuration (eight tiles of 16 rows of 64 bytes), 64 readable bytes.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly)) };
    // Edge tiles pass through here; whole ones never do, so it is left unfilled.
    #[repr(C, align(64))]
    struct Out([f32; 512]);
    let mut out = std::mem::MaybeUninit::<Out>::uninit();
    let out = out.as_mut_ptr().cast::<f32>();
    // Chunks [c0, c1) of row block ib into tmm0 (column block jb) and tmm1 (jb + 1).
    let chunks = |ib: usize, jb: usize, cs: std::ops::Range<usize>| {
        for c in cs {
            // SAFETY: ib < mb, jb + 1 < nb rounded up to even, and c < kc, so a is chunk c of
            // row block ib in pa, and b0 and b1 chunk c of column blocks jb and jb + 1 in pb
            // (by the assert); each tileloadd reads one tile there, 16 rows of 64 bytes at
            // stride 64, and tdpbf16ps touches only tile registers.
            unsafe {
                let a = pa.as_ptr().add(ib * block + c * 3 * TILE_U16);
                let b0 = pb.as_ptr().add(jb * block + c * 3 * TILE_U16);
                let b1 = b0.add(block);
                // tmm2-4: A's hi, mid, lo; tmm5-7: B's parts in turn. The six part products
                // into tmm0 and tmm1, interleaved.
                asm!(
                    "tileloadd tmm2, [{a} + {s}*1]",
                    "tileloadd tmm5, [{b0} + {s}*1]",
                    "tileloadd tmm6, [{b1} + {s}*1]",
                    "tileloadd tmm7, [{b0} + {s}*1 + 1024]",
                    "tileloadd tmm3, [{a} + {s}*1 + 1024]",
                    "tileloadd tmm4, [{a} + {s}*1 + 2048]",
                    "tdpbf16ps tmm0, tmm2, tmm5",
                    "tdpbf16ps tmm1, tmm2, tmm6",
                    "tdpbf16ps tmm0, tmm2, tmm7",
                    "tdpbf16ps tmm0, tmm3, tmm5",
                    "tdpbf16ps tmm1, tmm3, tmm6",
                    "tdpbf16ps tmm0, tmm3, tmm7",
                    "tileloadd tmm7, [{b1} + {s}*1 + 1024]",
                    "tdpbf16ps tmm0, tmm4, tmm5",
                    "tileloadd tmm5, [{b0} + {s}*1 + 2048]",
                    "tdpbf16ps tmm1, tmm4, tmm6",
                    "tileloadd tmm6, [{b1} + {s}*1 + 2048]",
                    "tdpbf16ps tmm1, tmm2, tmm7",
                    "tdpbf16ps tmm1, tmm3, tmm7",
                    "tdpbf16ps tmm0, tmm2, tmm5",
                    "tdpbf16ps tmm1, tmm2, tmm6",
                    a = in(reg) a,
                    b0 = in(reg) b0,
                    b1 = in(reg) b1,
                    s = in(reg) stride,
                    options(nostack, readonly),
                );
            }
        }
    };
    for jb in (0..nb).step_by(2) {
        // Whole tiles are summed KB chunks at a time over all row blocks, their partial sums
        // kept in dst, so the panel's KB chunks of B (24 KB) are read from L1 by every row
        // block (measured 103 us against 119 for half of 128x400x784 on one thread).
        let whole_cols = dcs == 1 && n - jb * 16 >= 32;
        for k0 in (0..kc).step_by(KB) {
            for ib in 0..mb {
                if whole_cols && m - ib * 16 >= 16 {
                    // SAFETY: rows ib * 16 .. ib * 16 + 16 <= m and columns jb * 16 ..
                    // jb * 16 + 32 <= n of dst, with dcs == 1 so each row's 32 floats are
                    // contiguous: d and d + 16 start two tiles of 16 rows of 64 bytes at a
                    // stride of drs floats, loaded once this call has stored them (k0 > 0).
                    unsafe {
                        let d = dst.offset((ib * 16) as isize * drs + (jb * 16) as isize);
                        if k0 == 0 {
                            asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
                        } else {
                            asm!(
                                "tileloadd tmm0, [{d} + {s}*1]",
                                "tileloadd tmm1, [{d1} + {s}*1]",
                                d = in(reg) d,
                                d1 = in(reg) d.add(16),
                                s = in(reg) drs * 4,
                                options(nostack, readonly),
                            );
                        }
                        chunks(ib, jb, k0..(k0 + KB).min(kc));
                        asm!(
                            "tilestored [{d} + {s}*1], tmm0",
                            "tilestored [{d1} + {s}*1], tmm1",
                            d = in(reg) d,
                            d1 = in(reg) d.add(16),
                            s = in(reg) drs * 4,
                            options(nostack),
                        );
                    }
                    continue;
                }
                if k0 > 0 {
                    continue;
                }
                // An edge tile: all chunks at once, then copied out through `out`.
                // SAFETY: out is 2048 bytes, 64-byte aligned, of which each tilestored writes
                // one half, 16 rows of 64 bytes at stride 64.
                unsafe {
                    asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
                    chunks(ib, jb, 0..kc);
                    asm!(
                        "tilestored [{o} + {s}*1], tmm0",
                        "tilestored [{o} + {s}*1 + 1024], tmm1",
                        o = in(reg) out,
                        s = in(reg) stride,
                        options(nostack),
                    );
                }
                // SAFETY: the two tiles just stored initialized all 512 floats, and nothing
                // writes them while this slice lives.
                let tiles = unsafe { std::slice::from_raw_parts(out, 512) };
                let rows = (m - ib * 16).min(16);
                for half in 0..2 {
                    let j0 = (jb + half) * 16;
                    if j0 >= n {
                        break;
                    }
                    let cols = (n - j0).min(16);
                    for r in 0..rows {
                        let src = &tiles[half * 256 + r * 16..half * 256 + r * 16 + cols];
                        // SAFETY: elements (ib * 16 + r, j0 + j) of dst with ib * 16 + r < m
                        // and j0 + j < n, writable and ours (the caller's word).
                        unsafe {
                            let d = dst.offset((ib * 16 + r) as isize * drs + j0 as isize * dcs);
                            for (j, &v) in src.iter().enumerate() {
                                *d.offset(j as isize * dcs) = v;
                            }
                        }
                    }
                }
            }
        }
    }
    // SAFETY: the tile state is granted; this returns the tiles to their initial state.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// # Safety
/// Never called: `available` is false off x86-64, and `gemm` requires it.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_a(_: &mut [u16], _: View) {
    unreachable!("AMX is x86-64 only")
}
/// # Safety
/// Never called, as `pack_a`.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_b(_: &mut [u16], _: View) {
    unreachable!("AMX is x86-64 only")
}
/// # Safety
/// Never called, as `pack_a`.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn multiply(
    _: *mut f32,
    _: isize,
    _: isize,
    _: &[u16],
    _: &[u16],
    _: usize,
    _: usize,
    _: usize,
) {
    unreachable!("AMX is x86-64 only")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::tests::pseudo;
    use std::io::Write;

    /// Say on stderr that a test did not run, and why. libtest captures `eprintln!` in tests
    /// that pass, but not writes to the stderr handle.
    fn skipped(test: &str, why: &str) {
        let _ = writeln!(std::io::stderr(), "note: {test} skipped: {why}");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    #[cfg_attr(miri, ignore = "AVX-512 intrinsics, and Miri detects no AVX-512")]
    fn transpose16_transposes() {
        if !(std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw"))
        {
            skipped(
                "amx::tests::transpose16_transposes",
                "this CPU has no AVX-512F and BW",
            );
            return;
        }
        use std::arch::x86_64::*;
        let src: Vec<i32> = (0..256).collect();
        // SAFETY: the CPU has AVX-512F (checked above).
        let mut r = [unsafe { _mm512_setzero_si512() }; 16];
        for (i, row) in r.iter_mut().enumerate() {
            // SAFETY: the CPU has AVX-512F (checked above); src[i * 16..] holds at least the
            // 16 i32 read, as i < 16; loadu needs no alignment.
            *row = unsafe { _mm512_loadu_si512(src[i * 16..].as_ptr().cast()) };
        }
        // SAFETY: the CPU has AVX-512F and BW, the features transpose16 is compiled for.
        unsafe { transpose16(&mut r) };
        let mut out = vec![0i32; 256];
        for (i, row) in r.iter().enumerate() {
            // SAFETY: as the loads above, into out's 16 i32 from i * 16.
            unsafe { _mm512_storeu_si512(out[i * 16..].as_mut_ptr().cast(), *row) };
        }
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(out[i * 16 + j], src[j * 16 + i]);
            }
        }
    }

    /// Every layout and ragged sizes, against a float64 reference: the error, relative to
    /// sum |a b| per element, stays at float32 rounding.
    #[test]
    #[cfg_attr(miri, ignore = "AMX detection runs cpuid and a syscall as inline asm")]
    fn matches_float64_reference() {
        if !available() {
            let why = if std::env::var("FASTVAE_AMX").is_ok_and(|v| v == "0") {
                "FASTVAE_AMX=0 turns AMX off"
            } else {
                "this CPU (or kernel) has no AMX"
            };
            skipped("amx::tests::matches_float64_reference", why);
            return;
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (16, 32, 16),
            (17, 33, 15),
            (128, 400, 784),
            (40, 130, 70),
        ] {
            let a = pseudo(m * k, 1);
            let b = pseudo(k * n, 2);
            for a_t in [false, true] {
                for b_t in [false, true] {
                    let av = View {
                        ptr: a.as_ptr(),
                        rows: m,
                        cols: k,
                        rs: if a_t { 1 } else { k as isize },
                        cs: if a_t { m as isize } else { 1 },
                    };
                    let bv = View {
                        ptr: b.as_ptr(),
                        rows: k,
                        cols: n,
                        rs: if b_t { 1 } else { n as isize },
                        cs: if b_t { k as isize } else { 1 },
                    };
                    let mut c = vec![f32::NAN; m * n];
                    // SAFETY: AMX is available (checked above); each view is exactly the
                    // (rows, cols) matrix a or b holds, at unit stride one way, with
                    // b.rows == a.cols and no side 0; c is a separate buffer of m rows of n.
                    unsafe { gemm(c.as_mut_ptr(), n as isize, 1, av, bv) };
                    let at = |i: usize, p: usize| if a_t { a[p * m + i] } else { a[i * k + p] };
                    let bt = |p: usize, j: usize| if b_t { b[j * k + p] } else { b[p * n + j] };
                    let mut worst = 0.0f64;
                    for i in 0..m {
                        for j in 0..n {
                            let (mut s, mut sa) = (0.0f64, 0.0f64);
                            for p in 0..k {
                                let t = at(i, p) as f64 * bt(p, j) as f64;
                                s += t;
                                sa += t.abs();
                            }
                            worst = worst.max((c[i * n + j] as f64 - s).abs() / sa.max(1e-30));
                        }
                    }
                    // A float32 dot product of these sizes errs up to ~2e-7 of sum |a b|.
                    assert!(worst < 4e-7, "{m}x{k}x{n} a_t {a_t} b_t {b_t}: {worst:e}");
                }
            }
        }
    }
}
