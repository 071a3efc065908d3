//! Progress on stderr: a bar redrawn in place (epoch, step, loss, images/s,
//! ETA), or, in quiet mode, one line per epoch for logs.

use std::io::Write;
use std::time::{Duration, Instant};

/// Reports training progress.
pub struct Progress {
    bar: bool,
    /// Prints nothing (ranks other than 0 of a distributed run).
    silent: bool,
    last_draw: Instant,
    started: Instant,
}

fn hms(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

impl Progress {
    /// `bar`: redraw a bar; else print only epoch lines.
    pub fn new(bar: bool) -> Self {
        let now = Instant::now();
        Progress {
            bar,
            silent: false,
            last_draw: now - Duration::from_secs(1),
            started: now,
        }
    }

    /// A reporter that prints nothing.
    pub fn silent() -> Self {
        Progress {
            silent: true,
            ..Progress::new(false)
        }
    }

    /// After a step of `epoch` (1-based, of `epochs`).
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        label: &str,
        epoch: usize,
        epochs: usize,
        step: usize,
        steps: usize,
        loss: f64,
        images_per_s: f64,
        elapsed_epoch: f64,
    ) {
        if !self.bar || (self.last_draw.elapsed() < Duration::from_millis(200) && step < steps) {
            return;
        }
        self.last_draw = Instant::now();
        let width = 24;
        let filled = (width * step).checked_div(steps).unwrap_or(0);
        let eta = if step > 0 {
            elapsed_epoch / step as f64 * (steps - step) as f64
        } else {
            0.0
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{label}epoch {epoch}/{epochs} [{}{}] {step}/{steps} loss {loss:.4} {images_per_s:.0} img/s ETA {}   ",
            "#".repeat(filled),
            ".".repeat(width - filled),
            hms(eta)
        );
        let _ = err.flush();
    }

    /// A line after an epoch (ends the bar's line).
    pub fn line(&mut self, text: &str) {
        if self.silent {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.bar {
            let _ = write!(err, "\r{:100}\r", "");
        }
        let _ = writeln!(
            err,
            "[{}] {text}",
            hms(self.started.elapsed().as_secs_f64())
        );
    }
}
