//! The first encoder layer, forward and backward: the one layer whose input is the data, so the
//! only one that needs no input gradient and the only one that can exploit zero inputs
//! exactly. About 80% of MNIST's pixels are 0,
//! so both products with the input x (B, I) need only its nonzeros: the forward pass
//! h = x wt + bias adds x[b, i] * wt[i, :] to row b of h for each nonzero, and the weight
//! gradient dwt = x^T dh sums x[b, i] * dh[b, :] into row i of dwt. The weight is stored
//! transposed, wt (I, O), so both work on contiguous rows.
//!
//! Each batch's nonzeros are indexed once (`BatchNonzeros`), by row and by group of 4
//! adjacent columns, from the gathered batch while it is in cache; a per-data-set index would
//! be read from memory a second time per batch, beside the dense rows the loss needs. The
//! forward pass runs by row, summing a block of outputs in registers while the weight rows
//! stream from L2. The weight gradient runs by column group, in blocks of up to 96 outputs:
//! each row of dh a group touches is loaded once for its 4 columns (adjacent pixels are
//! nonzero in mostly the same images), the block of dh stays in L1, and each block of dwt is
//! summed in registers, so the Adam step on that block of weights can follow at once while it
//! is in cache (`GradSink::Adam`), with no gradient buffer written or read.
//!
//! The weight gradient sums each output in one chain over its nonzeros in row order (a
//! group's zero values add exactly nothing), and the forward pass's blocks keep the same
//! chains on every instruction set, so neither the blocks, the threads nor the instruction
//! set change a result.
//!
//! Sums run in a different order than the dense products, so results agree with them to
//! float rounding. Dense data (more than `MAX_DENSITY` nonzeros) take the dense products, with
//! the same weight layout.
// Layer functions take their dims explicitly, as llm.c's do.
#![allow(clippy::too_many_arguments)]

use crate::config::Activation;
use crate::layers::{bias_activation, for_row_chunks};
use crate::matmul::{matmul, matmul_on, product_threads, Op};
use crate::optim::{adam_chunk_generic, AdamKernel};
use crate::simd::{dispatch, fmadd};
use rayon::prelude::*;
use std::ops::Range;

/// Data sets at or below this fraction of nonzeros train through the sparse first layer.
pub const MAX_DENSITY: f64 = 0.5;

/// Batch rows per part at most.
const PART_ROWS: usize = 128;

/// Input columns per group of the weight gradient's index. Adjacent pixels are nonzero in
/// mostly the same images, so a group of 4 of MNIST's has rows for 0.37 of its nonzeros: each
/// row of dh loaded serves 4 rows of the gradient (1.48 multiply-adds per nonzero, the zeros'
/// included, against 1 with one column at a time, but 0.37 loads against 1).
const GROUP: usize = 4;

/// The nonzeros of batch rows [row0, row0 + rows), by row (CSR) and by input column (CSC).
#[derive(Debug, Default, Clone)]
struct ColumnPart {
    row0: usize,
    rows: usize,
    /// Row r's nonzeros (r counted from row0) are idx/val[offsets[r]..offsets[r + 1]].
    offsets: Vec<usize>,
    idx: Vec<u32>,
    val: Vec<f32>,
    /// Column group g's entries are entries[starts[g]..starts[g + 1]].
    starts: Vec<usize>,
    /// For each row with a nonzero in any of a group's GROUP columns: (row in the batch, its
    /// values in those columns, 0 where zero), rows ascending within a group.
    entries: Vec<(u32, [f32; GROUP])>,
    /// Per row, one bit per column (words of 64 columns), then one per group of columns.
    masks: Vec<u64>,
}

/// The bits of a word of column bits that stand for whole groups: the first of each group
/// (0x1111...1 for groups of 4).
const GROUP_HEADS: u64 = {
    assert!(64 % GROUP == 0, "a word of columns holds whole groups");
    u64::MAX / ((1 << GROUP) - 1)
};

/// masks (d.div_ceil(64)): bit GROUP * j of word w set when group 16 w + j of the row has a
/// nonzero, the other bits clear.
#[inline(always)]
fn group_bits_generic(row: &[f32], masks: &mut [u64]) {
    // Column bits first, 64 at a time (a compare and a mask move per vector once vectorized).
    let mut chunks = row.chunks_exact(64);
    for (m, chunk) in masks.iter_mut().zip(&mut chunks) {
        let chunk: &[f32; 64] = chunk.try_into().expect("64 wide");
        let mut bits = 0u64;
        for (j, &v) in chunk.iter().enumerate() {
            bits |= u64::from(v != 0.0) << j;
        }
        *m = bits;
    }
    if let Some(m) = masks.get_mut(row.len() / 64) {
        let rest = chunks.remainder();
        *m = rest
            .iter()
            .enumerate()
            .fold(0, |bits, (j, &v)| bits | u64::from(v != 0.0) << j);
    }
    // Bit GROUP * j of a word is set when any of its group j's bits is.
    for m in masks.iter_mut() {
        *m = (1..GROUP).fold(*m, |any, s| any | *m >> s) & GROUP_HEADS;
    }
}

dispatch!(fn group_bits(row: &[f32], masks: &mut [u64]) -> () = group_bits_generic);

/// The groups whose head bits are set in word w of a row's mask, ascending.
fn set_groups(mut heads: u64, w: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (heads != 0).then(|| {
            let bit = heads.trailing_zeros() as usize;
            heads &= heads - 1;
            (w * 64 + bit) / GROUP
        })
    })
}

