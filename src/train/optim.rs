//! Optimizers and learning-rate schedules, written out so that their state
//! can be checkpointed and restored exactly (a resumed run must end where an
//! uninterrupted one does).
//!
//! Updates follow PyTorch's `torch.optim` formulas: Adam (L2 weight decay),
//! AdamW and RAdam with decoupled weight decay (the release's optimizer),
//! SGD with momentum.

use std::collections::HashMap;

use tch::Tensor;

use crate::error::{Error, Result};

/// Which update rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    Adam,
    AdamW,
    RAdam,
    Sgd,
}

impl OptimizerKind {
    /// Parses `adam`, `adamw`, `radam` or `sgd`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "adam" => Ok(OptimizerKind::Adam),
            "adamw" => Ok(OptimizerKind::AdamW),
            "radam" => Ok(OptimizerKind::RAdam),
            "sgd" => Ok(OptimizerKind::Sgd),
            other => Err(crate::error::not_one_of(
                "optimizer",
                other,
                &["adam", "adamw", "radam", "sgd"],
            )),
        }
    }
}

struct ParamState {
    name: String,
    param: Tensor,
    group: usize,
    /// First moment (Adam family) or momentum buffer (SGD).
    m: Option<Tensor>,
    /// Second moment (Adam family).
    v: Option<Tensor>,
}

/// An optimizer over named parameters in learning-rate groups.
pub struct Optimizer {
    kind: OptimizerKind,
    params: Vec<ParamState>,
    base_lrs: Vec<f64>,
    lrs: Vec<f64>,
    weight_decay: f64,
    momentum: f64,
    betas: (f64, f64),
    eps: f64,
    step: i64,
}

impl Optimizer {
    /// `params`: (name, tensor, group index into `base_lrs`).
    pub fn new(
        kind: OptimizerKind,
        params: Vec<(String, Tensor, usize)>,
        base_lrs: Vec<f64>,
        weight_decay: f64,
        momentum: f64,
    ) -> Self {
        let params = params
            .into_iter()
            .map(|(name, param, group)| ParamState {
                name,
                param,
                group,
                m: None,
                v: None,
            })
            .collect();
        Optimizer {
            kind,
            params,
            lrs: base_lrs.clone(),
            base_lrs,
            weight_decay,
            momentum,
            betas: (0.9, 0.999),
            eps: 1e-8,
            step: 0,
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> i64 {
        self.step
    }

    /// Sets every group's learning rate to its base times `factor`.
    pub fn set_lr_factor(&mut self, factor: f64) {
        for (lr, base) in self.lrs.iter_mut().zip(&self.base_lrs) {
            *lr = base * factor;
        }
    }

    /// The current learning rate of each group.
    pub fn lrs(&self) -> &[f64] {
        &self.lrs
    }

    /// Clears the gradients.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.param.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
        }
    }

    /// One update of every parameter that has a gradient.
    pub fn step(&mut self) {
        self.step += 1;
        let t = self.step as f64;
        let (b1, b2) = self.betas;
        let (wd, eps, mom, kind) = (self.weight_decay, self.eps, self.momentum, self.kind);
        let lrs = self.lrs.clone();
        tch::no_grad(|| {
            for p in &mut self.params {
                let grad = p.param.grad();
                if !grad.defined() {
                    continue;
                }
                let lr = lrs[p.group];
                match kind {
                    OptimizerKind::Sgd => {
                        let g = if wd != 0.0 {
                            &grad + &p.param * wd
                        } else {
                            grad
                        };
                        let update = if mom != 0.0 {
                            let buf = match p.m.take() {
                                Some(b) => b * mom + &g,
                                None => g.copy(),
                            };
                            p.m = Some(buf.shallow_clone());
                            buf
                        } else {
                            g
                        };
                        let _ = p.param.g_sub_(&(update * lr));
                    }
                    OptimizerKind::Adam | OptimizerKind::AdamW | OptimizerKind::RAdam => {
                        let decoupled = kind != OptimizerKind::Adam;
                        if decoupled && wd != 0.0 {
                            let _ = p.param.g_mul_scalar_(1.0 - lr * wd);
                        }
                        let g = if !decoupled && wd != 0.0 {
                            &grad + &p.param * wd
                        } else {
                            grad
                        };
                        let m = match p.m.take() {
                            Some(m) => m * b1 + &g * (1.0 - b1),
                            None => &g * (1.0 - b1),
                        };
                        let v = match p.v.take() {
                            Some(v) => v * b2 + g.square() * (1.0 - b2),
                            None => g.square() * (1.0 - b2),
                        };
                        let bc1 = 1.0 - b1.powf(t);
                        let bc2 = 1.0 - b2.powf(t);
                        let update = if kind == OptimizerKind::RAdam {
                            let rho_inf = 2.0 / (1.0 - b2) - 1.0;
                            let rho_t = rho_inf - 2.0 * t * b2.powf(t) / bc2;
                            if rho_t > 5.0 {
                                let rect = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                                    / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                                    .sqrt();
                                let adaptive = (v.sqrt() + eps).reciprocal() * bc2.sqrt();
                                &m * adaptive * (lr * rect / bc1)
                            } else {
                                &m * (lr / bc1)
                            }
                        } else {
                            let denom = v.sqrt() / bc2.sqrt() + eps;
                            &m / denom * (lr / bc1)
                        };
                        let _ = p.param.g_sub_(&update);
                        p.m = Some(m);
                        p.v = Some(v);
                    }
                }
            }
        });
    }

