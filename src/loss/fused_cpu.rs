//! The closed-form loss and gradients of [`super::analytic`], fused into
//! loops over raw CPU buffers.
//!
//! Same math as the libtorch version, but every elementwise pass, reduction
//! and n x n bookkeeping step is a loop over the buffers (vectorised, rows in
//! parallel when they are long), and the matrix products of a batch's size
//! run on [`super::gemm`]'s kernels (libtorch's BLAS takes larger ones).
//! While a float32 call with such products runs, the helper thread of
//! [`super::threads::Hot`] polls, and the products and long row loops are
//! shared with it. The input checks that read data (finite values, label
//! range) are fused into the first passes.

// Numeric loops index several buffers by the same row and column; iterator
// chains over four zipped slices would be harder to check against the math.
#![allow(clippy::needless_range_loop)]

use tch::{Device, Kind, Tensor};

use super::anchors::anchor_flags;
use super::checks::{check_label_range, check_structure, count_not_finite};
use super::gemm;
use super::kernels::{
    centre_row, dot, grad_row, logits_row, max_and_finite, similarity_grad_row, sum, LogitsRow,
    LogitsRowArgs, Real,
};
use super::similarity::{effective_power, Similarity};
use super::threads::{self, par_rows};
use super::GroupLossOptions;
use super::GroupLossOutput;
use crate::error::{Error, Result};
use crate::names::tensor_device_name;

/// A contiguous CPU tensor viewed as a slice of `T`.
///
/// The data pointer is read once: every `data_ptr` is a call into libtorch
/// (with its error check), and the loops over a batch's n x n entries would
/// pay it per row.
struct Buf<T: Real> {
    t: Tensor,
    ptr: *mut T,
    len: usize,
}

impl<T: Real> Buf<T> {
    fn new(t: Tensor) -> Self {
        debug_assert!(t.is_contiguous() && t.kind() == T::KIND && t.device() == Device::Cpu);
        let len = t.numel();
        let ptr = if len == 0 {
            std::ptr::NonNull::dangling().as_ptr()
        } else {
            t.data_ptr() as *mut T
        };
        Buf { t, ptr, len }
    }

    fn empty(shape: &[i64]) -> Self {
        Buf::new(Tensor::empty(shape, (T::KIND, Device::Cpu)))
    }

    fn zeros(shape: &[i64]) -> Self {
        Buf::new(Tensor::zeros(shape, (T::KIND, Device::Cpu)))
    }

    fn s(&self) -> &[T] {
        // SAFETY: the tensor is contiguous, of kind T, owned by self and
        // never resized, so its `len` elements stay at `ptr`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn m(&mut self) -> &mut [T] {
        // SAFETY: as in `s`; `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// `self @ self^T`, computing only the blocks on and below the diagonal
    /// and mirroring them: 62-75% of the multiply-adds of a full product for
    /// the batch sizes where the products dominate.
    fn gram(&self) -> Buf<T> {
        let (n, k) = (self.t.size()[0], self.t.size()[1]);
        let mut out = Buf::<T>::empty(&[n, n]);
        if gemm::try_matmul(&self.t, &self.t, true, true, &out.t) {
            return out;
        }
        // Long rows (thousands of classes) keep the half-size blocks
        // efficient for a few dozen rows already.
        let blocks = match n {
            32..=127 if k >= 2048 => 2,
            0..=127 => 1,
            128..=511 => 2,
            _ => 4,
        };
        if blocks == 1 {
            let _ = self.t.mm_out(&out.t, &self.t.transpose(0, 1));
            return out;
        }
        let bounds: Vec<(i64, i64)> = (0..blocks)
            .map(|b| (b * n / blocks, (b + 1) * n / blocks))
            .collect();
        for (bi, &(i0, i1)) in bounds.iter().enumerate() {
            let rows_i = self.t.narrow(0, i0, i1 - i0);
            for &(j0, j1) in &bounds[..=bi] {
                let rows_j = self.t.narrow(0, j0, j1 - j0);
                let block = rows_i.mm(&rows_j.transpose(0, 1));
                out.t
                    .narrow(0, i0, i1 - i0)
                    .narrow(1, j0, j1 - j0)
                    .copy_(&block);
            }
        }
        let (n, o) = (n as usize, out.m());
        let upper_start = bounds.iter().map(|&(a, b)| (a as usize, b as usize));
        for (a, b) in upper_start {
            // Mirror every entry above the computed blocks.
            for i in a..b {
                for j in b..n {
                    o[i * n + j] = o[j * n + i];
                }
            }
        }
        out
    }

    /// `self @ self^T` where the products among the first `u` rows and the
    /// rest are needed, and those among the rest only for the record (the
    /// anchors of the refinement, see [`Order`]): below 128 rows, where
    /// [`Self::gram`] is one full product, rows `..u` against all and the
    /// last rows among themselves, mirrored.
    fn gram_anchored(&self, u: usize) -> Buf<T> {
        let n = self.t.size()[0] as usize;
        if u == 0 || u == n || n >= 128 || gemm::available() && T::KIND == Kind::Float {
            // The kernels' Gram computes only the tiles on and below the
            // diagonal: fewer multiply-adds than the rows `..u` against all.
            return self.gram();
        }
        let (ui, ai) = (u as i64, (n - u) as i64);
        let mut out = Buf::<T>::empty(&[n as i64, n as i64]);
        let _ = self
            .t
            .narrow(0, 0, ui)
            .mm_out(&out.t.narrow(0, 0, ui), &self.t.transpose(0, 1));
        let rest = self.t.narrow(0, ui, ai);
        let block = Buf::<T>::new(rest.mm(&rest.transpose(0, 1)));
        let (o, b) = (out.m(), block.s());
        let na = n - u;
        for a in u..n {
            for j in 0..u {
                o[a * n + j] = o[j * n + a];
            }
            o[a * n + u..(a + 1) * n].copy_from_slice(&b[(a - u) * na..(a - u + 1) * na]);
        }
        out
    }

    /// `self @ other^T` or `self @ other`.
    fn mm(&self, other: &Buf<T>, transpose_other: bool) -> Buf<T> {
        let rows = self.t.size()[0];
        let cols = other.t.size()[if transpose_other { 0 } else { 1 }];
        let out = Buf::<T>::empty(&[rows, cols]);
        matmul_into(&self.t, &other.t, transpose_other, &out.t);
        out
    }
}

/// `a @ b` (`transpose_b`: `a @ b^T`) into `out`, a matrix of its own: the
/// products of a batch's size by [`gemm`], the others by libtorch.
fn matmul_into(a: &Tensor, b: &Tensor, transpose_b: bool, out: &Tensor) {
    if !gemm::try_matmul(a, b, transpose_b, false, out) {
        let b = if transpose_b {
            b.transpose(0, 1)
        } else {
            b.shallow_clone()
        };
        let _ = a.mm_out(out, &b);
    }
}

/// Rows of a buffer shared between threads, each thread writing its own rows.
#[derive(Clone, Copy)]
struct Rows<T> {
    ptr: *mut T,
    width: usize,
}

// SAFETY: used only by `par_rows`, where each index (row) is visited once.
unsafe impl<T> Send for Rows<T> {}
unsafe impl<T> Sync for Rows<T> {}

impl<T> Rows<T> {
    fn of(buf: &mut [T], width: usize) -> Self {
        Rows {
            ptr: buf.as_mut_ptr(),
            width,
        }
    }