impl ColumnPart {
    /// Index the nonzeros of x (rows, d), which holds batch rows `rows`.
    fn fill(&mut self, x: &[f32], rows: Range<usize>, d: usize) {
        self.row0 = rows.start;
        self.rows = rows.len();
        self.offsets.clear();
        self.offsets.push(0);
        self.idx.resize(x.len() + SPARE, 0);
        self.val.resize(x.len() + SPARE, 0.0);
        let mut k = 0;
        for row in x.chunks_exact(d) {
            k = compress_row(row, &mut self.idx, &mut self.val, k);
            self.offsets.push(k);
        }
        // By group of columns, a counting sort over each row's bitmask of groups with a
        // nonzero (GROUP divides 64, so a word of columns holds whole groups): group g's count
        // of rows goes to starts[g + 2]; after the prefix sums starts[g + 1] is where group g
        // begins, and placing an entry advances it, so it ends as where group g ends, that is
        // where group g + 1 begins. The masks' set bits are visited without a branch per
        // nonzero, and an entry's values are copied from the dense row.
        let (groups, words) = (d.div_ceil(GROUP), d.div_ceil(64));
        self.masks.clear();
        self.masks.resize(self.rows * words, 0);
        for (masks, row) in self.masks.chunks_exact_mut(words).zip(x.chunks_exact(d)) {
            group_bits(row, masks);
        }
        self.starts.clear();
        self.starts.resize(groups + 2, 0);
        for (w, &m) in self.masks.iter().enumerate() {
            for g in set_groups(m, w % words) {
                self.starts[g + 2] += 1;
            }
        }
        for g in 2..groups + 2 {
            self.starts[g] += self.starts[g - 1];
        }
        self.entries.clear();
        self.entries
            .resize(self.starts[groups + 1], (0, [0.0; GROUP]));
        for (r, (masks, row)) in self
            .masks
            .chunks_exact(words)
            .zip(x.chunks_exact(d))
            .enumerate()
        {
            for (w, &m) in masks.iter().enumerate() {
                for g in set_groups(m, w) {
                    let at = self.starts[g + 1];
                    self.starts[g + 1] += 1;
                    let entry = &mut self.entries[at];
                    entry.0 = (self.row0 + r) as u32;
                    // + 0.0 makes a -0.0 the 0.0 that compress_row leaves out. d may end
                    // inside the last group: its missing columns stay 0.
                    let c = g * GROUP;
                    match row.get(c..c + GROUP) {
                        Some(vals) => {
                            let vals: &[f32; GROUP] = vals.try_into().expect("GROUP wide");
                            entry.1 = vals.map(|v| v + 0.0);
                        }
                        None => {
                            for (e, &v) in entry.1.iter_mut().zip(&row[c..]) {
                                *e = v + 0.0;
                            }
                        }
                    }
                }
            }
        }
        self.starts.truncate(groups + 1);
    }

    /// Row r's nonzeros, r counted from row0.
    fn row(&self, r: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.offsets[r], self.offsets[r + 1]);
        (&self.idx[a..b], &self.val[a..b])
    }

    /// Column group g's entries.
    fn group(&self, g: usize) -> &[(u32, [f32; GROUP])] {
        &self.entries[self.starts[g]..self.starts[g + 1]]
    }
}

/// Places past the last entry that `compress_row` may overwrite.
const SPARE: usize = 16;

/// Write the nonzeros of `row` as (column, value) into idx/val from place k on, and return
/// the place after the last; both need room for row.len() + SPARE places from k.
fn compress_row(row: &[f32], idx: &mut [u32], val: &mut [f32], k: usize) -> usize {
    assert!(idx.len().min(val.len()) >= k + row.len() + SPARE);
    #[cfg(target_arch = "x86_64")]
    match crate::simd::isa() {
        // SAFETY: the CPU has AVX-512F (`isa` checked it), and the assert above gives idx and
        // val the room past k that the function's stores need.
        crate::simd::Isa::Avx512 => return unsafe { compress_row_avx512(row, idx, val, k) },
        // SAFETY: as above, with AVX2.
        crate::simd::Isa::Avx2 => return unsafe { compress_row_avx2(row, idx, val, k) },
        crate::simd::Isa::Generic => {}
    }
    compress_row_scalar(row, 0, idx, val, k)
}

/// Without branches: each value is written at the next free place, which advances past it
/// only when it is nonzero. `col0` is row[0]'s column.
fn compress_row_scalar(
    row: &[f32],
    col0: usize,
    idx: &mut [u32],
    val: &mut [f32],
    mut k: usize,
) -> usize {
    for (i, &v) in row.iter().enumerate() {
        idx[k] = (col0 + i) as u32;
        val[k] = v;
        k += (v != 0.0) as usize;
    }
    k
}

/// For each 8-bit mask, the positions of its set bits, lowest first (then zeros): the lane
/// order that packs a register's selected lanes to its front.
#[cfg(target_arch = "x86_64")]
const PACK_LANES: [[u32; 8]; 256] = {
    let mut table = [[0u32; 8]; 256];
    let mut mask = 0;
    while mask < 256 {
        let (mut lane, mut to) = (0, 0);
        while lane < 8 {
            if mask >> lane & 1 == 1 {
                table[mask][to] = lane as u32;
                to += 1;
            }
            lane += 1;
        }
        mask += 1;
    }
    table
};

/// 8 values at a time, as `compress_row_avx512` does 16: AVX2 has no compress instruction, so
/// the nonzeros' lanes are moved to the front by a permutation looked up by their mask (the
/// scalar loop cost 1.5-2 cycles a value, and AVX2's 784 of a row per batch row).
///
/// # Safety
/// The CPU must have AVX2, and idx and val must each hold at least k + row.len() + SPARE
/// elements: every full register is stored at place k' <= k + (values read so far), 8 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn compress_row_avx2(row: &[f32], idx: &mut [u32], val: &mut [f32], mut k: usize) -> usize {
    use std::arch::x86_64::*;
    let mut cols = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let step = _mm256_set1_epi32(8);
    let zero = _mm256_setzero_ps();
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        let v = _mm256_loadu_ps(c.as_ptr());
        let nonzero = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NEQ_UQ>(v, zero)) as usize;
        let lanes = _mm256_loadu_si256(PACK_LANES[nonzero].as_ptr().cast());
        _mm256_storeu_ps(val.as_mut_ptr().add(k), _mm256_permutevar8x32_ps(v, lanes));
        let packed = _mm256_permutevar8x32_epi32(cols, lanes);
        _mm256_storeu_si256(idx.as_mut_ptr().add(k).cast(), packed);
        k += nonzero.count_ones() as usize;
        cols = _mm256_add_epi32(cols, step);
    }
    let done = row.len() - chunks.remainder().len();
    compress_row_scalar(chunks.remainder(), done, idx, val, k)
}