    /// The state tensors, named `{param}.m` and `{param}.v`, on the CPU.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for p in &self.params {
            if let Some(m) = &p.m {
                out.push((format!("{}.m", p.name), m.to_device(tch::Device::Cpu)));
            }
            if let Some(v) = &p.v {
                out.push((format!("{}.v", p.name), v.to_device(tch::Device::Cpu)));
            }
        }
        out
    }

    /// Restores what [`Optimizer::state_tensors`] and [`Optimizer::steps`]
    /// returned.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, steps: i64) -> Result<()> {
        for p in &mut self.params {
            let device = p.param.device();
            for (suffix, slot) in [("m", &mut p.m), ("v", &mut p.v)] {
                *slot = match tensors.remove(&format!("{}.{suffix}", p.name)) {
                    Some(t) if t.size() == p.param.size() => Some(t.to_device(device)),
                    Some(t) => {
                        return Err(Error::invalid(
                            "checkpoint",
                            format!(
                                "optimizer state {}.{suffix} of shape {:?}",
                                p.name,
                                t.size()
                            ),
                            format!("shape {:?}", p.param.size()),
                        ))
                    }
                    None => None,
                };
            }
        }
        self.step = steps;
        Ok(())
    }
}

/// The learning-rate multiplier over training.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// `step` (the release's), `multistep`, `cosine` or `constant`.
    pub kind: String,
    pub epochs: usize,
    /// 1-based epochs at whose start `step` sets the rate to `decay` times
    /// the base (and reloads the best weights), `multistep` multiplies it
    /// by `decay`.
    pub decay_epochs: Vec<usize>,
    pub decay: f64,
    pub warmup_epochs: f64,
}

impl Schedule {
    /// The schedule a configuration sets.
    pub fn of(cfg: &super::config::TrainConfig) -> Self {
        Schedule {
            kind: cfg.schedule.clone(),
            epochs: cfg.epochs,
            decay_epochs: cfg.lr_decay_epochs.clone(),
            decay: cfg.lr_decay,
            warmup_epochs: cfg.warmup_epochs,
        }
    }

    /// The multiplier at `epoch` (0-based) after `fraction` of it.
    pub fn factor(&self, epoch: usize, fraction: f64) -> f64 {
        let progress = epoch as f64 + fraction;
        let passed = self
            .decay_epochs
            .iter()
            .filter(|&&e| epoch + 1 >= e)
            .count();
        let base = match self.kind.as_str() {
            // The release's train.py: lr = lr0 / 10 at each decay epoch, the
            // same value every time.
            "step" if passed > 0 => self.decay,
            "multistep" => self.decay.powi(passed as i32),
            "cosine" => 0.5 * (1.0 + (std::f64::consts::PI * progress / self.epochs as f64).cos()),
            _ => 1.0,
        };
        if self.warmup_epochs > 0.0 && progress < self.warmup_epochs {
            base * (progress / self.warmup_epochs).max(1e-3)
        } else {
            base
        }
    }
}

