//! The P x K epoch plan.
//!
//! Each class `c` with `n_c` samples is shuffled and cut into
//! `m_c = ceil(n_c / K)` chunks of K samples; a short last chunk is topped up
//! with other samples of the class (repeats when `n_c < K`). So every sample
//! appears in some chunk and every chunk is one class. The epoch has
//! `B = max(ceil(sum m_c / P), max m_c)` batches (rounded up to a multiple of
//! the number of replicas), each of P chunks of distinct classes.
//!
//! Batches are filled one after the other. A class whose remaining chunks
//! equal the remaining batches must be taken now (otherwise two of its chunks
//! would have to share a batch later); the other places are drawn among the
//! classes with chunks left, with probability proportional to their remaining
//! chunks, so large classes are spread over the whole epoch. Both rules keep
//! `r_c <= batches left` and `sum r_c <= P * batches left`, so the plan never
//! gets stuck. Places left once every chunk is planned are filled with extra
//! chunks of classes not yet in the batch. Finally the batches are shuffled
//! and rank `r` of `R` takes batches `r, r + R, r + 2R, ...`.

use crate::error::{at_least, ensure, Error, Result};
use crate::rng::{stream, Rng};

/// Seed and distribution of a [`ClassBalancedSampler`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SamplerOptions {
    /// The plan of epoch `e` is a function of `(seed, e)` alone.
    pub seed: u64,
    /// Number of processes sharing the epoch.
    pub num_replicas: usize,
    /// This process, in `0..num_replicas`.
    pub rank: usize,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        SamplerOptions {
            seed: 0,
            num_replicas: 1,
            rank: 0,
        }
    }
}

/// Plans epochs of batches of `classes_per_batch` (P) distinct classes x
/// `samples_per_class` (K) samples.
///
/// Guarantees, for every epoch: every batch has exactly P distinct classes
/// with K samples each, grouped by class; every sample appears at least
/// once; ranks get disjoint sets of batches of equal count; the plan depends
/// only on `(labels, P, K, seed, epoch, num_replicas)`, on every machine.
#[derive(Clone, Debug)]
pub struct ClassBalancedSampler {
    p: usize,
    k: usize,
    options: SamplerOptions,
    epoch: u64,
    /// `members[offsets[c]..offsets[c + 1]]` are the sample indices of class `c`.
    offsets: Vec<usize>,
    members: Vec<usize>,
    /// Batches of one epoch over all ranks (a multiple of `num_replicas`).
    total_batches: usize,
}

impl ClassBalancedSampler {
    /// A sampler over `labels` (non-negative class ids, any values).
    pub fn new(
        labels: &[i64],
        classes_per_batch: usize,
        samples_per_class: usize,
        options: SamplerOptions,
    ) -> Result<Self> {
        ensure(
            !labels.is_empty(),
            "labels",
            || "an empty sequence".into(),
            "at least one label",
        )?;
        if let Some(pos) = labels.iter().position(|&l| l < 0) {
            return Err(Error::invalid(
                "labels",
                format!("{} at position {pos}", labels[pos]),
                "non-negative class ids",
            ));
        }
        at_least("samples_per_class", samples_per_class, 1)?;
        at_least("classes_per_batch", classes_per_batch, 1)?;
        at_least("num_replicas", options.num_replicas, 1)?;
        ensure(
            options.rank < options.num_replicas,
            "rank",
            || options.rank.to_string(),
            format!("an integer in [0, {})", options.num_replicas),
        )?;
        let (offsets, members) = group_by_class(labels);
        let num_classes = offsets.len() - 1;
        ensure(
            classes_per_batch <= num_classes,
            "classes_per_batch",
            || classes_per_batch.to_string(),
            format!("at most the number of classes in labels ({num_classes})"),
        )?;
        let k = samples_per_class;
        let mut chunks = 0usize;
        let mut largest = 0usize;
        for c in 0..num_classes {
            let m = (offsets[c + 1] - offsets[c]).div_ceil(k);
            chunks += m;
            largest = largest.max(m);
        }
        let batches = chunks.div_ceil(classes_per_batch).max(largest);
        let total_batches = batches.div_ceil(options.num_replicas) * options.num_replicas;
        Ok(ClassBalancedSampler {
            p: classes_per_batch,
            k,
            options,
            epoch: 0,
            offsets,
            members,
            total_batches,
        })
    }