    /// SAFETY: `i` in range, the buffer outlives `'a`, and no other live
    /// reference to row `i`.
    unsafe fn row<'a>(self, i: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.ptr.add(i * self.width), self.width)
    }
}

fn scalar<T: Real>(v: f64) -> Tensor {
    Tensor::scalar_tensor(v, (T::KIND, Device::Cpu))
}

/// Entry point: checks and dispatch on the dtype.
pub(crate) fn group_loss_with_grads(
    emb: &Tensor,
    logits: &Tensor,
    labels: &Tensor,
    opts: &GroupLossOptions,
    want_grads: bool,
    want_probs: bool,
) -> Result<GroupLossOutput> {
    check_structure(emb, logits, labels, opts)?;
    if emb.device() != Device::Cpu {
        return Err(Error::invalid(
            "implementation",
            format!("\"fused_cpu\" with tensors on {}", tensor_device_name(emb)),
            "CPU tensors (use \"auto\" or \"libtorch\" on other devices)",
        ));
    }
    let kind = super::refine::compute_kind(&[emb.kind(), logits.kind()]);
    let _guard = tch::no_grad_guard();
    // Inputs already of the kind and contiguous (the usual case) are read
    // in place: every libtorch call costs a dispatch, and these add up on
    // the small batches of CUB.
    let readable = |t: &Tensor| {
        if t.kind() == kind && t.is_contiguous() {
            t.shallow_clone()
        } else {
            t.to_kind(kind).contiguous()
        }
    };
    let (emb, logits) = (readable(emb), readable(logits));
    let y = if labels.kind() == Kind::Int64 && labels.is_contiguous() && labels.numel() > 0 {
        // SAFETY: a contiguous int64 CPU tensor (same device as the
        // embeddings, checked above) of `numel` elements, alive meanwhile.
        unsafe { std::slice::from_raw_parts(labels.data_ptr() as *const i64, labels.numel()) }
            .to_vec()
    } else {
        super::anchors::labels_to_vec(labels)?
    };
    let m = logits.size()[1];
    let lo = y.iter().copied().min().unwrap_or(0);
    let hi = y.iter().copied().max().unwrap_or(0);
    check_label_range(lo, hi, Some(m))?;
    match kind {
        Kind::Double => run::<f64>(&emb, &logits, &y, opts, want_grads, want_probs),
        _ => run::<f32>(&emb, &logits, &y, opts, want_grads, want_probs),
    }
}

/// The similarity of the embeddings and what its backward needs.
struct Sim<T: Real> {
    /// Centred rows (correlation), rows (cosine) or the embeddings
    /// (gaussian), n x d, not normalised.
    rows: Buf<T>,
    norms: Vec<T>,
    degenerate: Vec<bool>,
    /// W, n x n.
    w: Buf<T>,
    /// Off-diagonal entries whose pre-clip similarity is positive.
    active: Vec<bool>,
    /// `power * base^(power - 1)` per entry when W is sharpened (empty
    /// otherwise).
    dpower: Vec<T>,
}

/// W of the embeddings in the refinement's order (`ord`).
fn similarity_forward<T: Real>(
    emb: &Tensor,
    kind: Similarity,
    zero_diagonal: bool,
    power: f64,
    ord: &Order,
) -> Result<Sim<T>> {
    let diag = if zero_diagonal { T::ZERO } else { T::ONE };
    match kind {
        Similarity::Correlation | Similarity::Cosine => {
            unit_similarity(emb, kind == Similarity::Correlation, diag, power, ord)
        }
        Similarity::Gaussian { sigma } => gaussian_similarity(emb, sigma, diag, ord),
    }
}

/// The correlation (`centre`) or cosine W, clipped at 0 and raised to
/// `power`, with `diag` on the diagonal.
fn unit_similarity<T: Real>(
    emb: &Tensor,
    centre: bool,
    diag: T,
    power: f64,
    ord: &Order,
) -> Result<Sim<T>> {
    let n = emb.size()[0] as usize;
    let (rows, norms, degenerate) = centred_rows::<T>(emb, centre, ord)?;
    // The norms are applied to the n x n products instead of the n x d rows.
    let mut w = rows.gram_anchored(ord.u);
    let mut active = vec![false; n * n];
    let mut dpower = Vec::new();
    if power == 1.0 {
        // The release's W, without per-entry branches.
        for (i, (row, act)) in w
            .m()
            .chunks_exact_mut(n.max(1))
            .zip(active.chunks_exact_mut(n.max(1)))
            .enumerate()
        {
            let ni = norms[i];
            for ((c, a), &nj) in row.iter_mut().zip(act.iter_mut()).zip(&norms) {
                let v = *c * ni * nj;
                *a = v > T::ZERO;
                *c = if v > T::ZERO { v } else { T::ZERO };
            }
            row[i] = diag;
            act[i] = false;
        }
    } else {
        dpower = vec![T::ZERO; n * n];
        let c = w.m();
        for i in 0..n {
            for j in 0..n {
                let v = c[i * n + j] * norms[i] * norms[j];
                if i == j {
                    c[i * n + j] = diag;
                } else if v > T::ZERO {
                    dpower[i * n + j] = T::from_f64(power) * v.powf(power - 1.0);
                    c[i * n + j] = v.powf(power);
                    active[i * n + j] = true;
                } else {
                    c[i * n + j] = T::ZERO;
                }
            }
        }
    }
    Ok(Sim {
        rows,
        norms,
        degenerate,
        w,
        active,
        dpower,
    })
}

