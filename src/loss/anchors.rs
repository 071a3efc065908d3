//! Which samples of a batch are anchors ("labelled points").

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use crate::error::{at_least, Result};
use crate::rng::Rng;

/// How anchors are chosen within each class of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnchorMode {
    /// The first `num_anchors` samples of each class in batch order (the
    /// release; its sampler shuffles within classes, so this is random).
    First,
    /// `num_anchors` samples of each class drawn with this seed.
    Random { seed: u64 },
}

impl AnchorMode {
    /// Parses `"first" | "random"`; `seed` is used by `"random"`.
    pub fn parse(mode: &str, seed: u64) -> Result<Self> {
        match mode {
            "first" => Ok(AnchorMode::First),
            "random" => Ok(AnchorMode::Random { seed }),
            other => Err(crate::error::not_one_of(
                "anchors",
                other,
                &["first", "random"],
            )),
        }
    }

    /// The name accepted by [`AnchorMode::parse`].
    pub fn name(&self) -> &'static str {
        match self {
            AnchorMode::First => "first",
            AnchorMode::Random { .. } => "random",
        }
    }
}

/// The anchor mask over `labels` as booleans (host side).
///
/// A class with fewer than `num_anchors` samples in the batch has all of them
/// as anchors, as in the release.
pub fn anchor_flags(labels: &[i64], num_anchors: usize, mode: AnchorMode) -> Vec<bool> {
    let mut flags = vec![false; labels.len()];
    if num_anchors == 0 {
        return flags;
    }
    match mode {
        AnchorMode::First => {
            let mut seen: HashMap<i64, usize> = HashMap::new();
            for (i, &y) in labels.iter().enumerate() {
                let c = seen.entry(y).or_insert(0);
                if *c < num_anchors {
                    flags[i] = true;
                    *c += 1;
                }
            }
        }
        AnchorMode::Random { seed } => {
            // Classes in order of first appearance so the draw does not depend
            // on hashing order.
            let mut order: Vec<i64> = Vec::new();
            let mut members: HashMap<i64, Vec<usize>> = HashMap::new();
            for (i, &y) in labels.iter().enumerate() {
                members
                    .entry(y)
                    .or_insert_with(|| {
                        order.push(y);
                        Vec::new()
                    })
                    .push(i);
            }
            let mut rng = Rng::new(seed);
            for y in order {
                let idx = &members[&y];
                for j in rng.choose(idx.len(), num_anchors) {
                    flags[idx[j]] = true;
                }
            }
        }
    }
    flags
}

/// Labels as a host vector of i64 (copies from any device).
pub fn labels_to_vec(labels: &Tensor) -> Result<Vec<i64>> {
    let host = labels
        .to_device(Device::Cpu)
        .to_kind(Kind::Int64)
        .contiguous();
    Ok(Vec::<i64>::try_from(&host)?)
}

/// The anchor mask as a bool tensor on the device of `labels`.
pub fn anchor_mask(labels: &Tensor, num_anchors: i64, mode: AnchorMode) -> Result<Tensor> {
    at_least("num_anchors", num_anchors, 0)?;
    let host = labels_to_vec(labels)?;
    let flags = anchor_flags(&host, num_anchors as usize, mode);
    Ok(Tensor::from_slice(&flags).to_device(labels.device()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_takes_the_first_per_class_in_batch_order() {
        let y = [3, 1, 3, 3, 1, 2];
        let f = anchor_flags(&y, 2, AnchorMode::First);
        assert_eq!(f, vec![true, true, true, false, true, true]);
        assert_eq!(anchor_flags(&y, 0, AnchorMode::First), vec![false; 6]);
    }

    #[test]
    fn random_takes_the_right_count_per_class_and_is_seeded() {
        let y: Vec<i64> = (0..40).map(|i| i % 4).collect();
        let a = anchor_flags(&y, 3, AnchorMode::Random { seed: 9 });
        for c in 0..4 {
            let k = y.iter().zip(&a).filter(|(&l, &f)| l == c && f).count();
            assert_eq!(k, 3);
        }
        assert_eq!(a, anchor_flags(&y, 3, AnchorMode::Random { seed: 9 }));
        assert_ne!(a, anchor_flags(&y, 3, AnchorMode::Random { seed: 10 }));
    }
}
