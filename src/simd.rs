//! Vectorizable elementwise math and run-time selection of the widest instruction set.
//!
//! The wheel is built for generic x86-64, so the compiler may only assume SSE2. Hot loops are
//! written once as `#[inline(always)]` code over slices, then compiled a second and third time
//! inside `#[target_feature]` functions (AVX-512, AVX2+FMA) where the compiler vectorizes them
//! 16 or 8 wide; `dispatch!` picks the widest the CPU has. libm's `expf`/`log1pf` are scalar
//! calls, so `exp_nonpositive` and `log1p_unit` are polynomial versions (Cephes `expf` and
//! `logf`) accurate to a few ulp on the ranges used here.

/// Call `$generic` compiled for the best available instruction set. The body must be safe
/// code; the target-feature wrappers only change code generation, and each is called only
/// once the CPU is known to have every feature it is compiled for.
macro_rules! dispatch {
    ($vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty = $generic:path) => {
        $crate::simd::dispatch!($vis fn $name($($arg: $ty),*) -> $ret = $generic, $generic);
    };
    // A second path for CPUs without FMA, where `mul_add` would be a slow library call.
    ($vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty = $generic:path, $fallback:path) => {
        $crate::simd::dispatch!($vis fn $name($($arg: $ty),*) -> $ret = $generic, $generic, $fallback);
    };
    // A separate AVX2 path, for kernels whose register blocks are sized to the ISA's register
    // file (32 AVX-512 registers, 16 AVX2 ones).
    ($vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty = $generic:path, $generic_avx2:path, $fallback:path) => {
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                /// `$generic` compiled with AVX-512 (F, VL, DQ, BW), AVX2 and FMA.
                ///
                /// # Safety
                /// The CPU must have all of those features.
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                /// `$generic` compiled with AVX2 and FMA.
                ///
                /// # Safety
                /// The CPU must have AVX2 and FMA.
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $generic_avx2($($arg),*)
                }
                match $crate::simd::isa() {
                    // SAFETY: `isa` answers Avx512 only when the CPU has every feature
                    // `avx512` is compiled for.
                    $crate::simd::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: `isa` answers Avx2 only when the CPU has AVX2 and FMA, the
                    // features `avx2` is compiled for.
                    $crate::simd::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::simd::Isa::Generic => {}
                }
            }
            $fallback($($arg),*)
        }
    };
}
pub(crate) use dispatch;

/// The instruction sets fastvae's own kernels choose among, widest last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// SSE2 only (or not x86-64): the plain code, without FMA.
    Generic,
    /// AVX2 and FMA: 8 lanes.
    Avx2,
    /// AVX-512 F, VL, DQ and BW, with AVX2 and FMA: 16 lanes.
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Generic => "generic",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// The widest instruction set this CPU has, capped by the `FASTVAE_ISA` environment variable
/// ("avx2" or "generic"; anything else, or unset, caps nothing): `FASTVAE_ISA=avx2` runs the
/// AVX2 kernels on a CPU with AVX-512 (and leaves AMX off), to measure what CPUs without it
/// get. Decided once per process.
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = match std::env::var("FASTVAE_ISA").as_deref() {
            Ok("generic") => Isa::Generic,
            Ok("avx2") => Isa::Avx2,
            _ => Isa::Avx512,
        };
        detect().min(cap)
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    use std::arch::is_x86_feature_detected as has;
    // AVX2 and FMA are checked with AVX-512 too: CPUs with AVX-512 have them, but nothing
    // architectural promises it (a virtual machine may hide them).
    let avx2 = has!("avx2") && has!("fma");
    if avx2 && has!("avx512f") && has!("avx512vl") && has!("avx512dq") && has!("avx512bw") {
        Isa::Avx512
    } else if avx2 {
        Isa::Avx2
    } else {
        Isa::Generic
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Generic
}

/// a * b + c, fused into one instruction when FMA (a const parameter of the calling kernel).
#[inline(always)]
pub fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Lanes of partial sums in vectorized reductions: a fixed count, so sums do not depend on
/// which instruction set ran.
pub const LANES: usize = 16;

