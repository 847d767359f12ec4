//! Data sets in core memory: rows of D finite values (intensities in [0, 1] for a Bernoulli
//! model, any real for a Gaussian one), checked once when they arrive, held as 8-bit levels
//! when every value is one (a quarter of the memory), and gathered into batches. Also the
//! fixed binarization of a data set.

use crate::error::{Result, VaeError};
use crate::first_layer::MAX_DENSITY;
use crate::rng::{binarize as binarize_row, stream, Purpose};
use crate::simd::dispatch;
use rayon::prelude::*;
use std::borrow::Cow;

/// The values a data set may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// Intensities in [0, 1], as the Bernoulli likelihood needs.
    Unit,
    /// Any finite real, as the Gaussian likelihood takes.
    Real,
}

/// Rows of D finite values, owned by the core so work on them can run without the caller.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// (n, d) row-major.
    values: Values,
    pub n: usize,
    pub d: usize,
    /// Whether the first layer skips zero inputs (decided by density unless forced).
    pub sparse: bool,
    /// Whether every value is in [0, 1] (always, for a data set checked as `Domain::Unit`).
    pub unit: bool,
}

impl Dataset {
    /// Checks every value is finite and in [0, 1]; the error names the first bad entry. The
    /// sparse first layer is used when the data are sparse enough.
    pub fn new(data: Vec<f32>, n: usize, d: usize) -> Result<Self> {
        Self::with_layout(data.into(), n, d, None, "x", 0, Domain::Unit)
    }

    /// As `new`, with the first layer's path chosen: `Some(true)` sparse, `Some(false)` dense,
    /// `None` by density. Both give the same results up to float rounding.
    /// `name` is the argument's name in error messages, and `first_row` the index of the
    /// first row there (for a piece of a larger array); `domain` what values are accepted.
    /// Borrowed `data` are copied only when they cannot be held as 8-bit levels: a caller's
    /// 8-bit images never take a float32 copy (for MNIST's 60,000 rows, 188 MB not written).
    pub fn with_layout(
        data: Cow<'_, [f32]>,
        n: usize,
        d: usize,
        sparse: Option<bool>,
        name: &str,
        first_row: usize,
        domain: Domain,
    ) -> Result<Self> {
        if n == 0 || d == 0 {
            return Err(VaeError::Input(format!(
                "{name} is empty: got shape ({n}, {d}), need at least one row and one column"
            )));
        }
        if data.len() != n * d {
            return Err(VaeError::Input(format!(
                "data length {} does not match shape ({n}, {d})",
                data.len()
            )));
        }
        let dense = |nnz: usize| nnz as f64 > MAX_DENSITY * data.len() as f64;
        // 8-bit levels first: one pass converts, counts the nonzeros and, since every k / 255
        // is in [0, 1], checks the values for either domain. Other data are checked, then copied.
        let (values, unit, sparse) = match Values::levels(&data) {
            Some((levels, nnz)) => (Values::Levels(levels), true, sparse.unwrap_or(!dense(nnz))),
            None => {
                let unit = check_domain(&data, d, name, first_row, domain)?;
                let sparse = sparse
                    .unwrap_or_else(|| !dense(data.par_iter().filter(|&&v| v != 0.0).count()));
                (Values::F32(Self::owned(data)), unit, sparse)
            }
        };
        Ok(Dataset {
            values,
            n,
            d,
            sparse,
            unit,
        })
    }

    /// The values as a vector: `data` itself if owned, else a copy.
    fn owned(data: Cow<'_, [f32]>) -> Vec<f32> {
        match data {
            Cow::Owned(v) => v,
            Cow::Borrowed(s) => {
                let mut v = vec![0.0; s.len()];
                v.par_chunks_mut(1 << 16)
                    .zip(s.par_chunks(1 << 16))
                    .for_each(|(v, s)| v.copy_from_slice(s));
                v
            }
        }
    }

    /// dst (count, d) = rows [first, first + count), as float32.
    pub fn read_rows(&self, dst: &mut [f32], first: usize, count: usize) {
        let span = first * self.d..(first + count) * self.d;
        match &self.values {
            Values::F32(v) => dst.copy_from_slice(&v[span]),
            Values::Levels(k) => from_levels(dst, &k[span]),
        }
    }

    /// An error naming the first value outside [0, 1], if there is one.
    pub fn check_unit(&self, name: &str) -> Result<()> {
        match &self.values {
            Values::F32(v) if !self.unit => check_values(v, self.d, name, 0),
            _ => Ok(()),
        }
    }

    /// Whether the values are held as 8-bit levels.
    pub fn is_levels(&self) -> bool {
        matches!(self.values, Values::Levels(_))
    }
}