/// The embeddings' rows in the refinement's order, centred when `centre`,
/// unnormalised; each row's `1 / norm` (0 for a degenerate row: a norm
/// within rounding of 0 next to the raw row's); which rows are degenerate.
/// Non-finite embeddings are an error naming them.
fn centred_rows<T: Real>(
    emb: &Tensor,
    centre: bool,
    ord: &Order,
) -> Result<(Buf<T>, Vec<T>, Vec<bool>)> {
    let (n, d) = (emb.size()[0] as usize, emb.size()[1] as usize);
    let mut rows = Buf::<T>::empty(&[n as i64, d as i64]);
    let mut norms = vec![T::ZERO; n];
    let mut degenerate = vec![false; n];
    let tol = T::from_f64(64.0 * T::EPS);
    let src = Buf::<T>::new(emb.shallow_clone());
    let x = src.s();
    let out = Rows::of(rows.m(), d);
    let sums = par_rows(n, n * d, |i| {
        let o = ord.order[i];
        // SAFETY: each row index is visited once.
        centre_row(&x[o * d..(o + 1) * d], unsafe { out.row(i) }, centre)
    });
    for (i, &(sq, sq_raw, finite)) in sums.iter().enumerate() {
        if !finite {
            return Err(count_not_finite(emb, "embeddings"));
        }
        let (norm, ref_norm) = (sq.sqrt(), sq_raw.sqrt());
        degenerate[i] = norm <= ref_norm * tol;
        norms[i] = if degenerate[i] || norm <= T::TINY {
            T::ZERO
        } else {
            T::ONE / norm
        };
    }
    Ok((rows, norms, degenerate))
}

/// The gaussian W, `exp(-|x_i - x_j|^2 / (2 sigma^2))`, with `diag` on the
/// diagonal.
fn gaussian_similarity<T: Real>(emb: &Tensor, sigma: f64, diag: T, ord: &Order) -> Result<Sim<T>> {
    let (n, d) = (emb.size()[0] as usize, emb.size()[1] as usize);
    let src = Buf::<T>::new(ord.permute(emb));
    let x = src.s();
    for i in 0..n {
        if !max_and_finite(&x[i * d..(i + 1) * d]).1 {
            return Err(count_not_finite(emb, "embeddings"));
        }
    }
    let sq: Vec<T> = (0..n)
        .map(|i| dot(&x[i * d..(i + 1) * d], &x[i * d..(i + 1) * d]))
        .collect();
    let mut w = src.gram_anchored(ord.u);
    let mut active = vec![false; n * n];
    let scale = T::from_f64(-0.5 / (sigma * sigma));
    let two = T::from_f64(2.0);
    let g = w.m();
    for i in 0..n {
        for j in 0..n {
            if i == j {
                g[i * n + j] = diag;
            } else {
                let d2 = sq[i] + sq[j] - two * g[i * n + j];
                let d2 = if d2 > T::ZERO { d2 } else { T::ZERO };
                g[i * n + j] = (d2 * scale).exp();
                active[i * n + j] = true;
            }
        }
    }
    Ok(Sim {
        rows: src,
        norms: Vec::new(),
        degenerate: Vec::new(),
        w,
        active,
        dpower: Vec::new(),
    })
}

/// The embeddings' gradient from W's (`dw`, refinement order), in the
/// samples' order: S's rows are taken at `pos`, so the product comes out
/// in that order.
fn similarity_backward<T: Real>(sim: &Sim<T>, dw: &[T], kind: Similarity, pos: &[usize]) -> Buf<T> {
    let n = sim.w.t.size()[0] as usize;
    let d = sim.rows.t.size()[1] as usize;
    let mut sym = Buf::<T>::empty(&[n as i64, n as i64]);
    {
        let s = sym.m();
        let w = sim.w.s();
        let scale = match kind {
            Similarity::Gaussian { sigma } => T::from_f64(-0.5 / (sigma * sigma)),
            _ => T::ONE,
        };
        // dw + dw^T, the gradient of W's symmetric entries.
        let mut both = vec![T::ZERO; n * n];
        for (i, row) in both.chunks_exact_mut(n.max(1)).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = dw[i * n + j] + dw[j * n + i];
            }
        }
        if sim.dpower.is_empty() && !matches!(kind, Similarity::Gaussian { .. }) {
            // The common case without per-entry branches, each row a select
            // (du = S U with U = diag(inv) Xc: S's columns are scaled
            // instead of U).
            for (r, out) in s.chunks_exact_mut(n.max(1)).enumerate() {
                let i = pos[r];
                let (bi, ai) = (&both[i * n..(i + 1) * n], &sim.active[i * n..(i + 1) * n]);
                for (((o, &v), &a), &nj) in out.iter_mut().zip(bi).zip(ai).zip(&sim.norms) {
                    *o = if a { v * nj } else { T::ZERO };
                }
            }
        } else {
            general_sym(s, w, &both, sim, kind, scale, pos);
        }
    }
    let mut du = sym.mm(&sim.rows, false);
    match kind {
        Similarity::Correlation | Similarity::Cosine => {
            let xc = sim.rows.s();
            let g = Rows::of(du.m(), d);
            let centre = kind == Similarity::Correlation;
            let (degenerate, norms) = (&sim.degenerate, &sim.norms);
            par_rows(n, n * d, |r| {
                let i = pos[r];
                // SAFETY: each row index is visited once.
                let out = unsafe { g.row(r) };
                if degenerate[i] || norms[i] == T::ZERO {
                    out.fill(T::ZERO);
                } else {
                    similarity_grad_row(out, &xc[i * d..(i + 1) * d], norms[i], centre);
                }
            });
            du
        }
        Similarity::Gaussian { .. } => {
            // dx_i = 2 (x_i sum_j S_ij - (S x)_i)
            let x = sim.rows.s();
            let s = sym.s();
            let two = T::from_f64(2.0);
            let g = du.m();
            for r in 0..n {
                let i = pos[r];
                let rs = sum(&s[r * n..(r + 1) * n]);
                for k in 0..d {
                    g[r * d + k] = two * (x[i * d + k] * rs - g[r * d + k]);
                }
            }
            du
        }
    }
}

