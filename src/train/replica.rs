//! What the ranks of a data-parallel run share: rank 0's restored state
//! (pretrained weights, an interrupted run's `last` checkpoint) given to
//! every rank, and the gradients averaged every step.

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::checkpoint::Checkpoint;
use super::config::TrainConfig;
use super::distributed::{self as dist, Collective};
use super::memory::Memory;
use super::optim::Optimizer;
use super::run_dir::RunDir;
use super::runner::{load_model, load_pretrained, model_tensors};
use super::state::TrainerState;
use crate::error::{Error, Result};

/// Averages the gradients of `params` over the ranks, with the step's
/// `control` values (stop flag and loss terms) in the same call.
pub fn average_gradients(coll: &dyn Collective, params: &[Tensor], control: &Tensor) -> Result<()> {
    let grads: Vec<Tensor> = params
        .iter()
        .map(Tensor::grad)
        .filter(Tensor::defined)
        .collect();
    dist::all_reduce_mean_bucketed(coll, &grads, &[control.shallow_clone()])
}

/// What rank 0 restored from an interrupted run's `last` checkpoint, as
/// the other ranks receive it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Restored {
    /// The trainer's state.
    pub state: TrainerState,
    /// The optimizer's tensors: name and shape.
    pub optimizer: Vec<(String, Vec<i64>)>,
    /// The Group Loss's memory tensors: name and shape.
    pub memory: Vec<(String, Vec<i64>)>,
}

/// Restores every rank's `vs`, `opt` and `memory` as rank 0 restores them
/// (rank 0 alone reads files, so the run folder and pretrained weights
/// need not be visible to the others). Returns the interrupted run's state
/// (None for a fresh start).
pub(super) fn restore(
    cfg: &TrainConfig,
    dir: &RunDir,
    vs: &nn::VarStore,
    opt: &mut Optimizer,
    mut memory: Option<&mut Memory>,
    device: Device,
    coll: &dyn Collective,
) -> Result<Option<TrainerState>> {
    let restored = if coll.rank() == 0 {
        restore_on_rank_0(cfg, dir, vs, opt, coll.world_size(), memory.as_deref_mut())
    } else {
        Ok(None)
    };
    let restored = dist::agree(coll, restored, device)?;
    share_rank_0_state(coll, vs, opt, restored.as_ref(), device)?;
    share_memory(coll, restored.as_ref(), memory, device)?;
    Ok(restored.map(|r| r.state))
}

/// What rank 0 restores before training: pretrained backbone weights, and
/// the `last` checkpoint of an interrupted run (into `vs`, `opt` and
/// `memory`). Returns that checkpoint's state (None for a fresh start).
fn restore_on_rank_0(
    cfg: &TrainConfig,
    dir: &RunDir,
    vs: &nn::VarStore,
    opt: &mut Optimizer,
    world: usize,
    memory: Option<&mut Memory>,
) -> Result<Option<Restored>> {
    load_pretrained(cfg, vs)?;
    if !dir.last().exists() {
        return Ok(None);
    }
    let ck = Checkpoint::<TrainerState>::load(&dir.last())?;
    ck.state
        .check_consistent(cfg.epochs)
        .map_err(|what| Error::format(dir.last(), None, format!("trainer state: {what}")))?;
    let saved_world = ck.state.world_size;
    if saved_world != world {
        return Err(Error::invalid(
            "world_size",
            format!("{world} process(es)"),
            format!(
                "{saved_world}, the number of processes of the interrupted run in {} \
                 (resume it with as many)",
                dir.root.display()
            ),
        ));
    }
    load_model(vs, &ck.model, &dir.last())?;
    let optimizer = ck
        .optimizer
        .iter()
        .map(|(n, t)| (n.clone(), t.size()))
        .collect();
    opt.load_state(ck.optimizer.into_iter().collect(), ck.state.optimizer_steps)?;
    if let Some(m) = memory {
        m.restore(&ck.memory, ck.state.memory_steps)?;
    }
    Ok(Some(Restored {
        state: ck.state,
        optimizer,
        memory: ck
            .memory
            .iter()
            .map(|(n, t)| (n.clone(), t.size()))
            .collect(),
    }))
}

