//! Weighted draws without replacement over a changing set of weights.
//!
//! A Fenwick (binary indexed) tree of integer weights: updating one weight
//! and drawing an item with probability proportional to its weight both cost
//! O(log n), which keeps planning an epoch of 100,000 classes in milliseconds.

use crate::rng::Rng;

pub(crate) struct WeightTree {
    tree: Vec<u64>,
    weights: Vec<u64>,
    total: u64,
    /// Largest power of two <= len, the first step of the descent.
    top: usize,
}

impl WeightTree {
    pub(crate) fn new(weights: &[u64]) -> Self {
        let n = weights.len();
        let mut tree = vec![0u64; n + 1];
        for (i, &w) in weights.iter().enumerate() {
            tree[i + 1] += w;
            let parent = (i + 1) + ((i + 1) & (i + 1).wrapping_neg());
            if parent <= n {
                tree[parent] += tree[i + 1];
            }
        }
        let top = if n == 0 {
            0
        } else {
            1 << (usize::BITS - 1 - n.leading_zeros())
        };
        WeightTree {
            tree,
            weights: weights.to_vec(),
            total: weights.iter().sum(),
            top,
        }
    }

    #[cfg(test)]
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    #[cfg(test)]
    pub(crate) fn weight(&self, i: usize) -> u64 {
        self.weights[i]
    }

    pub(crate) fn set(&mut self, i: usize, w: u64) {
        let old = self.weights[i];
        if old == w {
            return;
        }
        self.weights[i] = w;
        self.total = self.total - old + w;
        let mut j = i + 1;
        while j < self.tree.len() {
            // Wrapping arithmetic adds the signed difference in two's complement.
            self.tree[j] = self.tree[j].wrapping_add(w.wrapping_sub(old));
            j += j & j.wrapping_neg();
        }
    }

    /// An item drawn with probability weight / total; `None` if all are zero.
    pub(crate) fn draw(&self, rng: &mut Rng) -> Option<usize> {
        if self.total == 0 {
            return None;
        }
        let mut target = rng.below(self.total);
        let mut pos = 0usize;
        let mut step = self.top;
        while step > 0 {
            let next = pos + step;
            if next < self.tree.len() && self.tree[next] <= target {
                target -= self.tree[next];
                pos = next;
            }
            step >>= 1;
        }
        Some(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_follow_the_weights_and_skip_zeros() {
        let mut t = WeightTree::new(&[1, 0, 3, 0, 4]);
        let mut rng = Rng::new(5);
        let mut counts = [0usize; 5];
        for _ in 0..80_000 {
            counts[t.draw(&mut rng).unwrap()] += 1;
        }
        assert_eq!(counts[1] + counts[3], 0);
        assert!((9_000..11_000).contains(&counts[0]), "{counts:?}");
        assert!((29_000..31_000).contains(&counts[2]), "{counts:?}");
        t.set(2, 0);
        t.set(4, 0);
        assert_eq!(t.total(), 1);
        assert_eq!(t.draw(&mut rng), Some(0));
        t.set(0, 0);
        assert_eq!(t.draw(&mut rng), None);
        t.set(3, 2);
        assert_eq!(t.draw(&mut rng), Some(3));
        assert_eq!(t.weight(3), 2);
    }
}