/// Checks the rows `data` (n, d) hold values of `domain`; whether every value is in [0, 1].
pub fn check_domain(
    data: &[f32],
    d: usize,
    name: &str,
    first_row: usize,
    domain: Domain,
) -> Result<bool> {
    if domain == Domain::Unit {
        return check_values(data, d, name, first_row).map(|_| true);
    }
    if let Some(i) = first_bad(data, |c| c.iter().all(|v| v.is_finite()), f32::is_finite) {
        let v = data[i];
        let what = if v.is_nan() {
            "NaN".to_string()
        } else {
            v.to_string()
        };
        return Err(VaeError::Input(format!(
            "{name}[{}, {}] is {what}; inputs must be finite",
            first_row + i / d,
            i % d
        )));
    }
    Ok(data.par_chunks(1 << 16).all(unit_interval))
}

/// Checks every value of the rows `data` (n, d) is finite and in [0, 1]; the error names the
/// first bad entry, as `name[row, column]` with rows counted from `first_row`.
pub fn check_values(data: &[f32], d: usize, name: &str, first_row: usize) -> Result<()> {
    if let Some(i) = first_bad(data, unit_interval, |v| (0.0..=1.0).contains(&v)) {
        let v = data[i];
        let what = if v.is_nan() {
            "NaN".to_string()
        } else if v.is_infinite() {
            format!("{v}")
        } else {
            format!("{v}, outside [0, 1]")
        };
        return Err(VaeError::Input(format!(
            "{name}[{}, {}] is {what}; inputs must be finite intensities in [0, 1]",
            first_row + i / d,
            i % d
        )));
    }
    Ok(())
}

/// The index of the first value of `data` that fails `value_ok`: a vectorized `chunk_ok` pass
/// per chunk in parallel, and the slow search for the position only in a failing chunk.
fn first_bad(
    data: &[f32],
    chunk_ok: impl Fn(&[f32]) -> bool + Sync + Send,
    value_ok: impl Fn(f32) -> bool,
) -> Option<usize> {
    const CHUNK: usize = 1 << 16;
    let c = data.par_chunks(CHUNK).position_first(|c| !chunk_ok(c))?;
    let base = c * CHUNK;
    data[base..(base + CHUNK).min(data.len())]
        .iter()
        .position(|&v| !value_ok(v))
        .map(|i| base + i)
}

/// How a data set's values are held.
#[derive(Debug, Clone)]
enum Values {
    F32(Vec<f32>),
    /// Every value is exactly k / 255 for a byte k (8-bit images scaled to [0, 1] as
    /// `load_mnist` scales them), so the bytes are kept: a quarter of the memory, and a
    /// quarter of the bytes a batch gathers from random rows.
    Levels(Vec<u8>),
}

impl Values {
    /// The values as bytes k with k / 255 == value bit for bit, if they all are, and how many
    /// are nonzero. Stops at the first piece that is not.
    fn levels(data: &[f32]) -> Option<(Vec<u8>, usize)> {
        let mut out = vec![0u8; data.len()];
        let nnz = out
            .par_chunks_mut(LEVEL_PIECE)
            .zip(data.par_chunks(LEVEL_PIECE))
            .map(|(k, v)| to_levels(k, v).map(|nnz| nnz as usize))
            .try_reduce(|| 0, |a, b| Some(a + b))?;
        Some((out, nnz))
    }
}

/// Values per piece of the levels pass: a count of nonzeros within one fits a u32.
const LEVEL_PIECE: usize = 1 << 16;

/// k = round(v * 255) for each value (at most u32::MAX of them); the number of nonzero k when
/// every k / 255 gives v back bit for bit, else None.
#[inline(always)]
fn to_levels_generic(k: &mut [u8], v: &[f32]) -> Option<u32> {
    let (mut ok, mut nnz) = (true, 0u32);
    for (k, &v) in k.iter_mut().zip(v) {
        let level = (v * 255.0).round().clamp(0.0, 255.0) as u8;
        ok &= (level as f32 / 255.0).to_bits() == v.to_bits();
        nnz += u32::from(level != 0);
        *k = level;
    }
    ok.then_some(nnz)
}

dispatch!(fn to_levels(k: &mut [u8], v: &[f32]) -> Option<u32> = to_levels_generic);

/// dst = k / 255 for each byte k, rounded as float32 division rounds (as numpy's). With FMA,
/// without a division: q = k r (r = 1/255 rounded), then q + (k - 255 q) r, whose residual
/// k - 255 q one FMA gives exactly; that equals the division for all 256 bytes (tested), at a
/// third of the cost where vector division is slow.
#[inline(always)]
fn from_levels_generic<const FMA: bool>(dst: &mut [f32], k: &[u8]) {
    const R: f32 = 1.0 / 255.0;
    for (d, &k) in dst.iter_mut().zip(k) {
        let k = f32::from(k);
        *d = if FMA {
            let q = k * R;
            (-q).mul_add(255.0, k).mul_add(R, q)
        } else {
            k / 255.0
        };
    }
}

dispatch!(fn from_levels(dst: &mut [f32], k: &[u8]) -> () = from_levels_generic::<true>, from_levels_generic::<false>);

