//! Data-parallel training: the collectives a run needs, and the helpers
//! that use them (bucketed gradient averaging, broadcasts of variables and
//! of JSON, gathering of evaluation embeddings).
//!
//! The core does not talk to any communication library itself: a
//! [`Collective`] is handed to [`super::runner::train_on`]. The Python
//! bindings implement it with `torch.distributed` (NCCL on CUDA, gloo on
//! CPU); [`SingleProcess`] is the world of one process.
//!
//! Every rank calls the same collectives in the same order with tensors of
//! the same shapes; the helpers here keep it so (sizes that differ between
//! ranks are padded, bucket plans depend only on shapes).

use std::ops::Range;

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// The collectives of a process group, as PyTorch's `torch.distributed`
/// defines them. Tensors are modified in place where the operation says so.
pub trait Collective {
    /// This process, in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn world_size(&self) -> usize;
    /// Replaces every tensor by the mean of that tensor over the ranks.
    fn all_reduce_mean(&self, tensors: &[Tensor]) -> Result<()>;
    /// The tensor of every rank (same shape on all), in rank order.
    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>>;
    /// Overwrites every tensor with the one of rank `src`.
    fn broadcast(&self, tensors: &[Tensor], src: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// A world of one process: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_mean(&self, _tensors: &[Tensor]) -> Result<()> {
        Ok(())
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        Ok(vec![tensor.shallow_clone()])
    }

