//! A small, fully specified random number generator.
//!
//! Sampler plans, anchor choices and augmentations must be identical for the
//! same seed on every machine and with every thread count, and must not change
//! when a dependency updates its algorithms. So the crate carries its own
//! generator: xoshiro256++ seeded through SplitMix64 (both public-domain
//! reference algorithms by Blackman and Vigna), with Lemire's unbiased bounded
//! draw and a Fisher-Yates shuffle on top.

/// SplitMix64 step: a good 64-bit mixer, used to expand seeds.
#[inline]
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Derives an independent seed from a base seed and a path of integers, e.g.
/// `(run seed, epoch, rank, purpose)`, so that every random choice of a run has
/// its own stream and none depends on the order in which others were drawn.
pub fn derive_seed(base: u64, path: &[u64]) -> u64 {
    let mut state = base ^ 0x6A09_E667_F3BC_C908;
    let mut out = splitmix64(&mut state);
    for &p in path {
        state ^= p.wrapping_mul(0xD1B5_4A32_D192_ED03);
        out ^= splitmix64(&mut state);
        out = out.rotate_left(17);
    }
    splitmix64(&mut out)
}

/// The stream ids of a run's random choices: the last element of their
/// `derive_seed` path (`[epoch, ANCHORS]` of the run seed, ...). One list,
/// so that a new stream takes an id that no other uses (a test checks they
/// are distinct). Changing a value changes every run's draws.
pub mod stream {
    /// An epoch's random anchors: `[epoch, ANCHORS]` of the run seed.
    pub const ANCHORS: u64 = 7;
    /// A step's torch generator (dropout and the like): `[epoch, step,
    /// STEP]` of the run seed, then the rank in a data-parallel run.
    pub const STEP: u64 = 1;
    /// The images an evaluation subsamples (`max_images`): `[EVAL_SUBSET]`
    /// of the run seed.
    pub const EVAL_SUBSET: u64 = 11;
    /// A rank's loader seed: `[rank, RANK]` of the run seed.
    pub const RANK: u64 = 0x5241_4E4B;
    /// An image's augmentation: `[epoch, batch, position, AUGMENT]` of the
    /// loader seed.
    pub const AUGMENT: u64 = 0x4155_474D;
    /// The stand-in for an unreadable image: `[epoch, batch, position,
    /// REPLACE]` of the loader seed.
    pub const REPLACE: u64 = 0x5245_504C;
    /// The validation classes carved out of the training classes:
    /// `[VALIDATION]` of the split seed.
    pub const VALIDATION: u64 = 0x5641_4C53;
    /// An epoch's batches: `[epoch, SAMPLER]` of the sampler seed.
    pub const SAMPLER: u64 = 0x5A4D_504C;

    /// Every id above.
    pub const ALL: [u64; 8] = [
        ANCHORS,
        STEP,
        EVAL_SUBSET,
        RANK,
        AUGMENT,
        REPLACE,
        VALIDATION,
        SAMPLER,
    ];
}

/// xoshiro256++.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose whole stream is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Rng { s }
    }

    /// A generator for the stream `derive_seed(seed, path)`.
    pub fn derived(seed: u64, path: &[u64]) -> Self {
        Rng::new(derive_seed(seed, path))
    }

    /// The state, for checkpoints.
    pub fn state(&self) -> [u64; 4] {
        self.s
    }

    /// Restores a state returned by [`Rng::state`].
    pub fn from_state(s: [u64; 4]) -> Self {
        Rng { s }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let result = (self.s[0].wrapping_add(self.s[3]))
            .rotate_left(23)
            .wrapping_add(self.s[0]);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    #[inline]
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// Uniform integer in `[0, n)` without modulo bias (Lemire 2019). `n > 0`.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let mut m = (self.next_u64() as u128) * (n as u128);
        let mut low = m as u64;
        if low < n {
            let threshold = n.wrapping_neg() % n;
            while low < threshold {
                m = (self.next_u64() as u128) * (n as u128);
                low = m as u64;
            }
        }
        (m >> 64) as u64
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// `k` distinct indices of `[0, n)` in random order (partial Fisher-Yates).
    pub fn choose(&mut self, n: usize, k: usize) -> Vec<usize> {
        let k = k.min(n);
        let mut idx: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + self.below((n - i) as u64) as usize;
            idx.swap(i, j);
        }
        idx.truncate(k);
        idx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_are_distinct() {
        let mut ids = stream::ALL.to_vec();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), stream::ALL.len(), "two streams share an id");
    }

    #[test]
    fn stream_is_fixed_by_the_seed() {
        // Reference values of xoshiro256++ seeded by SplitMix64(0); a change
        // here would silently change every sampler plan ever published.
        let mut r = Rng::new(0);
        let first: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        let mut r2 = Rng::new(0);
        let again: Vec<u64> = (0..3).map(|_| r2.next_u64()).collect();
        assert_eq!(first, again);
        assert_ne!(Rng::new(1).next_u64(), first[0]);
        assert_eq!(first[0], 0x53175d61490b23df);
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut r = Rng::new(7);
        let mut counts = [0usize; 6];
        for _ in 0..60_000 {
            counts[r.below(6) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut r = Rng::new(3);
        let mut v: Vec<u32> = (0..100).collect();
        r.shuffle(&mut v);
        let mut s = v.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_ne!(v, s);
    }

    #[test]
    fn choose_gives_distinct_indices() {
        let mut r = Rng::new(11);
        let c = r.choose(10, 4);
        assert_eq!(c.len(), 4);
        let mut s = c.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 4);
        assert!(c.iter().all(|&i| i < 10));
        assert_eq!(r.choose(3, 5).len(), 3);
    }

    #[test]
    fn derived_seeds_differ_by_path() {
        assert_ne!(derive_seed(1, &[0]), derive_seed(1, &[1]));
        assert_ne!(derive_seed(1, &[0, 1]), derive_seed(1, &[1, 0]));
        assert_eq!(derive_seed(5, &[2, 3]), derive_seed(5, &[2, 3]));
    }
}
