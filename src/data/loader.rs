//! The batch loader: a pool of threads decoding and transforming the
//! batches of an epoch into float32 NCHW tensors, ahead of the consumer.
//!
//! Batch `j` of an epoch is built whole by one thread, straight into the
//! memory of its tensor. Threads claim batches in order but never more than
//! `prefetch` ahead of the consumer, which receives them in order. The
//! augmentation of the sample at position `i` of batch `j` draws from
//! `derive_seed(seed, [epoch, j, i, AUGMENT])`, so results do not depend on
//! the number of threads or their timing. Dropping an [`Epoch`] mid-way stops
//! and joins its threads (each notices within one image).

use std::collections::{BTreeMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tch::{Device, Kind, Tensor};

use super::dataset::Dataset;
use super::transform::{Transform, Workspace};
use crate::error::{at_least, ensure, Error, Result};
use crate::rng::{stream, Rng};

/// Replacement candidates tried for a bad sample before giving up.
const MAX_REPLACEMENT_TRIES: usize = 64;

/// What to do with a sample that cannot be read or decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// The batch fails with the sample's error (file and annotation line).
    Raise,
    /// The sample is reported once and replaced by another sample of the
    /// same class, so batches keep their P x K shape.
    Skip,
}

impl OnError {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "raise" => Ok(OnError::Raise),
            "skip" => Ok(OnError::Skip),
            other => Err(crate::error::not_one_of(
                "on_error",
                other,
                &["raise", "skip"],
            )),
        }
    }
}

/// Threads, queue depth, seed and error policy of a [`Loader`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderOptions {
    pub num_threads: usize,
    /// Batches built ahead of the consumer (in flight or ready); at least
    /// `num_threads` keeps every thread busy.
    pub prefetch: usize,
    pub seed: u64,
    pub on_error: OnError,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        LoaderOptions {
            num_threads: n,
            prefetch: 2 * n,
            seed: 0,
            on_error: OnError::Raise,
        }
    }
}

/// A batch: `images` float32 `[n, C, H, W]` on the CPU, `labels` int64
/// `[n]`, and the dataset indices actually loaded (they differ from the
/// plan where a bad sample was replaced).
#[derive(Debug)]
pub struct Batch {
    pub images: Tensor,
    pub labels: Tensor,
    pub indices: Vec<usize>,
}

/// A sample that failed and was skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub index: usize,
    pub message: String,
}

/// Loads batches of a dataset through a transform.
pub struct Loader {
    dataset: Arc<Dataset>,
    transform: Arc<Transform>,
    options: LoaderOptions,
    by_class: Arc<Vec<Vec<usize>>>,
    log: Arc<SkipLog>,
}

#[derive(Default)]
struct SkipLog {
    reported: Mutex<HashSet<usize>>,
    pending: Mutex<Vec<Skipped>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a thread panicked while holding it; the
    // data (counters, logs) is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Loader {
    pub fn new(
        dataset: Arc<Dataset>,
        transform: Transform,
        options: LoaderOptions,
    ) -> Result<Self> {
        at_least("num_threads", options.num_threads, 1)?;
        at_least("prefetch", options.prefetch, 1)?;
        let mut by_class = vec![Vec::new(); dataset.classes().len()];
        for (i, &l) in dataset.labels().iter().enumerate() {
            by_class[l as usize].push(i);
        }
        Ok(Loader {
            dataset,
            transform: Arc::new(transform),
            options,
            by_class: Arc::new(by_class),
            log: Arc::new(SkipLog::default()),
        })
    }

    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    pub fn transform(&self) -> &Transform {
        &self.transform
    }

    pub fn options(&self) -> &LoaderOptions {
        &self.options
    }

    /// Samples skipped since the last call (each sample is reported once
    /// per loader).
    pub fn take_skipped(&self) -> Vec<Skipped> {
        std::mem::take(&mut *lock(&self.log.pending))
    }

    /// Starts loading `batches` (dataset indices) of `epoch` in the
    /// background; the returned iterator yields them in order.
    pub fn epoch(&self, batches: Vec<Vec<usize>>, epoch: u64) -> Result<Epoch> {
        self.epoch_from(batches, epoch, 0)
    }

