//! The trainer's saved state: what a checkpoint's metadata holds besides
//! the tensors. Every field is required and no other is accepted, so a
//! checkpoint written by another version (a renamed or missing key) is
//! refused with an error naming the field instead of being read as zero.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// A field that must be present, `null` meaning `None` (serde would
/// otherwise read a missing `Option` field as `None`).
fn required<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d)
}

/// The state of a member's `last` checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    /// The epoch in progress (0-based); `epochs` once the run is done.
    pub epoch: usize,
    /// Optimizer steps done in that epoch.
    pub step: usize,
    /// Optimizer steps done in the whole run (Adam's bias correction).
    pub optimizer_steps: i64,
    /// One record per finished epoch (`metrics.jsonl`'s lines).
    pub history: Vec<Value>,
    /// The best epoch so far (1-based), if any.
    #[serde(deserialize_with = "required")]
    pub best_epoch: Option<usize>,
    /// Its selection value (`None` also when it was not a number).
    #[serde(deserialize_with = "required")]
    pub best_value: Option<f64>,
    /// The member's seed.
    pub seed: u64,
    /// The ensemble member (0-based).
    pub member: usize,
    /// The number of processes that trained it.
    pub world_size: usize,
    /// Batches the Group Loss's memory has taken in (`memory_size`; its
    /// tensors are the checkpoint's `memory.*`).
    pub memory_steps: usize,
    /// The running totals of the epoch in progress (zero at its start), so
    /// that a run resumed within an epoch reports the epoch's figures.
    pub epoch_so_far: EpochSoFar,
}

/// What an epoch has added up over its steps done so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochSoFar {
    /// Sums over the steps of the loss and of its NLL and CE terms (each
    /// step's mean over the ranks).
    pub loss: f64,
    pub nll: f64,
    pub ce: f64,
    /// Steps done.
    pub steps: usize,
    /// Images seen, all ranks together.
    pub images: usize,
    /// Seconds spent in the steps.
    pub train_s: f64,
    /// The epoch whose best weights were reloaded at the epoch's start.
    #[serde(deserialize_with = "required")]
    pub reloaded_best_epoch: Option<usize>,
}

impl TrainerState {
    /// What a checkpoint written by the trainer always holds, for a run of
    /// `epochs` epochs: at most `epochs` done, one record per epoch done,
    /// the steps of the epoch in progress counted in its totals, and a best
    /// epoch among those done. Says what is wrong otherwise (a hand-edited
    /// or foreign file).
    pub fn check_consistent(&self, epochs: usize) -> std::result::Result<(), String> {
        if self.epoch > epochs {
            return Err(format!("epoch {} of a run of {epochs} epochs", self.epoch));
        }
        if self.history.len() != self.epoch {
            return Err(format!(
                "{} epoch records for {} epochs done",
                self.history.len(),
                self.epoch
            ));
        }
        if self.epoch_so_far.steps != self.step {
            return Err(format!(
                "step {} with the totals of {} steps",
                self.step, self.epoch_so_far.steps
            ));
        }
        if self.best_epoch.is_some_and(|b| b == 0 || b > self.epoch) {
            return Err(format!(
                "best epoch {:?} of {} epochs done",
                self.best_epoch, self.epoch
            ));
        }
        Ok(())
    }

    /// Whether this is the state of ensemble member `member` trained with
    /// `seed` (a `last` checkpoint copied from another run or member is
    /// not); says what differs otherwise.
    pub fn check_member(&self, seed: u64, member: usize) -> std::result::Result<(), String> {
        if (self.seed, self.member) != (seed, member) {
            return Err(format!(
                "the state of member {} with seed {}, where this run's member {member} has seed {seed}",
                self.member, self.seed
            ));
        }
        Ok(())
    }

    /// The best epoch and its value (NaN where none was recorded).
    pub fn best(&self) -> Option<(usize, f64)> {
        self.best_epoch
            .map(|e| (e, self.best_value.unwrap_or(f64::NAN)))
    }
}

/// The state of a member's `best` checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BestState {
    /// The epoch whose weights these are (1-based).
    pub epoch: usize,
    /// Its selection value (`None` when it was not a number).
    #[serde(deserialize_with = "required")]
    pub value: Option<f64>,
    /// The selection metric.
    pub metric: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn state() -> Value {
        json!({
            "epoch": 2, "step": 5, "optimizer_steps": 45, "history": [{"epoch": 1}, {"epoch": 2}],
            "best_epoch": 1, "best_value": 0.5, "seed": 3, "member": 0, "world_size": 1,
            "memory_steps": 0,
            "epoch_so_far": {
                "loss": 6.5, "nll": 4.0, "ce": 2.5, "steps": 5, "images": 60, "train_s": 1.5,
                "reloaded_best_epoch": null,
            },
        })
    }

    #[test]
    fn the_state_round_trips() {
        let s: TrainerState = serde_json::from_value(state()).unwrap();
        assert_eq!((s.epoch, s.step, s.best()), (2, 5, Some((1, 0.5))));
        let back: TrainerState = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn a_missing_or_unknown_field_is_refused_by_name() {
        for key in [
            "epoch",
            "step",
            "best_epoch",
            "best_value",
            "world_size",
            "memory_steps",
            "epoch_so_far",
        ] {
            let mut v = state();
            v.as_object_mut().unwrap().remove(key);
            let e = serde_json::from_value::<TrainerState>(v)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("missing field `{key}`")), "{e}");
        }
        let mut v = state();
        v["epochs_done"] = json!(2);
        let e = serde_json::from_value::<TrainerState>(v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `epochs_done`"), "{e}");
        let mut v = state();
        v["epoch_so_far"]
            .as_object_mut()
            .unwrap()
            .remove("reloaded_best_epoch");
        let e = serde_json::from_value::<TrainerState>(v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `reloaded_best_epoch`"), "{e}");
    }

    #[test]
    fn an_inconsistent_state_says_what_is_wrong() {
        let ok: TrainerState = serde_json::from_value(state()).unwrap();
        assert_eq!(ok.check_consistent(2), Ok(()));
        let edits: [(&str, Value, &str); 4] = [
            ("epoch", json!(7), "epoch 7 of a run of 2 epochs"),
            ("history", json!([]), "0 epoch records for 2 epochs done"),
            (
                "step",
                json!(1_000_000),
                "step 1000000 with the totals of 5 steps",
            ),
            (
                "best_epoch",
                json!(3),
                "best epoch Some(3) of 2 epochs done",
            ),
        ];
        for (key, value, message) in edits {
            let mut v = state();
            v[key] = value;
            let s: TrainerState = serde_json::from_value(v).unwrap();
            assert_eq!(s.check_consistent(2), Err(message.to_string()), "{key}");
        }
    }

    #[test]
    fn another_members_state_is_named() {
        let s: TrainerState = serde_json::from_value(state()).unwrap();
        assert_eq!(s.check_member(3, 0), Ok(()));
        assert_eq!(
            s.check_member(4, 1),
            Err("the state of member 0 with seed 3, where this run's member 1 has seed 4".into())
        );
    }

    #[test]
    fn a_null_best_is_none() {
        let mut v = state();
        v["best_epoch"] = Value::Null;
        v["best_value"] = Value::Null;
        let s: TrainerState = serde_json::from_value(v).unwrap();
        assert_eq!(s.best(), None);
    }
}