/// Gives every rank rank 0's restored memory (`restored` is what
/// [`restore_on_rank_0`] returned).
fn share_memory(
    coll: &dyn Collective,
    restored: Option<&Restored>,
    memory: Option<&mut Memory>,
    device: Device,
) -> Result<()> {
    let (Some(restored), Some(memory)) = (restored, memory) else {
        return Ok(());
    };
    if coll.world_size() == 1 {
        return Ok(());
    }
    let tensors = broadcast_listed(
        coll,
        &restored.memory,
        memory.tensors(),
        "a restored memory tensor",
        Memory::kind_of,
        device,
    )?;
    memory.restore(&tensors, restored.state.memory_steps)
}

/// Rank 0's tensors `held` on every rank, in the order of `listed` (the
/// restored checkpoint's names and shapes, the same on every rank: `held`'s
/// own order may differ); the other ranks receive into zeros of
/// `kind_of(name)`. `what`: a listed tensor rank 0 lacks, in the error.
fn broadcast_listed(
    coll: &dyn Collective,
    listed: &[(String, Vec<i64>)],
    held: Vec<(String, Tensor)>,
    what: &str,
    kind_of: impl Fn(&str) -> Kind,
    device: Device,
) -> Result<Vec<(String, Tensor)>> {
    let mut held: std::collections::HashMap<String, Tensor> = held.into_iter().collect();
    let mut tensors = Vec::with_capacity(listed.len());
    for (name, shape) in listed {
        let t = if coll.rank() == 0 {
            held.remove(name)
                .ok_or_else(|| Error::invalid("checkpoint", name, what))?
                .to_device(device)
        } else {
            Tensor::zeros(shape.as_slice(), (kind_of(name), device))
        };
        tensors.push((name.clone(), t));
    }
    let flat: Vec<Tensor> = tensors.iter().map(|(_, t)| t.shallow_clone()).collect();
    dist::broadcast_bucketed(coll, &flat)?;
    Ok(tensors)
}

