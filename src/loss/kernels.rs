//! Row kernels over raw buffers for the fused CPU loss: the scalar type, a
//! vectorisable exp, reductions with independent accumulators (LLVM keeps
//! floating-point sums in order, so one accumulator would not vectorise), and
//! AVX2 builds of the heavy row loops chosen at run time. In f32 on an AVX2
//! CPU, the reductions and the similarity's row passes are those of
//! `avx_f32` (x86-64 only), written with intrinsics.

use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// f32 or f64.
pub(crate) trait Real:
    tch::kind::Element
    + Copy
    + Send
    + Sync
    + PartialOrd
    + Default
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + 'static
{
    /// 1 (ZERO comes from `tch::kind::Element`).
    const ONE: Self;
    /// Machine epsilon.
    const EPS: f64;
    /// Smallest divisor used for norms.
    const TINY: Self;
    /// Smallest positive normal number: a replicator row sum at or below it
    /// is degenerate (its reciprocal overflows, its square underflows).
    const MIN_NORMAL: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn powf(self, p: f64) -> Self;
}

/// [`Real`] for the primitive float `$t`: its own constants and methods
/// (`as` conversions, which are the identity for f64), `TINY` and `exp`
/// given.
macro_rules! impl_real {
    ($t:ident, tiny: $tiny:expr, exp: $exp:path) => {
        impl Real for $t {
            const ONE: Self = 1.0;
            const EPS: f64 = $t::EPSILON as f64;
            const TINY: Self = $tiny;
            const MIN_NORMAL: Self = $t::MIN_POSITIVE;
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                $t::ln(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                $t::sqrt(self)
            }
            #[inline]
            fn powf(self, p: f64) -> Self {
                $t::powf(self, p as $t)
            }
        }
    };
}

impl_real!(f64, tiny: 1e-300, exp: f64::exp);
impl_real!(f32, tiny: 1e-30, exp: exp_f32);

/// exp for f32 without branches or calls, so loops over it vectorise
/// (Cephes' expf: range reduction by ln 2 in two parts, degree-5
/// polynomial; within 2 ulp on [-87.3, 88.7]). Above that range the input
/// is clamped (3.4e38); below it the result is 0, where libtorch's exp
/// gives subnormals and then 0: a gaussian W entry there is no weight at
/// all, as in the libtorch paths, rather than the smallest normal number
/// (which made rows pass the replicator's smallest-normal test that the
/// other paths keep as they are). Both are selects, which vectorise.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = if x < -87.336_54 { -87.336_54 } else { x };
    let xc = if xc > 88.722_84 { 88.722_84 } else { xc };
    let k = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - k * C1 - k * C2;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    // 2^k from the bits of k + 127 + 2^23, whose low mantissa bits hold
    // k + 127 (a float-to-int cast would not vectorise).
    let bits = (k + 8_388_735.0).to_bits() << 23;
    let e = y * f32::from_bits(bits);
    if x < -87.336_54 {
        0.0
    } else {
        e
    }
}

const LANES: usize = 8;

/// Whether `T` is f32 and this CPU has the kernels of `avx_f32`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn takes_avx_f32<T: Real>() -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() && has_avx2()
}

/// `x` as f32 when [`takes_avx_f32`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn avx_f32<T: Real>(x: &[T]) -> Option<&[f32]> {
    // SAFETY: T is f32.
    takes_avx_f32::<T>()
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()) })
}

/// As [`avx_f32`], for a buffer written to.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn avx_f32_mut<T: Real>(x: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: T is f32.
    takes_avx_f32::<T>()
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut f32, x.len()) })
}

#[inline(always)]
fn fold<T: Real>(acc: [T; LANES], f: impl Fn(T, T) -> T) -> T {
    let mut r = acc[0];
    for &a in &acc[1..] {
        r = f(r, a);
    }
    r
}

#[inline(always)]
fn maxr<T: Real>(a: T, b: T) -> T {
    if b > a {
        b
    } else {
        a
    }
}

