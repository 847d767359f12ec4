//! The first encoder layer, forward and backward: the one layer whose input is the data, so the
//! only one that needs no input gradient and the only one that can exploit zero inputs
//! exactly. About 80% of MNIST's pixels are 0,
//! so both products with the input x (B, I) need only its nonzeros: the forward pass
//! h = x wt + bias adds x[b, i] * wt[i, :] to row b of h for each nonzero, and the weight
//! gradient dwt = x^T dh sums x[b, i] * dh[b, :] into row i of dwt. The weight is stored
//! transposed, wt (I, O), so both work on contiguous rows.
//!
//! Each batch's nonzeros are indexed once (`BatchNonzeros`), by group of 4 adjacent columns,
//! from the gathered batch while it is in cache; a per-data-set index would be read from
//! memory a second time per batch, beside the dense rows the loss needs. Both passes run by
//! column group. The forward pass keeps a group's 4 rows of weights (a block of up to 48
//! outputs) in registers and adds them, scaled by each entry's 4 values, to that entry's row
//! of outputs, held in L1 as a block: 4 multiply-adds per load and store of an output, where
//! a pass by row loads a row of weights per nonzero, which bound it by L2's bandwidth. The
//! weight gradient runs in blocks of up to 96 outputs:
//! each row of dh a group touches is loaded once for its 4 columns (adjacent pixels are
//! nonzero in mostly the same images), the block of dh stays in L1, and each block of dwt is
//! summed in registers, so the Adam step on that block of weights can follow at once while it
//! is in cache (`GradSink::Adam`), with no gradient buffer written or read.
//!
//! The weight gradient sums each output in one chain over its nonzeros in row order, and the
//! forward pass each output in one chain from its bias over the input columns in order (a
//! group's zero values add nothing but, to a sum of exactly zero, a sign), so neither the blocks, the threads nor the
//! instruction set change a result.
//!
//! Sums run in a different order than the dense products, so results agree with them to
//! float rounding. Dense data (more than `MAX_DENSITY` nonzeros) take the dense products, with
//! the same weight layout.
// Layer functions take their dims explicitly, as llm.c's do.
#![allow(clippy::too_many_arguments)]

use crate::config::Activation;
use crate::layers::bias_activation;
use crate::matmul::{matmul, matmul_on, product_threads, Op};
use crate::optim::{adam_chunk_generic, AdamKernel};
use crate::simd::{dispatch, fmadd};
use rayon::prelude::*;
use std::ops::Range;

/// Data sets at or below this fraction of nonzeros train through the sparse first layer.
pub const MAX_DENSITY: f64 = 0.5;

/// Batch rows per part at most.
const PART_ROWS: usize = 128;

/// Input columns per group of the index. Adjacent pixels are nonzero in
/// mostly the same images, so a group of 4 of MNIST's has rows for 0.37 of its nonzeros: each
/// row of dh loaded serves 4 rows of the gradient (1.48 multiply-adds per nonzero, the zeros'
/// included, against 1 with one column at a time, but 0.37 loads against 1).
const GROUP: usize = 4;

/// The nonzeros of batch rows [row0, row0 + rows), by group of input columns.
#[derive(Debug, Default, Clone)]
struct ColumnPart {
    row0: usize,
    rows: usize,
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

    /// Column group g's entries.
    fn group(&self, g: usize) -> &[(u32, [f32; GROUP])] {
        &self.entries[self.starts[g]..self.starts[g + 1]]
    }
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

    /// The batch's row count.
    fn rows(&self) -> usize {
        self.parts.last().map_or(0, |p| p.row0 + p.rows)
    }

    /// Rows with a nonzero in column group g.
    fn group_rows(&self, g: usize) -> usize {
        self.parts.iter().map(|p| p.group(g).len()).sum()
    }
}