/// 16 values at a time: the nonzeros and their columns are packed to the front of a register
/// (vcompressps) and the whole register stored, so up to 16 places past the end are written.
///
/// # Safety
/// The CPU must have AVX-512F, and idx and val must each hold at least k + row.len() + SPARE
/// elements: every full register is stored at place k' <= k + (values read so far), 16 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn compress_row_avx512(
    row: &[f32],
    idx: &mut [u32],
    val: &mut [f32],
    mut k: usize,
) -> usize {
    use std::arch::x86_64::*;
    const FIRST: [u32; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
    let mut cols = _mm512_loadu_si512(FIRST.as_ptr().cast());
    let step = _mm512_set1_epi32(16);
    let zero = _mm512_setzero_ps();
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        let v = _mm512_loadu_ps(c.as_ptr());
        let nonzero = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(v, zero);
        _mm512_storeu_ps(
            val.as_mut_ptr().add(k),
            _mm512_maskz_compress_ps(nonzero, v),
        );
        let packed = _mm512_maskz_compress_epi32(nonzero, cols);
        _mm512_storeu_si512(idx.as_mut_ptr().add(k).cast(), packed);
        k += nonzero.count_ones() as usize;
        cols = _mm512_add_epi32(cols, step);
    }
    let done = row.len() - chunks.remainder().len();
    compress_row_scalar(chunks.remainder(), done, idx, val, k)
}

/// One batch's nonzeros by input column, in parts of contiguous rows (at least one per thread,
/// built in parallel). Kept in the workspace and refilled for every batch, so its buffers are
/// allocated once.
#[derive(Debug, Default)]
pub struct BatchNonzeros {
    parts: Vec<ColumnPart>,
    /// Whether the parts hold the current batch (else the first layer runs dense).
    indexed: bool,
}

impl BatchNonzeros {
    /// Index the nonzeros of the batch x (n, d), in at least `threads` parts (the model's
    /// thread count, not the running pool's: the parts decide how the weight gradient's sums
    /// pair up, so they must not depend on which pool runs).
    pub fn build(&mut self, x: &[f32], n: usize, d: usize, threads: usize) {
        let parts = threads.max(n.div_ceil(PART_ROWS)).clamp(1, n.max(1));
        self.parts.resize_with(parts, ColumnPart::default);
        self.parts.par_iter_mut().enumerate().for_each(|(p, part)| {
            let rows = n * p / parts..n * (p + 1) / parts;
            part.fill(&x[rows.start * d..rows.end * d], rows, d)
        });
        self.indexed = true;
    }

    /// Mark the batch as not indexed.
    pub fn clear(&mut self) {
        self.indexed = false;
    }

    /// The index of the current batch, if it has one.
    pub fn get(&self) -> Option<&Self> {
        self.indexed.then_some(self)
    }

    /// The part holding batch row r.
    fn part_of(&self, r: usize) -> &ColumnPart {
        let p = self.parts.partition_point(|p| p.row0 + p.rows <= r);
        &self.parts[p]
    }

    /// Batch row r's nonzeros.
    fn row(&self, r: usize) -> (&[u32], &[f32]) {
        let part = self.part_of(r);
        part.row(r - part.row0)
    }

    /// The batch's row count.
    fn rows(&self) -> usize {
        self.parts.last().map_or(0, |p| p.row0 + p.rows)
    }

    /// Rows with a nonzero in column group g.
    fn group_rows(&self, g: usize) -> usize {
        self.parts.iter().map(|p| p.group(g).len()).sum()
    }
}

/// out (W) = bias[..W] + sum over nonzeros of v * wt[i, c0..c0 + W], summed in registers:
/// S chains of W accumulators, at least 8 AVX-512 registers in all, so that consecutive
/// nonzeros do not wait on each other's FMA.
#[inline(always)]
fn sparse_block<const W: usize, const S: usize, const FMA: bool>(
    out: &mut [f32],
    idx: &[u32],
    val: &[f32],
    wt: &[f32],
    o: usize,
    c0: usize,
    bias: &[f32],
) {
    let mut acc = [[0.0f32; W]; S];
    acc[0].copy_from_slice(&bias[..W]);
    let row = |i: u32| -> &[f32; W] {
        let at = i as usize * o + c0;
        wt[at..at + W].try_into().expect("W wide")
    };
    let (mut is, mut vs) = (idx.chunks_exact(S), val.chunks_exact(S));
    for (i, v) in (&mut is).zip(&mut vs) {
        for s in 0..S {
            let r = row(i[s]);
            for k in 0..W {
                acc[s][k] = fmadd::<FMA>(v[s], r[k], acc[s][k]);
            }
        }
    }
    for (&i, &v) in is.remainder().iter().zip(vs.remainder()) {
        let r = row(i);
        for k in 0..W {
            acc[0][k] = fmadd::<FMA>(v, r[k], acc[0][k]);
        }
    }
    let (sum, rest) = acc.split_at_mut(1);
    for chain in rest {
        sum[0]
            .iter_mut()
            .zip(chain.iter())
            .for_each(|(a, b)| *a += b);
    }
    out[..W].copy_from_slice(&sum[0]);
}

