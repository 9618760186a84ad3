// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's long-lived threads (guard, media sources, control server, guest
//! channel): one way to start them, so that none dies silently.
//!
//! Owns: the thread boundary. A panic there is caught, logged, recorded for `status`
//! and handed to the service's own last word (the guard's is "make the data durable
//! and stop claiming an immutable map"). Never decides what a service does.

use std::{
    any::Any,
    io,
    panic::{self, AssertUnwindSafe},
    sync::{Arc, Mutex},
    thread::{self, JoinHandle},
};

use log::error;
use serde::{Deserialize, Serialize};

/// A service thread that ended by panicking.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceFailure {
    pub service: String,
    pub reason: String,
    /// RFC 3339.
    pub at: String,
}

/// The record of service threads that died.
#[derive(Default)]
pub struct Services {
    failed: Mutex<Vec<ServiceFailure>>,
}

impl Services {
    /// Starts `body` on a thread called `name`. If it panics, the panic is logged and
    /// recorded, then `last_word` runs with the reason (on the same thread).
    pub fn spawn<F, L>(
        self: &Arc<Self>,
        name: &str,
        last_word: L,
        body: F,
    ) -> io::Result<JoinHandle<()>>
    where
        F: FnOnce() + Send + 'static,
        L: FnOnce(&str) + Send + 'static,
    {
        let me = self.clone();
        let service = name.to_string();
        thread::Builder::new().name(name.into()).spawn(move || {
            if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(body)) {
                let reason = panic_message(payload.as_ref());
                error!("service thread {service} died: {reason}");
                me.failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(ServiceFailure {
                        service,
                        reason: reason.clone(),
                        at: crate::control::events::rfc3339_now(),
                    });
                last_word(&reason);
            }
        })
    }

    /// Services that died, in order.
    pub fn failures(&self) -> Vec<ServiceFailure> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-text payload".into())
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn a_panic_is_recorded_and_the_last_word_runs() {
        let services = Arc::new(Services::default());
        let (tx, rx) = mpsc::channel();
        services
            .spawn(
                "doomed",
                move |why| tx.send(why.to_string()).unwrap(),
                || panic!("boom {}", 7),
            )
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(rx.recv().unwrap(), "boom 7");
        let f = services.failures();
        assert_eq!(
            (f[0].service.as_str(), f[0].reason.as_str()),
            ("doomed", "boom 7")
        );
        // A service that returns normally is no failure.
        services
            .spawn("fine", |_| unreachable!(), || {})
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(services.failures().len(), 1);
    }
}
