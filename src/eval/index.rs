//! An exact cosine-similarity index: stored unit vectors (float32 or
//! float16, CPU or CUDA) with ids and optional labels, searched in blocks of
//! queries and of stored vectors, so that memory beyond the vectors stays
//! O(block) however many are stored.
//!
//! On a CPU with AVX2 and FMA the search never forms a tile of similarities:
//! the crate's register-tile kernel (`crate::loss::gemm`'s `dot_tiles`)
//! hands each 6 x 16 block of products, still in cache, to the queries'
//! heaps of their `k` best; elsewhere a libtorch product per tile is read
//! by the same heaps.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::exact::cpu_slice;
use super::input::{
    check_batch_size, check_embeddings, compute_kind, host_vec, normalize_rows_, prepare,
};
use super::knn::topk_ordered;
use super::scan_cpu::{any_not_below, GROUP};
use crate::error::{at_least, ensure, Error, Result};
use crate::loss::checks::{check_finite, check_matrix_shape};
use crate::loss::{gemm, threads};
use crate::names::{device_name, dtype_name};

/// How far from 1 a stored row's norm may be in a file (float16 rows are
/// within about 1e-3 of it).
const UNIT_NORM_TOLERANCE: f64 = 1e-2;

/// Rows per chunk of an `add` (its temporaries are a chunk's).
const ADD_ROWS: i64 = 1_024;

/// The fused scan ([`gemm::dot_tiles`]): the queries of a block, in bytes
/// a thread (512 x 1 KiB at 256 dimensions), stay in L2 while the stored
/// vectors stream past (256 queries a thread were up to 15% slower); a
/// larger `batch_size` is swept in such pieces.
const FUSED_QUERY_BYTES: i64 = 512 << 10;
/// The fused scan: stored vectors per block, in bytes of float32; only
/// float16 storage is converted, a block at a time.
const FUSED_STORED_BYTES: i64 = 16 << 20;
/// Without the fused kernels: tiles of similarities, 512 queries x 2,048
/// stored vectors, float32, 4 MiB (small enough to keep the search's
/// memory near faiss's; near square, where the matrix product runs
/// fastest), each read by [`offer_row`].
const CPU_QUERIES: i64 = 512;
const CPU_STORED: i64 = 2_048;

/// On CUDA: larger tiles, for fewer and larger kernels.
const CUDA_STORED_BLOCK: i64 = 65_536;
const CUDA_TILE_BYTES: i64 = 64 << 20;

/// The ids of the stored vectors, all different: their positions (the ids
/// `add` gives when none are passed, from an empty index) until other ids
/// are added, then a list (with a set of them, to refuse an id twice).
/// Positions take no memory (a list of 500,000 takes about 20 MB).
#[derive(Debug)]
enum Ids {
    Positions(usize),
    Listed { ids: Vec<i64>, set: HashSet<i64> },
}

impl Ids {
    /// A saved list: positions where it is `0..n`; `None` if an id repeats.
    fn from_list(ids: Vec<i64>) -> Option<Self> {
        if ids.iter().enumerate().all(|(p, &id)| id == p as i64) {
            return Some(Ids::Positions(ids.len()));
        }
        let set: HashSet<i64> = ids.iter().copied().collect();
        (set.len() == ids.len()).then_some(Ids::Listed { ids, set })
    }

    fn len(&self) -> usize {
        match self {
            Ids::Positions(n) => *n,
            Ids::Listed { ids, .. } => ids.len(),
        }
    }

    fn get(&self, position: usize) -> i64 {
        match self {
            Ids::Positions(_) => position as i64,
            Ids::Listed { ids, .. } => ids[position],
        }
    }

    fn to_vec(&self) -> Vec<i64> {
        match self {
            Ids::Positions(n) => (0..*n as i64).collect(),
            Ids::Listed { ids, .. } => ids.clone(),
        }
    }

    fn contains(&self, id: i64) -> bool {
        match self {
            Ids::Positions(n) => usize::try_from(id).is_ok_and(|id| id < *n),
            Ids::Listed { set, .. } => set.contains(&id),
        }
    }