/// out (R, O) = bias + sum over each row's nonzeros of v * wt[i, :] for batch rows row0.., wt
/// (I, O), in register blocks of columns, one block at a time for all R rows: a block's
/// columns of wt are read from L3 once and then from L2 for the other rows (the AVX2 path's
/// blocks of 96 columns: 301 KB of wt; rows outside made each row stream all of wt, 1.25 MB,
/// through L2: 184 against 165 us a batch, medians of 12 interleaved runs, the AVX-512 path
/// the same, `FASTVAE_BENCH_BATCH` a real MNIST batch). Narrower blocks on the AVX-512 path
/// (208 + 192 columns) measured slower than one pass of 400: 170 against 136 us.
/// The weight gradient's column-major order, with
/// each block of outputs in L1, was slower here (304 us against 206 at B = 128 on two
/// threads): each nonzero then loads and stores its block of outputs.
/// `NARROW` sizes the blocks for 16 vector registers (AVX2, and the plain path): at most 12
/// accumulators of 8 floats, where AVX-512's 25-register blocks would spill to the stack (on
/// the AVX2 path at B = 128, 2 threads: 202-233 us a batch against 422-485 us with the
/// AVX-512 blocks; `FASTVAE_ISA=avx2 cargo bench --no-default-features --bench train_step --
/// "first layer"`).
#[inline(always)]
fn sparse_rows_generic<const FMA: bool, const NARROW: bool>(
    out: &mut [f32],
    cols: &BatchNonzeros,
    row0: usize,
    wt: &[f32],
    bias: &[f32],
) {
    let o = bias.len();
    let mut c = 0;
    // Blocks outside, rows inside: each block's columns of wt (I x width) serve every row of
    // the part while they are in L2.
    macro_rules! block {
        ($width:literal $chains:literal) => {{
            for (r, out) in out.chunks_exact_mut(o).enumerate() {
                let (idx, val) = cols.row(row0 + r);
                let (out, bias) = (&mut out[c..], &bias[c..]);
                sparse_block::<$width, $chains, FMA>(out, idx, val, wt, o, c, bias);
            }
            c += $width;
        }};
    }
    if NARROW {
        // The wide path's columns and chains, in blocks of at most 12 registers: every output
        // sums its nonzeros in the same order on both paths, so they agree bit for bit.
        let (one, two, eight) = chain_regions(o);
        // One chain: pieces of equal width, at most 96 (all multiples of 16).
        while c < one {
            let left = one - c;
            match left.div_ceil(left.div_ceil(96)).next_multiple_of(16) {
                96 => block!(96 1),
                80 => block!(80 1),
                64 => block!(64 1),
                48 => block!(48 1),
                32 => block!(32 1),
                _ => block!(16 1),
            }
        }
        while c < two {
            block!(32 2);
        }
        while c < eight {
            block!(8 8);
        }
    } else {
        // Blocks of up to 28 registers (448 columns), widest first: one pass over the row's
        // nonzeros per block, and a hidden width of 400 in a single pass (measured at B = 128
        // on two threads: 151 us, against 157 us for 384 + 16 and 200 us for blocks of 128;
        // choosing among all 28 widths through one `match` measured slower, 191 us). Chains:
        // at least 8 registers of accumulators, so the FMAs' latency is hidden.
        // `chain_regions` follows this list.
        macro_rules! blocks {
            ($($width:literal $chains:literal),*) => {
                $(
                    while o - c >= $width {
                        block!($width $chains);
                    }
                )*
            };
        }
        blocks!(448 1, 400 1, 384 1, 320 1, 256 1, 192 1, 128 1, 64 2, 16 8);
    }
    if c < o {
        for (r, out) in out.chunks_exact_mut(o).enumerate() {
            let (idx, val) = cols.row(row0 + r);
            let tail = &mut out[c..];
            tail.copy_from_slice(&bias[c..]);
            for (&i, &v) in idx.iter().zip(val) {
                let i = i as usize;
                tail.iter_mut()
                    .zip(&wt[i * o + c..(i + 1) * o])
                    .for_each(|(a, &r)| *a = fmadd::<FMA>(v, r, *a));
            }
        }
    }
}

/// Where the wide path's blocks of one, two and eight chains end for O outputs; the rest
/// (under 16) is summed in order, as one chain.
fn chain_regions(o: usize) -> (usize, usize, usize) {
    let mut c = 0;
    for w in [448, 400, 384, 320, 256, 192, 128] {
        while o - c >= w {
            c += w;
        }
    }
    let one = c;
    while o - c >= 64 {
        c += 64;
    }
    let two = c;
    while o - c >= 16 {
        c += 16;
    }
    (one, two, c)
}

dispatch!(fn sparse_rows(out: &mut [f32], cols: &BatchNonzeros, row0: usize, wt: &[f32], bias: &[f32]) -> () = sparse_rows_generic::<true, false>, sparse_rows_generic::<true, true>, sparse_rows_generic::<false, true>);

fn activate(row: &mut [f32], act: Activation) {
    match act {
        Activation::Relu => row.iter_mut().for_each(|v| *v = v.max(0.0)),
        Activation::Tanh => row.iter_mut().for_each(|v| *v = v.tanh()),
    }
}

