//! The run folder: `config.toml`, `input.json`, `metrics.jsonl`,
//! `steps.tsv`, `summary.json` and `checkpoints/{last,best}.safetensors`.
//! Every file but `steps.tsv` is replaced whole (`crate::files`: written
//! aside, flushed, renamed), so a crash leaves the previous version;
//! `steps.tsv` is appended step by step ([`StepLog`]) and cut back to the
//! resume point when a run resumes.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::files::write_atomic;

/// Paths of a run folder.
#[derive(Clone, Debug)]
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        RunDir { root: root.into() }
    }

    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    /// What the network takes ([`super::run_input::RunInput`]).
    pub fn input(&self) -> PathBuf {
        self.root.join("input.json")
    }

    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    pub fn summary(&self) -> PathBuf {
        self.root.join("summary.json")
    }

    pub fn last(&self) -> PathBuf {
        self.root.join("checkpoints").join("last.safetensors")
    }

    pub fn best(&self) -> PathBuf {
        self.root.join("checkpoints").join("best.safetensors")
    }

    pub fn steps(&self) -> PathBuf {
        self.root.join("steps.tsv")
    }

    /// The folder of ensemble member `i` (of `n`); the run folder itself
    /// when there is one model.
    pub fn member(&self, i: usize, n: usize) -> RunDir {
        if n == 1 {
            self.clone()
        } else {
            RunDir::new(self.root.join(format!("model-{i}")))
        }
    }

    /// Removes the temporary files (`.NAME.tmp-PID-N`) that a writer killed
    /// mid-write left in the run folder, its checkpoints and its ensemble
    /// members. A file whose writer is still alive (another rank starting)
    /// is left alone.
    pub fn remove_stale_temporaries(&self) {
        fn walk(dir: &Path, depth: usize) {
            let Ok(entries) = fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if path.is_dir() {
                    if depth < 3 {
                        walk(&path, depth + 1);
                    }
                    continue;
                }
                let Some(pid) = crate::files::temporary_writer(&name) else {
                    continue;
                };
                let alive =
                    pid != std::process::id() && Path::new("/proc").join(pid.to_string()).exists();
                if !alive {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        walk(&self.root, 0);
    }

    /// Rewrites `metrics.jsonl` from the whole history, one epoch a line.
    pub fn write_metrics(&self, history: &[serde_json::Value]) -> Result<()> {
        let mut text = String::new();
        for h in history {
            text.push_str(&h.to_string());
            text.push('\n');
        }
        write_atomic(&self.metrics(), text.as_bytes())
    }

    /// Writes `summary.json`.
    pub fn write_summary(&self, summary: &serde_json::Value) -> Result<()> {
        let text = serde_json::to_string_pretty(summary)
            .map_err(|e| Error::invalid("summary", e.to_string(), "JSON"))?;
        write_atomic(&self.summary(), text.as_bytes())
    }
}

/// `steps.tsv`: the loss and learning rates of every optimizer step
/// (`epoch`, `step` 1-based), written by rank 0 and flushed at each epoch's
/// end, before the checkpoint that records the epoch.
pub struct StepLog {
    file: std::io::BufWriter<fs::File>,
    path: PathBuf,
}

const STEP_LOG_HEADER: &str = "epoch\tstep\tloss\tlr\tbackbone_lr\n";

impl StepLog {
    /// Opens `path` for a run resumed after `steps_done` steps of epoch
    /// `epoch` (0-based; 0, 0 for a new run): lines of later steps, which a
    /// killed run wrote after its checkpoint, are dropped.
    pub fn open(path: PathBuf, epoch: usize, steps_done: usize) -> Result<Self> {
        let old = fs::read_to_string(&path).unwrap_or_default();
        let mut text = String::from(STEP_LOG_HEADER);
        for line in old.lines().skip(1) {
            let mut cols = line.split('\t').map(str::parse::<usize>);
            let (Some(Ok(e)), Some(Ok(s))) = (cols.next(), cols.next()) else {
                continue;
            };
            if e <= epoch || (e == epoch + 1 && s <= steps_done) {
                text.push_str(line);
                text.push('\n');
            }
        }
        write_atomic(&path, text.as_bytes())?;
        let file = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(StepLog {
            file: std::io::BufWriter::new(file),
            path,
        })
    }

    /// Records step `step` (1-based) of epoch `epoch` (1-based).
    pub fn write(&mut self, epoch: usize, step: usize, loss: f64, lrs: &[f64]) -> Result<()> {
        let (head, backbone) = (lrs[1], lrs[0]);
        writeln!(self.file, "{epoch}\t{step}\t{loss}\t{head}\t{backbone}")
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Writes what is buffered to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_step_log_drops_steps_after_the_resume_point() {
        let dir = std::env::temp_dir().join(format!("steplog-{}", std::process::id()));
        let path = dir.join("steps.tsv");
        let mut log = StepLog::open(path.clone(), 0, 0).unwrap();
        for (e, s) in [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3)] {
            log.write(e, s, 0.5, &[0.1, 0.2]).unwrap();
        }
        log.flush().unwrap();
        drop(log);
        // Resumed after 1 step of the second epoch (0-based 1).
        let mut log = StepLog::open(path.clone(), 1, 1).unwrap();
        log.write(2, 2, 0.25, &[0.1, 0.2]).unwrap();
        log.flush().unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(rows[0], STEP_LOG_HEADER.trim_end());
        let keys: Vec<String> = rows[1..]
            .iter()
            .map(|r| r.split('\t').take(3).collect::<Vec<_>>().join(","))
            .collect();
        assert_eq!(keys, ["1,1,0.5", "1,2,0.5", "2,1,0.5", "2,2,0.25"]);
        assert!(rows[1].ends_with("\t0.2\t0.1"));
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn stale_temporaries_go_and_live_writers_keep_theirs() {
        let root = std::env::temp_dir().join(format!("grouploss-stale-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("checkpoints")).unwrap();
        // No process has pid 4194305 (above Linux's pid_max).
        let dead = [
            ".metrics.jsonl.tmp-4194305",
            "checkpoints/.last.safetensors.tmp-4194305-3",
        ];
        let parent = std::os::unix::process::parent_id();
        let alive = format!(".summary.json.tmp-{parent}-0");
        let kept = [
            "config.toml",
            "checkpoints/best.safetensors",
            alive.as_str(),
        ];
        for name in dead.iter().chain(&kept) {
            fs::write(root.join(name), b"x").unwrap();
        }
        RunDir::new(root.clone()).remove_stale_temporaries();
        for name in dead {
            assert!(!root.join(name).exists(), "{name}");
        }
        for name in kept {
            assert!(root.join(name).exists(), "{name}");
        }
        let _ = fs::remove_dir_all(root);
    }
}