/// S of [`similarity_backward`] in every case, from `both = dw + dw^T`: on
/// the active entries, through the sharpening and the kernel's derivative.
fn general_sym<T: Real>(
    s: &mut [T],
    w: &[T],
    both: &[T],
    sim: &Sim<T>,
    kind: Similarity,
    scale: T,
    pos: &[usize],
) {
    let n = pos.len();
    for r in 0..n {
        let i = pos[r];
        for j in 0..n {
            let k = i * n + j;
            s[r * n + j] = if sim.active[k] {
                let mut v = both[k];
                if !sim.dpower.is_empty() {
                    v *= sim.dpower[k];
                }
                match kind {
                    Similarity::Gaussian { .. } => v * w[k] * scale,
                    _ => v * sim.norms[j],
                }
            } else {
                T::ZERO
            };
        }
    }
}

/// One replicator step of the forward pass, kept for the backward.
struct Step<T: Real> {
    x_prev: Buf<T>,
    a: Buf<T>,
    s: Vec<T>,
    x: Buf<T>,
}

/// Rows of the refinement in the order non-anchors first, anchors last.
///
/// An anchor's row of X is one-hot in every step (the replicator keeps a
/// one-hot row), its label probability is 1 and its NLL term a constant, so
/// nothing flows back through it: the n x n x classes products only need
/// the `u` non-anchor rows, which this order makes a contiguous block.
struct Order {
    /// `order[k]`: the sample at position k.
    order: Vec<usize>,
    /// `pos[i]`: the position of sample i.
    pos: Vec<usize>,
    /// Non-anchors.
    u: usize,
}

impl Order {
    fn new(flags: &[bool]) -> Self {
        let order: Vec<usize> = (0..flags.len())
            .filter(|&i| !flags[i])
            .chain((0..flags.len()).filter(|&i| flags[i]))
            .collect();
        let mut pos = vec![0; flags.len()];
        for (k, &i) in order.iter().enumerate() {
            pos[i] = k;
        }
        let u = flags.iter().filter(|&&f| !f).count();
        Order { order, pos, u }
    }

    fn is_identity(&self) -> bool {
        self.order.iter().enumerate().all(|(k, &i)| k == i)
    }

    fn rows_of(&self, t: &Tensor, by: &[usize]) -> Tensor {
        if self.is_identity() {
            return t.shallow_clone();
        }
        let idx: Vec<i64> = by.iter().map(|&k| k as i64).collect();
        t.index_select(0, &Tensor::from_slice(&idx)).contiguous()
    }

    /// A tensor's rows in this order.
    fn permute(&self, t: &Tensor) -> Tensor {
        self.rows_of(t, &self.order)
    }

    /// Rows in this order back in the samples' order.
    fn restore(&self, t: &Tensor) -> Tensor {
        self.rows_of(t, &self.pos)
    }
}

/// W among the first `u` rows (the non-anchors), a view.
fn leading_block<T: Real>(w: &Buf<T>, u: usize) -> Tensor {
    w.t.narrow(0, 0, u as i64).narrow(1, 0, u as i64)
}

/// The non-anchor rows of `W X` (a `u` x classes buffer), where X's last
/// `n - u` rows are one-hot at `targets`.
fn anchored_wx<T: Real>(w: &Buf<T>, x: &Buf<T>, u: usize, targets: &[usize]) -> Buf<T> {
    let n = targets.len();
    let mp = x.t.size()[1] as usize;
    let mut out = Buf::<T>::empty(&[u as i64, mp as i64]);
    if u > 0 {
        let w_nn = leading_block(w, u);
        matmul_into(&w_nn, &x.t.narrow(0, 0, u as i64), false, &out.t);
        let (o, ws) = (out.m(), w.s());
        for i in 0..u {
            for a in u..n {
                o[i * mp + targets[a]] += ws[i * n + a];
            }
        }
    }
    out
}

/// Where each sample goes in the refinement: the prior's columns, each
/// row's column, the anchors and the rows' order.
struct Layout {
    /// With `batch_classes_only`: the sorted classes of the prior's columns.
    classes: Option<Vec<usize>>,
    /// The prior's columns: m, or the batch's classes.
    mp: usize,
    /// Anchors, in the samples' order (none without the refinement).
    flags: Vec<bool>,
    ord: Order,
    /// Each row's column, in the refinement's order.
    tp: Vec<usize>,
}

impl Layout {
    fn new(y: &[i64], m: usize, opts: &GroupLossOptions) -> Self {
        let n = y.len();
        let classes: Option<Vec<usize>> = opts.batch_classes_only.then(|| {
            let mut c: Vec<usize> = y.iter().map(|&v| v as usize).collect();
            c.sort_unstable();
            c.dedup();
            c
        });
        let targets: Vec<usize> = match &classes {
            Some(c) => y
                .iter()
                .map(|&v| c.binary_search(&(v as usize)).unwrap_or(0))
                .collect(),
            None => y.iter().map(|&v| v as usize).collect(),
        };
        let mp = classes.as_ref().map_or(m, |c| c.len());
        let flags = if opts.gtg_weight != 0.0 {
            anchor_flags(y, opts.num_anchors as usize, opts.anchors)
        } else {
            vec![false; n]
        };
        let ord = Order::new(&flags);
        let tp = ord.order.iter().map(|&i| targets[i]).collect();
        Layout {
            classes,
            mp,
            flags,
            ord,
            tp,
        }
    }
}

