//! Hand-vectorised f32 reductions and row passes (AVX2 and FMA) for
//! [`super::kernels`].
//!
//! LLVM keeps a floating-point sum in order, so the generic loops either
//! carry one vector accumulator (each add waits on the last: a pass over
//! CUB's 1024-wide rows is latency-bound) or, with wider accumulator
//! arrays, spill them to the stack. Here four independent vector
//! accumulators, and the row passes of the similarity fused: two passes
//! over a row instead of five (centring) or three (its gradient).
//!
//! Every function requires a CPU with AVX2 and FMA (`has_avx2`).

use std::arch::x86_64::*;

/// Sum of the 8 lanes.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Largest of the 8 lanes.
#[inline(always)]
unsafe fn hmax(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_max_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `(a + b) + (c + d)`.
#[inline(always)]
unsafe fn add4(v: [__m256; 4]) -> __m256 {
    _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]))
}

#[inline(always)]
unsafe fn load(x: &[f32], i: usize) -> __m256 {
    debug_assert!(i + 8 <= x.len());
    _mm256_loadu_ps(x.as_ptr().add(i))
}

#[inline(always)]
unsafe fn store(x: &mut [f32], i: usize, v: __m256) {
    debug_assert!(i + 8 <= x.len());
    _mm256_storeu_ps(x.as_mut_ptr().add(i), v)
}

/// Runs `body(i)` at every multiple of 8 below `len / 8 * 8`, spreading the
/// calls over the 4 accumulator slots (`body(slot, i)`); returns the index
/// where the scalar tail starts.
#[inline(always)]
unsafe fn blocks(len: usize, mut body: impl FnMut(usize, usize)) -> usize {
    let wide = len / 32 * 32;
    let mut i = 0;
    while i < wide {
        body(0, i);
        body(1, i + 8);
        body(2, i + 16);
        body(3, i + 24);
        i += 32;
    }
    let narrow = len / 8 * 8;
    let mut slot = 0;
    while i < narrow {
        body(slot, i);
        slot += 1;
        i += 8;
    }
    narrow
}

/// The largest element and whether every element is finite.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn max_and_finite(x: &[f32]) -> (f32, bool) {
    let first = _mm256_set1_ps(x[0]);
    let zero = _mm256_setzero_ps();
    let mut mx = [first; 4];
    // x * 0 is 0 for finite x and NaN for NaN or infinite x.
    let mut chk = [zero; 4];
    let tail = blocks(x.len(), |s, i| {
        let v = load(x, i);
        mx[s] = _mm256_max_ps(mx[s], v);
        chk[s] = _mm256_fmadd_ps(v, zero, chk[s]);
    });
    let m = _mm256_max_ps(_mm256_max_ps(mx[0], mx[1]), _mm256_max_ps(mx[2], mx[3]));
    let (mut m, mut c) = (hmax(m), hsum(add4(chk)));
    for &v in &x[tail..] {
        if v > m {
            m = v;
        }
        c += v * 0.0;
    }
    (m, c == 0.0)
}

/// `sum_k a_k b_k`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [_mm256_setzero_ps(); 4];
    let tail = blocks(n, |s, i| {
        acc[s] = _mm256_fmadd_ps(load(a, i), load(b, i), acc[s]);
    });
    let mut r = hsum(add4(acc));
    for k in tail..n {
        r += a[k] * b[k];
    }
    r
}

/// `sum_k a_k`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn sum(a: &[f32]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let tail = blocks(a.len(), |s, i| {
        acc[s] = _mm256_add_ps(load(a, i), acc[s]);
    });
    let mut r = hsum(add4(acc));
    for &v in &a[tail..] {
        r += v;
    }
    r
}

/// `out = x - c` with `c` the mean of `x` (`centre`) or 0; returns
/// `(sum out^2, sum x^2, x finite)`. Two passes over the row.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn centre_row(x: &[f32], out: &mut [f32], centre: bool) -> (f32, f32, bool) {
    let n = x.len();
    assert!(out.len() >= n, "centre_row: output shorter than the row");
    let zero = _mm256_setzero_ps();
    let (mut chk, mut s, mut q) = ([zero; 4], [zero; 4], [zero; 4]);
    let tail = blocks(n, |k, i| {
        let v = load(x, i);
        chk[k] = _mm256_fmadd_ps(v, zero, chk[k]);
        s[k] = _mm256_add_ps(v, s[k]);
        q[k] = _mm256_fmadd_ps(v, v, q[k]);
    });
    let (mut chk, mut s, mut q) = (hsum(add4(chk)), hsum(add4(s)), hsum(add4(q)));
    for &v in &x[tail..] {
        chk += v * 0.0;
        s += v;
        q += v * v;
    }
    let mean = if centre && n > 0 { s / n as f32 } else { 0.0 };
    let mv = _mm256_set1_ps(mean);
    let mut c = [zero; 4];
    blocks(n, |k, i| {
        let o = _mm256_sub_ps(load(x, i), mv);
        store(out, i, o);
        c[k] = _mm256_fmadd_ps(o, o, c[k]);
    });
    let mut c = hsum(add4(c));
    for i in tail..n {
        let o = x[i] - mean;
        out[i] = o;
        c += o * o;
    }
    (c, q, chk == 0.0)
}