    /// Like [`Loader::epoch`] for the tail of an epoch whose first batch is
    /// batch `first` of the epoch: augmentations are those that batch
    /// would get in a whole epoch (a resumed run continues exactly).
    pub fn epoch_from(&self, batches: Vec<Vec<usize>>, epoch: u64, first: usize) -> Result<Epoch> {
        self.check_batches(&batches)?;
        let total = batches.len();
        let shared = Arc::new(Shared {
            work: self.work(epoch),
            batches,
            first,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            window: self.options.prefetch,
        });
        let (tx, rx) = channel();
        let mut workers = Vec::with_capacity(self.options.num_threads);
        for t in 0..self.options.num_threads.min(total.max(1)) {
            let (mine, tx) = (Arc::clone(&shared), tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("grouploss-loader-{t}"))
                .spawn(move || worker(&mine, &tx));
            match handle {
                Ok(h) => workers.push(h),
                Err(e) => {
                    let mut it = Epoch::new(shared, rx, workers, total);
                    it.shutdown();
                    return Err(Error::io("grouploss loader thread", e));
                }
            }
        }
        Ok(Epoch::new(shared, rx, workers, total))
    }

    /// Loads one batch in the calling thread, with the augmentation it
    /// would get as batch `batch_index` of `epoch`.
    pub fn load_batch(&self, batch: &[usize], epoch: u64, batch_index: usize) -> Result<Batch> {
        self.check_batches(std::slice::from_ref(&batch.to_vec()))?;
        self.work(epoch)
            .build(batch, batch_index, &mut Workspace::new(), &|| false)
    }

    fn work(&self, epoch: u64) -> Work {
        Work {
            dataset: Arc::clone(&self.dataset),
            transform: Arc::clone(&self.transform),
            by_class: Arc::clone(&self.by_class),
            log: Arc::clone(&self.log),
            seed: self.options.seed,
            on_error: self.options.on_error,
            epoch,
        }
    }

    fn check_batches(&self, batches: &[Vec<usize>]) -> Result<()> {
        let n = self.dataset.len();
        for (j, b) in batches.iter().enumerate() {
            ensure(
                !b.is_empty(),
                "batch_sampler",
                || format!("an empty batch at position {j}"),
                "non-empty batches",
            )?;
            if let Some(&i) = b.iter().find(|&&i| i >= n) {
                return Err(Error::invalid(
                    "batch_sampler",
                    format!("index {i} in batch {j}"),
                    format!("indices below the dataset's length ({n})"),
                ));
            }
        }
        Ok(())
    }
}

/// What a thread needs to build any batch of an epoch.
struct Work {
    dataset: Arc<Dataset>,
    transform: Arc<Transform>,
    by_class: Arc<Vec<Vec<usize>>>,
    log: Arc<SkipLog>,
    seed: u64,
    on_error: OnError,
    epoch: u64,
}

impl Work {
    fn build(
        &self,
        batch: &[usize],
        j: usize,
        ws: &mut Workspace,
        stopped: &dyn Fn() -> bool,
    ) -> Result<Batch> {
        let [c, h, w] = self.transform.output_shape();
        let per = self.transform.output_len();
        let mut images = Tensor::empty(
            [batch.len() as i64, c as i64, h as i64, w as i64],
            (Kind::Float, Device::Cpu),
        );
        let out = float_slice(&mut images);
        let mut indices = Vec::with_capacity(batch.len());
        for (pos, (&idx, dst)) in batch.iter().zip(out.chunks_exact_mut(per)).enumerate() {
            if stopped() {
                return Err(Error::Interrupted);
            }
            indices.push(self.sample(idx, j, pos, dst, ws)?);
        }
        let labels: Vec<i64> = indices.iter().map(|&i| self.dataset.labels()[i]).collect();
        Ok(Batch {
            images,
            labels: Tensor::from_slice(&labels),
            indices,
        })
    }