/// block (R, W) += the part's entries times wt's columns c0..c0 + W, group by group: the
/// group's GROUP rows of wt (GROUP x W) stay in registers while each entry's row of the block
/// is loaded, gets its GROUP multiply-adds per output in column order, and is stored. Groups
/// `groups` are whole (every column below d).
#[inline(always)]
fn group_block<const W: usize, const FMA: bool>(
    block: &mut [f32],
    part: &ColumnPart,
    wt: &[f32],
    o: usize,
    c0: usize,
    groups: Range<usize>,
) {
    const { assert!(GROUP == 4, "one weight array per column of a group") };
    // Checked once here instead of per entry (a third of the AVX2 loop's instructions): every
    // entry's row is one of the part's.
    assert!(
        c0 + W <= o && part.rows * W <= block.len(),
        "the block holds the part's rows"
    );
    for g in groups {
        let w = |j: usize| -> [f32; W] {
            let at = (g * GROUP + j) * o + c0;
            wt[at..at + W].try_into().expect("W wide")
        };
        // Four arrays written out, as in `grad_block`, so that they stay in registers.
        let (w0, w1, w2, w3) = (w(0), w(1), w(2), w(3));
        for &(b, v) in part.group(g) {
            let r = b as usize - part.row0;
            debug_assert!(r < part.rows);
            // SAFETY: r < part.rows (`ColumnPart::fill` indexes only its own rows), so with the
            // assert above (r + 1) * W <= block.len(); [f32; W] has f32's alignment.
            let dst = unsafe { &mut *block.as_mut_ptr().add(r * W).cast::<[f32; W]>() };
            for k in 0..W {
                let mut a = dst[k];
                a = fmadd::<FMA>(v[0], w0[k], a);
                a = fmadd::<FMA>(v[1], w1[k], a);
                a = fmadd::<FMA>(v[2], w2[k], a);
                a = fmadd::<FMA>(v[3], w3[k], a);
                dst[k] = a;
            }
        }
    }
}

/// `group_block` for outputs c0..c0 + w, any w, and groups that may end past d (the missing
/// columns have no row of wt, and zero values).
fn group_ragged<const FMA: bool>(
    out: &mut [f32],
    part: &ColumnPart,
    wt: &[f32],
    (o, d): (usize, usize),
    cols: Range<usize>,
    groups: Range<usize>,
) {
    for g in groups {
        let inputs = g * GROUP..(g * GROUP + GROUP).min(d);
        for &(b, v) in part.group(g) {
            let row = (b as usize - part.row0) * o;
            for k in cols.clone() {
                let mut a = out[row + k];
                for (j, i) in inputs.clone().enumerate() {
                    a = fmadd::<FMA>(v[j], wt[i * o + k], a);
                }
                out[row + k] = a;
            }
        }
    }
}

/// out (R, O) = bias + x wt for the part's R rows, wt (I, O), from its column groups: by blocks
/// of outputs (out's block in L1 for every group), each output one chain of multiply-adds from
/// its bias over the input columns in order, a group's zero values adding exactly nothing. So
/// blocks, threads and instruction sets give the same bits. `NARROW` sizes the blocks for 16
/// vector registers (AVX2, and the plain path).
#[inline(always)]
fn group_forward_generic<const FMA: bool, const NARROW: bool>(
    out: &mut [f32],
    part: &ColumnPart,
    wt: &[f32],
    bias: &[f32],
    d: usize,
) {
    let o = bias.len();
    let rows = out.len() / o;
    let whole = 0..d / GROUP;
    let full = o / 16 * 16;
    // Each block is summed in its own buffer, rows W apart: out's rows are O apart, which for
    // O a multiple of 1024 (4 KB) puts a block's rows in the same L1 sets (hidden 1024 on two
    // threads trained at 23,000 samples/s, against 27,700 with the pass by row).
    let mut buf = vec![0.0f32; rows * 48];
    let mut c = 0;
    while c < full {
        // AVX-512: pieces of equal width, at most 48 (12 registers of weights; on a real MNIST
        // batch, 2 threads, medians of 10 interleaved runs: 76 us, against 82 with 32 and 64,
        // 97 with 80). AVX2: 24 (12 registers of weights, one of them spilled; 113 us against
        // 124 with 16), then 16 where 24 would leave 8 (left is 32 at most there: a piece of
        // 24 past 8 outputs, which ran past out's rows, made 32 outputs panic).
        let left = full - c;
        let width = match (NARROW, left) {
            (true, 24 | 40..) => 24,
            (true, _) => 16,
            (false, _) => left.div_ceil(left.div_ceil(48)).next_multiple_of(16),
        };
        let block = &mut buf[..rows * width];
        for row in block.chunks_exact_mut(width) {
            row.copy_from_slice(&bias[c..c + width]);
        }
        let groups = whole.clone();
        match width {
            16 => group_block::<16, FMA>(block, part, wt, o, c, groups),
            24 => group_block::<24, FMA>(block, part, wt, o, c, groups),
            32 => group_block::<32, FMA>(block, part, wt, o, c, groups),
            _ => group_block::<48, FMA>(block, part, wt, o, c, groups),
        }
        for (dst, src) in out.chunks_exact_mut(o).zip(block.chunks_exact(width)) {
            dst[c..c + width].copy_from_slice(src);
        }
        c += width;
    }
    if c < o {
        for row in out.chunks_exact_mut(o) {
            row[c..].copy_from_slice(&bias[c..]);
        }
        group_ragged::<FMA>(out, part, wt, (o, d), c..o, whole.clone());
    }
    // A last group that d ends inside, for every output, after the whole ones.
    group_ragged::<FMA>(out, part, wt, (o, d), 0..o, whole.end..d.div_ceil(GROUP));
}