/// Gives every rank rank 0's variables and, when it restored one, its
/// optimizer state (`restored` is what [`restore_on_rank_0`] returned).
pub(super) fn share_rank_0_state(
    coll: &dyn Collective,
    vs: &nn::VarStore,
    opt: &mut Optimizer,
    restored: Option<&Restored>,
    device: Device,
) -> Result<()> {
    if coll.world_size() == 1 {
        return Ok(());
    }
    let vars: Vec<Tensor> = model_tensors(vs).into_iter().map(|(_, t)| t).collect();
    dist::broadcast_bucketed(coll, &vars)?;
    let Some(restored) = restored else {
        return Ok(());
    };
    let params = vs.variables();
    let state = broadcast_listed(
        coll,
        &restored.optimizer,
        opt.state_tensors(),
        "a restored optimizer state",
        |name| {
            let param = name.rsplit_once('.').map_or("", |(p, _)| p);
            params.get(param).map_or(Kind::Float, Tensor::kind)
        },
        device,
    )?;
    if coll.rank() != 0 {
        opt.load_state(state.into_iter().collect(), restored.state.optimizer_steps)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::{GroupLossOptions, GroupLossOutput};
    use crate::model::EmbeddingNet;
    use crate::train::distributed::tests::on_threads;
    use crate::train::objective::{forward_backward, GroupScope, Objective};
    use crate::train::optim::OptimizerKind;
    use crate::train::runner::{build_network, parameter_groups};
    use crate::train::state::EpochSoFar;
    use std::path::Path;

    const STEPS: usize = 3;
    const CPU_FLOAT: (Kind, Device) = (Kind::Float, Device::Cpu);

    fn test_config() -> TrainConfig {
        TrainConfig {
            optimizer: "adam".into(),
            lr: 1e-2,
            weight_decay: 1e-3,
            ..TrainConfig::default()
        }
    }

    fn network(
        cfg: &TrainConfig,
        seed: i64,
    ) -> (nn::VarStore, EmbeddingNet, Optimizer, Vec<Tensor>) {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = build_network(cfg, &vs, 1, 3).unwrap();
        let groups = parameter_groups(&vs);
        let params = groups.iter().map(|(_, t, _)| t.shallow_clone()).collect();
        let opt = Optimizer::new(
            OptimizerKind::parse(&cfg.optimizer).unwrap(),
            groups,
            vec![cfg.backbone_lr(), cfg.lr],
            cfg.weight_decay,
            cfg.momentum,
        );
        (vs, net, opt, params)
    }

    /// Every model tensor (parameters and buffers), flattened.
    fn snapshot(vs: &nn::VarStore) -> Vec<(String, Vec<f32>)> {
        model_tensors(vs)
            .into_iter()
            .map(|(n, t)| (n, Vec::<f32>::try_from(&t.detach().reshape([-1])).unwrap()))
            .collect()
    }

    /// The trainable parameters, flattened.
    fn values(vs: &nn::VarStore) -> Vec<(String, Vec<f32>)> {
        let trainable: Vec<bool> = model_tensors(vs)
            .iter()
            .map(|(_, t)| t.requires_grad())
            .collect();
        snapshot(vs)
            .into_iter()
            .zip(trainable)
            .filter_map(|(v, keep)| keep.then_some(v))
            .collect()
    }

    /// Loads a `snapshot` of a network of the same shape into `vs`.
    fn load_snapshot(vs: &nn::VarStore, snapshot: &[(String, Vec<f32>)]) {
        let shaped: Vec<(String, Tensor)> = model_tensors(vs)
            .into_iter()
            .zip(snapshot)
            .map(|((_, t), (n, v))| (n.clone(), Tensor::from_slice(v).view(t.size().as_slice())))
            .collect();
        load_model(vs, &shaped, Path::new("snapshot")).unwrap();
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    }

    /// The Group Loss of a batch of detached inputs, with its gradients.
    fn group_loss(
        emb: &Tensor,
        logits: &Tensor,
        labels: &Tensor,
        opts: &GroupLossOptions,
    ) -> GroupLossOutput {
        let want = crate::loss::Want {
            grads: true,
            probs: false,
        };
        let implementation = crate::loss::Implementation::Auto;
        crate::loss::evaluate(
            &emb.detach(),
            &logits.detach(),
            labels,
            opts,
            want,
            implementation,
        )
        .unwrap()
    }

    /// 3 classes x 4 images.
    fn three_classes() -> Tensor {
        Tensor::from_slice(&[0i64, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    }

    /// The Rust loop's step under two ranks (threads) against one process
    /// that computes the gradients of both ranks' batches and averages them.
    #[test]
    fn two_ranks_step_like_one_process_averaging_both_batches() {
        let cfg = test_config();
        // batch[step * 2 + rank]: 3 classes x 4 images of 28 x 28.
        let images: Vec<Vec<f32>> = (0..2 * STEPS as i64)
            .map(|i| {
                tch::manual_seed(100 + i);
                let t = Tensor::randn([12, 1, 28, 28], CPU_FLOAT).reshape([-1]);
                Vec::<f32>::try_from(&t).unwrap()
            })
            .collect();
        let batch = |images: &[Vec<f32>], step: usize, rank: usize| {
            let x = Tensor::from_slice(&images[step * 2 + rank]).view([12, 1, 28, 28]);
            (x, three_classes())
        };
        let lopts = Objective::of(&cfg, 0).unwrap();

        let (vs, net, mut opt, params) = network(&cfg, 0);
        let init_values = snapshot(&vs);
        let before = values(&vs);
        for step in 0..STEPS {
            let mut grads = Vec::new();
            for rank in 0..2 {
                let (x, y) = batch(&images, step, rank);
                opt.zero_grad();
                forward_backward(&net, &x, &y, &lopts, false, GroupScope::default()).unwrap();
                grads.push(params.iter().map(|p| p.grad().copy()).collect::<Vec<_>>());
            }
            for (i, p) in params.iter().enumerate() {
                p.grad().copy_(&((&grads[0][i] + &grads[1][i]) / 2.0));
            }
            opt.step();
        }
        let want = values(&vs);

        let got = on_threads(2, move |g| {
            let cfg = test_config();
            let rank = g.rank();
            // Rank 1 starts elsewhere: the broadcast must bring it in line.
            let (vs, net, mut opt, params) = network(&cfg, 1 + rank as i64);
            if rank == 0 {
                load_snapshot(&vs, &init_values);
            }
            share_rank_0_state(g, &vs, &mut opt, None, Device::Cpu).unwrap();
            let lopts = Objective::of(&cfg, 0).unwrap();
            let mut losses = Vec::new();
            for step in 0..STEPS {
                let (x, y) = batch(&images, step, rank);
                opt.zero_grad();
                let out =
                    forward_backward(&net, &x, &y, &lopts, false, GroupScope::default()).unwrap();
                let control = Tensor::from_slice(&[0.0, f64::try_from(&out.loss).unwrap()]);
                average_gradients(g, &params, &control).unwrap();
                losses.push(Vec::<f64>::try_from(&control).unwrap()[1]);
                opt.step();
            }
            (values(&vs), losses)
        });
        assert_eq!(got[0].1, got[1].1, "the averaged losses agree");
        for (rank_values, _) in &got {
            assert_eq!(rank_values.len(), want.len());
            for ((name, a), (_, b)) in rank_values.iter().zip(&want) {
                let diff = max_abs_diff(a, b);
                assert!(diff <= 1e-6, "{name}: max difference {diff}");
            }
        }
        // The steps moved the weights (the comparison is not of two copies
        // of the initialisation).
        assert_ne!(want, before);
    }

    /// `gather_ranks`: two ranks (threads), each forwarding its own batch,
    /// give after averaging the parameter gradients of one process that
    /// forwards both batches and takes the loss of their concatenation.
    #[test]
    fn gathered_ranks_step_like_one_group_of_both_batches() {
        let cfg = test_config();
        // Drawn before the threads start (torch's generator is global).
        let images: Vec<Vec<f32>> = (0..2)
            .map(|r| {
                tch::manual_seed(300 + r);
                let t = Tensor::randn([12, 1, 28, 28], CPU_FLOAT).reshape([-1]);
                Vec::<f32>::try_from(&t).unwrap()
            })
            .collect();
        let batch = move |rank: usize| {
            let x = Tensor::from_slice(&images[rank]).view([12, 1, 28, 28]);
            (x, (three_classes() + rank as i64).remainder(3))
        };
        let Objective::Group(opts) = Objective::of(&cfg, 0).unwrap() else {
            panic!("the default loss is the Group Loss")
        };
        // One process: both batches forwarded apart (BatchNorm statistics
        // per batch, as on the ranks), the loss of the concatenation.
        let (vs, net, _opt, params) = network(&cfg, 0);
        // The threads' networks start from these variables (their own
        // initialisations race for torch's global generator).
        let init = snapshot(&vs);
        let outs: Vec<(Tensor, Tensor)> =
            (0..2).map(|r| net.forward_t(&batch(r).0, true)).collect();
        let emb = Tensor::cat(&[&outs[0].0, &outs[1].0], 0);
        let logits = Tensor::cat(&[&outs[0].1, &outs[1].1], 0);
        let labels = Tensor::cat(&[batch(0).1, batch(1).1], 0);
        let out = group_loss(&emb, &logits, &labels, &opts);
        let (ge, gl) = (out.grad_embeddings.unwrap(), out.grad_logits.unwrap());
        ((&emb * &ge).sum(Kind::Float) + (&logits * &gl).sum(Kind::Float)).backward();
        let expected: Vec<Tensor> = params.iter().map(|p| p.grad().copy()).collect();
        let expected_loss = f64::try_from(&out.loss).unwrap();

        let ranks_batch = batch.clone();
        let got = on_threads(2, move |g| {
            let cfg = test_config();
            let (vs, net, mut opt, params) = network(&cfg, 0);
            load_snapshot(&vs, &init);
            let lopts = Objective::of(&cfg, 0).unwrap();
            let (x, y) = ranks_batch(g.rank());
            opt.zero_grad();
            let scope = GroupScope {
                ranks: Some(g),
                memory: None,
            };
            let out = forward_backward(&net, &x, &y, &lopts, false, scope).unwrap();
            let control = Tensor::from_slice(&[0.0, f64::try_from(&out.loss).unwrap()]);
            average_gradients(g, &params, &control).unwrap();
            let grads: Vec<Vec<f32>> = params
                .iter()
                .map(|p| Vec::<f32>::try_from(&p.grad().reshape([-1])).unwrap())
                .collect();
            (grads, f64::try_from(&out.loss).unwrap())
        });
        for (grads, loss) in &got {
            assert!(
                (loss - expected_loss).abs() < 1e-6,
                "{loss} {expected_loss}"
            );
            for (g, e) in grads.iter().zip(&expected) {
                let e = Vec::<f32>::try_from(&e.reshape([-1])).unwrap();
                let scale = e.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = max_abs_diff(g, &e);
                assert!(
                    diff <= 1e-5 * scale.max(1e-3),
                    "max difference {diff} of {scale}"
                );
            }
        }
        // Each rank alone would give another loss (the test could fail).
        let alone = group_loss(&outs[0].0, &outs[0].1, &batch(0).1, &opts);
        assert!((f64::try_from(&alone.loss).unwrap() - expected_loss).abs() > 1e-3);
    }

    /// Ranks 1.. get rank 0's memory, whatever order the checkpoint lists
    /// its tensors in (safetensors reads them from a hash map).
    #[test]
    fn the_memory_is_shared_in_the_checkpoints_order() {
        let got = on_threads(2, |coll| {
            let mut memory = Memory::new(6, 0, Device::Cpu);
            if coll.rank() == 0 {
                let e = Tensor::arange(8, CPU_FLOAT).view([4, 2]);
                memory
                    .push(&e, &Tensor::from_slice(&[3i64, 1, 4, 1]))
                    .unwrap();
            }
            let restored = Restored {
                state: TrainerState {
                    epoch: 1,
                    step: 0,
                    optimizer_steps: 1,
                    history: Vec::new(),
                    best_epoch: None,
                    best_value: None,
                    seed: 0,
                    member: 0,
                    world_size: 2,
                    memory_steps: 1,
                    epoch_so_far: EpochSoFar::default(),
                },
                optimizer: Vec::new(),
                memory: vec![
                    ("labels".into(), vec![4]),
                    ("embeddings".into(), vec![4, 2]),
                ],
            };
            share_memory(coll, Some(&restored), Some(&mut memory), Device::Cpu).unwrap();
            let rows = memory.rows().unwrap();
            (
                Vec::<f32>::try_from(&rows.embeddings.reshape([-1])).unwrap(),
                Vec::<i64>::try_from(rows.labels).unwrap(),
                memory.steps(),
            )
        });
        assert_eq!(got[0], got[1]);
        assert_eq!(got[1].1, [3, 1, 4, 1]);
        assert_eq!(got[1].2, 1);
    }
}