    /// New ids (argument `ids` of `add`) are all different and not stored.
    fn check_new(&self, new: &[i64]) -> Result<()> {
        let mut seen = HashSet::with_capacity(new.len());
        for &id in new {
            if !seen.insert(id) {
                return Err(Error::invalid("ids", format!("{id} twice"), "unique ids"));
            }
            if self.contains(id) {
                return Err(Error::invalid(
                    "ids",
                    format!("{id}, an id the index holds"),
                    "ids not in the index yet",
                ));
            }
        }
        Ok(())
    }

    /// `m` more: `ids` (checked by [`Ids::check_new`]), or (None) from one
    /// past the largest so far.
    fn extend(&mut self, ids: Option<Vec<i64>>, m: usize) {
        let start = match self {
            Ids::Positions(n) => *n as i64,
            Ids::Listed { ids, .. } => ids.iter().copied().max().map_or(0, |x| x + 1),
        };
        let follows = |ids: &[i64]| {
            ids.iter()
                .enumerate()
                .all(|(j, &id)| id == start + j as i64)
        };
        let new = match (&mut *self, ids) {
            (Ids::Positions(n), None) => return *n += m,
            (Ids::Positions(n), Some(ids)) if follows(&ids) => return *n += m,
            (_, Some(ids)) => ids,
            (_, None) => (start..start + m as i64).collect(),
        };
        if let Ids::Positions(_) = self {
            let ids = self.to_vec();
            let set = ids.iter().copied().collect();
            *self = Ids::Listed { ids, set };
        }
        if let Ids::Listed { ids, set } = self {
            set.extend(new.iter().copied());
            ids.extend(new);
        }
    }
}

/// Unit vectors with ids (and labels), searched by exact cosine similarity.
#[derive(Debug)]
pub struct Index {
    /// n x dim, L2-normalised, in the storage dtype, on the index's device.
    vectors: Tensor,
    ids: Ids,
    /// One per vector, or none for an index without labels.
    labels: Option<Vec<i64>>,
    /// Text saved with the index (safetensors metadata): what made it, the
    /// labels' names. `grouploss index` writes [`INFO_WEIGHTS`] and
    /// [`INFO_CLASSES`].
    pub info: BTreeMap<String, String>,
}

/// The `info` key of a SHA-256 of the weights of the network that embedded
/// the index's vectors (`grouploss index`); queries must be embedded by it.
pub const INFO_WEIGHTS: &str = "grouploss.weights_sha256";
/// The `info` key of the labels' names, a JSON list (label i: entry i).
pub const INFO_CLASSES: &str = "grouploss.class_names";

impl Index {
    /// An empty index of `dim`-wide vectors stored as `kind` (float32 or
    /// float16) on `device`.
    pub fn new(dim: i64, kind: Kind, device: Device) -> Result<Self> {
        at_least("dim", dim, 1)?;
        ensure(
            matches!(kind, Kind::Float | Kind::Half),
            "dtype",
            || dtype_name(kind).to_string(),
            "float32 or float16",
        )?;
        Ok(Index {
            vectors: Tensor::zeros([0, dim], (kind, device)),
            ids: Ids::Positions(0),
            labels: None,
            info: BTreeMap::new(),
        })
    }

