//! Matrix products on f32 buffers by the classic register tile: 6 rows of A
//! broadcast against a 16-wide panel of B packed contiguously (which also
//! avoids the cache-set aliasing of rows 4 KiB apart), 12 accumulators.
//!
//! Two uses. The fused CPU loss's products of a batch's size (tens of rows,
//! long rows), [`try_matmul`]: there libtorch's BLAS runs at about half of
//! this CPU's FMA peak (its packing copies dominate the few multiply-adds
//! per packed element, and its second thread costs more than it brings);
//! here the panels are shared out over the threads, and the Gram matrices
//! only get their tiles on and below the diagonal. Larger plain products
//! stay with libtorch, whose blocking for the caches wins there. And
//! products that are consumed as they are made, [`dot_tiles`]: the
//! retrieval index's top-k and k-means' nearest centres read each tile
//! while it is in cache, and the product is never written out.

// The packing and tile loops index raw panels by (k, column) pairs.
#![allow(clippy::needless_range_loop)]

use std::cell::RefCell;

use tch::{Device, Kind, Tensor};

use super::kernels::has_avx2;
use super::threads;

/// Rows of A per tile.
const MR: usize = 6;
/// Columns of B per tile (two AVX vectors).
const NR: usize = 16;
/// Depth of a panel block: 256 x 16 floats (16 KiB) stay in L1 while the
/// tiles of a task sweep it.
const KC: usize = 256;
/// Tiles of one panel handled by one task: the block of the panel is packed
/// once and read by all of them.
const TILES_PER_TASK: usize = 3;
/// Products of fewer multiply-adds run on one thread: below this, sharing
/// with the helper thread costs more than it saves.
const PARALLEL_MACS: usize = 1 << 18;
/// Largest row count of A (and of B for `A B^T`, of B's rows for `A B`)
/// taken here; beyond, the operands leave L2 and libtorch's blocking wins.
const MAX_SMALL_DIM: usize = 192;

/// A row-major f32 matrix view: `rows x cols`, rows `ld` apart.
#[derive(Clone, Copy)]
pub(crate) struct View {
    ptr: *const f32,
    rows: usize,
    cols: usize,
    ld: usize,
}

// SAFETY: a view is only read, and the tensors behind it outlive the product.
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    /// A view of a slice; panics unless the slice holds every row.
    fn of(data: &[f32], rows: usize, cols: usize, ld: usize) -> Self {
        assert!(
            cols <= ld || rows <= 1,
            "view: {cols} columns in rows {ld} apart"
        );
        assert!(
            rows == 0 || cols == 0 || (rows - 1) * ld + cols <= data.len(),
            "view: {rows} x {cols} (rows {ld} apart) in {} elements",
            data.len()
        );
        View {
            ptr: data.as_ptr(),
            rows,
            cols,
            ld,
        }
    }

    /// A 2-D f32 CPU tensor whose columns are adjacent, as a view.
    fn of_tensor(t: &Tensor) -> Option<Self> {
        let (size, stride) = (t.size(), t.stride());
        if t.kind() != Kind::Float || t.device() != Device::Cpu || size.len() != 2 {
            return None;
        }
        let (rows, cols) = (size[0] as usize, size[1] as usize);
        if rows > 1 && (stride[0] < size[1]) || cols > 1 && stride[1] != 1 {
            return None;
        }
        Some(View {
            ptr: t.data_ptr() as *const f32,
            rows,
            cols,
            ld: stride[0].max(1) as usize,
        })
    }

    /// SAFETY: `r < rows`, `c <= cols`.
    unsafe fn at(&self, r: usize, c: usize) -> *const f32 {
        self.ptr.add(r * self.ld + c)
    }
}

/// The output: rows `ld` apart, written tile by tile.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    ld: usize,
}

// SAFETY: tasks write disjoint tiles.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Whether this CPU runs these kernels (AVX2 and FMA).
pub(crate) fn available() -> bool {
    has_avx2()
}

/// Whether the products of a batch of `rows` samples with rows of `depth`
/// features are taken here and large enough to share with the helper
/// thread ([`threads::Hot`]).
pub(crate) fn worth_sharing(rows: usize, depth: usize) -> bool {
    available() && rows <= MAX_SMALL_DIM && rows * rows * depth >= 2 * PARALLEL_MACS
}