    fn broadcast(&self, _tensors: &[Tensor], _src: usize) -> Result<()> {
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// Largest bucket of the gradient all-reduce. A call per tensor would pay
/// the per-call latency (a Python call and a network round trip) a few
/// hundred times a step; a few large flat buckets pay it a few times.
pub const BUCKET_BYTES: usize = 64 << 20;

/// Indices of `tensors` in buckets of one kind and device and at most
/// `cap` bytes (a larger tensor is a bucket of its own). Depends only on
/// kinds, devices and sizes, so every rank makes the same plan.
fn plan_buckets(tensors: &[Tensor], cap: usize) -> Vec<Vec<usize>> {
    let mut open: Vec<((Kind, Device), Vec<usize>, usize)> = Vec::new();
    let mut done = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let key = (t.kind(), t.device());
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        match open.iter().position(|(k, _, _)| *k == key) {
            Some(j) if open[j].2 + bytes <= cap => {
                open[j].1.push(i);
                open[j].2 += bytes;
            }
            Some(j) => {
                let (_, full, _) = std::mem::replace(&mut open[j], (key, vec![i], bytes));
                done.push(full);
            }
            None => open.push((key, vec![i], bytes)),
        }
    }
    done.extend(open.into_iter().map(|(_, b, _)| b));
    done
}

fn flatten(tensors: &[Tensor], bucket: &[usize]) -> Tensor {
    let parts: Vec<Tensor> = bucket
        .iter()
        .map(|&i| tensors[i].detach().reshape([-1]))
        .collect();
    Tensor::cat(&parts, 0)
}

fn unflatten_into(flat: &Tensor, tensors: &[Tensor], bucket: &[usize]) {
    let mut offset = 0i64;
    for &i in bucket {
        let n = tensors[i].numel() as i64;
        let mut dst = tensors[i].shallow_clone();
        dst.copy_(&flat.narrow(0, offset, n).view(tensors[i].size().as_slice()));
        offset += n;
    }
}

/// Averages `tensors` over the ranks through flat buckets of at most
/// `cap` bytes; the small tensors of `extra` ride in the same call.
pub fn all_reduce_mean_bucketed_with_cap(
    coll: &dyn Collective,
    tensors: &[Tensor],
    extra: &[Tensor],
    cap: usize,
) -> Result<()> {
    if coll.world_size() == 1 {
        return Ok(());
    }
    tch::no_grad(|| {
        let plan = plan_buckets(tensors, cap);
        let flats: Vec<Tensor> = plan.iter().map(|b| flatten(tensors, b)).collect();
        let mut all: Vec<Tensor> = flats.iter().map(Tensor::shallow_clone).collect();
        all.extend(extra.iter().map(Tensor::shallow_clone));
        coll.all_reduce_mean(&all)?;
        for (flat, bucket) in flats.iter().zip(&plan) {
            unflatten_into(flat, tensors, bucket);
        }
        Ok(())
    })
}

/// [`all_reduce_mean_bucketed_with_cap`] with buckets of [`BUCKET_BYTES`].
pub fn all_reduce_mean_bucketed(
    coll: &dyn Collective,
    tensors: &[Tensor],
    extra: &[Tensor],
) -> Result<()> {
    all_reduce_mean_bucketed_with_cap(coll, tensors, extra, BUCKET_BYTES)
}

/// Overwrites `tensors` with those of rank 0, through flat buckets.
pub fn broadcast_bucketed(coll: &dyn Collective, tensors: &[Tensor]) -> Result<()> {
    if coll.world_size() == 1 {
        return Ok(());
    }
    tch::no_grad(|| {
        let plan = plan_buckets(tensors, BUCKET_BYTES);
        let flats: Vec<Tensor> = plan.iter().map(|b| flatten(tensors, b)).collect();
        coll.broadcast(&flats, 0)?;
        for (flat, bucket) in flats.iter().zip(&plan) {
            unflatten_into(flat, tensors, bucket);
        }
        Ok(())
    })
}

/// Rank 0's `value` on every rank (others pass anything, e.g. `Null`).
/// Tensors travel on `device`, the one the collective serves (NCCL only
/// moves CUDA tensors).
pub fn broadcast_json(coll: &dyn Collective, value: Value, device: Device) -> Result<Value> {
    if coll.world_size() == 1 {
        return Ok(value);
    }
    let bytes = if coll.rank() == 0 {
        serde_json::to_vec(&value)
            .map_err(|e| Error::invalid("broadcast", e.to_string(), "a JSON value"))?
    } else {
        Vec::new()
    };
    let len = Tensor::from_slice(&[bytes.len() as i64]).to_device(device);
    coll.broadcast(&[len.shallow_clone()], 0)?;
    let n = i64::try_from(&len)?;
    let buf = if coll.rank() == 0 {
        Tensor::from_slice(&bytes).to_device(device)
    } else {
        Tensor::zeros([n], (Kind::Uint8, device))
    };
    coll.broadcast(&[buf.shallow_clone()], 0)?;
    let received = Vec::<u8>::try_from(&buf.to_device(Device::Cpu))?;
    serde_json::from_slice(&received)
        .map_err(|e| Error::invalid("broadcast", e.to_string(), "rank 0's JSON"))
}

/// Rank 0's result on every rank: its `Ok` value, or its error (an
/// argument error is rebuilt as such; others by their message). Keeps the
/// ranks together where only rank 0 touches the run folder.
pub fn agree<T>(coll: &dyn Collective, local: Result<T>, device: Device) -> Result<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    if coll.world_size() == 1 {
        return local;
    }
    let message = match &local {
        Ok(v) => serde_json::json!({ "ok": serde_json::to_value(v).map_err(|e| {
            Error::invalid("broadcast", e.to_string(), "a serialisable value")
        })? }),
        Err(Error::InvalidArgument {
            arg,
            seen,
            expected,
        }) => serde_json::json!({ "invalid": [arg, seen, expected] }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    let got = broadcast_json(coll, message, device)?;
    if coll.rank() == 0 {
        return local;
    }
    if let Some(v) = got.get("ok") {
        return serde_json::from_value(v.clone())
            .map_err(|e| Error::invalid("broadcast", e.to_string(), "rank 0's value"));
    }
    if let Some([arg, seen, expected]) = got
        .get("invalid")
        .and_then(Value::as_array)
        .map(|a| [0, 1, 2].map(|i| a.get(i).and_then(Value::as_str).unwrap_or("").to_string()))
    {
        return Err(Error::invalid(arg, seen, expected));
    }
    let msg = got.get("error").and_then(Value::as_str).unwrap_or("");
    Err(Error::invalid("rank 0", msg, "no error"))
}

/// Whether any rank asks to stop (a signal may reach the ranks at
/// different steps; they must leave the loop at the same one).
pub fn any(coll: &dyn Collective, flag: bool, device: Device) -> Result<bool> {
    if coll.world_size() == 1 {
        return Ok(flag);
    }
    let t = Tensor::from_slice(&[f64::from(u8::from(flag))]).to_device(device);
    coll.all_reduce_mean(&[t.shallow_clone()])?;
    Ok(f64::try_from(&t)? > 0.0)
}

/// The contiguous part of `0..n` that `rank` of `world` embeds (sizes
/// differ by at most one).
pub fn shard(n: usize, rank: usize, world: usize) -> Range<usize> {
    (n * rank / world)..(n * (rank + 1) / world)
}

/// Every rank's `local` rows (`shard(n, rank, world)` of them, `n` in all)
/// stacked in rank order on rank 0; `None` on the others.
pub fn gather_rows(coll: &dyn Collective, local: &Tensor, n: usize) -> Result<Option<Tensor>> {
    let world = coll.world_size();
    if world == 1 {
        return Ok(Some(local.shallow_clone()));
    }
    if local.dim() == 0 {
        return Err(Error::invalid("gather_rows", "a 0-d tensor", "rows"));
    }
    let counts: Vec<i64> = (0..world)
        .map(|r| shard(n, r, world).len() as i64)
        .collect();
    let rows = gather_counted(coll, local, &counts)?;
    Ok((coll.rank() == 0).then_some(rows))
}

/// Every rank's rows of each of `locals`, concatenated in rank order on
/// every rank, and where this rank's rows are in each result (start,
/// count). The tensors of one rank share their number of rows; ranks may
/// hold different numbers. The ranks exchange every tensor's row count once
/// (-1 for a 0-d tensor), and each rank checks the whole table: a mismatch
/// on any rank is the same error on every rank (naming `locals[i]` and the
/// rank), none is left waiting in a gather. Every rank passes as many
/// tensors.
pub fn all_gather_rows(
    coll: &dyn Collective,
    locals: &[&Tensor],
) -> Result<(Vec<Tensor>, (i64, i64))> {
    let Some(first) = locals.first() else {
        return Err(Error::invalid("locals", "no tensors", "one tensor or more"));
    };
    let rows: Vec<i64> = locals
        .iter()
        .map(|t| if t.dim() == 0 { -1 } else { t.size()[0] })
        .collect();
    if coll.world_size() == 1 {
        check_row_table(std::slice::from_ref(&rows))?;
        let all = locals.iter().map(|t| t.shallow_clone()).collect();
        return Ok((all, (0, rows[0])));
    }
    let mine = Tensor::from_slice(&rows).to_device(first.device());
    let table: Vec<Vec<i64>> = coll
        .all_gather(&mine)?
        .iter()
        .map(Vec::<i64>::try_from)
        .collect::<std::result::Result<_, _>>()?;
    check_row_table(&table)?;
    let counts: Vec<i64> = table.iter().map(|r| r[0]).collect();
    let (rank, n) = (coll.rank(), counts[coll.rank()]);
    let start = counts[..rank].iter().sum();
    let gathered = locals
        .iter()
        .map(|t| gather_counted(coll, t, &counts))
        .collect::<Result<_>>()?;
    Ok((gathered, (start, n)))
}

/// `table[rank][i]`, the rows of tensor i on each rank (-1: 0-d), agree
/// within every rank.
fn check_row_table(table: &[Vec<i64>]) -> Result<()> {
    for (rank, rows) in table.iter().enumerate() {
        for (i, &r) in rows.iter().enumerate() {
            if r < 0 {
                return Err(Error::invalid(
                    format!("locals[{i}]"),
                    format!("a 0-d tensor on rank {rank}"),
                    "rows",
                ));
            }
            if r != rows[0] {
                return Err(Error::invalid(
                    format!("locals[{i}]"),
                    format!("{r} rows for {} on rank {rank}", rows[0]),
                    "as many rows as locals[0] on every rank",
                ));
            }
        }
    }
    Ok(())
}

/// The rows of every rank, `counts[r]` of them on rank r, concatenated in
/// rank order: padded to the largest count for the collective, then cut.
fn gather_counted(coll: &dyn Collective, local: &Tensor, counts: &[i64]) -> Result<Tensor> {
    let most = counts.iter().copied().max().unwrap_or(0);
    let have = local.size()[0];
    let padded = if have < most {
        let mut shape = local.size();
        shape[0] = most - have;
        let pad = Tensor::zeros(&shape, (local.kind(), local.device()));
        Tensor::cat(&[local.shallow_clone(), pad], 0)
    } else {
        local.shallow_clone()
    };
    let parts = coll.all_gather(&padded)?;
    let rows: Vec<Tensor> = parts
        .iter()
        .zip(counts)
        .map(|(p, &c)| p.narrow(0, 0, c))
        .collect();
    Ok(Tensor::cat(&rows, 0))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Barrier, Mutex};

    /// Ranks as threads of one process, for tests: every collective meets
    /// at a barrier and computes on copies held in shared slots.
    pub(crate) struct ThreadGroup {
        rank: usize,
        world: usize,
        barrier: Arc<Barrier>,
        slots: Arc<Mutex<Vec<Vec<Tensor>>>>,
    }

    impl ThreadGroup {
        pub(crate) fn new(world: usize) -> Vec<ThreadGroup> {
            let barrier = Arc::new(Barrier::new(world));
            let slots = Arc::new(Mutex::new((0..world).map(|_| Vec::new()).collect()));
            (0..world)
                .map(|rank| ThreadGroup {
                    rank,
                    world,
                    barrier: Arc::clone(&barrier),
                    slots: Arc::clone(&slots),
                })
                .collect()
        }

        /// Deposits copies of `tensors`, waits for everyone, returns all
        /// ranks' copies, waits again (so that nobody overwrites the slots
        /// while another rank reads them).
        fn exchange(&self, tensors: &[Tensor]) -> Vec<Vec<Tensor>> {
            self.slots.lock().unwrap()[self.rank] = tensors.iter().map(|t| t.copy()).collect();
            self.barrier.wait();
            let all: Vec<Vec<Tensor>> = self
                .slots
                .lock()
                .unwrap()
                .iter()
                .map(|v| v.iter().map(|t| t.copy()).collect())
                .collect();
            self.barrier.wait();
            all
        }
    }

    impl Collective for ThreadGroup {
        fn rank(&self) -> usize {
            self.rank
        }

        fn world_size(&self) -> usize {
            self.world
        }

        fn all_reduce_mean(&self, tensors: &[Tensor]) -> Result<()> {
            let all = self.exchange(tensors);
            for (i, t) in tensors.iter().enumerate() {
                let mut sum = all[0][i].copy();
                for r in all.iter().skip(1) {
                    sum += &r[i];
                }
                t.shallow_clone().copy_(&(sum / self.world as f64));
            }
            Ok(())
        }

        fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
            let all = self.exchange(std::slice::from_ref(tensor));
            Ok(all.into_iter().map(|mut v| v.remove(0)).collect())
        }

        fn broadcast(&self, tensors: &[Tensor], src: usize) -> Result<()> {
            let all = self.exchange(tensors);
            for (t, s) in tensors.iter().zip(&all[src]) {
                t.shallow_clone().copy_(s);
            }
            Ok(())
        }

        fn barrier(&self) -> Result<()> {
            self.barrier.wait();
            Ok(())
        }
    }