/// exp(t) for t <= 0 (Cephes expf: t = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial in r,
/// times 2^n). Below -87.3 it returns exp(-87.3), about 1e-38, where 1 + e == 1 anyway.
///
/// The polynomials here and in `log1p_unit` are evaluated in Estrin's scheme (pairs of terms,
/// then pairs of pairs) rather than Horner's: the same coefficients and error, in half the
/// chain of dependent multiply-adds, so vectorized loops over them are not bound by latency.
#[inline(always)]
pub fn exp_nonpositive<const FMA: bool>(t: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds t log2(e) to an integer n (ties to even) and leaves it in the
    // low mantissa bits, where a bit cast reads it out for 2^n below: unlike `round` and
    // `n as i32` (a library call without SSE4.1; saturating, so scalar code) this vectorizes.
    const MAGIC: f32 = 12_582_912.0;
    let t = t.max(-87.3);
    let shifted = t * std::f32::consts::LOG2_E + MAGIC;
    let n = shifted - MAGIC;
    let r = fmadd::<FMA>(n, 2.121_944_4e-4, fmadd::<FMA>(n, -0.693_359_4, t));
    // p = c0 r^5 + c1 r^4 + c2 r^3 + c3 r^2 + c4 r + c5.
    let r2 = r * r;
    let c01 = fmadd::<FMA>(1.987_569_1e-4, r, 1.398_199_9e-3);
    let c23 = fmadd::<FMA>(8.333_452e-3, r, 4.166_579_6e-2);
    let c45 = fmadd::<FMA>(0.166_666_65, r, 0.5);
    let p = fmadd::<FMA>(r2, fmadd::<FMA>(r2, c01, c23), c45);
    let y = fmadd::<FMA>(p * r, r, r) + 1.0;
    // n is an integer in [-126, 0].
    let n_bits = shifted.to_bits().wrapping_sub(MAGIC.to_bits());
    y * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// log(1 + e) for e in [0, 1] (Cephes logf on m = 1 + e, or m = (1 + e) / 2 above sqrt 2,
/// with f = m - 1 formed exactly from e).
#[inline(always)]
pub fn log1p_unit<const FMA: bool>(e: f32) -> f32 {
    let high = e > std::f32::consts::SQRT_2 - 1.0;
    let f = if high { (e - 1.0) * 0.5 } else { e };
    let k = if high { 1.0 } else { 0.0 };
    let z = f * f;
    // p = c0 f^8 + c1 f^7 + ... + c8, as c0 z^4 + (c1 f + c2) z^3 + ... + (c7 f + c8).
    let z2 = z * z;
    let c12 = fmadd::<FMA>(-0.115_146_1, f, 0.116_769_98);
    let c34 = fmadd::<FMA>(-0.124_201_41, f, 0.142_493_23);
    let c56 = fmadd::<FMA>(-0.166_680_57, f, 0.200_007_15);
    let c78 = fmadd::<FMA>(-0.249_999_94, f, 0.333_333_3);
    let high4 = fmadd::<FMA>(z2, 7.037_683_6e-2, fmadd::<FMA>(z, c12, c34));
    let p = fmadd::<FMA>(z2, high4, fmadd::<FMA>(z, c56, c78));
    let mut y = p * f * z;
    y = fmadd::<FMA>(-2.121_944_4e-4, k, y);
    y = fmadd::<FMA>(-0.5, z, y);
    fmadd::<FMA>(0.693_359_4, k, f + y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_variants_match() {
        for i in 0..=10_000 {
            let t = -(i as f32) * 87.0 / 10_000.0;
            let (a, b) = (exp_nonpositive::<false>(t), exp_nonpositive::<true>(t));
            assert!(((a - b) / a).abs() < 3e-7, "exp({t}): {a} vs {b}");
            let e = i as f32 / 10_000.0;
            let (a, b) = (log1p_unit::<false>(e), log1p_unit::<true>(e));
            assert!(
                (a - b).abs() <= 3e-7 * a.max(1e-30),
                "log1p({e}): {a} vs {b}"
            );
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "200,001 evaluations: over two minutes under Miri")]
    fn exp_matches_libm() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let t = -(i as f32) * 87.0 / 200_000.0;
            let want = (t as f64).exp();
            for got in [exp_nonpositive::<false>(t), exp_nonpositive::<true>(t)] {
                worst = worst.max(((got as f64 - want) / want).abs());
            }
        }
        assert!(worst < 4e-7, "max relative error {worst}");
        assert_eq!(exp_nonpositive::<false>(0.0), 1.0);
        assert!(exp_nonpositive::<false>(-1000.0) < 1e-37);
        assert!(exp_nonpositive::<false>(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    #[cfg_attr(miri, ignore = "200,001 evaluations: a minute and a half under Miri")]
    fn log1p_matches_libm() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let e = i as f32 / 200_000.0;
            let want = (e as f64).ln_1p();
            for got in [log1p_unit::<false>(e), log1p_unit::<true>(e)] {
                let got = got as f64;
                let err = if want > 0.0 {
                    ((got - want) / want).abs()
                } else {
                    got.abs()
                };
                worst = worst.max(err);
            }
        }
        assert!(worst < 4e-7, "max relative error {worst}");
        assert!(
            log1p_unit::<false>(1e-30) > 0.0 && (log1p_unit::<false>(1e-30) - 1e-30).abs() < 1e-36
        );
    }
}