/// The largest element and whether every element is finite.
#[inline(always)]
pub(crate) fn max_and_finite<T: Real>(x: &[T]) -> (T, bool) {
    #[cfg(target_arch = "x86_64")]
    if let Some(x) = avx_f32(x) {
        // SAFETY: `avx_f32` checked the CPU.
        let (m, finite) = unsafe { super::avx_f32::max_and_finite(x) };
        return (T::from_f64(m as f64), finite);
    }
    let first = x[0];
    let mut mx = [first; LANES];
    // x * 0 is 0 for finite x and NaN for NaN or infinite x.
    let mut chk = [T::ZERO; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            mx[k] = maxr(mx[k], c[k]);
            chk[k] += c[k] * T::ZERO;
        }
    }
    for (k, &v) in rest.iter().enumerate() {
        mx[k] = maxr(mx[k], v);
        chk[k] += v * T::ZERO;
    }
    let c = fold(chk, |a, b| a + b);
    (fold(mx, maxr), c == T::ZERO)
}

/// `sum_k a_k b_k`.
#[inline(always)]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    #[cfg(target_arch = "x86_64")]
    if let (Some(a), Some(b)) = (avx_f32(a), avx_f32(b)) {
        // SAFETY: `avx_f32` checked the CPU.
        return T::from_f64(unsafe { super::avx_f32::dot(a, b) } as f64);
    }
    let mut acc = [T::ZERO; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..LANES {
            acc[k] += x[k] * y[k];
        }
    }
    for (k, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        acc[k] += x * y;
    }
    fold(acc, |p, q| p + q)
}

/// `sum_k a_k`.
#[inline(always)]
pub(crate) fn sum<T: Real>(a: &[T]) -> T {
    #[cfg(target_arch = "x86_64")]
    if let Some(a) = avx_f32(a) {
        // SAFETY: `avx_f32` checked the CPU.
        return T::from_f64(unsafe { super::avx_f32::sum(a) } as f64);
    }
    let mut acc = [T::ZERO; LANES];
    let ca = a.chunks_exact(LANES);
    let ra = ca.remainder();
    for x in ca {
        for k in 0..LANES {
            acc[k] += x[k];
        }
    }
    for (k, &x) in ra.iter().enumerate() {
        acc[k] += x;
    }
    fold(acc, |p, q| p + q)
}

/// What one row of logits gives the loss (see [`logits_row`]).
#[derive(Clone, Copy)]
pub(crate) struct LogitsRow<T> {
    /// `logsumexp(l) - l[label]`: the row's cross-entropy (0 without CE).
    pub ce: f64,
    /// `1 / sum exp(l - max)`: softmax = `ce_exp * scale`.
    pub scale: T,
    pub finite: bool,
}

/// The inputs and outputs of [`logits_row`] for one row.
pub(crate) struct LogitsRowArgs<'a, T> {
    /// The row of logits.
    pub l: &'a [T],
    pub label: usize,
    /// Where `exp(l - max)` goes (with the cross-entropy).
    pub ce_exp: Option<&'a mut [T]>,
    /// Where `softmax(l / T)` goes (over `columns` only, when given).
    pub prior: Option<&'a mut [T]>,
    pub columns: Option<&'a [usize]>,
    /// `1 / T`.
    pub inv_t: T,
}