/// out (B, O) = act(x wt + bias) for the first layer, wt (I, O): from the batch's nonzeros
/// when `cols` indexes them, else as a dense product of x (B, I).
pub fn forward(
    out: &mut [f32],
    x: &[f32],
    cols: Option<&BatchNonzeros>,
    wt: &[f32],
    bias: &[f32],
    b: usize,
    i: usize,
    o: usize,
    act: Activation,
) {
    match cols {
        // By rows: split by columns instead, each thread would read only its columns of wt,
        // but every nonzero twice over (measured slower: 247 us against 200 at B = 128).
        Some(cols) => for_row_chunks(&mut out[..b * o], o, |r0, rows| {
            sparse_rows(rows, cols, r0, wt, bias);
            rows.chunks_exact_mut(o).for_each(|row| activate(row, act));
        }),
        None => {
            let epi = |row: &mut [f32], c0: usize| {
                bias_activation(row, &bias[c0..c0 + row.len()], Some(act))
            };
            let parts = product_threads(b, i, o);
            matmul_on(parts, out, x, Op::Plain, wt, Op::Plain, b, i, o, Some(&epi));
        }
    }
}

/// Where the first layer's weight gradient goes, one block of one row at a time; each slice
/// holds the rows (input columns) of the range being worked on.
pub enum GradSink<'a> {
    /// Into dwt.
    Store(&'a mut [f32]),
    /// Straight into an Adam step of wt with its moments m and v.
    Adam {
        wt: &'a mut [f32],
        m: &'a mut [f32],
        v: &'a mut [f32],
        kernel: AdamKernel,
    },
}

impl GradSink<'_> {
    fn split_at(self, at: usize) -> (Self, Self) {
        match self {
            GradSink::Store(d) => {
                let (a, b) = d.split_at_mut(at);
                (GradSink::Store(a), GradSink::Store(b))
            }
            GradSink::Adam { wt, m, v, kernel } => {
                let (wt0, wt1) = wt.split_at_mut(at);
                let (m0, m1) = m.split_at_mut(at);
                let (v0, v1) = v.split_at_mut(at);
                (
                    GradSink::Adam {
                        wt: wt0,
                        m: m0,
                        v: v0,
                        kernel,
                    },
                    GradSink::Adam {
                        wt: wt1,
                        m: m1,
                        v: v1,
                        kernel,
                    },
                )
            }
        }
    }

    /// Per input column, the cost of the sink's work on its row in nonzero-equivalents (a
    /// nonzero costs O / 16 fused multiply-adds): an Adam row moves 7 floats per weight.
    fn row_cost(&self) -> usize {
        match self {
            GradSink::Store(_) => 4,
            GradSink::Adam { .. } => 64,
        }
    }

    /// Row `at / O` of the gradient, from column `at % O` on, is `g`.
    #[inline(always)]
    fn put(&mut self, at: usize, g: &[f32]) {
        let span = at..at + g.len();
        match self {
            GradSink::Store(dwt) => dwt[span].copy_from_slice(g),
            GradSink::Adam { wt, m, v, kernel } => adam_chunk_generic(
                &mut wt[span.clone()],
                g,
                &mut m[span.clone()],
                &mut v[span],
                *kernel,
            ),
        }
    }
}

/// Outputs c0..c0 + W of the weight gradient's rows for column groups `groups` (rows
/// groups.start * GROUP on are the sink's first): GROUP x W sums in registers, each one chain
/// over the group's rows in order, so every output sums its nonzeros in the same order
/// whatever the blocks (a zero value adds exactly nothing: dh is finite here, see
/// `sparse_weight_backward`).
#[inline(always)]
fn grad_block<const W: usize, const FMA: bool>(
    sink: &mut GradSink<'_>,
    cols: &BatchNonzeros,
    dh: &[f32],
    (o, d): (usize, usize),
    groups: Range<usize>,
    c0: usize,
) {
    const { assert!(GROUP == 4, "one accumulator array per column of a group") };
    let first = groups.start * GROUP;
    for g in groups {
        // Four arrays written out, not an array of four: LLVM then keeps every width's sums
        // in registers (an array of arrays of 48 or 80 was kept in memory).
        let (mut a0, mut a1, mut a2, mut a3) = ([0.0f32; W], [0.0f32; W], [0.0f32; W], [0.0f32; W]);
        for part in &cols.parts {
            for &(b, v) in part.group(g) {
                let at = b as usize * o + c0;
                let src: &[f32; W] = dh[at..at + W].try_into().expect("W wide");
                for k in 0..W {
                    a0[k] = fmadd::<FMA>(v[0], src[k], a0[k]);
                    a1[k] = fmadd::<FMA>(v[1], src[k], a1[k]);
                    a2[k] = fmadd::<FMA>(v[2], src[k], a2[k]);
                    a3[k] = fmadd::<FMA>(v[3], src[k], a3[k]);
                }
            }
        }
        for (r, sums) in [a0, a1, a2, a3].iter().enumerate() {
            let i = g * GROUP + r;
            if i < d {
                sink.put((i - first) * o + c0, sums);
            }
        }
    }
}