    /// Runs `f(rank, group)` on `world` threads; results in rank order.
    pub(crate) fn on_threads<T: Send + 'static>(
        world: usize,
        f: impl Fn(&ThreadGroup) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = ThreadGroup::new(world)
            .into_iter()
            .map(|g| {
                let f = Arc::clone(&f);
                std::thread::spawn(move || f(&g))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn buckets_keep_kinds_apart_and_respect_the_cap() {
        let f = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
        let d = |n: i64| Tensor::zeros([n], (Kind::Double, Device::Cpu));
        let ts = [f(10), d(3), f(10), f(100), f(5), d(2)];
        // 40 + 40 bytes fit in 100; 400 is alone; 20 opens a new bucket.
        assert_eq!(
            plan_buckets(&ts, 100),
            vec![vec![0, 2], vec![3], vec![4], vec![1, 5]]
        );
        assert_eq!(
            plan_buckets(&ts, BUCKET_BYTES),
            vec![vec![0, 2, 3, 4], vec![1, 5]]
        );
    }

    #[test]
    fn bucketed_mean_equals_the_mean_of_each_tensor() {
        let out = on_threads(3, |g| {
            let r = g.rank() as f64;
            let shapes: [&[i64]; 4] = [&[7, 3], &[300], &[1], &[2, 2, 2]];
            let ts: Vec<Tensor> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    Tensor::arange(s.iter().product::<i64>(), (Kind::Double, Device::Cpu)).view(*s)
                        * (r + 1.0)
                        + i as f64
                })
                .collect();
            let extra = Tensor::from_slice(&[r, 10.0 * r]);
            all_reduce_mean_bucketed_with_cap(g, &ts, &[extra.shallow_clone()], 64).unwrap();
            (ts, Vec::<f64>::try_from(&extra).unwrap())
        });
        for (ts, extra) in &out {
            assert_eq!(extra, &vec![1.0, 10.0]);
            for (i, t) in ts.iter().enumerate() {
                let n = t.numel() as i64;
                // mean over ranks of (r + 1) * x + i = 2 x + i.
                let want = Tensor::arange(n, (Kind::Double, Device::Cpu)).view(t.size().as_slice())
                    * 2.0
                    + i as f64;
                assert!(t.equal(&want), "tensor {i}");
            }
        }
    }

