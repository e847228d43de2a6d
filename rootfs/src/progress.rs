//! Progress for long steps: a spinner on a terminal, a line every so often
//! in CI logs (where a spinner would print nothing).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    what: String,
    started: Instant,
    last_line: Instant,
    count: u64,
}

impl Progress {
    pub fn new(what: &str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(ProgressStyle::with_template("{spinner} {prefix} [{elapsed}] {pos} {msg}").unwrap());
            b.set_prefix(what.to_string());
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        eprintln!("==> {what}");
        Progress { bar, what: what.into(), started: Instant::now(), last_line: Instant::now(), count: 0 }
    }

    /// One more unit of work done, described by `msg`.
    pub fn tick(&mut self, msg: &str) {
        self.count += 1;
        match &self.bar {
            Some(b) => {
                b.set_position(self.count);
                b.set_message(msg.to_string());
            }
            None if self.last_line.elapsed() > Duration::from_secs(30) => {
                self.last_line = Instant::now();
                eprintln!("    {}: {} steps, {}s ({msg})", self.what, self.count, self.started.elapsed().as_secs());
            }
            None => {}
        }
    }

    pub fn finish(self, summary: &str) -> Duration {
        let took = self.started.elapsed();
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        eprintln!("    {}: {summary} ({:.1}s)", self.what, took.as_secs_f64());
        took
    }
}