/// What one pass over the logits gives.
struct LogitsPass<T: Real> {
    /// `exp(l - max)` per row, samples' order (kept for the gradients).
    ce_exp: Option<Buf<T>>,
    /// `1 / sum` of each row of `ce_exp`.
    ce_scales: Vec<T>,
    /// The cross-entropy, when weighted.
    ce: Option<f64>,
    /// The prior X0 in the refinement's order, anchor rows one-hot (when
    /// the refinement runs).
    prior: Option<Buf<T>>,
}

/// The logits in one pass per exponential: the cross-entropy's rows and the
/// prior's, rows in parallel; non-finite logits are an error naming them.
fn logits_pass<T: Real>(
    logits: &Tensor,
    y: &[i64],
    lay: &Layout,
    opts: &GroupLossOptions,
    inv_t: T,
    want_grads: bool,
) -> Result<LogitsPass<T>> {
    let (n, m, mp) = (y.len(), logits.size()[1] as usize, lay.mp);
    let want_ce = opts.ce_weight != 0.0;
    let lg = Buf::<T>::new(logits.shallow_clone());
    let mut ce_exp = want_ce.then(|| Buf::<T>::empty(&[n as i64, m as i64]));
    let mut prior = (opts.gtg_weight != 0.0).then(|| Buf::<T>::empty(&[n as i64, mp as i64]));
    let rows: Vec<LogitsRow<T>> = {
        let ls = lg.s();
        let ce_rows = ce_exp.as_mut().map(|b| Rows::of(b.m(), m));
        let prior_rows = prior.as_mut().map(|b| Rows::of(b.m(), mp));
        let (pos, flags, cls) = (&lay.ord.pos, &lay.flags, lay.classes.as_deref());
        par_rows(n, n * m, |i| {
            // SAFETY: row i of ce_exp and row pos[i] of the prior are
            // visited by this call only.
            let e = ce_rows.map(|r| unsafe { r.row(i) });
            let p = prior_rows
                .filter(|_| !flags[i])
                .map(|r| unsafe { r.row(pos[i]) });
            logits_row(LogitsRowArgs {
                l: &ls[i * m..(i + 1) * m],
                label: y[i] as usize,
                ce_exp: e,
                prior: p,
                columns: cls,
                inv_t,
            })
        })
    };
    if rows.iter().any(|r| !r.finite) {
        return Err(count_not_finite(logits, "logits"));
    }
    if let Some(x0) = prior.as_mut() {
        let x = x0.m();
        for k in lay.ord.u..n {
            let row = &mut x[k * mp..(k + 1) * mp];
            row.fill(T::ZERO);
            row[lay.tp[k]] = T::ONE;
        }
    }
    Ok(LogitsPass {
        ce_exp: if want_grads { ce_exp } else { None },
        ce_scales: rows.iter().map(|r| r.scale).collect(),
        ce: want_ce.then(|| rows.iter().map(|r| r.ce).sum::<f64>() / n as f64),
        prior,
    })
}

/// The loss and gradients of a checked batch of CPU tensors of `T`'s kind.
fn run<T: Real>(
    emb: &Tensor,
    logits: &Tensor,
    y: &[i64],
    opts: &GroupLossOptions,
    want_grads: bool,
    want_probs: bool,
) -> Result<GroupLossOutput> {
    let n = y.len();
    let m = logits.size()[1] as usize;
    // Wake the helper thread now, so that it polls by the first product.
    let depth = (emb.size()[1] as usize).max(m);
    let _hot = threads::Hot::begin(T::KIND == Kind::Float && gemm::worth_sharing(n, depth));
    let inv_t = T::from_f64(1.0 / opts.temperature);
    let lay = Layout::new(y, m, opts);
    let pass = logits_pass::<T>(logits, y, &lay, opts, inv_t, want_grads)?;
    let refinement = match &pass.prior {
        Some(x0) => Some(refinement(emb, x0, &lay, opts, want_grads, want_probs)?),
        None => {
            let e = Buf::<T>::new(emb.shallow_clone());
            if !max_and_finite(e.s()).1 {
                return Err(count_not_finite(emb, "embeddings"));
            }
            None
        }
    };
    let (nll, probs, grads) = match refinement {
        Some(r) => (Some(r.nll), r.probs, r.grads),
        None => (None, None, None),
    };
    let grad_logits = want_grads.then(|| {
        let mut gl = Buf::<T>::empty(&[n as i64, m as i64]);
        let refined = pass
            .prior
            .as_ref()
            .zip(grads.as_ref())
            .map(|(x0, (dx0, _))| {
                (
                    x0,
                    dx0,
                    &lay.flags[..],
                    &lay.ord.pos[..],
                    lay.classes.as_deref(),
                )
            });
        let ce = pass.ce_exp.as_ref().map(|e| (e, &pass.ce_scales[..]));
        logits_grad(&mut gl, refined, ce, y, opts, inv_t, m, lay.mp);
        gl
    });
    let grad_emb = match grads {
        Some((_, ge)) => Some(ge),
        None => want_grads.then(|| Buf::zeros(&emb.size())),
    };
    let loss = nll.unwrap_or(0.0) * opts.gtg_weight + pass.ce.unwrap_or(0.0) * opts.ce_weight;
    let classes_tensor = lay.classes.map(|c| {
        let v: Vec<i64> = c.iter().map(|&k| k as i64).collect();
        Tensor::from_slice(&v)
    });
    Ok(GroupLossOutput {
        loss: scalar::<T>(loss),
        nll: nll.map(scalar::<T>),
        ce: pass.ce.map(scalar::<T>),
        probs,
        classes: classes_tensor,
        grad_embeddings: grad_emb.map(|b| b.t),
        grad_logits: grad_logits.map(|b| b.t),
    })
}

/// What the refinement gives.
struct Refinement<T: Real> {
    /// The NLL of the refined label probabilities.
    nll: f64,
    /// The refined probabilities, samples' order (when asked for).
    probs: Option<Tensor>,
    /// dX0 (its non-anchor rows, refinement order) and d embeddings (when
    /// asked for).
    grads: Option<(Buf<T>, Buf<T>)>,
}