    #[test]
    fn broadcasts_and_gathers() {
        let out = on_threads(3, |g| {
            let r = g.rank();
            let vars = [
                Tensor::full([4], r as f64, (Kind::Float, Device::Cpu)),
                Tensor::full([2], 10 * r as i64, (Kind::Int64, Device::Cpu)),
            ];
            broadcast_bucketed(g, &vars).unwrap();
            let sent = serde_json::json!({"rank": r, "text": "é"});
            let got = broadcast_json(g, sent, Device::Cpu).unwrap();
            let rows = shard(7, r, 3);
            let local = Tensor::arange_start(
                rows.start as i64,
                rows.end as i64,
                (Kind::Int64, Device::Cpu),
            )
            .view([-1, 1])
            .repeat([1, 2]);
            let gathered = gather_rows(g, &local, 7).unwrap();
            let stop = any(g, r == 2, Device::Cpu).unwrap();
            let none = any(g, false, Device::Cpu).unwrap();
            let agreed = agree(
                g,
                if r == 0 {
                    Err(Error::invalid("world_size", 2, "3"))
                } else {
                    Ok(Value::Null)
                },
                Device::Cpu,
            );
            (
                Vec::<f64>::try_from(&vars[0]).unwrap(),
                Vec::<i64>::try_from(&vars[1]).unwrap(),
                got,
                gathered.map(|t| Vec::<i64>::try_from(&t.reshape([-1])).unwrap()),
                (stop, none),
                agreed.unwrap_err().to_string(),
            )
        });
        for (r, (a, b, got, gathered, flags, err)) in out.into_iter().enumerate() {
            assert_eq!(a, vec![0.0; 4]);
            assert_eq!(b, vec![0, 0]);
            assert_eq!(got, serde_json::json!({"rank": 0, "text": "é"}));
            assert_eq!(flags, (true, false));
            assert_eq!(err, "world_size: expected 3, got 2");
            if r == 0 {
                let want: Vec<i64> = (0..7).flat_map(|i| [i, i]).collect();
                assert_eq!(gathered, Some(want));
            } else {
                assert_eq!(gathered, None);
            }
        }
        assert_eq!(shard(2, 2, 3), 1..2);
        assert_eq!(shard(2, 0, 3), 0..0);
    }

