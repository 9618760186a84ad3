// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The flush rate limit: its setting (`--flush-rate-limit OPS[,BURST]`) and the
//! token bucket that enforces it.
//!
//! Owns: what a valid limit is, and the bucket's arithmetic (integer only: a token
//! is 10^9 credits, a nanosecond adds `ops_per_sec` of them, so no rounding drifts).
//! Never reads a clock, sleeps or arms a timer: every call is given `now`, so tests
//! drive it with instants of their own, and the caller decides how to wait.

use std::{
    fmt,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// The most flushes per second, and the largest burst, a limit may name: beyond
/// that a limit means nothing for a device whose flushes are at best a few
/// microseconds (and the arithmetic stays far from overflowing).
pub const MAX_FLUSH_RATE: u32 = 1_000_000;

/// A flush rate limit: `ops_per_sec` flush requests per second on average, and up
/// to `burst` at once after a quiet spell (the bucket starts full).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct FlushRateLimit {
    pub ops_per_sec: u32,
    pub burst: u32,
}

impl FlushRateLimit {
    /// Parses `OPS[,BURST]`: whole numbers from 1 to [`MAX_FLUSH_RATE`]; BURST
    /// defaults to OPS (one second's worth).
    pub fn parse(s: &str) -> Result<Self, String> {
        let form = "expected OPS[,BURST]: flush requests per second and the burst, whole numbers \
                    from 1 to 1000000 (e.g. 100 or 100,10)";
        let mut parts = s.split(',');
        let ops = parts.next().unwrap_or_default();
        let burst = parts.next();
        if parts.next().is_some() {
            return Err(format!("bad flush rate limit {s:?}: {form}"));
        }
        let number = |what: &str, t: &str| -> Result<u32, String> {
            let t = t.trim();
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "bad flush rate limit {s:?}: {what} {t:?} is not a whole number; {form}"
                ));
            }
            match t.parse::<u64>() {
                Ok(0) => Err(format!(
                    "bad flush rate limit {s:?}: {what} must be at least 1 (leave the option out for no limit)"
                )),
                Ok(n) if n <= u64::from(MAX_FLUSH_RATE) => Ok(n as u32),
                _ => Err(format!(
                    "bad flush rate limit {s:?}: {what} must be at most {MAX_FLUSH_RATE}"
                )),
            }
        };
        let ops_per_sec = number("OPS", ops)?;
        let burst = match burst {
            Some(b) => number("BURST", b)?,
            None => ops_per_sec,
        };
        Ok(Self { ops_per_sec, burst })
    }
}

impl fmt::Display for FlushRateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.ops_per_sec, self.burst)
    }
}

/// The config file's `flush-rate-limit`: `"OPS[,BURST]"` like the flag, or a bare
/// number of flushes per second.
impl<'de> Deserialize<'de> for FlushRateLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Number(n) => n.to_string(),
            Raw::Text(t) => t,
        };
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Credits in one token.
const CREDITS_PER_TOKEN: u128 = 1_000_000_000;