/// `grad_block` at W = 16 for AVX2's 16 registers: 8 sums of 8 outputs, one per column of the
/// group and half of the block, written as arrays of 8 so that each is one register (arrays
/// of 16 were vectorized across the columns, with shuffles). Blocks of 24, 12 sums, leave too
/// few registers for the 4 broadcast values and spill: 420 against 327 us for the fused step
/// on a real MNIST batch, one thread (`FASTVAE_ISA=avx2`, AMD EPYC Zen 5).
#[inline(always)]
fn grad_block_narrow<const FMA: bool>(
    sink: &mut GradSink<'_>,
    cols: &BatchNonzeros,
    dh: &[f32],
    (o, d): (usize, usize),
    groups: Range<usize>,
    c0: usize,
) {
    let first = groups.start * GROUP;
    // Checked once here instead of twice per entry (a third of the loop's instructions; the
    // fused step on a real MNIST batch, FASTVAE_ISA=avx2, medians of 8 interleaved runs: 381
    // -> 354 us on 1 thread, 195 -> 185 on 2; in the AVX-512 blocks, 24 FMAs per entry
    // against 8, it measured no change): every entry's row is below the batch's row count.
    let rows = cols.rows();
    assert!(
        c0 + 16 <= o && rows * o <= dh.len(),
        "dh holds the batch's rows"
    );
    for g in groups {
        let z = [0.0f32; 8];
        let (mut l0, mut h0, mut l1, mut h1) = (z, z, z, z);
        let (mut l2, mut h2, mut l3, mut h3) = (z, z, z, z);
        for part in &cols.parts {
            for (b, v) in part.group(g) {
                debug_assert!((*b as usize) < rows);
                let at = *b as usize * o + c0;
                // SAFETY: b < rows (`ColumnPart::fill` indexes only its own rows), so with the
                // assert above at + 16 <= (b + 1) * o <= dh.len(); [f32; 8] has f32's alignment.
                let (lo, hi) = unsafe {
                    let p = dh.as_ptr().add(at).cast::<[f32; 8]>();
                    (&*p, &*p.add(1))
                };
                for k in 0..8 {
                    l0[k] = fmadd::<FMA>(v[0], lo[k], l0[k]);
                    h0[k] = fmadd::<FMA>(v[0], hi[k], h0[k]);
                    l1[k] = fmadd::<FMA>(v[1], lo[k], l1[k]);
                    h1[k] = fmadd::<FMA>(v[1], hi[k], h1[k]);
                    l2[k] = fmadd::<FMA>(v[2], lo[k], l2[k]);
                    h2[k] = fmadd::<FMA>(v[2], hi[k], h2[k]);
                    l3[k] = fmadd::<FMA>(v[3], lo[k], l3[k]);
                    h3[k] = fmadd::<FMA>(v[3], hi[k], h3[k]);
                }
            }
        }
        for (r, (lo, hi)) in [(l0, h0), (l1, h1), (l2, h2), (l3, h3)].iter().enumerate() {
            let i = g * GROUP + r;
            if i < d {
                let at = (i - first) * o + c0;
                sink.put(at, lo);
                sink.put(at + 8, hi);
            }
        }
    }
}

/// `grad_block` for the last outputs c0..O, fewer than 16, in the same order.
#[inline(always)]
fn grad_ragged<const FMA: bool>(
    sink: &mut GradSink<'_>,
    cols: &BatchNonzeros,
    dh: &[f32],
    (o, d): (usize, usize),
    groups: Range<usize>,
    c0: usize,
) {
    let (first, w) = (groups.start * GROUP, o - c0);
    for g in groups {
        let mut acc = [[0.0f32; 16]; GROUP];
        for part in &cols.parts {
            for &(b, v) in part.group(g) {
                let src = &dh[b as usize * o + c0..][..w];
                for r in 0..GROUP {
                    for k in 0..w {
                        acc[r][k] = fmadd::<FMA>(v[r], src[k], acc[r][k]);
                    }
                }
            }
        }
        for (r, sums) in acc.iter().enumerate() {
            let i = g * GROUP + r;
            if i < d {
                sink.put((i - first) * o + c0, &sums[..w]);
            }
        }
    }
}

/// The weight gradient's rows for column groups `groups` (B, O) into the sink, in blocks of
/// outputs of equal width, multiples of 16: at most 96 (6 x GROUP AVX-512 registers of sums),
/// or 16 with `NARROW` (AVX2's 16 registers hold 2 x GROUP of them). Each block of dh (rows x
/// width) stays in L1 across the groups, and each block of gradient rows goes to the sink as
/// soon as it is summed, while it is in cache.
#[inline(always)]
fn weight_grad_generic<const FMA: bool, const NARROW: bool>(
    sink: &mut GradSink<'_>,
    cols: &BatchNonzeros,
    dh: &[f32],
    dims: (usize, usize),
    groups: Range<usize>,
) {
    let o = dims.0;
    let full = o / 16 * 16;
    let mut c = 0;
    while c < full {
        // Pieces of 16 outputs in this block: 6 at most (1 on AVX2), and not a lone 1 after
        // a block (4 sums, too few to hide the FMAs' latency).
        let left = (full - c) / 16;
        let take = match left {
            _ if NARROW => 1,
            7 => 4,
            0..=6 => left,
            _ => 6,
        };
        let groups = groups.clone();
        match take {
            _ if NARROW => grad_block_narrow::<FMA>(sink, cols, dh, dims, groups, c),
            1 => grad_block::<16, FMA>(sink, cols, dh, dims, groups, c),
            2 => grad_block::<32, FMA>(sink, cols, dh, dims, groups, c),
            3 => grad_block::<48, FMA>(sink, cols, dh, dims, groups, c),
            4 => grad_block::<64, FMA>(sink, cols, dh, dims, groups, c),
            5 => grad_block::<80, FMA>(sink, cols, dh, dims, groups, c),
            _ => grad_block::<96, FMA>(sink, cols, dh, dims, groups, c),
        }
        c += 16 * take;
    }
    if c < o {
        grad_ragged::<FMA>(sink, cols, dh, dims, groups, c);
    }
}