    /// Loads sample `idx` at position `pos` of batch `j` into `dst`;
    /// returns the index actually loaded.
    fn sample(
        &self,
        idx: usize,
        j: usize,
        pos: usize,
        dst: &mut [f32],
        ws: &mut Workspace,
    ) -> Result<usize> {
        let path = [self.epoch, j as u64, pos as u64];
        let load = |i: usize, dst: &mut [f32], ws: &mut Workspace| {
            let mut rng = Rng::derived(self.seed, &[path[0], path[1], path[2], stream::AUGMENT]);
            self.dataset
                .load_into(i, &self.transform, &mut rng, dst, ws)
        };
        let err = match load(idx, dst, ws) {
            Ok(()) => return Ok(idx),
            Err(e) if self.on_error == OnError::Raise => return Err(e),
            Err(e) => e,
        };
        self.report(idx, &err);
        // Candidates in an order fixed by the seed; known-bad ones would fail
        // again, so skipping them does not change which one is chosen.
        let label = self.dataset.labels()[idx] as usize;
        let members = &self.by_class[label];
        let mut rng = Rng::derived(self.seed, &[path[0], path[1], path[2], stream::REPLACE]);
        let tries = members.len().min(MAX_REPLACEMENT_TRIES);
        for k in rng.choose(members.len(), tries) {
            let cand = members[k];
            if cand == idx || lock(&self.log.reported).contains(&cand) {
                continue;
            }
            match load(cand, dst, ws) {
                Ok(()) => return Ok(cand),
                Err(e) => self.report(cand, &e),
            }
        }
        Err(Error::format(
            self.dataset.describe(idx),
            None,
            format!(
                "{err}; and no other sample of class {:?} could be read in its place (on_error='skip')",
                self.dataset.classes()[label]
            ),
        ))
    }

    fn report(&self, idx: usize, err: &Error) {
        if lock(&self.log.reported).insert(idx) {
            lock(&self.log.pending).push(Skipped {
                index: idx,
                message: err.to_string(),
            });
        }
    }
}

/// The float32 values of a freshly made contiguous CPU tensor.
fn float_slice(t: &mut Tensor) -> &mut [f32] {
    let n = t.numel();
    // SAFETY: `t` was just allocated by `Tensor::empty` as a contiguous CPU
    // float32 tensor of `n` elements and no other handle to its storage
    // exists; the slice borrows `t` mutably, so it cannot outlive it.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) }
}

#[derive(Default)]
struct State {
    next: usize,
    consumed: usize,
    stop: bool,
}

struct Shared {
    work: Work,
    batches: Vec<Vec<usize>>,
    /// Index in the whole epoch of `batches[0]`.
    first: usize,
    state: Mutex<State>,
    wake: Condvar,
    window: usize,
}

type Message = (usize, Result<Batch>);

fn worker(shared: &Shared, tx: &Sender<Message>) {
    let mut ws = Workspace::new();
    let total = shared.batches.len();
    loop {
        let j = {
            let mut st = lock(&shared.state);
            while !st.stop && st.next < total && st.next >= st.consumed + shared.window {
                st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.stop || st.next >= total {
                return;
            }
            st.next += 1;
            st.next - 1
        };
        let stopped = || lock(&shared.state).stop;
        let result = catch_unwind(AssertUnwindSafe(|| {
            shared
                .work
                .build(&shared.batches[j], shared.first + j, &mut ws, &stopped)
        }))
        .unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::format(
                shared.work.dataset.root(),
                None,
                format!("internal error while loading batch {j}: {msg}"),
            ))
        });
        if tx.send((j, result)).is_err() {
            return;
        }
    }
}

/// The batches of one epoch, in order. Dropping it stops its threads.
pub struct Epoch {
    shared: Arc<Shared>,
    rx: Receiver<Message>,
    pending: BTreeMap<usize, Result<Batch>>,
    next: usize,
    total: usize,
    workers: Vec<JoinHandle<()>>,
    finished: bool,
}

impl Epoch {
    fn new(
        shared: Arc<Shared>,
        rx: Receiver<Message>,
        workers: Vec<JoinHandle<()>>,
        total: usize,
    ) -> Self {
        Epoch {
            shared,
            rx,
            pending: BTreeMap::new(),
            next: 0,
            total,
            workers,
            finished: false,
        }
    }

    /// Batches not yielded yet.
    pub fn remaining(&self) -> usize {
        if self.finished {
            0
        } else {
            self.total - self.next
        }
    }

    fn shutdown(&mut self) {
        self.finished = true;
        lock(&self.shared.state).stop = true;
        self.shared.wake.notify_all();
        for h in self.workers.drain(..) {
            // A worker cannot panic outside catch_unwind; nothing to report.
            let _ = h.join();
        }
    }
}