    /// Stored vectors.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.ids.len() == 0
    }

    /// The vectors' width.
    pub fn dim(&self) -> i64 {
        self.vectors.size()[1]
    }

    /// The storage dtype.
    pub fn kind(&self) -> Kind {
        self.vectors.kind()
    }

    /// The device of the stored vectors.
    pub fn device(&self) -> Device {
        self.vectors.device()
    }

    /// The ids, in the order stored.
    pub fn ids(&self) -> Vec<i64> {
        self.ids.to_vec()
    }

    /// The labels, if the index has them.
    pub fn labels(&self) -> Option<&[i64]> {
        self.labels.as_deref()
    }

    /// Adds `embeddings` (m x dim, any floating dtype and device), normalised,
    /// under `ids` (default: the next m integers after the largest id) and
    /// `labels` (given with every add or never).
    pub fn add(
        &mut self,
        embeddings: &Tensor,
        ids: Option<Vec<i64>>,
        labels: Option<Vec<i64>>,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        check_matrix_shape(embeddings, "embeddings", "samples x embedding dims")?;
        let (m, d) = (embeddings.size()[0], embeddings.size()[1]);
        ensure(
            d == self.dim(),
            "embeddings",
            || format!("{d} columns"),
            format!("the index's width ({})", self.dim()),
        )?;
        let one_per_row = |arg: &str, len: usize| {
            ensure(
                len as i64 == m,
                arg,
                || format!("{len} {arg}"),
                format!("one per row of embeddings ({m})"),
            )
        };
        if let Some(ids) = &ids {
            one_per_row("ids", ids.len())?;
            self.ids.check_new(ids)?;
        }
        if let Some(labels) = &labels {
            one_per_row("labels", labels.len())?;
        }
        // Everything that can fail before the index changes.
        let vectors = self.append(embeddings)?;
        let labelled = self.labels.is_some() || self.is_empty();
        match (&mut self.labels, labels) {
            (Some(stored), Some(new)) => stored.extend(new),
            (None, Some(new)) if labelled => self.labels = Some(new),
            (None, None) => {}
            (stored, _) => {
                let has = if stored.is_some() {
                    "holds"
                } else {
                    "does not hold"
                };
                return Err(Error::invalid(
                    "labels",
                    "a change of labelling",
                    format!("labels with every add or none (the index {has} labels)"),
                ));
            }
        }
        self.vectors = vectors;
        self.ids.extend(ids, m as usize);
        Ok(())
    }

    /// The stored vectors followed by `embeddings`, checked and normalised
    /// in place, in chunks of rows: beyond the two copies of the stored
    /// vectors, memory stays O(chunk rows), with no chunk-sized temporary.
    fn append(&self, embeddings: &Tensor) -> Result<Tensor> {
        let (old, m) = (self.len() as i64, embeddings.size()[0]);
        let (kind, device) = (self.kind(), self.device());
        let out = Tensor::empty([old + m, self.dim()], (kind, device));
        if old > 0 {
            out.narrow(0, 0, old).copy_(&self.vectors);
        }
        for start in (0..m).step_by(ADD_ROWS as usize) {
            let len = ADD_ROWS.min(m - start);
            let chunk = embeddings.narrow(0, start, len);
            check_finite(&chunk, "embeddings")?;
            let mut rows = out.narrow(0, old + start, len);
            if kind == Kind::Float && chunk.kind() == Kind::Float {
                rows.copy_(&chunk);
                normalize_rows_(&mut rows);
            } else {
                // Normalised before the cast: float64 rows beyond float32's
                // range (1e39) or below it keep their direction.
                rows.copy_(&unit_rows(&chunk.to_device(device)));
            }
        }
        Ok(out)
    }

    /// The `k` most similar stored vectors of every query (q x dim): their
    /// cosine similarities (q x k, float32) and ids (q x k, int64), on the
    /// index's device, ordered by (-similarity, order of addition).
    /// `batch_size`: queries per block (None: 512 KiB of queries a thread on
    /// a CPU with the fused kernels, tiles of similarities of 4 MiB on other
    /// CPUs and near 64 MiB on CUDA).
    pub fn search(
        &self,
        queries: &Tensor,
        k: i64,
        batch_size: Option<i64>,
    ) -> Result<(Tensor, Tensor)> {
        let _guard = tch::no_grad_guard();
        check_embeddings(queries, "queries", 1)?;
        check_batch_size(batch_size)?;
        let n = self.len() as i64;
        ensure(
            n > 0,
            "index",
            || "an empty index".to_string(),
            "vectors to search (add some first)",
        )?;
        ensure(
            k >= 1 && k <= n,
            "k",
            || k.to_string(),
            format!("1 <= k <= {n}, the number of stored vectors"),
        )?;
        ensure(
            queries.size()[1] == self.dim(),
            "queries",
            || format!("{} columns", queries.size()[1]),
            format!("the index's width ({})", self.dim()),
        )?;
        let cuda = self.device().is_cuda();
        let fused = !cuda && gemm::available();
        let width = 4 * self.dim();
        let (block, rows) = if cuda {
            let block = CUDA_STORED_BLOCK.min(n);
            (block, CUDA_TILE_BYTES / (4 * block))
        } else if fused {
            let threads = threads::count() as i64;
            (
                FUSED_STORED_BYTES / width,
                threads * FUSED_QUERY_BYTES / width,
            )
        } else {
            (CPU_STORED, CPU_QUERIES)
        };
        let block = block.clamp(1, n);
        let rows = batch_size.unwrap_or(rows).max(1);
        let nq = queries.size()[0];
        // Between the fused scans, libtorch only normalises the queries.
        let _inline = fused.then(threads::TorchInline::begin);
        let (mut scores, mut found) = (Vec::new(), Vec::new());
        for start in (0..nq).step_by(rows as usize) {
            let len = rows.min(nq - start);
            let q = queries.narrow(0, start, len).to_device(self.device());
            let q = unit_rows(&q).to_kind(Kind::Float);
            let (s, i) = if cuda {
                self.search_block(&q, k, block)?
            } else {
                self.scan_block(&q, k, block, fused)?
            };
            scores.push(s);
            found.push(i);
        }
        let positions = host_vec::<i64>(&Tensor::cat(&found, 0))?;
        let ids: Vec<i64> = positions
            .iter()
            .map(|&p| self.ids.get(p as usize))
            .collect();
        let ids = Tensor::from_slice(&ids)
            .reshape([nq, k])
            .to_device(self.device());
        Ok((Tensor::cat(&scores, 0), ids))
    }

    /// [`Self::search_block`] on the CPU: every query's `k` best kept in a
    /// heap by [`offer_row`], over blocks of `block` stored vectors. `fused`
    /// ([`gemm::dot_tiles`], where the CPU has its kernels): the similarities
    /// are read from registers' tiles as they are computed; otherwise from a
    /// libtorch product of the block.
    fn scan_block(&self, q: &Tensor, k: i64, block: i64, fused: bool) -> Result<(Tensor, Tensor)> {
        let (n, rows, d) = (self.len() as i64, q.size()[0], self.dim() as usize);
        let q = q.contiguous();
        let qs = cpu_slice::<f32>(&q)?;
        let k = k as usize;
        let mut heaps: Vec<BinaryHeap<Hit>> = (0..rows)
            .map(|_| BinaryHeap::with_capacity(k + 1))
            .collect();
        let mut los = vec![f32::NEG_INFINITY; rows as usize];
        let workers = threads::count();
        let per = (rows as usize).div_ceil(workers).max(1);
        for start in (0..n).step_by(block as usize) {
            let len = block.min(n - start);
            let g = self.vectors.narrow(0, start, len).to_kind(Kind::Float);
            let g = g.contiguous();
            let s = if fused {
                None
            } else {
                Some(q.matmul(&g.tr()).contiguous())
            };
            let (gs, tile) = (
                cpu_slice::<f32>(&g)?,
                s.as_ref().map(cpu_slice::<f32>).transpose()?,
            );
            let width = len as usize;
            std::thread::scope(|scope| {
                for (c, (hs, lo)) in heaps.chunks_mut(per).zip(los.chunks_mut(per)).enumerate() {
                    let first = c * per;
                    scope.spawn(move || match tile {
                        None => {
                            let piece = (FUSED_QUERY_BYTES as usize / (4 * d)).max(1);
                            for (p, (hs, lo)) in
                                hs.chunks_mut(piece).zip(lo.chunks_mut(piece)).enumerate()
                            {
                                let q0 = first + p * piece;
                                let a = &qs[q0 * d..(q0 + hs.len()) * d];
                                let done = gemm::dot_tiles(a, gemm::Rhs::Rows(gs), d, |t| {
                                    for r in 0..t.rows {
                                        let i = t.row0 + r;
                                        let col0 = start + t.col0 as i64;
                                        offer_row(&mut hs[i], &mut lo[i], t.row(r), col0, k);
                                    }
                                });
                                assert!(done, "the fused scan runs where the kernels do");
                            }
                        }
                        Some(tile) => {
                            let rows = tile[first * width..].chunks(width);
                            for ((heap, lo), row) in hs.iter_mut().zip(lo.iter_mut()).zip(rows) {
                                offer_row(heap, lo, row, start, k);
                            }
                        }
                    });
                }
            });
        }
        let (mut sims, mut positions) = (Vec::new(), Vec::new());
        for heap in heaps {
            for hit in heap.into_sorted_vec() {
                sims.push(hit.s);
                positions.push(hit.j);
            }
        }
        let k = k as i64;
        Ok((
            Tensor::from_slice(&sims).reshape([rows, k]),
            Tensor::from_slice(&positions).reshape([rows, k]),
        ))
    }

    /// The top `k` of a block of normalised float32 queries, over the stored
    /// vectors in blocks of `block`: (similarities, positions).
    fn search_block(&self, q: &Tensor, k: i64, block: i64) -> Result<(Tensor, Tensor)> {
        let n = self.len() as i64;
        let mut best: Option<(Tensor, Tensor)> = None;
        for start in (0..n).step_by(block as usize) {
            let len = block.min(n - start);
            let g = self.vectors.narrow(0, start, len).to_kind(Kind::Float);
            let s = q.matmul(&g.tr());
            let (v, i) = topk_ordered(&s, k.min(len))?;
            let i = i + start;
            best = Some(match best {
                None => (v, i),
                // The earlier blocks first: ties keep the smaller position.
                Some((bv, bi)) => {
                    let both = Tensor::cat(&[&bv, &v], 1);
                    let (v, cols) = topk_ordered(&both, k.min(both.size()[1]))?;
                    (v, Tensor::cat(&[&bi, &i], 1).gather(1, &cols, false))
                }
            });
        }
        best.ok_or_else(|| Error::invalid("k", k, "a non-empty index"))
    }

    /// Writes the index to `path` (safetensors: `vectors`, `ids` and, if
    /// any, `labels`, with `info` as metadata; nothing executable), through
    /// a temporary file so that
    /// a crash leaves the old file or the new one.
    pub fn save(&self, path: &Path) -> Result<()> {
        if path.is_dir() {
            return Err(Error::invalid(
                "path",
                path.display(),
                "a file to write (it is a folder)",
            ));
        }
        let mut named = vec![
            ("vectors".to_string(), self.vectors.to_device(Device::Cpu)),
            ("ids".to_string(), Tensor::from_slice(&self.ids.to_vec())),
        ];
        if let Some(labels) = &self.labels {
            named.push(("labels".to_string(), Tensor::from_slice(labels)));
        }
        let info = self.info.clone().into_iter().collect();
        crate::files::write_safetensors_atomic(path, &named, info)
    }

    /// Reads an index written by [`Index::save`] onto `device`.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such index file"),
            ));
        }
        let mut vectors = None;
        let (mut ids, mut labels) = (None, None);
        let (tensors, info) = crate::files::read_safetensors_with_metadata(path)
            .map_err(|e| bad_file(path, &format!("not a safetensors file ({e})")))?;
        // Ids and labels as saved: int64 vectors, nothing cast or flattened.
        let integers = |t: &Tensor| -> Result<Vec<i64>> {
            if t.kind() != Kind::Int64 || t.dim() != 1 {
                return Err(bad_file(path, "ids or labels that are not int64 vectors"));
            }
            host_vec::<i64>(t)
        };
        for (name, t) in tensors {
            match name.as_str() {
                "vectors" => vectors = Some(t),
                "ids" => ids = Some(integers(&t)?),
                "labels" => labels = Some(integers(&t)?),
                other => return Err(bad_file(path, &format!("an unknown tensor {other:?}"))),
            }
        }
        let vectors = vectors.ok_or_else(|| bad_file(path, "no tensor \"vectors\""))?;
        let ids = ids.ok_or_else(|| bad_file(path, "no tensor \"ids\""))?;
        let rows = vectors.size().first().copied().unwrap_or(-1);
        let fits = vectors.dim() == 2
            && vectors.size()[1] >= 1
            && matches!(vectors.kind(), Kind::Float | Kind::Half)
            && rows == ids.len() as i64
            && labels.as_ref().is_none_or(|l| l.len() == ids.len());
        if !fits {
            return Err(bad_file(path, "tensors of mismatched shapes or dtypes"));
        }
        // The search assumes finite vectors, as `add` checks them.
        if !bool::try_from(vectors.isfinite().all())? {
            return Err(bad_file(path, "vectors that are not all finite"));
        }
        // Scores are cosines: `add` stores unit rows (or zero ones).
        let norms = vectors
            .to_kind(Kind::Float)
            .norm_scalaropt_dim(2, [1i64].as_slice(), false);
        let unit = (&norms - 1.0)
            .abs()
            .le(UNIT_NORM_TOLERANCE)
            .logical_or(&norms.eq(0.0));
        if !bool::try_from(unit.all())? {
            return Err(bad_file(path, "vectors that are not of unit length"));
        }
        let ids = Ids::from_list(ids).ok_or_else(|| bad_file(path, "an id stored twice"))?;
        Ok(Index {
            vectors: vectors.to_device(device),
            ids,
            labels,
            info: info.into_iter().collect(),
        })
    }

    /// A one-line description, as `repr` shows it.
    pub fn describe(&self) -> String {
        format!(
            "Index({} vectors of {}, {}, {}{})",
            self.len(),
            self.dim(),
            dtype_name(self.kind()),
            device_name(self.device()),
            if self.labels.is_some() {
                ", labelled"
            } else {
                ""
            }
        )
    }
}