#[inline(always)]
fn logits_row_impl<T: Real>(args: LogitsRowArgs<'_, T>) -> LogitsRow<T> {
    let LogitsRowArgs {
        l,
        label,
        ce_exp,
        prior,
        columns,
        inv_t,
    } = args;
    let (mx, finite) = max_and_finite(l);
    let mut out = LogitsRow {
        ce: 0.0,
        scale: T::ONE,
        finite,
    };
    if !finite {
        return out;
    }
    if let Some(e) = ce_exp {
        for (o, &v) in e.iter_mut().zip(l) {
            *o = (v - mx).exp();
        }
        let s = sum(e);
        out.scale = T::ONE / s;
        out.ce = s.to_f64().ln() + (mx - l[label]).to_f64();
    }
    if let Some(p) = prior {
        match columns {
            None => {
                for (o, &v) in p.iter_mut().zip(l) {
                    *o = ((v - mx) * inv_t).exp();
                }
            }
            Some(cols) => {
                let cm = cols.iter().fold(l[cols[0]], |a, &k| maxr(a, l[k]));
                for (o, &k) in p.iter_mut().zip(cols) {
                    *o = ((l[k] - cm) * inv_t).exp();
                }
            }
        }
        let inv = T::ONE / sum(p);
        for v in p.iter_mut() {
            *v *= inv;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn logits_row_avx2<T: Real>(args: LogitsRowArgs<'_, T>) -> LogitsRow<T> {
    logits_row_impl(args)
}

/// One row of logits, in one pass per exponential: the largest entry and
/// finiteness; with `ce_exp`, `exp(l - max)` written there and the row's
/// cross-entropy against `label`; with `prior`, `softmax(l / T)` written
/// there.
pub(crate) fn logits_row<T: Real>(args: LogitsRowArgs<'_, T>) -> LogitsRow<T> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA.
        return unsafe { logits_row_avx2(args) };
    }
    logits_row_impl(args)
}

/// The gradient of one row of logits:
/// `out = prior (dx - r) / T + ce_coef (exp(l - lse) - onehot(label))`,
/// the first term only where `dx` is given. `ce_exp` holds `exp(l - max)`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn grad_row_impl<T: Real>(
    out: &mut [T],
    prior: Option<(&[T], &[T])>,
    inv_t: T,
    ce: Option<(&[T], T)>,
    label: usize,
    ce_coef: T,
) {
    match (prior, ce) {
        (Some((p, dx)), Some((e, scale))) => {
            let r = dot(p, dx);
            let c = ce_coef * scale;
            for k in 0..out.len() {
                out[k] = p[k] * (dx[k] - r) * inv_t + c * e[k];
            }
        }
        (Some((p, dx)), None) => {
            let r = dot(p, dx);
            for k in 0..out.len() {
                out[k] = p[k] * (dx[k] - r) * inv_t;
            }
        }
        (None, Some((e, scale))) => {
            let c = ce_coef * scale;
            for k in 0..out.len() {
                out[k] = c * e[k];
            }
        }
        (None, None) => {
            for v in out.iter_mut() {
                *v = T::ZERO;
            }
        }
    }
    if ce.is_some() {
        out[label] -= ce_coef;
    }
}

/// Sums of one embedding row for the similarity: `sum (x - c)^2` and
/// `sum x^2`, with `c` the row's mean (`centre`) or 0, and whether the row
/// is finite. Writes `x - c` into `out`.
#[inline(always)]
fn centre_row_impl<T: Real>(x: &[T], out: &mut [T], centre: bool) -> (T, T, bool) {
    // Separate passes over the (L1-resident) row: one loop carrying three
    // accumulator arrays did not vectorise.
    let finite = max_and_finite(x).1;
    let q = dot(x, x);
    let mean = if centre {
        sum(x) / T::from_f64(x.len() as f64)
    } else {
        T::ZERO
    };
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v - mean;
    }
    (dot(out, out), q, finite)
}