impl Iterator for Epoch {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.finished || self.next >= self.total {
            return None;
        }
        let result = loop {
            if let Some(r) = self.pending.remove(&self.next) {
                break r;
            }
            match self.rx.recv() {
                Ok((j, r)) => {
                    self.pending.insert(j, r);
                }
                Err(_) => {
                    break Err(Error::format(
                        self.shared.work.dataset.root(),
                        None,
                        "internal error: the loader threads ended early",
                    ))
                }
            }
        };
        self.next += 1;
        {
            let mut st = lock(&self.shared.state);
            st.consumed = self.next;
        }
        self.shared.wake.notify_all();
        if result.is_err() {
            self.shutdown();
        }
        Some(result)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining(), Some(self.remaining()))
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::{DatasetOptions, Split};
    use crate::data::readers::cub200;
    use crate::data::testing;
    use crate::data::transform::Normalization;

    fn setup(name: &str) -> (std::path::PathBuf, Arc<Dataset>) {
        let root = testing::cub(name, 4, 4);
        let opts = DatasetOptions {
            split: Split::All,
            ..Default::default()
        };
        let ds = Arc::new(cub200(Some(&root), &opts).unwrap());
        (root, ds)
    }

    fn transform() -> Transform {
        Transform::random_resized_crop(
            24,
            (0.08, 1.0),
            (0.75, 4.0 / 3.0),
            true,
            Normalization::Imagenet,
            3,
        )
        .unwrap()
    }

    fn run(
        ds: &Arc<Dataset>,
        threads: usize,
        prefetch: usize,
        on_error: OnError,
    ) -> Vec<Result<Batch>> {
        let options = LoaderOptions {
            num_threads: threads,
            prefetch,
            seed: 7,
            on_error,
        };
        let loader = Loader::new(Arc::clone(ds), transform(), options).unwrap();
        let batches: Vec<Vec<usize>> = (0..10)
            .map(|j| (0..6).map(|i| (i * 5 + j) % 16).collect())
            .collect();
        loader.epoch(batches, 3).unwrap().collect()
    }

    #[test]
    fn batches_come_in_order_and_do_not_depend_on_threads() {
        let (root, ds) = setup("loader-order");
        let one = run(&ds, 1, 1, OnError::Raise);
        let four = run(&ds, 4, 3, OnError::Raise);
        assert_eq!(one.len(), 10);
        for (j, (a, b)) in one.iter().zip(&four).enumerate() {
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            assert_eq!(a.images.size(), vec![6, 3, 24, 24]);
            assert_eq!(
                a.indices,
                (0..6).map(|i| (i * 5 + j) % 16).collect::<Vec<_>>()
            );
            assert!(a.images.equal(&b.images) && a.labels.equal(&b.labels));
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn bad_files_raise_or_are_replaced_by_their_class() {
        let (root, ds) = setup("loader-errors");
        // Sample 5 (class 2) is empty.
        std::fs::write(ds.path(5).unwrap(), b"").unwrap();
        let raised = run(&ds, 2, 2, OnError::Raise);
        let err = raised
            .iter()
            .find_map(|r| r.as_ref().err())
            .unwrap()
            .to_string();
        assert!(
            err.contains("1.jpg (line 6 of") && err.ends_with("empty file"),
            "{err}"
        );
        assert!(raised.len() < 10, "the epoch ends at its error");
        let skipped = run(&ds, 2, 2, OnError::Skip);
        let mut replaced = 0;
        for (j, b) in skipped.iter().enumerate() {
            let b = b.as_ref().unwrap();
            let planned: Vec<usize> = (0..6).map(|i| (i * 5 + j) % 16).collect();
            for (pos, &p) in planned.iter().enumerate() {
                if p == 5 {
                    // Class 2 is samples 4..8.
                    assert!((4..8).contains(&b.indices[pos]) && b.indices[pos] != 5);
                    replaced += 1;
                } else {
                    assert_eq!(b.indices[pos], p);
                }
            }
        }
        assert!(replaced > 0);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn dropping_an_epoch_midway_stops_its_threads() {
        let (root, ds) = setup("loader-drop");
        let options = LoaderOptions {
            num_threads: 3,
            prefetch: 2,
            seed: 0,
            on_error: OnError::Raise,
        };
        let loader = Loader::new(Arc::clone(&ds), transform(), options).unwrap();
        let mut epoch = loader.epoch(vec![(0..16).collect(); 500], 0).unwrap();
        assert!(epoch.next().unwrap().is_ok());
        let start = std::time::Instant::now();
        drop(epoch);
        assert!(start.elapsed().as_secs_f64() < 2.0);
        let err = loader.epoch(vec![vec![16]], 0).err().unwrap().to_string();
        assert!(err.contains("index 16 in batch 0"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
