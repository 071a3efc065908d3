//! Progress on stderr, readable both on a terminal and in a log file.
//!
//! On a terminal: a bar redrawn in place (epoch, step, loss, images/s, ETA)
//! and a line after each epoch. When stderr is not a terminal (a file, a
//! pipe, a CI log): no carriage returns; a line after each epoch and, within
//! an epoch, at most one step line every [`LOG_INTERVAL`] (tqdm's behaviour
//! under `disable=None`). Quiet (`progress = false`): epoch lines only.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Least time between two step lines when stderr is not a terminal.
pub const LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Least time between two redraws of the bar.
const BAR_INTERVAL: Duration = Duration::from_millis(200);

/// How steps are shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A bar redrawn in place (stderr is a terminal).
    Bar,
    /// A step line at most every [`LOG_INTERVAL`] (stderr is a file or pipe).
    Log,
    /// Epoch lines only.
    Quiet,
}

impl Mode {
    /// The mode for a run that asked for progress (`progress = true`) or
    /// not, given whether stderr is a terminal.
    pub fn choose(progress: bool, terminal: bool) -> Mode {
        match (progress, terminal) {
            (false, _) => Mode::Quiet,
            (true, true) => Mode::Bar,
            (true, false) => Mode::Log,
        }
    }
}

/// One step's figures.
#[derive(Clone, Debug)]
pub struct Step<'a> {
    /// Prefix of the line (`model 2: ` in an ensemble).
    pub label: &'a str,
    /// 1-based epoch, of `epochs`.
    pub epoch: usize,
    pub epochs: usize,
    /// 1-based step, of `steps`.
    pub step: usize,
    pub steps: usize,
    /// Mean loss of the epoch so far.
    pub loss: f64,
    pub images_per_s: f64,
    /// Seconds since the epoch started.
    pub elapsed_epoch: f64,
}

/// Reports training progress.
pub struct Progress {
    mode: Mode,
    /// Last bar redraw, or last line written in [`Mode::Log`].
    last_write: Instant,
    started: Instant,
    out: Box<dyn Write + Send>,
}

fn hms(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

impl Progress {
    /// Progress on stderr: a bar if `progress` and stderr is a terminal,
    /// timed step lines if `progress` and it is not, else epoch lines only.
    pub fn new(progress: bool) -> Self {
        let mode = Mode::choose(progress, std::io::stderr().is_terminal());
        Progress::to(mode, Box::new(std::io::stderr()))
    }

    /// Progress in `mode` written to `out`.
    pub fn to(mode: Mode, out: Box<dyn Write + Send>) -> Self {
        let now = Instant::now();
        Progress {
            mode,
            last_write: now,
            started: now,
            out,
        }
    }

    /// A reporter that prints nothing (ranks other than 0 of a
    /// distributed run): its lines go to a sink.
    pub fn silent() -> Self {
        Progress::to(Mode::Quiet, Box::new(std::io::sink()))
    }

    /// After a step.
    pub fn step(&mut self, s: &Step<'_>) {
        let due = match self.mode {
            Mode::Quiet => false,
            Mode::Bar => self.last_write.elapsed() >= BAR_INTERVAL || s.step >= s.steps,
            // The epoch's own line follows its last step.
            Mode::Log => self.last_write.elapsed() >= LOG_INTERVAL && s.step < s.steps,
        };
        if !due {
            return;
        }
        self.last_write = Instant::now();
        let eta = if s.step > 0 {
            s.elapsed_epoch / s.step as f64 * s.steps.saturating_sub(s.step) as f64
        } else {
            0.0
        };
        let (label, epoch, epochs, step, steps) = (s.label, s.epoch, s.epochs, s.step, s.steps);
        let figures = format!(
            "loss {:.4} {:.0} img/s ETA {}",
            s.loss,
            s.images_per_s,
            hms(eta)
        );
        if self.mode == Mode::Bar {
            let width = 24;
            let filled = (width * step).checked_div(steps).unwrap_or(0).min(width);
            let _ = write!(
                self.out,
                "\r{label}epoch {epoch}/{epochs} [{}{}] {step}/{steps} {figures}   ",
                "#".repeat(filled),
                ".".repeat(width - filled),
            );
            let _ = self.out.flush();
        } else {
            let elapsed = hms(self.started.elapsed().as_secs_f64());
            let _ = writeln!(
                self.out,
                "[{elapsed}] {label}epoch {epoch}/{epochs} step {step}/{steps} {figures}"
            );
            let _ = self.out.flush();
        }
    }

    /// A line (after an epoch; ends the bar's line).
    pub fn line(&mut self, text: &str) {
        if self.mode == Mode::Bar {
            let _ = write!(self.out, "\r{:100}\r", "");
        }
        let _ = writeln!(
            self.out,
            "[{}] {text}",
            hms(self.started.elapsed().as_secs_f64())
        );
        let _ = self.out.flush();
        if self.mode == Mode::Log {
            self.last_write = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer whose bytes the test reads back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn step(step: usize, steps: usize) -> Step<'static> {
        Step {
            label: "",
            epoch: 1,
            epochs: 2,
            step,
            steps,
            loss: 1.5,
            images_per_s: 100.0,
            elapsed_epoch: step as f64,
        }
    }

    #[test]
    fn mode_follows_the_terminal() {
        assert_eq!(Mode::choose(true, true), Mode::Bar);
        assert_eq!(Mode::choose(true, false), Mode::Log);
        assert_eq!(Mode::choose(false, true), Mode::Quiet);
        assert_eq!(Mode::choose(false, false), Mode::Quiet);
    }

    #[test]
    fn log_mode_writes_lines_without_carriage_returns_at_most_every_interval() {
        let buf = Shared::default();
        let mut p = Progress::to(Mode::Log, Box::new(buf.clone()));
        for s in 1..=1000 {
            p.step(&step(s, 1000));
        }
        p.line("epoch 1/2: loss 1.5");
        // Within the interval: no step line, only the epoch's line.
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains('\r'), "{text:?}");
        assert_eq!(text.lines().count(), 1, "{text:?}");
        // Past the interval: one step line, then none until the next.
        p.last_write -= LOG_INTERVAL;
        p.step(&step(10, 1000));
        p.step(&step(11, 1000));
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text:?}");
        assert!(
            lines[1].ends_with("epoch 1/2 step 10/1000 loss 1.5000 100 img/s ETA 0:16:30"),
            "{text:?}"
        );
        // The epoch's last step is left to the epoch's line.
        p.last_write -= LOG_INTERVAL;
        p.step(&step(1000, 1000));
        assert_eq!(
            buf.0
                .lock()
                .unwrap()
                .iter()
                .filter(|&&b| b == b'\n')
                .count(),
            2
        );
    }

    #[test]
    fn bar_mode_redraws_in_place() {
        let buf = Shared::default();
        let mut p = Progress::to(Mode::Bar, Box::new(buf.clone()));
        p.step(&step(5, 5));
        p.line("done");
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with("\repoch 1/2 [########################] 5/5 loss 1.5000"));
        assert!(text.ends_with("] done\n"), "{text:?}");
    }

    #[test]
    fn quiet_mode_prints_epoch_lines_only() {
        let buf = Shared::default();
        let mut p = Progress::to(Mode::Quiet, Box::new(buf.clone()));
        p.last_write -= LOG_INTERVAL;
        p.step(&step(1, 5));
        p.step(&step(5, 5));
        assert!(buf.0.lock().unwrap().is_empty());
        p.line("epoch 1/2: loss 1.5");
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text, "[0:00:00] epoch 1/2: loss 1.5\n");
    }
}
