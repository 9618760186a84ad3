// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The request queue: takes every available chain, answers it, fills the used ring.
//!
//! Owns: the order "take all available requests, one durability action for the
//! flushes among them, then complete them all" (this is where group commit happens),
//! and the rule that a bad chain is completed and logged, never allowed to wedge the
//! queue or panic. Never signals the guest (the caller does, once per pass).

use std::{collections::HashSet, time::Instant};

use log::{error, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use crate::{
    durability::Flusher,
    virtio_pmem::{
        parse_request, write_response, RequestType, VIRTIO_PMEM_RESP_EIO, VIRTIO_PMEM_RESP_OK,
    },
};

/// Errors that stop processing of the whole queue (the ring itself is unusable).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the available ring is unusable: {0}")]
    AvailRing(virtio_queue::Error),
    #[error("cannot write the used ring: {0}")]
    UsedRing(virtio_queue::Error),
}

/// Remembers which unsupported request types were logged, so each is logged once.
#[derive(Default)]
pub struct LogOnce(HashSet<u32>);

impl LogOnce {
    fn first(&mut self, ty: u32) -> bool {
        self.0.insert(ty)
    }
}

/// What one pass over the queue did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Chains put on the used ring.
    pub completed: usize,
    /// Flush requests among them.
    pub flushes: u64,
}

/// Processes every chain now available on `queue`. Flush requests in the pass share
/// one [`Flusher::flush_batch`]; unsupported types get EIO; malformed chains are
/// completed with 0 bytes written.
pub fn process_queue<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    flusher: &Flusher,
    unsupported: &mut LogOnce,
) -> Result<Pass, QueueError> {
    let taken = Instant::now();
    let mut answers = Vec::new();
    let mut malformed = Vec::new();
    let mut flushes = 0u64;
    {
        let chains: Vec<_> = queue.iter(mem).map_err(QueueError::AvailRing)?.collect();
        for chain in chains {
            let head = chain.head_index();
            match parse_request(mem, chain) {
                Ok(req) => {
                    if req.kind == RequestType::Flush {
                        flushes += 1;
                    }
                    answers.push((head, req));
                }
                Err(e) => {
                    error!("virtio-pmem: malformed request chain (head {head}): {e}; completed with no response");
                    malformed.push(head);
                }
            }
        }
    }

    let flush_status = if flushes == 0 {
        VIRTIO_PMEM_RESP_OK
    } else {
        match flusher.flush_batch(flushes, taken) {
            Ok(()) => VIRTIO_PMEM_RESP_OK,
            Err(e) => {
                error!("virtio-pmem: flush of {flushes} request(s) failed: {e}; answering EIO");
                VIRTIO_PMEM_RESP_EIO
            }
        }
    };

    let mut pass = Pass {
        completed: 0,
        flushes,
    };
    for (head, mut req) in answers {
        let status = match req.kind {
            RequestType::Flush => flush_status,
            RequestType::Unsupported(ty) => {
                flusher
                    .stats
                    .unsupported
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if unsupported.first(ty) {
                    warn!("virtio-pmem: unsupported request type {ty}; answering EIO (logged once per type)");
                }
                VIRTIO_PMEM_RESP_EIO
            }
        };
        let len = write_response(&mut req.response, status).unwrap_or_else(|e| {
            error!("virtio-pmem: cannot write the response of chain {head}: {e}");
            0
        });
        queue
            .add_used(mem, head, len)
            .map_err(QueueError::UsedRing)?;
        pass.completed += 1;
    }
    for head in malformed {
        flusher
            .stats
            .malformed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        queue.add_used(mem, head, 0).map_err(QueueError::UsedRing)?;
        pass.completed += 1;
    }
    Ok(pass)
}