/// Steps 1, 4 and 5 of the loss from the prior `x0` (its anchor rows
/// already one-hot, step 3): W, the replicator steps, the NLL, and backward
/// through them.
fn refinement<T: Real>(
    emb: &Tensor,
    x0: &Buf<T>,
    lay: &Layout,
    opts: &GroupLossOptions,
    want_grads: bool,
    want_probs: bool,
) -> Result<Refinement<T>> {
    let (kind, power) = effective_power(opts.similarity, opts.similarity_power);
    let sim = similarity_forward::<T>(emb, kind, opts.zero_diagonal, power, &lay.ord)?;
    let (steps, mut x) = forward_steps(&sim.w, x0, lay, opts.num_iters);
    let last = LastStep::of(&mut x, sim.w.s(), lay);
    let last_grads = want_grads.then(|| last.grads(&x, sim.w.s(), lay, opts.gtg_weight));
    last.restore(&mut x, lay);
    let grads = last_grads.map(|(dx, mut dw)| {
        let dx0 = backward_steps(&steps, &sim.w, dx, &mut dw, lay);
        (dx0, similarity_backward(&sim, &dw, kind, &lay.ord.pos))
    });
    let probs = want_probs.then(|| last.probs(&sim.w, &x, lay));
    Ok(Refinement {
        nll: last.nll(),
        probs,
        grads,
    })
}

/// The first `num_iters - 1` replicator steps from `x0`, kept for the
/// backward, and the X they end at (sharing its buffer with the last kept
/// step, or with `x0`).
fn forward_steps<T: Real>(
    w: &Buf<T>,
    x0: &Buf<T>,
    lay: &Layout,
    num_iters: i64,
) -> (Vec<Step<T>>, Buf<T>) {
    let (n, mp, u) = (lay.tp.len(), lay.mp, lay.ord.u);
    let mut steps: Vec<Step<T>> = Vec::new();
    for _ in 1..num_iters {
        let x_prev = match steps.last() {
            Some(st) => Buf::new(st.x.t.shallow_clone()),
            None => Buf::new(x0.t.shallow_clone()),
        };
        let a = anchored_wx(w, &x_prev, u, &lay.tp);
        let mut next = Buf::<T>::empty(&[n as i64, mp as i64]);
        let s = replicator_rows(x_prev.s(), a.s(), next.m(), u, n, mp);
        steps.push(Step {
            x_prev,
            a,
            s,
            x: next,
        });
    }
    let x = match steps.last() {
        Some(st) => Buf::new(st.x.t.shallow_clone()),
        None => Buf::new(x0.t.shallow_clone()),
    };
    (steps, x)
}

/// The last replicator step in closed form, through the Gram matrix of X
/// with each row's own label entry left out (see `analytic`): the label
/// probabilities and what their gradient needs. n x n quantities are
/// row-major, rows and columns in the refinement's order.
struct LastStep<T: Real> {
    /// X[i, t_i].
    xy: Vec<T>,
    /// q[i][j] = X[j, t_i].
    q: Vec<T>,
    /// g_off[i][j] = sum_{k != t_i} X[i, k] X[j, k].
    g_off: Vec<T>,
    /// sum_j W[i][j] X[j, t_i] over j of i's class, and over the others.
    own: Vec<T>,
    other: Vec<T>,
    /// The update's row sums without the label column (`s_off`) and with.
    s_off: Vec<T>,
    s: Vec<T>,
    /// Rows whose sum is above the smallest normal (updated; the others
    /// keep X).
    ok: Vec<bool>,
    /// The refined label probability of each row.
    p: Vec<T>,
}

impl<T: Real> LastStep<T> {
    /// The step from X, whose label entries it leaves zeroed (the anchor
    /// rows are then 0) until [`LastStep::restore`].
    fn of(x: &mut Buf<T>, w: &[T], lay: &Layout) -> Self {
        let (n, mp, u, tp) = (lay.tp.len(), lay.mp, lay.ord.u, &lay.tp);
        let xy: Vec<T> = (0..n).map(|i| x.s()[i * mp + tp[i]]).collect();
        for i in 0..n {
            x.m()[i * mp + tp[i]] = T::ZERO;
        }
        let mut g_hat = Buf::<T>::zeros(&[n as i64, n as i64]);
        if u > 0 {
            let g_nn = Buf::<T>::new(x.t.narrow(0, 0, u as i64)).gram();
            let (gh, gs) = (g_hat.m(), g_nn.s());
            for i in 0..u {
                gh[i * n..i * n + u].copy_from_slice(&gs[i * u..(i + 1) * u]);
            }
        }
        let (xs, gh) = (x.s(), g_hat.s());
        // X in the columns of the batch's labels: xg[i][j] = X[i, t_j],
        // which is 0 where t_i == t_j (the label entries are zeroed above).
        let mut xg = vec![T::ZERO; n * n];
        for (i, row) in xg.chunks_exact_mut(n.max(1)).enumerate() {
            let xr = &xs[i * mp..(i + 1) * mp];
            for (g, &tj) in row.iter_mut().zip(tp) {
                *g = xr[tj];
            }
        }
        // q[i][j] = X[j, t_i] (xy[j] in i's class);
        // g_off[i][j] = G^[i][j] + X[i, t_j] xy[j].
        let mut q = vec![T::ZERO; n * n];
        let mut g_off = vec![T::ZERO; n * n];
        let (mut own, mut other) = (vec![T::ZERO; n], vec![T::ZERO; n]);
        let mut s_off = vec![T::ZERO; n];
        for i in 0..n {
            let (ti, wi) = (tp[i], &w[i * n..(i + 1) * n]);
            let qi = &mut q[i * n..(i + 1) * n];
            for (j, v) in qi.iter_mut().enumerate() {
                *v = xg[j * n + i];
            }
            // The same-class entries are 0 so far: other classes only.
            let other_i = dot(wi, qi);
            let mut own_i = T::ZERO;
            for j in 0..n {
                if tp[j] == ti {
                    qi[j] = xy[j];
                    own_i += wi[j] * xy[j];
                }
            }
            let gi = &mut g_off[i * n..(i + 1) * n];
            let (ghi, xgi) = (&gh[i * n..(i + 1) * n], &xg[i * n..(i + 1) * n]);
            for (((g, &h), &x), &y) in gi.iter_mut().zip(ghi).zip(xgi).zip(&xy) {
                *g = h + x * y;
            }
            s_off[i] = dot(wi, gi);
            (own[i], other[i]) = (own_i, other_i);
        }
        let ay: Vec<T> = (0..n).map(|i| own[i] + other[i]).collect();
        let s: Vec<T> = (0..n).map(|i| s_off[i] + xy[i] * ay[i]).collect();
        let ok: Vec<bool> = s.iter().map(|&v| v > T::MIN_NORMAL).collect();
        let p: Vec<T> = (0..n)
            .map(|i| if ok[i] { xy[i] * ay[i] / s[i] } else { xy[i] })
            .collect();
        LastStep {
            xy,
            q,
            g_off,
            own,
            other,
            s_off,
            s,
            ok,
            p,
        }
    }