    /// A rank's all-gathers, counted.
    struct Counting<'a> {
        inner: &'a ThreadGroup,
        gathers: std::cell::Cell<usize>,
    }

    impl Collective for Counting<'_> {
        fn rank(&self) -> usize {
            self.inner.rank()
        }
        fn world_size(&self) -> usize {
            self.inner.world_size()
        }
        fn all_reduce_mean(&self, tensors: &[Tensor]) -> Result<()> {
            self.inner.all_reduce_mean(tensors)
        }
        fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
            self.gathers.set(self.gathers.get() + 1);
            self.inner.all_gather(tensor)
        }
        fn broadcast(&self, tensors: &[Tensor], src: usize) -> Result<()> {
            self.inner.broadcast(tensors, src)
        }
        fn barrier(&self) -> Result<()> {
            self.inner.barrier()
        }
    }

    /// Ranks of 2, 3 and 1 rows: every tensor in rank order on every rank,
    /// each rank's place in it, and one exchange of the counts for all the
    /// tensors (plus one per tensor). A mismatch on one rank is the same
    /// error on every rank.
    #[test]
    fn all_gather_rows_gathers_the_counts_once() {
        let out = on_threads(3, |g| {
            let counting = Counting {
                inner: g,
                gathers: 0.into(),
            };
            let r = g.rank() as i64;
            let n = [2, 3, 1][r as usize];
            let rows = Tensor::full([n, 2], r as f64, (Kind::Double, Device::Cpu));
            let labels = Tensor::full([n], 10 * r, (Kind::Int64, Device::Cpu));
            let (all, mine) = all_gather_rows(&counting, &[&rows, &labels]).unwrap();
            let short = if r == 1 {
                labels.narrow(0, 0, n - 1)
            } else {
                labels.shallow_clone()
            };
            let bad = all_gather_rows(&counting, &[&rows, &short]);
            (
                Vec::<f64>::try_from(all[0].select(1, 1)).unwrap(),
                Vec::<i64>::try_from(&all[1]).unwrap(),
                mine,
                counting.gathers.get(),
                bad.unwrap_err().to_string(),
            )
        });
        let starts = [0, 2, 5];
        for (r, (rows, labels, mine, gathers, bad)) in out.into_iter().enumerate() {
            assert_eq!(rows, [0.0, 0.0, 1.0, 1.0, 1.0, 2.0]);
            assert_eq!(labels, [0, 0, 10, 10, 10, 20]);
            assert_eq!(mine, (starts[r], [2, 3, 1][r]));
            // The table and two tensors, then the bad call's table alone.
            assert_eq!(gathers, 4);
            assert_eq!(
                bad,
                "locals[1]: expected as many rows as locals[0] on every rank, \
                 got 2 rows for 3 on rank 1"
            );
        }
    }
}