    /// Selects the epoch whose plan [`batches`](Self::batches) returns.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Batches of this rank per epoch (the same for every epoch and rank).
    pub fn len(&self) -> usize {
        self.total_batches / self.options.num_replicas
    }

    /// Never true: a sampler has at least one batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn classes_per_batch(&self) -> usize {
        self.p
    }

    pub fn samples_per_class(&self) -> usize {
        self.k
    }

    /// P x K.
    pub fn batch_size(&self) -> usize {
        self.p * self.k
    }

    /// Distinct classes in the labels.
    pub fn num_classes(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn options(&self) -> &SamplerOptions {
        &self.options
    }

    /// This rank's batches of the current epoch: `len()` batches of
    /// `batch_size()` sample indices, K consecutive ones per class.
    pub fn batches(&self) -> Vec<Vec<usize>> {
        self.plan_flat()
            .chunks_exact(self.batch_size())
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// [`batches`](Self::batches) concatenated: `len() * batch_size()` indices.
    pub fn plan_flat(&self) -> Vec<usize> {
        let all = self.plan_all_ranks();
        let r = self.options.num_replicas;
        if r == 1 {
            return all;
        }
        let n = self.batch_size();
        let mut out = Vec::with_capacity(self.len() * n);
        for b in (self.options.rank..self.total_batches).step_by(r) {
            out.extend_from_slice(&all[b * n..(b + 1) * n]);
        }
        out
    }

    /// The batches of every rank, in the shuffled global order, flattened.
    fn plan_all_ranks(&self) -> Vec<usize> {
        let (p, k) = (self.p, self.k);
        let num_classes = self.num_classes();
        let mut rng = Rng::derived(self.options.seed, &[self.epoch, stream::SAMPLER]);

        let mut order = self.members.clone();
        let mut remaining = vec![0u32; num_classes];
        // One pool entry per unplanned chunk: a uniform entry is a class
        // drawn with probability proportional to its remaining chunks.
        let mut pool: Vec<u32> = Vec::with_capacity(self.members.len() / k + num_classes);
        for c in 0..num_classes {
            let seg = &mut order[self.offsets[c]..self.offsets[c + 1]];
            rng.shuffle(seg);
            remaining[c] = seg.len().div_ceil(k) as u32;
            pool.extend(std::iter::repeat_n(c as u32, remaining[c] as usize));
        }
        // Entries of chunks already planned as forced picks, dropped when drawn.
        let mut stale = vec![0u32; num_classes];
        let mut alive = num_classes;
        let mut next_chunk = vec![0usize; num_classes];

        // Lazy buckets by remaining chunks: a class sits in bucket r when it
        // had r chunks left; entries whose count moved on are ignored.
        let b_total = self.total_batches;
        let mut buckets = Buckets::new(b_total + 1, num_classes + pool.len());
        for (c, &r) in remaining.iter().enumerate() {
            buckets.push(r as usize, c as u32);
        }

        let mut in_batch = vec![false; num_classes];
        let mut plan = Vec::with_capacity(b_total * p * k);
        let mut picked: Vec<(usize, bool)> = Vec::with_capacity(p);
        for b in 0..b_total {
            let left = (b_total - b) as u32;
            picked.clear();
            let mut node = buckets.head[left as usize];
            while node != NONE {
                let (c, next) = buckets.nodes[node as usize];
                node = next;
                let c = c as usize;
                if remaining[c] == left && !in_batch[c] {
                    in_batch[c] = true;
                    stale[c] += 1;
                    picked.push((c, true));
                }
            }
            debug_assert!(picked.len() <= p, "more forced classes than places");
            while picked.len() < p && picked.len() < alive {
                let c = draw_class(&mut pool, &mut stale, &in_batch, &remaining, &mut rng);
                in_batch[c] = true;
                picked.push((c, true));
            }
            while picked.len() < p {
                let c = self.extra_class(&mut rng, &in_batch);
                in_batch[c] = true;
                picked.push((c, false));
            }
            rng.shuffle(&mut picked);
            for &(c, real) in &picked {
                in_batch[c] = false;
                if real {
                    self.push_chunk(&mut plan, &order, c, next_chunk[c], &mut rng);
                    next_chunk[c] += 1;
                    remaining[c] -= 1;
                    if remaining[c] > 0 {
                        buckets.push(remaining[c] as usize, c as u32);
                    } else {
                        alive -= 1;
                    }
                } else {
                    self.push_extra(&mut plan, c, &mut rng);
                }
            }
        }
        shuffle_batches(&plan, p * k, &mut rng)
    }

    /// A class uniformly among those not in the batch (there are at least P
    /// classes, so one exists while the batch has fewer than P).
    fn extra_class(&self, rng: &mut Rng, in_batch: &[bool]) -> usize {
        let n = in_batch.len();
        loop {
            let c = rng.below(n as u64) as usize;
            if !in_batch[c] {
                return c;
            }
        }
    }

    /// Chunk `j` of class `c` in the shuffled `order`, topped up to K.
    fn push_chunk(
        &self,
        plan: &mut Vec<usize>,
        order: &[usize],
        c: usize,
        j: usize,
        rng: &mut Rng,
    ) {
        let seg = &order[self.offsets[c]..self.offsets[c + 1]];
        let start = j * self.k;
        let end = (start + self.k).min(seg.len());
        plan.extend_from_slice(&seg[start..end]);
        let missing = self.k - (end - start);
        if missing == 0 {
            return;
        }
        // Only the last chunk is short; the samples before it are all the
        // others, so top it up from them without repeating one.
        let others = &seg[..start];
        if others.len() >= missing {
            let mut picked = Vec::with_capacity(missing);
            while picked.len() < missing {
                let i = rng.below(others.len() as u64) as usize;
                if !picked.contains(&i) {
                    picked.push(i);
                }
            }
            plan.extend(picked.into_iter().map(|i| others[i]));
        } else {
            for _ in 0..missing {
                plan.push(seg[rng.below(seg.len() as u64) as usize]);
            }
        }
    }

    /// K samples of class `c` beyond its planned chunks: distinct when the
    /// class has K samples, otherwise all of them plus random repeats.
    fn push_extra(&self, plan: &mut Vec<usize>, c: usize, rng: &mut Rng) {
        let seg = &self.members[self.offsets[c]..self.offsets[c + 1]];
        if seg.len() <= self.k {
            plan.extend_from_slice(seg);
            for _ in seg.len()..self.k {
                plan.push(seg[rng.below(seg.len() as u64) as usize]);
            }
            return;
        }
        let start = plan.len();
        while plan.len() - start < self.k {
            let s = seg[rng.below(seg.len() as u64) as usize];
            if !plan[start..].contains(&s) {
                plan.push(s);
            }
        }
    }
}

const NONE: u32 = u32::MAX;

/// Lists of classes by remaining chunks, as linked lists in two flat arrays
/// (one node per push, no allocation per bucket).
struct Buckets {
    head: Vec<u32>,
    nodes: Vec<(u32, u32)>,
}

impl Buckets {
    fn new(buckets: usize, capacity: usize) -> Self {
        Buckets {
            head: vec![NONE; buckets],
            nodes: Vec::with_capacity(capacity),
        }
    }

    fn push(&mut self, bucket: usize, class: u32) {
        self.nodes.push((class, self.head[bucket]));
        self.head[bucket] = (self.nodes.len() - 1) as u32;
    }
}

/// The batches of `plan` (`n` indices each) in a random order.
fn shuffle_batches(plan: &[usize], n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..plan.len() / n).collect();
    rng.shuffle(&mut order);
    let mut shuffled = Vec::with_capacity(plan.len());
    for b in order {
        shuffled.extend_from_slice(&plan[b * n..(b + 1) * n]);
    }
    shuffled
}

