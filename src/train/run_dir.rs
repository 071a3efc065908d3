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