/// The gradient of one embedding row through `u = xc * inv` (and the
/// centring when `centre`), given `du` in `g` (overwritten):
/// `dxc = inv du - xc inv^3 (xc . du)`, minus its mean when centred. The
/// mean comes from the sums of `du` and `xc` of the first pass, so the row
/// is read twice.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn similarity_grad_row(g: &mut [f32], xc: &[f32], inv: f32, centre: bool) {
    let n = g.len();
    assert!(
        xc.len() >= n,
        "similarity_grad_row: row shorter than its gradient"
    );
    let zero = _mm256_setzero_ps();
    let (mut gx, mut sg, mut sx) = ([zero; 4], [zero; 4], [zero; 4]);
    let tail = blocks(n, |k, i| {
        let (gv, xv) = (load(g, i), load(xc, i));
        gx[k] = _mm256_fmadd_ps(gv, xv, gx[k]);
        sg[k] = _mm256_add_ps(gv, sg[k]);
        sx[k] = _mm256_add_ps(xv, sx[k]);
    });
    let (mut gx, mut sg, mut sx) = (hsum(add4(gx)), hsum(add4(sg)), hsum(add4(sx)));
    for i in tail..n {
        gx += g[i] * xc[i];
        sg += g[i];
        sx += xc[i];
    }
    let radial = gx * inv * inv * inv;
    let mean = if centre && n > 0 {
        (inv * sg - radial * sx) / n as f32
    } else {
        0.0
    };
    let (iv, rv, mv) = (
        _mm256_set1_ps(inv),
        _mm256_set1_ps(radial),
        _mm256_set1_ps(mean),
    );
    blocks(n, |_, i| {
        // g inv - (xc radial + mean)
        let shift = _mm256_fmadd_ps(load(xc, i), rv, mv);
        store(g, i, _mm256_fmsub_ps(load(g, i), iv, shift));
    });
    for i in tail..n {
        g[i] = g[i] * inv - (xc[i] * radial + mean);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn close(a: f32, b: f64, scale: f64) -> bool {
        (a as f64 - b).abs() <= 1e-5 * scale.max(1.0)
    }

    #[test]
    fn reductions_match_their_definitions_on_every_tail() {
        if !super::super::kernels::has_avx2() {
            return;
        }
        for len in [1, 7, 8, 9, 31, 32, 33, 100, 1024, 1031] {
            let (a, b) = (data(len, 1), data(len, 7));
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            let (d, s, (m, fin)) = unsafe { (dot(&a, &b), sum(&a), max_and_finite(&a)) };
            let want_d: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let want_s: f64 = a.iter().map(|&x| x as f64).sum();
            let want_m = a.iter().cloned().fold(f32::MIN, f32::max);
            assert!(close(d, want_d, len as f64), "dot, {len}: {d} vs {want_d}");
            assert!(close(s, want_s, len as f64), "sum, {len}: {s} vs {want_s}");
            assert!(fin && m == want_m, "max, {len}: {m} vs {want_m}");
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut c = a.clone();
                c[len - 1] = bad;
                // SAFETY: as above.
                assert!(
                    !unsafe { max_and_finite(&c) }.1,
                    "{bad} at the end of {len}"
                );
            }
        }
    }

    #[test]
    fn row_passes_match_their_definitions_on_every_tail() {
        if !super::super::kernels::has_avx2() {
            return;
        }
        for len in [1, 9, 33, 100, 1024, 1031] {
            for centre in [false, true] {
                let x = data(len, 3);
                let mut out = vec![f32::NAN; len];
                // SAFETY: the CPU has AVX2 and FMA.
                let (c, q, fin) = unsafe { centre_row(&x, &mut out, centre) };
                let mean = if centre {
                    x.iter().map(|&v| v as f64).sum::<f64>() / len as f64
                } else {
                    0.0
                };
                let want: Vec<f64> = x.iter().map(|&v| v as f64 - mean).collect();
                let want_c: f64 = want.iter().map(|v| v * v).sum();
                let want_q: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
                assert!(fin && close(c, want_c, len as f64) && close(q, want_q, len as f64));
                assert!(out.iter().zip(&want).all(|(&o, &w)| close(o, w, 1.0)));

                let du = data(len, 11);
                let mut g = du.clone();
                let inv = 0.7f32;
                // SAFETY: as above.
                unsafe { similarity_grad_row(&mut g, &out, inv, centre) };
                let inv = inv as f64;
                let r: f64 = du
                    .iter()
                    .zip(&out)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                let v: Vec<f64> = du
                    .iter()
                    .zip(&out)
                    .map(|(&a, &b)| a as f64 * inv - b as f64 * r * inv * inv * inv)
                    .collect();
                let m = if centre {
                    v.iter().sum::<f64>() / len as f64
                } else {
                    0.0
                };
                for (k, (&got, &w)) in g.iter().zip(&v).enumerate() {
                    assert!(
                        close(got, w - m, len as f64),
                        "{len}, centre {centre}, entry {k}: {got} vs {}",
                        w - m
                    );
                }
            }
        }
    }
}