/// Draws a class not in the batch with probability proportional to its
/// remaining chunks, removing one of its pool entries. Entries of classes in
/// the batch are redrawn; after many redraws (a few classes hold most
/// chunks) the choice is made over the other classes directly.
fn draw_class(
    pool: &mut Vec<u32>,
    stale: &mut [u32],
    in_batch: &[bool],
    remaining: &[u32],
    rng: &mut Rng,
) -> usize {
    let mut misses = 0;
    while misses < 64 && !pool.is_empty() {
        let i = rng.below(pool.len() as u64) as usize;
        let c = pool[i] as usize;
        if stale[c] > 0 {
            stale[c] -= 1;
            pool.swap_remove(i);
        } else if in_batch[c] {
            misses += 1;
        } else {
            pool.swap_remove(i);
            return c;
        }
    }
    // Weighted choice among the classes outside the batch, by a scan.
    let total: u64 = (0..remaining.len())
        .filter(|&c| !in_batch[c])
        .map(|c| remaining[c] as u64)
        .sum();
    let mut target = rng.below(total.max(1));
    let mut chosen = 0;
    for c in (0..remaining.len()).filter(|&c| !in_batch[c] && remaining[c] > 0) {
        chosen = c;
        if target < remaining[c] as u64 {
            break;
        }
        target -= remaining[c] as u64;
    }
    // Its entry stays in the pool; mark one stale so it is dropped later.
    stale[chosen] += 1;
    chosen
}