dispatch!(fn weight_grad(sink: &mut GradSink<'_>, cols: &BatchNonzeros, dh: &[f32], dims: (usize, usize), groups: Range<usize>) -> () = weight_grad_generic::<true, false>, weight_grad_generic::<true, true>, weight_grad_generic::<false, true>);

/// The column groups in `groups` on `threads` threads, split where the work (entries plus the
/// sink's per-row cost) halves.
fn weight_grad_split(
    mut sink: GradSink<'_>,
    cols: &BatchNonzeros,
    dh: &[f32],
    dims: (usize, usize),
    groups: Range<usize>,
    threads: usize,
) {
    if threads <= 1 || groups.len() < 2 {
        weight_grad(&mut sink, cols, dh, dims, groups);
        return;
    }
    let left = threads / 2;
    let cost = |g: usize| GROUP * (cols.group_rows(g) + sink.row_cost());
    let total: usize = groups.clone().map(cost).sum();
    let (mut cut, mut acc) = (groups.start, 0);
    while cut + 1 < groups.end && acc * threads < total * left {
        acc += cost(cut);
        cut += 1;
    }
    let (s0, s1) = sink.split_at((cut - groups.start) * GROUP * dims.0);
    rayon::join(
        || weight_grad_split(s0, cols, dh, dims, groups.start..cut, left),
        || weight_grad_split(s1, cols, dh, dims, cut..groups.end, threads - left),
    );
}

/// The first layer's weight gradient dwt (I, O) = x^T dh from the batch's nonzeros, dh (B, O)
/// the gradient of its pre-activation, into `sink` (whose slices span all I rows).
///
/// A column group's zero values multiply dh too, which adds exactly nothing while dh is
/// finite (the fused Adam step runs only after `step` bounded it). Where dh is not, a row
/// that is zero in one column of a group and not in another makes the first column's sum NaN
/// instead of finite; the other column's sum is not finite either way, so the step fails the
/// same.
pub fn sparse_weight_backward(
    sink: GradSink<'_>,
    cols: &BatchNonzeros,
    dh: &[f32],
    i: usize,
    o: usize,
) {
    let groups = 0..i.div_ceil(GROUP);
    weight_grad_split(sink, cols, dh, (o, i), groups, rayon::current_num_threads());
}

/// dwt (I, O) = x^T dh for x (B, I) and dh (B, O): from the batch's nonzeros when `cols`
/// indexes them, else as a dense product. (The bias gradient is `layers::bias_backward`, as
/// for every layer; the input gradient is never needed.)
pub fn weight_backward(
    dwt: &mut [f32],
    x: &[f32],
    cols: Option<&BatchNonzeros>,
    dh: &[f32],
    b: usize,
    i: usize,
    o: usize,
) {
    match cols {
        Some(cols) => sparse_weight_backward(GradSink::Store(dwt), cols, dh, i, o),
        None => matmul(dwt, x, Op::Transposed, dh, Op::Plain, i, b, o),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::tests::same_bits;
    use crate::optim::{adam_update, AdamConfig};

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max)
    }

    /// Every instruction set's compress writes the nonzeros and their columns in order, as
    /// the plain loop does, from any starting place and for any row length.
    #[test]
    #[cfg_attr(miri, ignore = "vector kernels")]
    fn compress_row_matches_the_plain_loop() {
        for len in [0, 1, 7, 8, 9, 16, 17, 33, 784] {
            let row: Vec<f32> = (0..len)
                .map(|c| match (c * 7 + c / 3) % 5 {
                    0 | 1 => 0.0,
                    2 => -0.0,
                    _ => c as f32 - 10.0,
                })
                .collect();
            for k0 in [0, 3] {
                let room = k0 + len + SPARE;
                let (mut wi, mut wv) = (vec![0u32; room], vec![0.0f32; room]);
                let want = compress_row_scalar(&row, 0, &mut wi, &mut wv, k0);
                type Compress = fn(&[f32], &mut [u32], &mut [f32], usize) -> usize;
                let mut kernels: Vec<(&str, Compress)> = vec![("dispatched", compress_row)];
                #[cfg(target_arch = "x86_64")]
                {
                    if std::arch::is_x86_feature_detected!("avx2") {
                        // SAFETY: the CPU has AVX2; the buffers have SPARE places of room.
                        kernels.push(("avx2", |r, i, v, k| unsafe {
                            compress_row_avx2(r, i, v, k)
                        }));
                    }
                    if std::arch::is_x86_feature_detected!("avx512f") {
                        // SAFETY: the CPU has AVX-512F; as above.
                        kernels.push(("avx512", |r, i, v, k| unsafe {
                            compress_row_avx512(r, i, v, k)
                        }));
                    }
                }
                for (name, compress) in kernels {
                    let (mut gi, mut gv) = (vec![0u32; room], vec![0.0f32; room]);
                    let got = compress(&row, &mut gi, &mut gv, k0);
                    let what = format!("{name}: length {len} from {k0}");
                    assert_eq!(got, want, "{what}");
                    assert_eq!(gi[k0..got], wi[k0..want], "{what}");
                    assert!(same_bits(&gv[k0..got], &wv[k0..want]), "{what}");
                }
            }
        }
    }

    /// Each group's entries are, in row order, the rows with a nonzero in any of its columns,
    /// with those columns' values (0.0 for a zero, -0.0 included): against a plain scan of
    /// every group of every row, for widths that end inside a group and inside a word.
    #[test]
    fn column_index_matches_a_plain_scan() {
        for (n, d, row0) in [(9, 784, 0), (5, 70, 3), (3, 130, 128), (1, 3, 0)] {
            let x: Vec<f32> = (0..n * d)
                .map(|k| match (k * 7 + k / 5) % 13 {
                    0..=3 => (k % 17) as f32 - 8.5,
                    4 => -0.0,
                    _ => 0.0,
                })
                .collect();
            let mut part = ColumnPart::default();
            part.fill(&x, row0..row0 + n, d);
            let groups = d.div_ceil(GROUP);
            assert_eq!(part.starts.len(), groups + 1);
            for g in 0..groups {
                let mut want = Vec::new();
                for r in 0..n {
                    let mut vals = [0.0f32; GROUP];
                    for (j, v) in vals.iter_mut().enumerate() {
                        let c = g * GROUP + j;
                        if c < d && x[r * d + c] != 0.0 {
                            *v = x[r * d + c];
                        }
                    }
                    if vals.iter().any(|&v| v != 0.0) {
                        want.push(((row0 + r) as u32, vals));
                    }
                }
                let got = part.group(g);
                assert_eq!(got.len(), want.len(), "group {g} of ({n}, {d})");
                for ((gr, gv), (wr, wv)) in got.iter().zip(&want) {
                    assert_eq!(gr, wr, "group {g} of ({n}, {d})");
                    assert!(same_bits(gv, wv), "group {g} row {gr} of ({n}, {d})");
                }
            }
        }
    }

    /// The weight gradient from column groups equals, bit for bit, each output summed in one
    /// chain over its nonzeros in row order, on any number of threads: a group's zero values
    /// add exactly nothing.
    #[test]
    #[cfg_attr(miri, ignore = "slow under Miri; sparse_matches_dense covers the code")]
    fn weight_gradient_sums_each_output_in_row_order() {
        let fused = crate::simd::isa() != crate::simd::Isa::Generic;
        // Widths with a partial last group and ragged last outputs; strokes of nonzeros along
        // the rows (as in images) and isolated ones.
        for (n, i, o) in [(64, 50, 70), (130, 31, 400), (7, 9, 16), (128, 784, 100)] {
            let h = |k: usize, s: u32| {
                ((k as u32 ^ s).wrapping_mul(2_654_435_761) >> 8) as f32 / (1u32 << 24) as f32
            };
            let x: Vec<f32> = (0..n * i)
                .map(|k| {
                    let (r, c) = (k / i, k % i);
                    let stroke = (c + 3 * r) % 11 < 3;
                    if stroke || h(k, 1) < 0.1 {
                        h(k, 2) - 0.3
                    } else {
                        0.0
                    }
                })
                .collect();
            let dh: Vec<f32> = (0..n * o).map(|k| (h(k, 5) - 0.5) * 1e3).collect();
            let mut want = vec![0.0f32; i * o];
            for c in 0..i {
                for k in 0..o {
                    let mut acc = 0.0f32;
                    for r in 0..n {
                        let v = x[r * i + c];
                        if v != 0.0 {
                            acc = if fused {
                                v.mul_add(dh[r * o + k], acc)
                            } else {
                                v * dh[r * o + k] + acc
                            };
                        }
                    }
                    want[c * o + k] = acc;
                }
            }
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut got = vec![f32::NAN; i * o];
                pool.install(|| {
                    let mut cols = BatchNonzeros::default();
                    cols.build(&x, n, i, threads);
                    let cols = cols.get().expect("indexed");
                    sparse_weight_backward(GradSink::Store(&mut got), cols, &dh, i, o);
                });
                assert!(
                    same_bits(&got, &want),
                    "({n}, {i}, {o}) on {threads} threads"
                );
            }
        }
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "minutes under Miri; tests/gradients.rs checks a small case there"
    )]
    fn sparse_matches_dense() {
        // Widths below, at and above a block, with a ragged last block, and wide enough for the
        // forward's widest blocks; batches below, at and above PART_ROWS.
        for (n, i, o) in [(37, 50, 70), (5, 30, 64), (300, 40, 150), (20, 30, 1000)] {
            let h = |k: usize, s: u32| {
                ((k as u32 ^ s).wrapping_mul(2_654_435_761) >> 8) as f32 / (1u32 << 24) as f32
            };
            // Inputs with ~70% zeros; input column 3 all zeros.
            let x: Vec<f32> = (0..n * i)
                .map(|k| {
                    if h(k, 1) < 0.7 || k % i == 3 {
                        0.0
                    } else {
                        h(k, 2)
                    }
                })
                .collect();
            let wt: Vec<f32> = (0..i * o).map(|k| h(k, 3) - 0.5).collect();
            let bias: Vec<f32> = (0..o).map(|k| h(k, 4) - 0.5).collect();
            let dh: Vec<f32> = (0..n * o).map(|k| h(k, 5) - 0.5).collect();
            let xb = x;
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let mut cols = BatchNonzeros::default();
                    cols.build(&xb, n, i, threads);
                    let cols = cols.get();
                    let what = format!("({n}, {i}, {o}) on {threads} threads");
                    let (mut a, mut b) = (vec![0.0; n * o], vec![0.0; n * o]);
                    let act = Activation::Tanh;
                    forward(&mut a, &xb, cols, &wt, &bias, n, i, o, act);
                    forward(&mut b, &xb, None, &wt, &bias, n, i, o, act);
                    assert!(max_diff(&a, &b) < 1e-5, "forward {what}");

                    let (mut ga, mut gb) = (vec![f32::NAN; i * o], vec![0.0; i * o]);
                    let cols = cols.expect("indexed");
                    sparse_weight_backward(GradSink::Store(&mut ga), cols, &dh, i, o);
                    weight_backward(&mut gb, &xb, None, &dh, n, i, o);
                    assert!(max_diff(&ga, &gb) < 1e-4, "weight gradient {what}");
                    assert!(ga[3 * o..4 * o].iter().all(|&g| g == 0.0));

                    // Fused with Adam (two steps, so the moments matter) against Adam on the
                    // dense gradient.
                    let (mut pa, mut ma, mut va) = (wt.clone(), vec![0.0; i * o], vec![0.0; i * o]);
                    let (mut pb, mut mb, mut vb) = (pa.clone(), ma.clone(), va.clone());
                    for t in 1..=2 {
                        let kernel = AdamKernel::new(t, AdamConfig::default());
                        let sink = GradSink::Adam {
                            wt: &mut pa,
                            m: &mut ma,
                            v: &mut va,
                            kernel,
                        };
                        sparse_weight_backward(sink, cols, &dh, i, o);
                        adam_update(&mut pb, &gb, &mut mb, &mut vb, kernel);
                    }
                    assert!(max_diff(&pa, &pb) < 1e-6, "Adam weights {what}");
                    assert!(max_diff(&ma, &mb) < 1e-5, "Adam m {what}");
                    assert!(max_diff(&va, &vb) < 1e-5, "Adam v {what}");
                });
            }
        }
    }
}
