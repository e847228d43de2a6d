//! Progress for long steps (a distro build, an import, a VM boot): a spinner
//! or a bar on a terminal, a line every so often in logs (where a spinner
//! would print nothing). The xtask uses it too.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    what: String,
    started: Instant,
    last_line: Instant,
    count: u64,
    /// Bytes to go through, for a bar; none for a spinner counting steps.
    total: Option<u64>,
}

impl Progress {
    /// A spinner: `tick` counts steps.
    pub fn new(what: &str) -> Progress {
        Self::start(what, None)
    }

    /// A bar over `total` bytes: `advance` moves it.
    pub fn bytes(what: &str, total: u64) -> Progress {
        Self::start(what, Some(total))
    }

    fn start(what: &str, total: Option<u64>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = match total {
                Some(t) => {
                    let b = ProgressBar::new(t);
                    b.set_style(
                        ProgressStyle::with_template(
                            "{prefix} [{elapsed}] [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}) {msg}",
                        )
                        .unwrap()
                        .progress_chars("=> "),
                    );
                    b
                }
                None => {
                    let b = ProgressBar::new_spinner();
                    b.set_style(ProgressStyle::with_template("{spinner} {prefix} [{elapsed}] {pos} {msg}").unwrap());
                    b
                }
            };
            b.set_prefix(what.to_string());
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        eprintln!("==> {what}");
        Progress { bar, what: what.into(), started: Instant::now(), last_line: Instant::now(), count: 0, total }
    }

    /// One more unit of work done, described by `msg`.
    pub fn tick(&mut self, msg: &str) {
        self.count += 1;
        self.show(msg);
    }

    /// `n` more bytes done.
    pub fn advance(&mut self, n: u64) {
        self.count += n;
        self.show("");
    }

    fn show(&mut self, msg: &str) {
        match &self.bar {
            Some(b) => {
                b.set_position(self.count);
                if !msg.is_empty() {
                    b.set_message(msg.to_string());
                }
            }
            None if self.last_line.elapsed() > Duration::from_secs(30) => {
                self.last_line = Instant::now();
                let done = match self.total {
                    Some(t) => format!("{} of {} MiB", self.count >> 20, t >> 20),
                    None => format!("{} steps", self.count),
                };
                eprintln!("    {}: {done}, {}s {msg}", self.what, self.started.elapsed().as_secs());
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