fn bad_file(path: &Path, what: &str) -> Error {
    Error::invalid(
        "path",
        format!("{}: {what}", path.display()),
        "an index written by Index.save",
    )
}

/// A stored vector found for a query: its similarity and position. `Ord`
/// puts the one ranked last (smaller similarity, then larger position)
/// greatest, so that a max-heap keeps the worst kept one on top and
/// `into_sorted_vec` lists them best first.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Hit {
    s: f32,
    j: i64,
}

impl Eq for Hit {}

impl Ord for Hit {
    fn cmp(&self, other: &Self) -> Ordering {
        // Similarities are finite: the vectors and queries were checked.
        other
            .s
            .partial_cmp(&self.s)
            .unwrap_or(Ordering::Equal)
            .then(self.j.cmp(&other.j))
    }
}

impl PartialOrd for Hit {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Offers a query's similarities `row` to stored vectors `col0..` to its
/// heap of the `k` best. `lo`: below it nothing enters the heap (the worst
/// kept once the heap is full); groups of [`GROUP`] all below it are
/// rejected by one vectorised test. Equal similarities keep the smaller
/// position ([`Hit`]'s order), in whatever order they are offered.
fn offer_row(heap: &mut BinaryHeap<Hit>, lo: &mut f32, row: &[f32], col0: i64, k: usize) {
    for (g, group) in row.chunks(GROUP).enumerate() {
        if !any_not_below(group, *lo) {
            continue;
        }
        for (i, &s) in group.iter().enumerate() {
            let hit = Hit {
                s,
                j: col0 + (g * GROUP + i) as i64,
            };
            if heap.len() < k {
                heap.push(hit);
            } else if hit < *heap.peek().expect("a full heap") {
                heap.pop();
                heap.push(hit);
            }
        }
        if heap.len() == k {
            *lo = heap.peek().expect("a full heap").s;
        }
    }
}

/// Rows scaled to unit length in their compute dtype (float64, else
/// float32; zero rows stay zero).
fn unit_rows(x: &Tensor) -> Tensor {
    prepare(x, compute_kind(x.kind()), true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Rows of +-1/2 in 4 dimensions: unit vectors whose products are exact
    /// (multiples of 1/4), so ties do not depend on the order of any sum.
    fn random(rng: &mut Rng, n: i64, d: i64) -> Tensor {
        let v: Vec<f32> = (0..n * d).map(|_| rng.below(2) as f32 - 0.5).collect();
        Tensor::from_slice(&v).reshape([n, d])
    }

    /// Blocked search equals one full similarity matrix ranked by
    /// (-similarity, position), ties included.
    #[test]
    fn blocked_search_equals_the_full_ranking() {
        let mut rng = Rng::new(5);
        let (n, d, k) = (300, 4, 7);
        let mut index = Index::new(d, Kind::Float, Device::Cpu).unwrap();
        let g = random(&mut rng, n, d);
        index.add(&g.narrow(0, 0, 120), None, None).unwrap();
        index.add(&g.narrow(0, 120, 180), None, None).unwrap();
        let q = random(&mut rng, 23, d);
        let s = unit_rows(&q).matmul(&unit_rows(&g).tr());
        let (want_v, want_i) = topk_ordered(&s, k).unwrap();
        for block in [1, 7, 64, 300] {
            let q = unit_rows(&q);
            // The torch top-k (CUDA) and the Rust scans (CPU), over tiles.
            let mut found = vec![
                index.search_block(&q, k, block).unwrap(),
                index.scan_block(&q, k, block, false).unwrap(),
            ];
            if gemm::available() {
                found.push(index.scan_block(&q, k, block, true).unwrap());
            }
            for (v, i) in found {
                assert!(v.allclose(&want_v, 0.0, 1e-6, false), "block {block}");
                assert!(i.equal(&want_i), "block {block}");
            }
        }
        let (_, ids) = index.search(&q, k, Some(5)).unwrap();
        assert!(ids.equal(&want_i));
    }

    /// Query blocks larger than a thread's piece (128 queries at 1,024
    /// dimensions) are swept piece by piece: the same neighbours. Rows of
    /// +-1/2 in 1,024 dimensions normalise to +-1/32, so products are exact.
    #[test]
    fn the_fused_scan_sweeps_large_query_blocks_in_pieces() {
        if !gemm::available() {
            return;
        }
        let mut rng = Rng::new(8);
        let (n, d, k) = (50, 1024, 5);
        let mut index = Index::new(d, Kind::Float, Device::Cpu).unwrap();
        index.add(&random(&mut rng, n, d), None, None).unwrap();
        let q = unit_rows(&random(&mut rng, 700, d));
        let (want_v, want_i) = index.search_block(&q, k, 16).unwrap();
        let (v, i) = index.scan_block(&q, k, 16, true).unwrap();
        assert!(v.allclose(&want_v, 0.0, 1e-6, false));
        assert!(i.equal(&want_i));
    }

    /// Ids stay positions (no list) while every add follows on; other ids
    /// turn them into a list, after which default ids go on from the largest.
    #[test]
    fn ids_are_positions_until_others_are_added() {
        let mut ids = Ids::Positions(0);
        ids.extend(None, 3);
        ids.extend(Some(vec![3, 4]), 2);
        assert!(matches!(ids, Ids::Positions(5)));
        ids.extend(Some(vec![10, 7]), 2);
        ids.extend(None, 2);
        assert_eq!(ids.to_vec(), [0, 1, 2, 3, 4, 10, 7, 11, 12]);
        assert_eq!((ids.len(), ids.get(5), ids.get(8)), (9, 10, 12));
        assert!(matches!(
            Ids::from_list(vec![0, 1, 2]),
            Some(Ids::Positions(3))
        ));
        assert!(matches!(
            Ids::from_list(vec![0, 2]),
            Some(Ids::Listed { .. })
        ));
        assert!(Ids::from_list(vec![4, 2, 4]).is_none());
    }

    #[test]
    fn a_crafted_file_is_refused_not_searched() {
        let dir = crate::data::testing::temp_dir("index-crafted");
        let path = dir.join("bad.safetensors");
        let vectors = Tensor::from_slice(&[1f32, 0., 0., 1.]).reshape([2, 2]);
        let ids = Tensor::from_slice(&[3i64, 4]);
        let nan = Tensor::from_slice(&[1f32, f32::NAN, 0., 1.]).reshape([2, 2]);
        let cases = [
            (nan, ids.shallow_clone(), "not all finite"),
            (
                vectors.shallow_clone(),
                ids.to_kind(Kind::Double),
                "not int64 vectors",
            ),
            (
                vectors.shallow_clone(),
                ids.reshape([2, 1]),
                "not int64 vectors",
            ),
            (
                vectors.shallow_clone(),
                Tensor::from_slice(&[7i64, 7]),
                "an id stored twice",
            ),
        ];
        for (v, i, message) in cases {
            let named = vec![("vectors".to_string(), v), ("ids".to_string(), i)];
            crate::files::write_safetensors_atomic(&path, &named, Default::default()).unwrap();
            let err = Index::load(&path, Device::Cpu).unwrap_err().to_string();
            assert!(err.contains(message), "{err}");
        }
        let named = vec![("vectors".to_string(), vectors), ("ids".to_string(), ids)];
        crate::files::write_safetensors_atomic(&path, &named, Default::default()).unwrap();
        assert_eq!(Index::load(&path, Device::Cpu).unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(dir);
    }
}
