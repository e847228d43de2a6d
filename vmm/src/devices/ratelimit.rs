//! A rate limit for log lines the guest can trigger at will (one per bad
//! request, per packet to a closed port...): without it a hostile guest can
//! fill the host's journal or the VMM's stderr pipe as fast as it can notify.
//!
//! Each kind of message gets its own [`LogLimit`], usually a `static`: at
//! most [`LogLimit::burst`] lines per window; the lines over that are counted
//! and the next line that goes through says how many were suppressed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines per window of every [`LogLimit::new`] limiter.
pub const DEFAULT_BURST: u32 = 5;
/// The window of every [`LogLimit::new`] limiter.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(1);

/// A limiter for one kind of log line. Thread-safe and `const`-constructible,
/// so it can be a `static` beside the code that logs.
pub struct LogLimit {
    burst: u32,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl LogLimit {
    pub const fn new() -> LogLimit {
        LogLimit::with(DEFAULT_BURST, DEFAULT_WINDOW)
    }

    pub const fn with(burst: u32, window: Duration) -> LogLimit {
        LogLimit { burst, window, state: Mutex::new(State { window_start: None, in_window: 0, suppressed: 0 }) }
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Whether a line may be logged now: `Some(n)` with the number of lines
    /// suppressed since the last one logged, `None` to stay quiet.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    /// [`Self::check`] at a given time (tests inject their clock here).
    pub fn check_at(&self, now: Instant) -> Option<u64> {
        // A poisoned lock only means another thread panicked mid-log: the
        // counters are still usable.
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let expired = s.window_start.is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            s.window_start = Some(now);
            s.in_window = 0;
        }
        if s.in_window >= self.burst {
            s.suppressed += 1;
            return None;
        }
        s.in_window += 1;
        Some(std::mem::take(&mut s.suppressed))
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit::new()
    }
}

/// `warn_limited!(LIMIT, fmt, args...)`: a `tracing::warn!` that goes through
/// the [`LogLimit`] `LIMIT`, saying how many lines it held back.
#[macro_export]
macro_rules! warn_limited {
    ($limit:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limit.check() {
            if suppressed > 0 {
                tracing::warn!(suppressed, $($arg)+);
            } else {
                tracing::warn!($($arg)+);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_silence_then_the_count_of_what_was_suppressed() {
        let l = LogLimit::with(3, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(l.check_at(t0), Some(0));
        assert_eq!(l.check_at(t0), Some(0));
        assert_eq!(l.check_at(t0 + Duration::from_millis(10)), Some(0));
        for i in 0..100 {
            assert_eq!(l.check_at(t0 + Duration::from_millis(20 + i)), None);
        }
        // A new window: one line through, carrying the count.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.check_at(t1), Some(100));
        assert_eq!(l.check_at(t1), Some(0));
    }

    #[test]
    fn the_macro_compiles_and_counts() {
        static L: LogLimit = LogLimit::new();
        for _ in 0..(DEFAULT_BURST + 10) {
            crate::warn_limited!(L, "test line {}", 1);
        }
        assert_eq!(L.check_at(Instant::now() + DEFAULT_WINDOW * 2), Some(10));
    }
}