dispatch!(fn group_forward(out: &mut [f32], part: &ColumnPart, wt: &[f32], bias: &[f32], d: usize) -> () = group_forward_generic::<true, false>, group_forward_generic::<true, true>, group_forward_generic::<false, true>);

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
        Some(cols) => {
            // One task per part of the index, on its own rows of out.
            let mut rest = &mut out[..b * o];
            let mut work = Vec::with_capacity(cols.parts.len());
            for part in &cols.parts {
                let (mine, tail) = std::mem::take(&mut rest).split_at_mut(part.rows * o);
                work.push((part, mine));
                rest = tail;
            }
            work.into_par_iter().for_each(|(part, out)| {
                group_forward(out, part, wt, bias, i);
                out.chunks_exact_mut(o).for_each(|row| activate(row, act));
            });
        }
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
/// groups.start * GROUP on are the sink's first), from `block`, dh's columns c0..c0 + W for
/// every batch row, W apart: GROUP x W sums in registers, each one chain
/// over the group's rows in order, so every output sums its nonzeros in the same order
/// whatever the blocks (a zero value adds exactly nothing: dh is finite here, see
/// `sparse_weight_backward`).
#[inline(always)]
fn grad_block<const W: usize, const FMA: bool>(
    sink: &mut GradSink<'_>,
    cols: &BatchNonzeros,
    block: &[f32],
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
                let at = b as usize * W;
                let src: &[f32; W] = block[at..at + W].try_into().expect("W wide");
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
    block: &[f32],
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
        c0 + 16 <= o && rows * 16 <= block.len(),
        "the block holds the batch's rows"
    );
    for g in groups {
        let z = [0.0f32; 8];
        let (mut l0, mut h0, mut l1, mut h1) = (z, z, z, z);
        let (mut l2, mut h2, mut l3, mut h3) = (z, z, z, z);
        for part in &cols.parts {
            for (b, v) in part.group(g) {
                debug_assert!((*b as usize) < rows);
                let at = *b as usize * 16;
                // SAFETY: b < rows (`ColumnPart::fill` indexes only its own rows), so with the
                // assert above at + 16 <= block.len(); [f32; 8] has f32's alignment.
                let (lo, hi) = unsafe {
                    let p = block.as_ptr().add(at).cast::<[f32; 8]>();
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
    block: &[f32],
    (o, d): (usize, usize),
    groups: Range<usize>,
    c0: usize,
) {
    let (first, w) = (groups.start * GROUP, o - c0);
    for g in groups {
        let mut acc = [[0.0f32; 16]; GROUP];
        for part in &cols.parts {
            for &(b, v) in part.group(g) {
                let src = &block[b as usize * w..][..w];
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
    // Each block of dh is read from its own copy, rows W apart: dh's rows are O apart, which
    // for O a multiple of 1024 (4 KB) puts a block's rows in the same L1 sets.
    let rows = cols.rows();
    let mut buf = vec![0.0f32; rows * 96];
    fn copy<'b>(buf: &'b mut [f32], dh: &[f32], o: usize, c: usize, width: usize) -> &'b [f32] {
        let block = &mut buf[..dh.len() / o * width];
        for (dst, src) in block.chunks_exact_mut(width).zip(dh.chunks_exact(o)) {
            dst.copy_from_slice(&src[c..c + width]);
        }
        block
    }
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
        let (groups, block) = (groups.clone(), copy(&mut buf, dh, o, c, 16 * take));
        match take {
            _ if NARROW => grad_block_narrow::<FMA>(sink, cols, block, dims, groups, c),
            1 => grad_block::<16, FMA>(sink, cols, block, dims, groups, c),
            2 => grad_block::<32, FMA>(sink, cols, block, dims, groups, c),
            3 => grad_block::<48, FMA>(sink, cols, block, dims, groups, c),
            4 => grad_block::<64, FMA>(sink, cols, block, dims, groups, c),
            5 => grad_block::<80, FMA>(sink, cols, block, dims, groups, c),
            _ => grad_block::<96, FMA>(sink, cols, block, dims, groups, c),
        }
        c += 16 * take;
    }
    if c < o {
        let block = copy(&mut buf, dh, o, c, o - c);
        grad_ragged::<FMA>(sink, cols, block, dims, groups, c);
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

    /// A pseudo-random value in [0, 1) for index k of stream s.
    fn hash01(k: usize, s: u32) -> f32 {
        ((k as u32 ^ s).wrapping_mul(2_654_435_761) >> 8) as f32 / (1u32 << 24) as f32
    }

    /// bias + x wt (n, o) for x (n, i), wt (i, o): each output one chain from its bias over
    /// the row's nonzeros in column order, with fused multiply-adds or without.
    fn chain_forward(x: &[f32], wt: &[f32], bias: &[f32], n: usize, fused: bool) -> Vec<f32> {
        let (i, o) = (x.len() / n, bias.len());
        let mut out = vec![0.0f32; n * o];
        for r in 0..n {
            for k in 0..o {
                let mut acc = bias[k];
                for c in (0..i).filter(|&c| x[r * i + c] != 0.0) {
                    let (v, w) = (x[r * i + c], wt[c * o + k]);
                    acc = if fused {
                        v.mul_add(w, acc)
                    } else {
                        v * w + acc
                    };
                }
                out[r * o + k] = acc;
            }
        }
        out
    }

    /// The forward pass from column groups equals, bit for bit, each output summed in one
    /// chain from its bias over the row's nonzeros in column order, on any number of threads
    /// and parts: a group's zero values add exactly nothing to these (nonzero) sums.
    #[test]
    #[cfg_attr(miri, ignore = "slow under Miri; sparse_matches_dense covers the code")]
    fn forward_sums_each_output_in_column_order() {
        let fused = crate::simd::isa() != crate::simd::Isa::Generic;
        // Outputs below, at and past a block (ragged last ones), a partial last group, -0.0
        // inputs, and batches of one part and of several.
        for (n, i, o) in [
            (64, 50, 70),
            (130, 31, 400),
            (7, 9, 16),
            (128, 784, 100),
            (3, 4, 25),
        ] {
            let h = hash01;
            let x: Vec<f32> = (0..n * i)
                .map(|k| {
                    let (r, c) = (k / i, k % i);
                    match ((c + 3 * r) % 11, h(k, 1)) {
                        (0..=2, _) => h(k, 2) - 0.3,
                        (_, p) if p < 0.1 => h(k, 2),
                        (_, p) if p < 0.2 => -0.0,
                        _ => 0.0,
                    }
                })
                .collect();
            let wt: Vec<f32> = (0..i * o).map(|k| h(k, 3) - 0.5).collect();
            let bias: Vec<f32> = (0..o).map(|k| h(k, 4) + 0.5).collect();
            let mut want = chain_forward(&x, &wt, &bias, n, fused);
            want.iter_mut().for_each(|v| *v = v.max(0.0));
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut got = vec![f32::NAN; n * o];
                pool.install(|| {
                    let mut cols = BatchNonzeros::default();
                    cols.build(&x, n, i, threads);
                    let (cols, relu) = (cols.get(), Activation::Relu);
                    forward(&mut got, &x, cols, &wt, &bias, n, i, o, relu);
                });
                assert!(
                    same_bits(&got, &want),
                    "({n}, {i}, {o}) on {threads} threads"
                );
            }
        }
    }

    /// Every build of the forward pass (AVX-512's blocks, the 16-register ones of AVX2 and the
    /// plain path, called directly, so each is checked on any CPU) gives each output one chain
    /// from its bias over the columns in order, for output counts that end each way the blocks
    /// can: 32 and 80 end where a block of 24 would leave 8 (the 16-register blocks ran past
    /// the output there), 1000 a block past the last whole 16.
    #[test]
    #[cfg_attr(miri, ignore = "slow under Miri; sparse_matches_dense covers the code")]
    fn every_forward_build_takes_every_output_count() {
        let (n, i) = (20, 37);
        let h = hash01;
        let x: Vec<f32> = (0..n * i)
            .map(|k| if h(k, 1) < 0.3 { h(k, 2) - 0.4 } else { 0.0 })
            .collect();
        let mut cols = BatchNonzeros::default();
        cols.build(&x, n, i, 1);
        let part = &cols.parts[0];
        assert_eq!(part.rows, n);
        type Build = fn(&mut [f32], &ColumnPart, &[f32], &[f32], usize);
        let builds: [(&str, bool, Build); 3] = [
            ("wide", true, group_forward_generic::<true, false>),
            ("narrow", true, group_forward_generic::<true, true>),
            ("plain", false, group_forward_generic::<false, true>),
        ];
        for o in [16, 24, 32, 48, 64, 80, 100, 128, 400, 1000] {
            let wt: Vec<f32> = (0..i * o).map(|k| h(k, 3) - 0.5).collect();
            let bias: Vec<f32> = (0..o).map(|k| h(k, 4)).collect();
            for (name, fused, build) in builds {
                let want = chain_forward(&x, &wt, &bias, n, fused);
                let mut got = vec![f32::NAN; n * o];
                build(&mut got, part, &wt, &bias, i);
                assert!(same_bits(&got, &want), "{name} build, {o} outputs");
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
            let h = hash01;
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
            let h = hash01;
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