/// A token bucket of `burst` tokens refilled at `ops_per_sec` tokens per second,
/// full at the start. One token is one flush request.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    ops_per_sec: u128,
    capacity: u128,
    /// Credits held at `last` (at most `capacity`).
    credits: u128,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket for `limit`, as of `now`.
    pub fn new(limit: FlushRateLimit, now: Instant) -> Self {
        let capacity = u128::from(limit.burst.max(1)) * CREDITS_PER_TOKEN;
        Self {
            ops_per_sec: u128::from(limit.ops_per_sec.max(1)),
            capacity,
            credits: capacity,
            last: now,
        }
    }

    /// Adds what accrued since the last call. Time never runs backwards here: an
    /// instant older than the last one adds nothing.
    fn refill(&mut self, now: Instant) {
        if now <= self.last {
            return;
        }
        let ns = now.duration_since(self.last).as_nanos();
        self.credits = ns
            .saturating_mul(self.ops_per_sec)
            .saturating_add(self.credits)
            .min(self.capacity);
        self.last = now;
    }

    /// Takes one token if there is one at `now`.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.credits >= CREDITS_PER_TOKEN {
            self.credits -= CREDITS_PER_TOKEN;
            true
        } else {
            false
        }
    }

    /// How long after `now` the next token is there (zero if one is now); never
    /// early: a [`Self::try_take`] at `now` plus this succeeds.
    pub fn next_token_in(&mut self, now: Instant) -> Duration {
        self.refill(now);
        let missing = CREDITS_PER_TOKEN.saturating_sub(self.credits);
        let ns = missing.div_ceil(self.ops_per_sec);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Whole tokens at `now`.
    pub fn tokens(&mut self, now: Instant) -> u64 {
        self.refill(now);
        u64::try_from(self.credits / CREDITS_PER_TOKEN).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(ops_per_sec: u32, burst: u32) -> FlushRateLimit {
        FlushRateLimit { ops_per_sec, burst }
    }

    #[test]
    fn the_setting_parses_ops_and_an_optional_burst() {
        assert_eq!(FlushRateLimit::parse("100").unwrap(), limit(100, 100));
        assert_eq!(FlushRateLimit::parse("100,10").unwrap(), limit(100, 10));
        assert_eq!(FlushRateLimit::parse(" 5 , 1 ").unwrap(), limit(5, 1));
        assert_eq!(
            FlushRateLimit::parse("1000000,1000000").unwrap(),
            limit(MAX_FLUSH_RATE, MAX_FLUSH_RATE)
        );
        assert_eq!(limit(100, 10).to_string(), "100,10");
    }

    #[test]
    fn zero_and_nonsense_are_refused_with_the_form() {
        for bad in [
            "",
            "0",
            "0,5",
            "5,0",
            "-1",
            "+5",
            "abc",
            "1.5",
            "1e3",
            "5,",
            ",5",
            "5,5,5",
            "0x10",
            "1000001",
            "5,1000001",
            "99999999999999999999",
        ] {
            let e = FlushRateLimit::parse(bad).expect_err(bad);
            assert!(e.starts_with("bad flush rate limit"), "{bad}: {e}");
        }
        assert!(FlushRateLimit::parse("0")
            .unwrap_err()
            .contains("at least 1"));
        assert!(FlushRateLimit::parse("7,x")
            .unwrap_err()
            .contains("OPS[,BURST]"));
        assert!(FlushRateLimit::parse("2000000")
            .unwrap_err()
            .contains("at most 1000000"));
    }

    #[test]
    fn a_full_bucket_gives_its_burst_then_nothing_until_time_passes() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(10, 3), t0);
        assert_eq!(b.tokens(t0), 3);
        assert!((0..3).all(|_| b.try_take(t0)));
        assert!(!b.try_take(t0));
        // 10 per second: one token every 100 ms.
        assert_eq!(b.next_token_in(t0), Duration::from_millis(100));
        assert!(!b.try_take(t0 + Duration::from_millis(99)));
        assert!(b.try_take(t0 + Duration::from_millis(100)));
        assert!(!b.try_take(t0 + Duration::from_millis(100)));
    }

    #[test]
    fn the_bucket_never_holds_more_than_its_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(1000, 4), t0);
        assert!((0..4).all(|_| b.try_take(t0)));
        // An hour idle refills it to the burst, not to 3.6 million.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.tokens(later), 4);
        assert!((0..4).all(|_| b.try_take(later)));
        assert!(!b.try_take(later));
        assert_eq!(b.next_token_in(later), Duration::from_millis(1));
    }

    #[test]
    fn the_wait_is_never_early_even_when_the_rate_does_not_divide_a_second() {
        let t0 = Instant::now();
        // 3 per second: 333333333.3 ns per token; the wait is rounded up.
        let mut b = TokenBucket::new(limit(3, 1), t0);
        assert!(b.try_take(t0));
        let mut now = t0;
        for _ in 0..1000 {
            let wait = b.next_token_in(now);
            assert!(wait > Duration::ZERO);
            assert!(
                !b.clone().try_take(now + wait - Duration::from_nanos(1)),
                "a token before the wait"
            );
            now += wait;
            assert!(b.try_take(now), "no token after the wait");
        }
        // A thousand tokens at 3/s took 1000/3 s, to the nanosecond (no drift).
        let took = now - t0;
        let exact = Duration::from_nanos(333_333_333_333);
        assert!(
            took >= exact && took <= exact + Duration::from_nanos(1000),
            "{took:?}"
        );
    }

    #[test]
    fn the_rate_holds_over_time_with_partial_credit_kept() {
        let t0 = Instant::now();
        // A burst of 2, so a token that is due between two asks is not lost to a
        // full bucket (with a burst of 1 it would be: the bucket is full at 10 ms,
        // and what accrues until the ask at 12 ms overflows).
        let mut b = TokenBucket::new(limit(100, 2), t0);
        assert!(b.try_take(t0) && b.try_take(t0));
        // Asked every 3 ms for 10 s: 100 per second go through, no more, no less.
        let mut granted = 0;
        for i in 1..=3334u64 {
            if b.try_take(t0 + Duration::from_millis(3 * i)) {
                granted += 1;
            }
        }
        assert_eq!(granted, 1000);
    }

    #[test]
    fn a_full_bucket_does_not_save_up_beyond_its_burst_between_asks() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(limit(100, 1), t0);
        assert!(b.try_take(t0));
        // Full again at 10 ms; asked every 12 ms, the 2 ms in between are lost.
        let granted = (1..=100u64)
            .filter(|i| b.try_take(t0 + Duration::from_millis(12 * i)))
            .count();
        assert_eq!(granted, 100);
    }

    #[test]
    fn an_older_instant_adds_nothing_and_takes_nothing_back() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(limit(1, 1), t0);
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0 - Duration::from_secs(5)));
        assert_eq!(b.next_token_in(t0), Duration::from_secs(1));
        assert!(b.try_take(t0 + Duration::from_secs(1)));
    }
}