impl Schedule {
    /// Whether the release's `step` schedule reloads the best weights so
    /// far at the start of `epoch` (0-based).
    pub fn reloads_best_at(&self, epoch: usize) -> bool {
        self.kind == "step" && self.decay_epochs.contains(&(epoch + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The same updates as torch.optim on a quadratic, computed by hand.
    fn run(kind: OptimizerKind, wd: f64) -> Vec<f64> {
        let p = Tensor::from_slice(&[1.0f64, -2.0]).set_requires_grad(true);
        let mut opt = Optimizer::new(
            kind,
            vec![("p".into(), p.shallow_clone(), 0)],
            vec![0.1],
            wd,
            0.9,
        );
        for _ in 0..8 {
            opt.zero_grad();
            let loss = (&p * &p).sum(Kind::Double) * 0.5 + p.sum(Kind::Double);
            loss.backward();
            opt.step();
        }
        Vec::<f64>::try_from(&p.detach()).unwrap()
    }

    #[test]
    fn updates_match_torch_optim() {
        // torch 2.13: torch.optim.X([p], lr=0.1, weight_decay=wd) (SGD with
        // momentum 0.9, RAdam with decoupled_weight_decay=True) on the same
        // loss for 8 steps.
        let cases = [
            (OptimizerKind::Adam, 0.0, [0.2123369452, -1.2362637288]),
            (OptimizerKind::Adam, 0.05, [0.2127566886, -1.233429936]),
            (OptimizerKind::Sgd, 0.0, [-2.10644704, -0.44677648]),
            (OptimizerKind::AdamW, 0.05, [0.1874639362, -1.1773097098]),
            (OptimizerKind::RAdam, 0.05, [0.0812323452, -1.4810812651]),
        ];
        for (kind, wd, want) in cases {
            let got = run(kind, wd);
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() < 1e-9,
                    "{kind:?} wd {wd}: {got:?} vs {want:?}"
                );
            }
        }
    }

    #[test]
    fn state_round_trips() {
        let radam = |p: &Tensor| {
            Optimizer::new(
                OptimizerKind::RAdam,
                vec![("p".into(), p.shallow_clone(), 0)],
                vec![0.1],
                0.01,
                0.0,
            )
        };
        let p = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let mut a = radam(&p);
        (&p * &p).sum(Kind::Float).backward();
        a.step();
        let state: HashMap<String, Tensor> = a.state_tensors().into_iter().collect();
        assert_eq!(state.len(), 2);
        let q = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let mut b = radam(&q);
        b.load_state(state, a.steps()).unwrap();
        assert_eq!(b.steps(), 1);
        let bad: HashMap<String, Tensor> = [(
            "p.m".to_string(),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        )]
        .into();
        assert!(b
            .load_state(bad, 1)
            .unwrap_err()
            .to_string()
            .contains("p.m of shape [3]"));
    }

    #[test]
    fn step_schedules_act_at_the_given_epochs() {
        let s = Schedule {
            kind: "multistep".into(),
            epochs: 70,
            decay_epochs: vec![31, 51],
            decay: 0.1,
            warmup_epochs: 0.0,
        };
        assert_eq!(s.factor(0, 0.0), 1.0);
        assert_eq!(s.factor(29, 0.9), 1.0);
        assert!((s.factor(30, 0.0) - 0.1).abs() < 1e-12);
        assert!((s.factor(50, 0.0) - 0.01).abs() < 1e-12);
        assert!(!s.reloads_best_at(30));
        // The release's: lr0 / 10 at both, and the best weights reloaded.
        let release = Schedule {
            kind: "step".into(),
            ..s.clone()
        };
        assert_eq!(release.factor(29, 0.9), 1.0);
        assert_eq!(release.factor(30, 0.0), 0.1);
        assert_eq!(release.factor(50, 0.0), 0.1);
        assert_eq!(release.factor(69, 0.5), 0.1);
        let reloads: Vec<usize> = (0..70).filter(|&e| release.reloads_best_at(e)).collect();
        assert_eq!(reloads, vec![30, 50]);
        let c = Schedule {
            kind: "cosine".into(),
            warmup_epochs: 1.0,
            ..s
        };
        assert!(c.factor(0, 0.5) < 0.6);
        assert!((c.factor(35, 0.0) - 0.5).abs() < 1e-9);
    }
}
