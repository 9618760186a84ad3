// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The rate limit on log lines a guest can cause.
//!
//! Owns: the window and its counters. Never drops a count (callers count every
//! message in their stats); only the log lines are limited.

use std::time::{Duration, Instant};

use log::warn;

/// Messages a guest can cause (malformed chains, unsupported request types): at
/// most [`GuestLog::BURST`] per [`GuestLog::WINDOW`], then one line saying how many
/// were held back. Constant memory whatever the guest sends; the counters in
/// `stats` count every one.
#[derive(Debug)]
pub struct GuestLog {
    /// What is being logged, for the "held back" line.
    what: &'static str,
    /// Where the held-back ones are counted, for the same line.
    hint: &'static str,
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl Default for GuestLog {
    fn default() -> Self {
        Self::new("guest request problem")
    }
}

impl GuestLog {
    pub const BURST: u32 = 10;
    pub const WINDOW: Duration = Duration::from_secs(60);

    pub const fn new(what: &'static str) -> Self {
        Self::with_hint(what, " (see `stats`)")
    }

    /// As [`Self::new`], saying `hint` (e.g. " (see `status`)") after the count
    /// of held-back messages.
    pub const fn with_hint(what: &'static str, hint: &'static str) -> Self {
        Self {
            what,
            hint,
            window_start: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// Lines logged in the current window.
    pub fn logged(&self) -> u32 {
        self.logged
    }

    /// Lines held back in the current window.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// Whether a message may be logged now (counting it as held back if not).
    pub fn allow(&mut self, now: Instant) -> bool {
        let expired = self
            .window_start
            .is_none_or(|t| now.duration_since(t) >= Self::WINDOW);
        if expired {
            if self.suppressed > 0 {
                warn!(
                    "{} more {}(s) in the last {:?} were not logged{}",
                    self.suppressed,
                    self.what,
                    Self::WINDOW,
                    self.hint
                );
            }
            self.window_start = Some(now);
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < Self::BURST {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_caused_messages_are_rate_limited_in_constant_memory() {
        let mut log = GuestLog::default();
        let t0 = Instant::now();
        let allowed = (0..10_240).filter(|_| log.allow(t0)).count();
        assert_eq!(allowed, GuestLog::BURST as usize);
        assert_eq!(log.suppressed, 10_240 - u64::from(GuestLog::BURST));
        // A new window logs again (and reports what it held back).
        assert!(log.allow(t0 + GuestLog::WINDOW));
        assert_eq!(log.suppressed, 0);
    }
}
