//! The trainer's memory of earlier batches (`memory_size`): the embeddings
//! (detached, float32) and labels of the last `memory_size` samples the
//! Group Loss saw, which join each later group as labelled points
//! ([`crate::loss::memory`]) once `memory_warmup_steps` steps have filled
//! it. It is saved in the `last` checkpoint, so a resumed run continues
//! with the memory an uninterrupted one would have.

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::loss::{self, MemoryRows};

/// The names of the memory's tensors in a checkpoint (under `memory.`).
const EMBEDDINGS: &str = "embeddings";
const LABELS: &str = "labels";

/// A first-in first-out memory of samples.
#[derive(Debug)]
pub struct Memory {
    size: usize,
    warmup: usize,
    /// Oldest first, at most `size` rows (none before the first push).
    embeddings: Tensor,
    labels: Tensor,
    /// Batches pushed so far (the warm-up's count).
    steps: usize,
}

impl Memory {
    /// An empty memory of `size` samples, joining groups after `warmup`
    /// pushes.
    pub fn new(size: usize, warmup: usize, device: Device) -> Memory {
        Memory {
            size,
            warmup,
            embeddings: Tensor::zeros([0, 0], (Kind::Float, device)),
            labels: Tensor::zeros([0], (Kind::Int64, device)),
            steps: 0,
        }
    }

    /// The rows that join this step's group: none during the warm-up.
    pub fn rows(&self) -> Option<MemoryRows<'_>> {
        (self.steps >= self.warmup && self.labels.numel() > 0).then_some(MemoryRows {
            embeddings: &self.embeddings,
            labels: &self.labels,
        })
    }

    /// Appends a batch (after its loss: a batch never joins its own group),
    /// keeping the last `size` samples ([`loss::push_rows`]).
    pub fn push(&mut self, embeddings: &Tensor, labels: &Tensor) -> Result<()> {
        let memory = MemoryRows {
            embeddings: &self.embeddings,
            labels: &self.labels,
        };
        let new = embeddings.detach().to_kind(Kind::Float);
        (self.embeddings, self.labels) = loss::push_rows(memory, &new, labels, self.size)?;
        self.steps += 1;
        Ok(())
    }

    /// The dtype of the checkpoint tensor `name` (`memory.<name>`).
    pub fn kind_of(name: &str) -> Kind {
        if name == LABELS {
            Kind::Int64
        } else {
            Kind::Float
        }
    }

    /// Batches pushed so far (saved in the trainer's state).
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The tensors a checkpoint keeps (none while empty).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        if self.labels.numel() == 0 {
            return Vec::new();
        }
        vec![
            (EMBEDDINGS.to_string(), self.embeddings.shallow_clone()),
            (LABELS.to_string(), self.labels.shallow_clone()),
        ]
    }

    /// Restores what [`Memory::tensors`] and [`Memory::steps`] saved.
    pub fn restore(&mut self, tensors: &[(String, Tensor)], steps: usize) -> Result<()> {
        let find = |name: &str| tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        match (find(EMBEDDINGS), find(LABELS)) {
            (Some(e), Some(l)) if e.dim() == 2 && l.size() == [e.size()[0]] => {
                let device = self.labels.device();
                self.embeddings = e.to_kind(Kind::Float).to_device(device);
                self.labels = l.to_kind(Kind::Int64).to_device(device);
            }
            (None, None) => {}
            _ => {
                return Err(Error::invalid(
                    "checkpoint",
                    "a partial memory",
                    "memory.embeddings (n x d) and memory.labels (n) together",
                ))
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_samples_and_waits_for_the_warm_up() {
        let mut m = Memory::new(5, 2, Device::Cpu);
        assert!(m.rows().is_none());
        for step in 0..3i64 {
            let e = Tensor::from_slice(&[step as f64; 6]).reshape([3, 2])
                + Tensor::arange(3, (Kind::Double, Device::Cpu)).unsqueeze(1);
            m.push(&e, &Tensor::from_slice(&[step, step, step]))
                .unwrap();
            assert_eq!(m.rows().is_some(), step >= 1, "after push {step}");
        }
        let rows = m.rows().unwrap();
        assert_eq!(rows.embeddings.size(), [5, 2]);
        assert_eq!(rows.embeddings.kind(), Kind::Float);
        assert_eq!(Vec::<i64>::try_from(rows.labels).unwrap(), [1, 1, 2, 2, 2]);
        // Saved and restored alike.
        let mut back = Memory::new(5, 2, Device::Cpu);
        back.restore(&m.tensors(), m.steps()).unwrap();
        assert!(back.rows().unwrap().embeddings.equal(rows.embeddings));
        assert_eq!(back.steps(), 3);
        let partial = vec![m.tensors().remove(0)];
        assert!(Memory::new(5, 2, Device::Cpu).restore(&partial, 3).is_err());
    }
}
