//! The run folder: `config.toml`, `metrics.jsonl`, `summary.json` and
//! `checkpoints/{last,best}.safetensors`. Every file is replaced atomically
//! (written aside, flushed, renamed), so a crash leaves the previous version.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path.file_name().and_then(|f| f.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

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

    /// The folder of ensemble member `i` (of `n`); the run folder itself
    /// when there is one model.
    pub fn member(&self, i: usize, n: usize) -> RunDir {
        if n == 1 {
            self.clone()
        } else {
            RunDir::new(self.root.join(format!("model-{i}")))
        }
    }

    /// Removes the temporary files (`.NAME.tmp-PID`) that a writer killed
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
                let Some(pid) = name
                    .strip_prefix('.')
                    .and_then(|n| n.rsplit_once(".tmp-"))
                    .and_then(|(_, pid)| pid.parse::<u32>().ok())
                else {
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