/// `out = a @ b` (`transpose_b`: `a @ b^T`) when the operands are f32 CPU
/// matrices of a batch's size and this CPU has the kernels; `symmetric`
/// promises that the result is (`a @ a^T`). Returns false, with `out`
/// untouched, where libtorch should do it.
pub(crate) fn try_matmul(
    a: &Tensor,
    b: &Tensor,
    transpose_b: bool,
    symmetric: bool,
    out: &Tensor,
) -> bool {
    if !available() {
        return false;
    }
    let (Some(av), Some(bv)) = (View::of_tensor(a), View::of_tensor(b)) else {
        return false;
    };
    let Some(ov) = View::of_tensor(out) else {
        return false;
    };
    let (m, k) = (av.rows, av.cols);
    let (kb, n) = if transpose_b {
        (bv.cols, bv.rows)
    } else {
        (bv.rows, bv.cols)
    };
    let b_small = if transpose_b { n } else { kb };
    if kb != k || ov.rows != m || ov.cols != n || m > MAX_SMALL_DIM || b_small > MAX_SMALL_DIM {
        return false;
    }
    let parallel = m * n * k >= PARALLEL_MACS && threads::sharing();
    let c = Out {
        ptr: ov.ptr as *mut f32,
        ld: ov.ld,
    };
    // SAFETY: the views cover their tensors, which outlive the call; `out`
    // is m x n and shares no memory with the inputs (the callers' buffers).
    unsafe { matmul(av, bv, transpose_b, symmetric && m == n, c, parallel) };
    true
}

/// `c = a @ b` or `a @ b^T` on slices (the kernels are checked by tests
/// through this).
#[cfg(test)]
fn matmul_slices(
    a: View,
    b: View,
    transpose_b: bool,
    symmetric: bool,
    c: &mut [f32],
    parallel: bool,
) {
    let n = if transpose_b { b.rows } else { b.cols };
    assert!(c.len() >= a.rows * n);
    let out = Out {
        ptr: c.as_mut_ptr(),
        ld: n,
    };
    // SAFETY: the views were checked against their slices; c holds m x n.
    unsafe { matmul(a, b, transpose_b, symmetric, out, parallel) }
}

thread_local! {
    /// A block of a packed panel (16 KiB), one per thread.
    static PANEL: RefCell<Vec<f32>> = RefCell::new(vec![0.0; KC * NR]);
}

/// The most columns of a [`DotTile`].
pub(crate) const TILE_COLS: usize = NR;

/// One register tile of [`dot_tiles`]: the dot products of rows
/// `row0..row0 + rows` of A with rows `col0..col0 + cols` of B.
pub(crate) struct DotTile<'a> {
    pub row0: usize,
    pub rows: usize,
    pub col0: usize,
    pub cols: usize,
    dots: &'a [f32],
}

impl DotTile<'_> {
    /// Row `r < rows`: the dot products of A's row `row0 + r` with B's rows
    /// `col0..col0 + cols`.
    pub(crate) fn row(&self, r: usize) -> &[f32] {
        debug_assert!(r < self.rows, "row {r} of a tile of {}", self.rows);
        &self.dots[r * NR..r * NR + self.cols]
    }
}