    /// Puts X's label entries back.
    fn restore(&self, x: &mut Buf<T>, lay: &Layout) {
        let xs = x.m();
        for (i, (&t, &v)) in lay.tp.iter().zip(&self.xy).enumerate() {
            xs[i * lay.mp + t] = v;
        }
    }

    /// The NLL of the label probabilities (`log(p + 1e-12)`, the release's).
    fn nll(&self) -> f64 {
        let eps = T::from_f64(1e-12);
        -self.p.iter().map(|&v| (v + eps).ln().to_f64()).sum::<f64>() / self.p.len() as f64
    }

    /// dX (its non-anchor rows) and dW of `gtg_weight` times the NLL,
    /// through this step from X with its label entries zeroed.
    fn grads(&self, x: &Buf<T>, w: &[T], lay: &Layout, gtg_weight: f64) -> (Buf<T>, Vec<T>) {
        let (n, mp, u, tp) = (lay.tp.len(), lay.mp, lay.ord.u, &lay.tp);
        let (xy, s, p, ok) = (&self.xy, &self.s, &self.p, &self.ok);
        let eps = T::from_f64(1e-12);
        let gw = T::from_f64(-gtg_weight / n as f64);
        // A label probability that is exactly 0 passes nothing (the rule of
        // refine::gradient_on_support).
        let gi: Vec<T> = p
            .iter()
            .map(|&v| {
                if v == T::ZERO {
                    T::ZERO
                } else {
                    gw / (v + eps)
                }
            })
            .collect();
        let coef = |f: &dyn Fn(usize) -> T| -> Vec<T> {
            (0..n).map(|i| if ok[i] { f(i) } else { T::ZERO }).collect()
        };
        let a_c = coef(&|i| gi[i] / s[i]);
        let b_c = coef(&|i| -gi[i] * p[i] / s[i]);
        // (g / s) (s~ / s): s * s would underflow for small s.
        let c_c = coef(&|i| gi[i] / s[i] * (self.s_off[i] / s[i]));

        // dX = (W o (b_i + b_j)) X on the non-anchor rows only: X's anchor
        // rows are 0 here, and the anchor rows of dX reach nothing (dX
        // below has the `u` non-anchor rows).
        let mut dx = Buf::<T>::empty(&[u as i64, mp as i64]);
        if u > 0 {
            let mut mmat = Buf::<T>::empty(&[u as i64, u as i64]);
            for (i, row) in mmat.m().chunks_exact_mut(u).enumerate() {
                let (wi, bi) = (&w[i * n..i * n + u], b_c[i]);
                for ((m, &wv), &bj) in row.iter_mut().zip(wi).zip(&b_c[..u]) {
                    *m = wv * (bi + bj);
                }
            }
            matmul_into(&mmat.t, &x.t.narrow(0, 0, u as i64), false, &dx.t);
        }
        let dxs = dx.m();
        for j in 0..u {
            let row = &mut dxs[j * mp..(j + 1) * mp];
            for i in 0..n {
                let b = if tp[i] == tp[j] { T::ZERO } else { b_c[j] };
                row[tp[i]] += w[j * n + i] * xy[i] * (c_c[i] + b);
            }
            let pass = if ok[j] { T::ZERO } else { gi[j] };
            // A coefficient may overflow where its factor is 0 (a label
            // probability that underflowed): 0 * inf is 0 here.
            let prod = |c: T, v: T| if v == T::ZERO { T::ZERO } else { c * v };
            row[tp[j]] += prod(c_c[j], self.own[j]) + prod(a_c[j], self.other[j]) + pass;
        }
        let mut dw = vec![T::ZERO; n * n];
        for (i, row) in dw.chunks_exact_mut(n.max(1)).enumerate() {
            let (cq, bg) = (c_c[i] * xy[i], b_c[i]);
            let (qi, gi) = (&self.q[i * n..(i + 1) * n], &self.g_off[i * n..(i + 1) * n]);
            for ((d, &qv), &gv) in row.iter_mut().zip(qi).zip(gi) {
                *d = cq * qv + bg * gv;
            }
        }
        (dx, dw)
    }

    /// The refined probabilities of this step from X (label entries
    /// restored), in the samples' order.
    fn probs(&self, w: &Buf<T>, x: &Buf<T>, lay: &Layout) -> Tensor {
        let (n, mp, u) = (lay.tp.len(), lay.mp, lay.ord.u);
        let a = anchored_wx(w, x, u, &lay.tp);
        let mut out = Buf::<T>::empty(&[n as i64, mp as i64]);
        let (o, xs, am) = (out.m(), x.s(), a.s());
        for i in 0..n {
            for k in i * mp..(i + 1) * mp {
                o[k] = if self.ok[i] && i < u {
                    xs[k] * am[k] / self.s[i]
                } else {
                    xs[k]
                };
            }
        }
        lay.ord.restore(&out.t)
    }
}