/// The gradient of one embedding row through `u = xc * inv` (and the
/// centring when `centre`), given `du` in `g` (overwritten):
/// `dxc = inv du - xc inv^3 (xc . du)`, minus its mean when centred.
#[inline(always)]
fn similarity_grad_row_impl<T: Real>(g: &mut [T], xc: &[T], inv: T, centre: bool) {
    let radial = dot(g, xc) * inv * inv * inv;
    let mut acc = [T::ZERO; LANES];
    let mut cg = g.chunks_exact_mut(LANES);
    let cx = xc.chunks_exact(LANES);
    let rx = cx.remainder();
    for (gs, xs) in (&mut cg).zip(cx) {
        for k in 0..LANES {
            let v = gs[k] * inv - xs[k] * radial;
            gs[k] = v;
            acc[k] += v;
        }
    }
    for (k, (gv, &xv)) in cg.into_remainder().iter_mut().zip(rx).enumerate() {
        *gv = *gv * inv - xv * radial;
        acc[k] += *gv;
    }
    if centre {
        let mean = fold(acc, |a, b| a + b) / T::from_f64(g.len() as f64);
        for v in g.iter_mut() {
            *v -= mean;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn centre_row_avx2<T: Real>(x: &[T], out: &mut [T], centre: bool) -> (T, T, bool) {
    centre_row_impl(x, out, centre)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn similarity_grad_row_avx2<T: Real>(g: &mut [T], xc: &[T], inv: T, centre: bool) {
    similarity_grad_row_impl(g, xc, inv, centre)
}

/// [`centre_row_impl`] with the best instruction set of this CPU.
pub(crate) fn centre_row<T: Real>(x: &[T], out: &mut [T], centre: bool) -> (T, T, bool) {
    #[cfg(target_arch = "x86_64")]
    if let (Some(xf), Some(of)) = (avx_f32(x), avx_f32_mut(&mut *out)) {
        // SAFETY: `avx_f32` checked the CPU.
        let (c, q, finite) = unsafe { super::avx_f32::centre_row(xf, of, centre) };
        return (T::from_f64(c as f64), T::from_f64(q as f64), finite);
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA.
        return unsafe { centre_row_avx2(x, out, centre) };
    }
    centre_row_impl(x, out, centre)
}

/// [`similarity_grad_row_impl`] with the best instruction set of this CPU.
pub(crate) fn similarity_grad_row<T: Real>(g: &mut [T], xc: &[T], inv: T, centre: bool) {
    #[cfg(target_arch = "x86_64")]
    if let (Some(gf), Some(xf)) = (avx_f32_mut(&mut *g), avx_f32(xc)) {
        // SAFETY: `avx_f32` checked the CPU; `inv` is an f32.
        let inv = inv.to_f64() as f32;
        return unsafe { super::avx_f32::similarity_grad_row(gf, xf, inv, centre) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA.
        return unsafe { similarity_grad_row_avx2(g, xc, inv, centre) };
    }
    similarity_grad_row_impl(g, xc, inv, centre)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn grad_row_avx2<T: Real>(
    out: &mut [T],
    prior: Option<(&[T], &[T])>,
    inv_t: T,
    ce: Option<(&[T], T)>,
    label: usize,
    ce_coef: T,
) {
    grad_row_impl(out, prior, inv_t, ce, label, ce_coef)
}

/// Whether this CPU has AVX2 and FMA (checked once).
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`grad_row_impl`] with the best instruction set of this CPU.
pub(crate) fn grad_row<T: Real>(
    out: &mut [T],
    prior: Option<(&[T], &[T])>,
    inv_t: T,
    ce: Option<(&[T], T)>,
    label: usize,
    ce_coef: T,
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { grad_row_avx2(out, prior, inv_t, ce, label, ce_coef) };
    }
    grad_row_impl(out, prior, inv_t, ce, label, ce_coef)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_two_ulp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp_f32(x);
            let want = (x as f64).exp();
            let rel = ((got as f64 - want) / want).abs();
            assert!(
                rel < 2.5 * f32::EPSILON as f64,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
        assert_eq!(exp_f32(-87.4), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(-87.3) > 1.1e-38);
        assert!(exp_f32(100.0) > 3.0e38);
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn reductions_match_plain_loops() {
        let a: Vec<f64> = (0..37).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..37).map(|i| (i as f64 * 0.11).cos()).collect();
        let plain: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - plain).abs() < 1e-12);
        assert!((sum(&a) - a.iter().sum::<f64>()).abs() < 1e-12);
        let (mx, fin) = max_and_finite(&a);
        assert_eq!(mx, a.iter().cloned().fold(f64::MIN, f64::max));
        assert!(fin);
        let mut c = a.clone();
        c[30] = f64::NAN;
        assert!(!max_and_finite(&c).1);
        c[30] = f64::NEG_INFINITY;
        assert!(!max_and_finite(&c).1);
    }
}