thread_local! {
    /// [`dot_tiles`]' panel of B (when packed as it goes) and its strip of
    /// products.
    static DOT_BUFFERS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The rows of B (`n x d`) packed once for [`dot_tiles`], for a B that
/// many calls read: panels of 16 rows, each transposed (`d x 16`, zero past
/// the last row).
pub(crate) struct Packed {
    data: Vec<f32>,
    rows: usize,
    d: usize,
}

impl Packed {
    /// None where this CPU lacks the kernels ([`available`]), or where `b`
    /// is not rows of `d > 0` values.
    pub(crate) fn new(b: &[f32], d: usize) -> Option<Self> {
        if !available() || d == 0 || !b.len().is_multiple_of(d) {
            return None;
        }
        let rows = b.len() / d;
        let bv = View::of(b, rows, d, d);
        let mut data = vec![0.0; rows.div_ceil(NR) * d * NR];
        for (p, panel) in data.chunks_mut(d * NR).enumerate() {
            let j0 = p * NR;
            // SAFETY: the view covers `b`; the panel holds d x NR floats.
            unsafe { pack_transposed(bv, j0, NR.min(rows - j0), 0, d, panel) };
        }
        Some(Packed { data, rows, d })
    }

    /// Panel `p`'s rows `k0..` (of `d x NR`).
    fn panel(&self, p: usize, k0: usize) -> *const f32 {
        self.data[p * self.d * NR + k0 * NR..].as_ptr()
    }
}

/// B of [`dot_tiles`]: its rows (row-major `n x d`), packed panel by panel
/// as the product goes, or [`Packed`] once.
#[derive(Clone, Copy)]
pub(crate) enum Rhs<'a> {
    Rows(&'a [f32]),
    Packed(&'a Packed),
}

/// The dot products of every row of `a` (`m x d`, row-major) with every row
/// of `b` (`n x d`), handed to `visit` one register tile at a time, without
/// forming the `m x n` product: a visitor that keeps little of it (a top-k,
/// the nearest centres) reads each product from the cache once, instead of
/// writing a product to memory and reading it back. Columns of B go in
/// panels of 16 (a last one of at most 8 in one vector a row), each swept
/// by all the rows of A, so every row of A meets B's rows in increasing
/// order. One thread; the caller shares out rows. Each dot product is
/// summed in order of the features (one fused multiply-add chain per block
/// of 256 features, the blocks added in order), whatever the CPU and the
/// thread count. Returns false, visiting nothing, where this CPU lacks the
/// kernels (AVX2 and FMA).
pub(crate) fn dot_tiles(
    a: &[f32],
    b: Rhs<'_>,
    d: usize,
    mut visit: impl FnMut(&DotTile<'_>),
) -> bool {
    if !available() {
        return false;
    }
    let n = match b {
        Rhs::Rows(rows) => rows.len() / d.max(1),
        Rhs::Packed(p) => p.rows,
    };
    let b_fits = match b {
        Rhs::Rows(rows) => rows.len() == n * d,
        Rhs::Packed(p) => p.d == d,
    };
    assert!(
        d > 0 && a.len().is_multiple_of(d) && b_fits,
        "dot_tiles: {} elements in rows of {d}, against B of another width",
        a.len()
    );
    let m = a.len() / d;
    let av = View::of(a, m, d, d);
    let row_tiles = m.div_ceil(MR);
    DOT_BUFFERS.with(|bufs| {
        let (buf, strip) = &mut *bufs.borrow_mut();
        if let Rhs::Rows(_) = b {
            buf.resize(KC * NR, 0.0);
        }
        strip.resize(row_tiles * MR * NR, 0.0);
        for j0 in (0..n).step_by(NR) {
            let nc = NR.min(n - j0);
            for k0 in (0..d).step_by(KC) {
                let kc = KC.min(d - k0);
                let panel = match b {
                    Rhs::Rows(rows) => {
                        // SAFETY: the view covers `rows` (View::of checks);
                        // `buf` holds KC x NR.
                        unsafe { pack_transposed(View::of(rows, n, d, d), j0, nc, k0, kc, buf) };
                        buf.as_ptr()
                    }
                    Rhs::Packed(p) => p.panel(j0 / NR, k0),
                };
                for t in 0..row_tiles {
                    let i0 = t * MR;
                    // SAFETY: the view covers `a`; the strip holds MR x NR
                    // floats per row tile; the panel (zero past nc) kc x NR.
                    unsafe {
                        tile(Tile {
                            mr: MR.min(m - i0),
                            kc,
                            a: av.at(i0, k0),
                            lda: d,
                            panel,
                            c: strip.as_mut_ptr().add(i0 * NR),
                            ldc: NR,
                            nc,
                            accumulate: k0 > 0,
                        })
                    };
                }
            }
            for t in 0..row_tiles {
                let i0 = t * MR;
                visit(&DotTile {
                    row0: i0,
                    rows: MR.min(m - i0),
                    col0: j0,
                    cols: nc,
                    dots: &strip[i0 * NR..(i0 + MR) * NR],
                });
            }
        }
    });
    true
}

/// One task: row tiles `tiles` of column panel `panel`.
struct Task {
    panel: usize,
    tiles: std::ops::Range<usize>,
}

/// SAFETY: views valid; `c` holds `a.rows` rows of the product's width;
/// with `symmetric`, the product is square and symmetric.
unsafe fn matmul(a: View, b: View, transpose_b: bool, symmetric: bool, c: Out, parallel: bool) {
    let (m, k) = (a.rows, a.cols);
    let n = if transpose_b { b.rows } else { b.cols };
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            std::ptr::write_bytes(c.ptr.add(i * c.ld), 0, n);
        }
        return;
    }
    let row_tiles = m.div_ceil(MR);
    let panels = n.div_ceil(NR);
    // Few panels: split their tiles so that the threads share the work;
    // many, or a Gram matrix of three or more (whose panels reach fewer and
    // fewer tiles below the diagonal, which balances the threads): one task
    // per panel, packed once.
    let per_task = if parallel && panels < 8 && !(symmetric && panels > 2) {
        TILES_PER_TASK
    } else {
        row_tiles
    };
    let mut tasks = Vec::new();
    for p in 0..panels {
        // Symmetric: the tiles reaching the diagonal or below it.
        let first = if symmetric { (p * NR) / MR } else { 0 };
        let mut t = first;
        while t < row_tiles {
            let end = (t + per_task).min(row_tiles);
            tasks.push(Task {
                panel: p,
                tiles: t..end,
            });
            t = end;
        }
    }
    let run = |i: usize| {
        PANEL.with(|buf| {
            let mut buf = buf.borrow_mut();
            // SAFETY: forwarded from `matmul`; tasks write disjoint tiles.
            unsafe { run_task(a, b, transpose_b, c, &tasks[i], &mut buf) }
        })
    };
    if parallel {
        threads::share(tasks.len(), &run);
    } else {
        (0..tasks.len()).for_each(run);
    }
    if symmetric {
        for i in 0..m {
            for j in i + 1..n {
                *c.ptr.add(i * c.ld + j) = *c.ptr.add(j * c.ld + i);
            }
        }
    }
}

unsafe fn run_task(a: View, b: View, transpose_b: bool, c: Out, task: &Task, buf: &mut [f32]) {
    let (m, k) = (a.rows, a.cols);
    let n = if transpose_b { b.rows } else { b.cols };
    let j0 = task.panel * NR;
    let nc = NR.min(n - j0);
    let mut k0 = 0;
    while k0 < k {
        let kc = KC.min(k - k0);
        if transpose_b {
            pack_transposed(b, j0, nc, k0, kc, buf);
        } else {
            pack_rows(b, j0, nc, k0, kc, buf);
        }
        for t in task.tiles.clone() {
            let i0 = t * MR;
            let mr = MR.min(m - i0);
            tile(Tile {
                mr,
                kc,
                a: a.at(i0, k0),
                lda: a.ld,
                panel: buf.as_ptr(),
                c: c.ptr.add(i0 * c.ld + j0),
                ldc: c.ld,
                nc,
                accumulate: k0 > 0,
            });
        }
        k0 += kc;
    }
}

/// `buf[p][jj] = b[k0 + p][j0 + jj]`, columns past `nc` zero.
unsafe fn pack_rows(b: View, j0: usize, nc: usize, k0: usize, kc: usize, buf: &mut [f32]) {
    for p in 0..kc {
        let src = std::slice::from_raw_parts(b.at(k0 + p, j0), nc);
        let dst = &mut buf[p * NR..(p + 1) * NR];
        dst[..nc].copy_from_slice(src);
        dst[nc..].fill(0.0);
    }
}

/// `buf[p][jj] = b[j0 + jj][k0 + p]`, columns past `nc` zero.
unsafe fn pack_transposed(b: View, j0: usize, nc: usize, k0: usize, kc: usize, buf: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        pack_transposed_avx(b, j0, nc, k0, kc, buf)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        unreachable!("the kernels run on x86-64 only")
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_transposed_avx(
    b: View,
    j0: usize,
    nc: usize,
    k0: usize,
    kc: usize,
    buf: &mut [f32],
) {
    use std::arch::x86_64::*;
    let full = kc / 8 * 8;
    for half in 0..2 {
        let rows: [Option<*const f32>; 8] =
            std::array::from_fn(|r| (half * 8 + r < nc).then(|| b.at(j0 + half * 8 + r, k0)));
        let mut p = 0;
        while p < full {
            let v: [__m256; 8] = std::array::from_fn(|r| match rows[r] {
                Some(ptr) => _mm256_loadu_ps(ptr.add(p)),
                None => _mm256_setzero_ps(),
            });
            let t0 = _mm256_unpacklo_ps(v[0], v[1]);
            let t1 = _mm256_unpackhi_ps(v[0], v[1]);
            let t2 = _mm256_unpacklo_ps(v[2], v[3]);
            let t3 = _mm256_unpackhi_ps(v[2], v[3]);
            let t4 = _mm256_unpacklo_ps(v[4], v[5]);
            let t5 = _mm256_unpackhi_ps(v[4], v[5]);
            let t6 = _mm256_unpacklo_ps(v[6], v[7]);
            let t7 = _mm256_unpackhi_ps(v[6], v[7]);
            let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let cols = [
                _mm256_permute2f128_ps::<0x20>(s0, s4),
                _mm256_permute2f128_ps::<0x20>(s1, s5),
                _mm256_permute2f128_ps::<0x20>(s2, s6),
                _mm256_permute2f128_ps::<0x20>(s3, s7),
                _mm256_permute2f128_ps::<0x31>(s0, s4),
                _mm256_permute2f128_ps::<0x31>(s1, s5),
                _mm256_permute2f128_ps::<0x31>(s2, s6),
                _mm256_permute2f128_ps::<0x31>(s3, s7),
            ];
            for (q, col) in cols.iter().enumerate() {
                _mm256_storeu_ps(buf.as_mut_ptr().add((p + q) * NR + half * 8), *col);
            }
            p += 8;
        }
        for p in full..kc {
            for r in 0..8 {
                buf[p * NR + half * 8 + r] = match rows[r] {
                    Some(ptr) => *ptr.add(p),
                    None => 0.0,
                };
            }
        }
    }
}

/// One register tile: `c[0..mr][0..nc] (+)= a[0..mr][0..kc] @
/// panel[0..kc][0..nc]`, rows of A `lda` apart, of C `ldc` apart.
#[derive(Clone, Copy)]
struct Tile {
    mr: usize,
    kc: usize,
    a: *const f32,
    lda: usize,
    panel: *const f32,
    c: *mut f32,
    ldc: usize,
    nc: usize,
    accumulate: bool,
}

/// SAFETY: the pointers cover the tile's rows and columns.
unsafe fn tile(t: Tile) {
    #[cfg(target_arch = "x86_64")]
    match t.mr {
        6 => tile_width::<6>(t),
        5 => tile_width::<5>(t),
        4 => tile_width::<4>(t),
        3 => tile_width::<3>(t),
        2 => tile_width::<2>(t),
        _ => tile_width::<1>(t),
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the kernels run on x86-64 only ({} rows)", t.mr)
}

/// A tile of at most 8 columns takes one vector per row, not two.
#[cfg(target_arch = "x86_64")]
unsafe fn tile_width<const R: usize>(t: Tile) {
    if t.nc <= NR / 2 {
        tile_avx_narrow::<R>(t)
    } else {
        tile_avx::<R>(t)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx<const R: usize>(t: Tile) {
    let Tile {
        kc,
        a,
        lda,
        panel,
        c,
        ldc,
        nc,
        accumulate,
        ..
    } = t;
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for p in 0..kc {
        let b0 = _mm256_loadu_ps(panel.add(p * NR));
        let b1 = _mm256_loadu_ps(panel.add(p * NR + 8));
        for r in 0..R {
            let av = _mm256_broadcast_ss(&*a.add(r * lda + p));
            acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
        }
    }
    if nc == NR {
        for r in 0..R {
            let row = c.add(r * ldc);
            let (mut v0, mut v1) = (acc[r][0], acc[r][1]);
            if accumulate {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(row));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(row.add(8)));
            }
            _mm256_storeu_ps(row, v0);
            _mm256_storeu_ps(row.add(8), v1);
        }
    } else {
        let mut tmp = [0f32; NR];
        for r in 0..R {
            _mm256_storeu_ps(tmp.as_mut_ptr(), acc[r][0]);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), acc[r][1]);
            store_columns(c.add(r * ldc), &tmp[..nc], accumulate);
        }
    }
}

/// `row[j] (+)= values[j]`, one row of a tile narrower than its vectors.
///
/// SAFETY: `row` holds `values.len()` floats.
unsafe fn store_columns(row: *mut f32, values: &[f32], accumulate: bool) {
    for (j, &v) in values.iter().enumerate() {
        *row.add(j) = if accumulate { *row.add(j) + v } else { v };
    }
}

/// [`tile_avx`] for at most 8 columns: one vector a row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx_narrow<const R: usize>(t: Tile) {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); R];
    for p in 0..t.kc {
        let b = _mm256_loadu_ps(t.panel.add(p * NR));
        for r in 0..R {
            let av = _mm256_broadcast_ss(&*t.a.add(r * t.lda + p));
            acc[r] = _mm256_fmadd_ps(av, b, acc[r]);
        }
    }
    let mut tmp = [0f32; NR / 2];
    for r in 0..R {
        _mm256_storeu_ps(tmp.as_mut_ptr(), acc[r]);
        store_columns(t.c.add(r * t.ldc), &tmp[..t.nc], t.accumulate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// The product from its definition, in f64.
    fn naive(a: View, b: View, transpose_b: bool) -> Vec<f64> {
        let n = if transpose_b { b.rows } else { b.cols };
        let mut c = vec![0.0; a.rows * n];
        for i in 0..a.rows {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..a.cols {
                    // SAFETY: indices within the views.
                    let (x, y) = unsafe {
                        let bv = if transpose_b {
                            *b.at(j, p)
                        } else {
                            *b.at(p, j)
                        };
                        (*a.at(i, p), bv)
                    };
                    s += x as f64 * y as f64;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    fn check(got: &[f32], want: &[f64], k: usize, what: &str) {
        for (idx, (&g, &w)) in got.iter().zip(want).enumerate() {
            // Each term is below 0.25 in size: the f32 sum's error is
            // bounded by k terms' rounding.
            let tol = 1e-6 * k as f64 + 1e-6;
            assert!(
                (g as f64 - w).abs() <= tol,
                "{what}: entry {idx}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn products_match_their_definition_on_every_tail() {
        if !available() {
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (6, 16, 8),
            (7, 17, 9),
            (54, 54, 1024),
            (13, 40, 300),
            (42, 100, 42),
            (5, 3, 600),
        ] {
            for parallel in [false, true] {
                let _hot = threads::Hot::begin(parallel);
                let (lda, ldb) = (k + 3, n + 5);
                let a = data(m * lda, 1);
                let b = data(k * ldb, 2);
                let (av, bv) = (View::of(&a, m, k, lda), View::of(&b, k, n, ldb));
                let mut c = vec![f32::NAN; m * n];
                matmul_slices(av, bv, false, false, &mut c, parallel);
                check(&c, &naive(av, bv, false), k, &format!("A B {m}x{k}x{n}"));

                let bt = data(n * (k + 1), 3);
                let btv = View::of(&bt, n, k, k + 1);
                let mut c = vec![f32::NAN; m * n];
                matmul_slices(av, btv, true, false, &mut c, parallel);
                check(&c, &naive(av, btv, true), k, &format!("A B^T {m}x{k}x{n}"));
            }
        }
    }

    #[test]
    fn gram_from_the_lower_tiles_equals_the_full_product() {
        if !available() {
            return;
        }
        for &(m, k) in &[(1, 5), (6, 16), (17, 3), (54, 1024), (60, 700), (100, 33)] {
            let a = data(m * k, 4);
            let av = View::of(&a, m, k, k);
            let mut full = vec![0f32; m * m];
            let mut sym = vec![f32::NAN; m * m];
            matmul_slices(av, av, true, false, &mut full, false);
            {
                let _hot = threads::Hot::begin(true);
                matmul_slices(av, av, true, true, &mut sym, true);
            }
            assert_eq!(full, sym, "{m} x {k}");
        }
    }

    /// Every (row, column) product is visited once, equal to its
    /// definition, and each row meets the columns in increasing order.
    #[test]
    fn dot_tiles_visit_every_product_once_in_column_order() {
        if !available() {
            return;
        }
        for &(m, n, d) in &[
            (1, 1, 1),
            (6, 16, 4),
            (7, 33, 9),
            (13, 40, 300),
            (20, 17, 520),
            (9, 24, 40),
        ] {
            let a = data(m * d, 5);
            let b = data(n * d, 6);
            let want = naive(View::of(&a, m, d, d), View::of(&b, n, d, d), true);
            let packed = Packed::new(&b, d).unwrap();
            let mut results = Vec::new();
            for rhs in [Rhs::Rows(&b), Rhs::Packed(&packed)] {
                let mut got = vec![f32::NAN; m * n];
                let mut next_col = vec![0; m];
                assert!(dot_tiles(&a, rhs, d, |t| {
                    for r in 0..t.rows {
                        let i = t.row0 + r;
                        assert_eq!(t.col0, next_col[i], "row {i}: columns out of order");
                        next_col[i] = t.col0 + t.cols;
                        got[i * n + t.col0..i * n + t.col0 + t.cols].copy_from_slice(t.row(r));
                    }
                }));
                let what = format!("dot tiles {m}x{d}x{n}");
                assert!(next_col.iter().all(|&c| c == n), "{what}: columns missed");
                check(&got, &want, d, &what);
                results.push(got);
            }
            // Packed once or as it goes: the same sums.
            assert_eq!(results[0], results[1]);
        }
    }
}