/// True when every value is in [0, 1] (false for NaN).
#[inline(always)]
fn unit_interval_generic(values: &[f32]) -> bool {
    // An AND over the flat slice, as integers, as `optim::all_within` does: over lanes of
    // bools it was vectorized across iterations, with gathers.
    let within = values
        .iter()
        .fold(1u32, |all, &v| all & u32::from((0.0..=1.0).contains(&v)));
    within == 1
}

dispatch!(fn unit_interval(values: &[f32]) -> bool = unit_interval_generic);

/// x (B, D) = the data rows named by `rows`, in one contiguous piece per thread: the same
/// pieces the first layer's index is built from next (`BatchNonzeros::build`), so each thread
/// tends to find its rows in its own cache.
pub fn gather(x: &mut [f32], data: &Dataset, rows: &[u32]) {
    let d = data.d;
    let per_thread = rows.len().div_ceil(rayon::current_num_threads()).max(1);
    x.par_chunks_mut(d * per_thread)
        .zip(rows.par_chunks(per_thread))
        .for_each(|(dst, idx)| {
            for (row, &i) in dst.chunks_exact_mut(d).zip(idx) {
                data.read_rows(row, i as usize, 1);
            }
        });
}

/// x (n, d) with each value p in (0, 1) replaced by a Bernoulli(p) draw, 0 or 1, keyed by
/// (seed, row): the fixed binarization that models trained with dynamic binarization are
/// scored on, the same whatever the thread count.
pub fn binarize_fixed(x: &mut [f32], d: usize, seed: u64) {
    x.par_chunks_mut(d.max(1)).enumerate().for_each(|(r, row)| {
        binarize_row(&mut stream(seed, Purpose::FixedBinarize, r as u64), row)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::tests::same_bits;

    /// Both conversions of a byte, with FMA and by division, give k / 255 as float32 division
    /// rounds it, for every byte.
    #[test]
    fn from_levels_divides_exactly() {
        let k: Vec<u8> = (0..=255).collect();
        let want: Vec<f32> = k.iter().map(|&k| f32::from(k) / 255.0).collect();
        let (mut fused, mut plain, mut dispatched) =
            (vec![0.0; 256], vec![0.0; 256], vec![0.0; 256]);
        from_levels_generic::<true>(&mut fused, &k);
        from_levels_generic::<false>(&mut plain, &k);
        from_levels(&mut dispatched, &k);
        assert!(same_bits(&fused, &want));
        assert!(same_bits(&plain, &want));
        assert!(same_bits(&dispatched, &want));
    }

    #[test]
    fn levels_hold_8_bit_images_exactly() {
        // Every byte scaled as numpy scales it, in an odd-sized data set: kept as bytes, and
        // given back bit for bit.
        let (n, d) = (3, 173);
        let data: Vec<f32> = (0..n * d).map(|i| (i % 256) as u8 as f32 / 255.0).collect();
        let set = Dataset::new(data.clone(), n, d).unwrap();
        assert!(set.is_levels());
        let mut back = vec![f32::NAN; n * d];
        set.read_rows(&mut back, 0, n);
        assert!(same_bits(&back, &data));
        let mut row = vec![f32::NAN; d];
        set.read_rows(&mut row, 2, 1);
        assert_eq!(row, data[2 * d..]);

        // One value a hair off a level (or -0.0, whose sign a byte would lose): kept as given.
        for odd in [f32::from_bits((7.0f32 / 255.0).to_bits() + 1), -0.0] {
            let mut data = data.clone();
            data[100] = odd;
            let set = Dataset::new(data.clone(), n, d).unwrap();
            assert!(!set.is_levels());
            set.read_rows(&mut back, 0, n);
            assert!(same_bits(&back, &data));
        }
    }

    /// The first layer's path follows the share of nonzeros either way a data set is held,
    /// counted across the levels pass's pieces (a data set of more than one).
    #[test]
    #[cfg_attr(
        miri,
        ignore = "a data set of several levels pieces is slow under Miri"
    )]
    fn path_follows_the_share_of_nonzeros() {
        let d = 1000;
        let n = 2 * LEVEL_PIECE / d + 3;
        for (share, want_sparse) in [(MAX_DENSITY - 0.01, true), (MAX_DENSITY + 0.01, false)] {
            let data: Vec<f32> = (0..n * d)
                .map(|i| {
                    let nonzero = ((i % 100) as f64) < share * 100.0;
                    if nonzero {
                        ((i % 255) + 1) as u8 as f32 / 255.0
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut off = data.clone();
            off[n * d - 1] = 0.123_456_7;
            for (data, levels) in [(data, true), (off, false)] {
                let set = Dataset::new(data, n, d).unwrap();
                assert_eq!(set.is_levels(), levels);
                assert_eq!(set.sparse, want_sparse, "share {share}, levels {levels}");
            }
        }
    }
}