/// dX0 (its non-anchor rows) from `dx`, the gradient of the last step's
/// input, back through the kept steps, adding each step's part of dW to
/// `dw`.
fn backward_steps<T: Real>(
    steps: &[Step<T>],
    w: &Buf<T>,
    mut dx: Buf<T>,
    dw: &mut [T],
    lay: &Layout,
) -> Buf<T> {
    let (n, mp, u, tp) = (lay.tp.len(), lay.mp, lay.ord.u, &lay.tp);
    for st in steps.iter().rev() {
        // Anchor rows: X one-hot before and after, so dA is 0 there (dA,
        // dN and dX hold the non-anchor rows).
        let mut da = Buf::<T>::empty(&[u as i64, mp as i64]);
        let mut dn = vec![T::ZERO; u * mp];
        let mut pass = vec![false; u];
        {
            let (dxs, xt, xp) = (dx.s(), st.x.s(), st.x_prev.s());
            let das = da.m();
            for i in 0..u {
                let r = i * mp..(i + 1) * mp;
                if st.s[i] > T::MIN_NORMAL {
                    let rr = dot(&dxs[r.clone()], &xt[r.clone()]);
                    let inv = T::ONE / st.s[i];
                    for k in r {
                        // dN on the support of X (refine::on_support).
                        if xp[k] != T::ZERO {
                            dn[k] = (dxs[k] - rr) * inv;
                        }
                        das[k] = dn[k] * xp[k];
                    }
                } else {
                    pass[i] = true;
                    das[r].fill(T::ZERO);
                }
            }
        }
        let mut next = Buf::<T>::empty(&[u as i64, mp as i64]);
        if u > 0 {
            let (da_n, xp_n) = (
                Buf::<T>::new(da.t.shallow_clone()),
                Buf::<T>::new(st.x_prev.t.narrow(0, 0, u as i64)),
            );
            // dW += dA X^T: the anchor columns pick dA at their label.
            let dw_nn = da_n.mm(&xp_n, true);
            let (dws, das) = (dw_nn.s(), da.s());
            for i in 0..u {
                for j in 0..u {
                    dw[i * n + j] += dws[i * u + j];
                }
                for a in u..n {
                    dw[i * n + a] += das[i * mp + tp[a]];
                }
            }
            matmul_into(&leading_block(w, u), &da_n.t, false, &next.t);
            let (nx, am, dxs) = (next.m(), st.a.s(), dx.s());
            for i in 0..u {
                for k in i * mp..(i + 1) * mp {
                    nx[k] += dn[k] * am[k];
                    if pass[i] {
                        nx[k] += dxs[k];
                    }
                }
            }
        }
        dx = next;
    }
    dx
}

/// One replicator step on raw rows: `next = x * a / rowsum(x * a)`, rows
/// whose sum is 0 copied unchanged, and the one-hot anchor rows (from `u`
/// on; `a` holds the first `u` rows only) copied with sum 1. Returns the
/// row sums.
fn replicator_rows<T: Real>(
    x: &[T],
    a: &[T],
    next: &mut [T],
    u: usize,
    n: usize,
    m: usize,
) -> Vec<T> {
    let mut sums = vec![T::ONE; n];
    for i in 0..u {
        let r = i * m..(i + 1) * m;
        let (xr, ar, nr) = (&x[r.clone()], &a[r.clone()], &mut next[r]);
        for k in 0..m {
            nr[k] = xr[k] * ar[k];
        }
        let s = sum(nr);
        sums[i] = s;
        if s > T::MIN_NORMAL {
            let inv = T::ONE / s;
            for v in nr.iter_mut() {
                *v *= inv;
            }
        } else {
            nr.copy_from_slice(xr);
        }
    }
    next[u * m..n * m].copy_from_slice(&x[u * m..n * m]);
    sums
}

/// Exp rows of the cross-entropy and their `1 / sum`.
type CeRows<'a, T> = (&'a Buf<T>, &'a [T]);
/// The prior X0 (refinement order) and dX0 (its non-anchor rows), the
/// anchor flags and positions (samples' order), and the prior's columns.
type Refined<'a, T> = (
    &'a Buf<T>,
    &'a Buf<T>,
    &'a [bool],
    &'a [usize],
    Option<&'a [usize]>,
);

/// The gradient of the logits: through the prior (when the refinement ran;
/// not on anchor rows) and through the cross-entropy.
#[allow(clippy::too_many_arguments)]
fn logits_grad<T: Real>(
    out: &mut Buf<T>,
    refined: Option<Refined<'_, T>>,
    ce: Option<CeRows<'_, T>>,
    y: &[i64],
    opts: &GroupLossOptions,
    inv_t: T,
    m: usize,
    mp: usize,
) {
    let n = y.len();
    let ce_coef = T::from_f64(opts.ce_weight / n as f64);
    let out_rows = Rows::of(out.m(), m);
    let ce = ce.map(|(b, scales)| (b.s(), scales));
    let refined = refined.map(|(x0, dx, flags, pos, cls)| (x0.s(), dx.s(), flags, pos, cls));
    par_rows(n, n * m, |i| {
        // SAFETY: each row index is visited once.
        let o = unsafe { out_rows.row(i) };
        let ce_row = ce.map(|(e, sc)| (&e[i * m..(i + 1) * m], sc[i]));
        let prior_row = refined.and_then(|(x0, dx, flags, pos, _)| {
            let k = pos[i];
            (!flags[i]).then(|| (&x0[k * mp..(k + 1) * mp], &dx[k * mp..(k + 1) * mp]))
        });
        let coef = if ce_row.is_some() { ce_coef } else { T::ZERO };
        match refined.and_then(|r| r.4) {
            None => grad_row(o, prior_row, inv_t, ce_row, y[i] as usize, coef),
            Some(cls) => {
                grad_row(o, None, inv_t, ce_row, y[i] as usize, coef);
                if let Some((p, dx)) = prior_row {
                    let r = dot(p, dx);
                    for (k, &c) in cls.iter().enumerate() {
                        o[c] += p[k] * (dx[k] - r) * inv_t;
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gram_by_blocks_equals_the_full_product() {
        for (n, k) in [(5, 7), (130, 7), (600, 7), (40, 3000)] {
            let x = Buf::<f64>::new(Tensor::randn([n, k], (Kind::Double, Device::Cpu)));
            let full = x.mm(&x, true);
            let blocked = x.gram();
            let scale = f64::try_from(full.t.abs().max()).unwrap_or(1.0);
            let diff = f64::try_from((&full.t - &blocked.t).abs().max()).unwrap_or(1.0);
            assert!(diff <= 1e-13 * scale, "n = {n}, k = {k}: {diff} of {scale}");
        }
    }
}