/// Sample indices grouped by class, classes in increasing label order, as
/// `(offsets, members)` with `offsets.len() == classes + 1`.
fn group_by_class(labels: &[i64]) -> (Vec<usize>, Vec<usize>) {
    let max = labels.iter().copied().max().unwrap_or(0) as u64;
    // Dense labels (the usual case) are counted directly; sparse ones are
    // mapped to dense ids by sorting their distinct values first.
    let dense: Vec<usize>;
    let num_ids;
    if max <= 4 * labels.len() as u64 + 1024 {
        dense = labels.iter().map(|&l| l as usize).collect();
        num_ids = max as usize + 1;
    } else {
        let mut values = labels.to_vec();
        values.sort_unstable();
        values.dedup();
        dense = labels
            .iter()
            .map(|l| values.binary_search(l).unwrap_or_default())
            .collect();
        num_ids = values.len();
    }
    let mut counts = vec![0usize; num_ids];
    for &d in &dense {
        counts[d] += 1;
    }
    // Drop ids that do not occur, keeping increasing label order.
    let mut class_of_id = vec![usize::MAX; num_ids];
    let mut offsets = vec![0usize];
    for (id, &n) in counts.iter().enumerate() {
        if n > 0 {
            class_of_id[id] = offsets.len() - 1;
            offsets.push(offsets[offsets.len() - 1] + n);
        }
    }
    let mut fill = offsets[..offsets.len() - 1].to_vec();
    let mut members = vec![0usize; labels.len()];
    for (i, &d) in dense.iter().enumerate() {
        let c = class_of_id[d];
        members[fill[c]] = i;
        fill[c] += 1;
    }
    (offsets, members)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn labels_with_sizes(sizes: &[usize]) -> Vec<i64> {
        let mut labels = Vec::new();
        for (c, &n) in sizes.iter().enumerate() {
            labels.extend(std::iter::repeat_n(c as i64 * 7 + 3, n));
        }
        // Interleave, so indices of a class are not contiguous.
        let mut rng = Rng::new(99);
        rng.shuffle(&mut labels);
        labels
    }

    fn check_epoch(labels: &[i64], s: &ClassBalancedSampler) {
        let (p, k) = (s.classes_per_batch(), s.samples_per_class());
        let mut seen = vec![0usize; labels.len()];
        let r = s.options().num_replicas;
        let mut all = Vec::new();
        for rank in 0..r {
            let mut t = s.clone();
            t.options.rank = rank;
            let batches = t.batches();
            assert_eq!(batches.len(), s.len());
            all.extend(batches);
        }
        for batch in &all {
            assert_eq!(batch.len(), p * k);
            let mut classes = HashSet::new();
            for block in batch.chunks(k) {
                let c = labels[block[0]];
                assert!(
                    block.iter().all(|&i| labels[i] == c),
                    "mixed block {block:?}"
                );
                assert!(classes.insert(c), "class {c} twice in a batch");
            }
            for &i in batch {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n > 0), "a sample was never drawn");
    }

    #[test]
    fn every_batch_is_p_classes_by_k_and_every_sample_is_drawn() {
        for (sizes, p, k) in [
            (vec![5, 5, 5, 5], 2, 5),
            (vec![1, 2, 3, 40, 7, 9, 11], 3, 4),
            (vec![200, 3, 3, 3], 2, 2),
            (vec![6; 50], 10, 6),
            (vec![1, 1, 1], 3, 3),
        ] {
            let labels = labels_with_sizes(&sizes);
            let mut s =
                ClassBalancedSampler::new(&labels, p, k, SamplerOptions::default()).unwrap();
            for e in 0..3 {
                s.set_epoch(e);
                check_epoch(&labels, &s);
            }
        }
    }

    #[test]
    fn length_is_the_chunk_count_over_p_or_the_largest_class() {
        let labels = labels_with_sizes(&[6; 50]);
        let s = ClassBalancedSampler::new(&labels, 10, 6, SamplerOptions::default()).unwrap();
        assert_eq!(s.len(), 5);
        let labels = labels_with_sizes(&[200, 3, 3, 3]);
        let s = ClassBalancedSampler::new(&labels, 2, 2, SamplerOptions::default()).unwrap();
        assert_eq!(s.len(), 100);
        let labels = labels_with_sizes(&[7, 7, 7]);
        let opts = SamplerOptions {
            num_replicas: 4,
            ..Default::default()
        };
        // 3 classes x 2 chunks = 6 chunks, P=2 -> 3 batches, padded to 4 ranks.
        let s = ClassBalancedSampler::new(&labels, 2, 4, opts).unwrap();
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn ranks_get_disjoint_batches_that_cover_the_epoch() {
        let labels = labels_with_sizes(&[9, 4, 13, 8, 8, 20, 2, 5]);
        for r in [1, 2, 3] {
            let mut s = ClassBalancedSampler::new(
                &labels,
                3,
                3,
                SamplerOptions {
                    seed: 4,
                    num_replicas: r,
                    rank: 0,
                },
            )
            .unwrap();
            s.set_epoch(2);
            check_epoch(&labels, &s);
            let mut count: HashMap<Vec<usize>, usize> = HashMap::new();
            for rank in 0..r {
                let mut t = s.clone();
                t.options.rank = rank;
                for b in t.batches() {
                    *count.entry(b).or_default() += 1;
                }
            }
            let mut single = s.clone();
            single.options = SamplerOptions {
                seed: 4,
                num_replicas: 1,
                rank: 0,
            };
            single.total_batches = s.total_batches;
            let mut whole: HashMap<Vec<usize>, usize> = HashMap::new();
            for b in single.batches() {
                *whole.entry(b).or_default() += 1;
            }
            assert_eq!(count, whole);
        }
    }

    #[test]
    fn plans_depend_on_seed_and_epoch_only() {
        let labels = labels_with_sizes(&[10, 12, 9, 30, 4]);
        let mk = |seed| {
            ClassBalancedSampler::new(
                &labels,
                2,
                4,
                SamplerOptions {
                    seed,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let mut a = mk(1);
        let b = mk(1);
        assert_eq!(a.batches(), b.batches());
        assert_ne!(a.batches(), mk(2).batches());
        let first = a.batches();
        a.set_epoch(1);
        assert_ne!(a.batches(), first);
        a.set_epoch(0);
        assert_eq!(a.batches(), first);
    }

    #[test]
    fn rejects_bad_arguments() {
        let opts = SamplerOptions::default;
        let err = |r: Result<ClassBalancedSampler>| r.unwrap_err().to_string();
        assert!(
            err(ClassBalancedSampler::new(&[0, 1, 1], 3, 2, opts())).contains("classes_per_batch")
        );
        assert!(err(ClassBalancedSampler::new(&[0, 1], 2, 0, opts())).contains("samples_per_class"));
        assert!(err(ClassBalancedSampler::new(&[0, -1], 1, 1, opts())).contains("-1 at position 1"));
        assert!(err(ClassBalancedSampler::new(&[], 1, 1, opts())).contains("labels"));
        let bad_rank = SamplerOptions {
            num_replicas: 2,
            rank: 2,
            seed: 0,
        };
        assert!(err(ClassBalancedSampler::new(&[0, 1], 1, 1, bad_rank)).contains("rank"));
    }

    #[test]
    fn sparse_labels_group_like_dense_ones() {
        let (off, mem) = group_by_class(&[1 << 40, 5, 1 << 40, 5, 2]);
        assert_eq!(off, vec![0, 1, 3, 5]);
        assert_eq!(mem, vec![4, 1, 3, 0, 2]);
    }
}
