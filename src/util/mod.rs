// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Small helpers every floor may use: the busy marker, the guest log limiter, the
//! flush rate limit's token bucket, the wall clock, the poison-tolerant lock, and
//! accepting on a listener with a spare descriptor and back-off.
//!
//! Owns: nothing of the domain. Never imports from above the utilities floor.

pub mod accept;
pub mod busy;
pub mod guest_log;
pub mod rate;
pub mod time;

pub use self::{
    busy::{Busy, BusyGuard},
    guest_log::GuestLog,
    time::rfc3339_now,
};

/// Locks `m`, taking the data of a poisoned lock as it is: a thread that panicked
/// while holding it is recorded by `Services`, and the others go on.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
