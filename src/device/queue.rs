// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The request queue: takes every available chain, answers it, fills the used ring.
//!
//! Owns: the order "take all available requests, one durability action for the
//! flushes among them, then complete them all" (this is where group commit happens),
//! the flush rate limit's place in it (a flush without a token is left on the ring,
//! and the pass stops there), and the rule that a bad chain is completed and logged
//! (rate-limited: the guest controls how many), never allowed to wedge the queue or
//! panic. Never signals the guest and never waits (the caller does both: it signals
//! once per pass, and arms the limit's timer when a pass held a flush back).

use std::{
    io,
    num::Wrapping,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use log::{error, warn};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use crate::{
    device::wire::{
        parse_request, write_response, Request, RequestType, VIRTIO_PMEM_RESP_EIO,
        VIRTIO_PMEM_RESP_OK,
    },
    durability::Flusher,
    sys::Timer,
    util::{
        lock,
        rate::{FlushRateLimit, TokenBucket},
        GuestLog,
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

/// What one pass over the queue did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Chains put on the used ring.
    pub completed: usize,
    /// Flush requests among them.
    pub flushes: u64,
}

/// One chain taken off the ring, waiting for its answer.
#[derive(Clone, Copy)]
struct Taken {
    head: u16,
    /// `None`: malformed, completed with nothing written.
    request: Option<Request>,
}

/// Counters of what the guest put on the ring that was not a flush, and the flush
/// rate limit, over the daemon's life (every connection adds to the same ones and
/// draws on the same bucket).
#[derive(Default)]
pub struct QueueStats {
    pub malformed: AtomicU64,
    pub unsupported: AtomicU64,
    /// Set while a queue pass is in progress (the watchdog reads it).
    pub pass: crate::util::Busy,
    /// The flush rate limit, if one is configured.
    pub limiter: Option<FlushLimiter>,
}

/// A point-in-time copy of [`QueueStats`], for `stats`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueCounters {
    pub malformed_chains: u64,
    pub unsupported_requests: u64,
    /// Flush requests the rate limit held back before they were answered (0
    /// without a limit).
    #[serde(default)]
    pub flush_throttled: u64,
    /// Their waits added up, µs: from the pass that first saw each one on the ring
    /// to the pass that took it.
    #[serde(default)]
    pub flush_throttled_us: u64,
}

impl QueueStats {
    /// The counters, with the flush rate limit `limit` if given (its timer is
    /// created here: before the sandbox, which allows arming it, not creating it).
    pub fn with_limit(limit: Option<FlushRateLimit>) -> io::Result<Self> {
        Ok(Self {
            limiter: limit.map(FlushLimiter::new).transpose()?,
            ..Self::default()
        })
    }

    pub fn snapshot(&self) -> QueueCounters {
        let (throttled, throttled_ns) = self.limiter.as_ref().map_or((0, 0), |l| {
            (
                l.throttled.load(Ordering::Relaxed),
                l.throttled_ns.load(Ordering::Relaxed),
            )
        });
        QueueCounters {
            malformed_chains: self.malformed.load(Ordering::Relaxed),
            unsupported_requests: self.unsupported.load(Ordering::Relaxed),
            flush_throttled: throttled,
            flush_throttled_us: throttled_ns / 1000,
        }
    }
}

/// The flush rate limit of the device: the token bucket every connection draws
/// on, the timer the vring worker waits on while a flush is held back, and what
/// the limit did.
///
/// A flush without a token is never failed and never waited for in the pass: it
/// stays on the available ring (the pass stops in front of it, so the order of the
/// ring is kept), and the pass reports when the next token is due. The vring
/// worker arms [`Self::timer`] for then (it is in the worker's epoll set) and goes
/// back to waiting, so kicks, the VMM's messages and the exit event are served
/// meanwhile, and an idle device arms nothing. A chain left on the ring belongs to
/// the driver until it is taken: a VMM that stops the ring gets a base in front of
/// it and hands it to the next start.
pub struct FlushLimiter {
    pub limit: FlushRateLimit,
    bucket: Mutex<TokenBucket>,
    pub timer: Timer,
    throttled: AtomicU64,
    throttled_ns: AtomicU64,
    /// Set while a flush is held back (for `status`).
    holding: AtomicBool,
}

impl FlushLimiter {
    pub fn new(limit: FlushRateLimit) -> io::Result<Self> {
        Ok(Self {
            limit,
            bucket: Mutex::new(TokenBucket::new(limit, Instant::now())),
            timer: Timer::new()?,
            throttled: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
            holding: AtomicBool::new(false),
        })
    }

    /// Whether a flush is held back on the ring now.
    pub fn holding(&self) -> bool {
        self.holding.load(Ordering::Relaxed)
    }

    /// Fills the bucket and holds its clock (its last refill an hour ahead), so
    /// only the next call gives tokens again: tests drive the limit without time.
    #[cfg(test)]
    pub(crate) fn refill_and_hold(&self) {
        let ahead = Instant::now() + Duration::from_secs(3600);
        *lock(&self.bucket) = TokenBucket::new(self.limit, ahead);
    }

    /// Nothing is held back any more (the ring was stopped or reset): the timer is
    /// disarmed.
    pub fn release(&self) {
        self.holding.store(false, Ordering::Relaxed);
        let _ = self.timer.disarm();
    }
}

/// When each position of the available ring was first seen, so a flush the limit
/// held back is counted once, with its wait, when a later pass takes it. Kept
/// per connection, only with a limit.
struct Arrivals {
    /// By ring position modulo [`MAX_QUEUE_SIZE`] (at most a ring's worth of chains
    /// is ever outstanding, and 2^16 is a multiple of it).
    seen: Vec<Instant>,
    /// Positions from the queue's next one up to this one have a time in `seen`.
    upto: Wrapping<u16>,
}

impl Arrivals {
    fn new() -> Self {
        Self {
            seen: vec![Instant::now(); usize::from(MAX_QUEUE_SIZE)],
            upto: Wrapping(0),
        }
    }

    fn slot(pos: Wrapping<u16>) -> usize {
        usize::from(pos.0 % MAX_QUEUE_SIZE)
    }

    /// Records `now` for the positions before `avail` not seen yet, for a pass
    /// that starts at `start` on a ring of `size`; returns how many positions from
    /// `start` on were seen by an earlier pass (those are flushes held back).
    fn note(&mut self, start: Wrapping<u16>, avail: Wrapping<u16>, now: Instant, size: u16) -> u16 {
        let mut known = (self.upto - start).0;
        if known > size {
            // The ring was reset or restarted elsewhere: nothing is known of it.
            known = 0;
            self.upto = start;
        }
        if (avail - start).0 <= size {
            self.mark(avail, now);
        }
        known
    }

    /// Records `now` for the positions from `upto` to `end` (not included).
    fn mark(&mut self, end: Wrapping<u16>, now: Instant) {
        while self.upto != end {
            self.seen[Self::slot(self.upto)] = now;
            self.upto += 1;
        }
    }
}

/// What the queue keeps from one pass to the next: the list of chains a pass took
/// (allocated once, for the largest ring, so a pass never allocates), the log of
/// guest-caused problems and their counters.
pub struct QueueState {
    taken: Vec<Taken>,
    pub log: GuestLog,
    pub stats: Arc<QueueStats>,
    /// With a flush rate limit: when the chains on the ring were first seen.
    arrivals: Option<Arrivals>,
    /// Set by a pass that left a flush on the ring for want of a token: when the
    /// next token is due, from the pass's start.
    held_back: Option<Duration>,
}

impl QueueState {
    pub fn new(stats: Arc<QueueStats>) -> Self {
        Self {
            taken: Vec::with_capacity(usize::from(MAX_QUEUE_SIZE)),
            log: GuestLog::default(),
            arrivals: stats.limiter.as_ref().map(|_| Arrivals::new()),
            stats,
            held_back: None,
        }
    }

    /// Whether the last pass stopped in front of a flush the rate limit held back,
    /// and if so how long after its start the next token is due (the caller comes
    /// back then; the flush is still on the ring).
    pub fn held_back(&self) -> Option<Duration> {
        self.held_back
    }
}

/// The largest ring the device offers (vhost-user-backend
/// refuses larger ones): a pass takes at most one ring's worth of chains.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// Processes every chain now available on `queue`: each chain is walked once as it
/// is taken; the flush requests among them share one [`Flusher::flush_batch`];
/// unsupported types get EIO; malformed chains are completed with 0 bytes written.
/// With a flush rate limit each flush takes a token first; at the first flush
/// without one the pass stops, leaving it (and what follows it) on the ring, and
/// [`QueueState::held_back`] says when to come back.
pub fn process_queue<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    flusher: &Flusher,
    state: &mut QueueState,
) -> Result<Pass, QueueError> {
    // Not a clone of the Arc: the pass marks itself with two relaxed stores only.
    let stats: &QueueStats = &state.stats;
    let _busy = stats.pass.enter();
    let taken_at = Instant::now();
    let mut flushes = 0u64;
    state.taken.clear();
    state.held_back = None;
    // With a limit: the bucket (for the whole pass), where the pass starts and how
    // many chains from there on an earlier pass saw (held back then).
    let mut limited = match (stats.limiter.as_ref(), state.arrivals.as_mut()) {
        (Some(limiter), Some(arrivals)) => {
            let start = Wrapping(queue.next_avail());
            let avail = queue
                .avail_idx(mem, Ordering::Acquire)
                .map_err(QueueError::AvailRing)?;
            let known = arrivals.note(start, avail, taken_at, queue.size());
            Some((limiter, lock(&limiter.bucket), arrivals, start, known))
        }
        _ => None,
    };
    let mut iter = queue.iter(mem).map_err(QueueError::AvailRing)?;
    let mut position = 0u16;
    while let Some(chain) = iter.next() {
        let head = chain.head_index();
        let request = match parse_request(mem, chain) {
            Ok(req) => Some(req),
            Err(e) => {
                if state.log.allow(taken_at) {
                    error!("virtio-pmem: malformed request chain (head {head}): {e}; completed with no response");
                }
                None
            }
        };
        if request.is_some_and(|r| r.kind == RequestType::Flush) {
            if let Some((limiter, bucket, arrivals, start, known)) = limited.as_mut() {
                let pos = *start + Wrapping(position);
                if !bucket.try_take(taken_at) {
                    // Left on the ring, first seen now at the latest.
                    iter.go_to_previous_position();
                    if (arrivals.upto - *start).0 <= position {
                        arrivals.mark(pos + Wrapping(1), taken_at);
                    }
                    limiter.holding.store(true, Ordering::Relaxed);
                    state.held_back = Some(bucket.next_token_in(taken_at));
                    break;
                }
                if position < *known {
                    let waited =
                        taken_at.saturating_duration_since(arrivals.seen[Arrivals::slot(pos)]);
                    limiter.throttled.fetch_add(1, Ordering::Relaxed);
                    limiter.throttled_ns.fetch_add(
                        u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX),
                        Ordering::Relaxed,
                    );
                }
            }
            flushes += 1;
        }
        state.taken.push(Taken { head, request });
        position = position.wrapping_add(1);
    }
    if let Some((limiter, ..)) = limited.take() {
        if state.held_back.is_none() {
            limiter.holding.store(false, Ordering::Relaxed);
        }
    }

    let flush_status = if flushes == 0 {
        VIRTIO_PMEM_RESP_OK
    } else {
        match flusher.flush_batch(flushes, taken_at) {
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
    let size = queue.size();
    for Taken { head, request } in state.taken.drain(..) {
        if head >= size {
            // A head index past the ring (the driver's bug) names no descriptor the
            // driver could get back: there is nothing to complete. Skipping it keeps
            // the chains after it answered (found by the fuzzer: `add_used` refuses
            // it, which used to end the pass and strand the rest of the batch).
            state.stats.malformed.fetch_add(1, Ordering::Relaxed);
            if state.log.allow(taken_at) {
                error!("virtio-pmem: head index {head} is past the ring of {size}; not completed");
            }
            continue;
        }
        let len = match request {
            None => {
                state.stats.malformed.fetch_add(1, Ordering::Relaxed);
                0
            }
            Some(req) => {
                let status = match req.kind {
                    RequestType::Flush => flush_status,
                    RequestType::Unsupported(ty) => {
                        state.stats.unsupported.fetch_add(1, Ordering::Relaxed);
                        if state.log.allow(taken_at) {
                            warn!("virtio-pmem: unsupported request type {ty}; answering EIO");
                        }
                        VIRTIO_PMEM_RESP_EIO
                    }
                };
                write_response(mem, &req.status, status).unwrap_or_else(|e| {
                    error!("virtio-pmem: cannot write the response of chain {head}: {e}");
                    0
                })
            }
        };
        queue
            .add_used(mem, head, len)
            .map_err(QueueError::UsedRing)?;
        pass.completed += 1;
    }
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use std::{fs::File, os::fd::OwnedFd, os::unix::net::UnixStream, sync::atomic::Ordering};

    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::{
        desc::{split::Descriptor as SplitDescriptor, RawDescriptor},
        mock::MockSplitQueue,
    };
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::{
        device::wire::{MAX_CHAIN_LEN, VIRTIO_PMEM_REQ_TYPE_FLUSH},
        durability::Policy,
    };

    const QUEUE_LEN: u16 = 64;
    const MEM_SIZE: usize = 1 << 20;
    /// Request and status buffers are carved from here up.
    const DATA_START: u64 = 0x1_0000;
    /// A status buffer nobody wrote to yet.
    const UNTOUCHED: u32 = 0xdead_beef;
    /// Beyond the end of guest memory.
    const OUTSIDE: u64 = 0x1_0000_0000;

    /// One descriptor as a test writes it: address, length, device-writable.
    #[derive(Clone, Copy)]
    struct D(u64, u32, bool);

    /// Plays the driver: writes chains into guest memory and reads the used ring.
    struct Driver<'a> {
        mem: &'a GuestMemoryMmap,
        mock: MockSplitQueue<'a, GuestMemoryMmap>,
        queue: Queue,
        next_desc: u16,
        next_buf: u64,
        used_seen: u16,
        flusher: Flusher,
        state: QueueState,
    }

    impl<'a> Driver<'a> {
        fn new(mem: &'a GuestMemoryMmap, policy: Policy) -> Self {
            Self::with_file(mem, tempfile::tempfile().unwrap(), policy)
        }

        fn with_file(mem: &'a GuestMemoryMmap, file: File, policy: Policy) -> Self {
            let mock = MockSplitQueue::new(mem, QUEUE_LEN);
            let queue = mock.create_queue::<Queue>().unwrap();
            Self {
                mem,
                mock,
                queue,
                next_desc: 0,
                next_buf: DATA_START,
                used_seen: 0,
                flusher: Flusher::new(file, policy),
                state: QueueState::new(Arc::default()),
            }
        }

        /// A buffer of `len` bytes, each 4-byte word set to `word`.
        fn buf(&mut self, len: u32, word: u32) -> u64 {
            let addr = self.next_buf;
            self.next_buf += u64::from(len).next_multiple_of(16);
            let bytes: Vec<u8> = word
                .to_le_bytes()
                .into_iter()
                .cycle()
                .take(len as usize)
                .collect();
            self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
            addr
        }

        /// Puts one chain on the available ring; returns its head index.
        fn submit(&mut self, descs: &[D]) -> u16 {
            let head = self.next_desc;
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, &D(addr, len, writable))| {
                    let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
                    if i + 1 < descs.len() {
                        flags |= VRING_DESC_F_NEXT;
                    }
                    let next = head + i as u16 + 1;
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
                })
                .collect();
            self.mock.add_desc_chains(&raw, head).unwrap();
            self.next_desc += descs.len() as u16;
            head
        }

        /// A well-formed request of type `ty`; returns the head and the status address.
        fn request(&mut self, ty: u32) -> (u16, u64) {
            let req = self.buf(4, ty);
            let status = self.buf(4, UNTOUCHED);
            (self.submit(&[D(req, 4, false), D(status, 4, true)]), status)
        }

        fn run(&mut self) -> Pass {
            process_queue(&mut self.queue, self.mem, &self.flusher, &mut self.state).unwrap()
        }

        /// Used ring entries (head, len) added since the last call.
        fn used(&mut self) -> Vec<(u16, u32)> {
            let idx = self.mock.used().idx().load();
            let mut out = Vec::new();
            while self.used_seen != idx {
                let e = self
                    .mock
                    .used()
                    .ring()
                    .ref_at(usize::from(self.used_seen % QUEUE_LEN))
                    .unwrap()
                    .load();
                out.push((e.id() as u16, e.len()));
                self.used_seen = self.used_seen.wrapping_add(1);
            }
            out
        }

        fn status(&self, addr: u64) -> u32 {
            self.mem.read_obj(GuestAddress(addr)).unwrap()
        }

        fn stat(&self, counter: &std::sync::atomic::AtomicU64) -> u64 {
            counter.load(Ordering::Relaxed)
        }

        /// A malformed chain is completed with 0 bytes and the queue still serves the
        /// next request.
        fn assert_completed_empty_then_usable(&mut self, head: u16, status: Option<u64>) {
            assert_eq!(self.run(), pass(1, 0));
            assert_eq!(self.used(), vec![(head, 0)]);
            if let Some(s) = status {
                assert_eq!(self.status(s), UNTOUCHED, "a rejected chain got a response");
            }
            assert_eq!(self.stat(&self.state.stats.malformed), 1);
            assert_eq!(self.stat(&self.flusher.stats.requests), 0);

            let (good, status) = self.request(VIRTIO_PMEM_REQ_TYPE_FLUSH);
            assert_eq!(self.run(), pass(1, 1));
            assert_eq!(self.used(), vec![(good, 4)]);
            assert_eq!(self.status(status), VIRTIO_PMEM_RESP_OK);
            assert_eq!(self.stat(&self.state.stats.malformed), 1);
        }
    }

    /// What a pass should have done: chains completed, flushes among them.
    fn pass(completed: usize, flushes: u64) -> Pass {
        Pass { completed, flushes }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    #[test]
    fn a_flush_is_answered_ok_with_a_four_byte_used_entry() {
        let mem = memory();
        let mut d = Driver::new(&mem, Policy::Fsync);
        let (head, status) = d.request(VIRTIO_PMEM_REQ_TYPE_FLUSH);
        assert_eq!(d.run(), pass(1, 1));
        assert_eq!(d.used(), vec![(head, 4)]);
        assert_eq!(d.status(status), VIRTIO_PMEM_RESP_OK);
        let s = d.flusher.stats.snapshot();
        assert_eq!(
            (s.flush_requests, s.batches, s.syncs, s.errors),
            (1, 1, 1, 0)
        );
        assert_eq!(s.latency_us.count, 1);
        // Nothing new on the ring: an empty pass completes nothing and syncs nothing.
        assert_eq!(d.run(), Pass::default());
        assert_eq!(d.flusher.stats.snapshot().syncs, 1);
    }

    #[test]
    fn flushes_taken_in_one_pass_share_one_sync() {
        for (policy, syncs) in [
            (Policy::Fsync, 1),
            (Policy::Datasync, 1),
            (Policy::Volatile, 0),
        ] {
            let mem = memory();
            let mut d = Driver::new(&mem, policy);
            let reqs: Vec<_> = (0..8)
                .map(|_| d.request(VIRTIO_PMEM_REQ_TYPE_FLUSH))
                .collect();
            assert_eq!(d.run(), pass(8, 8), "{policy}");
            let used = d.used();
            assert_eq!(used.len(), 8, "{policy}");
            for ((head, status), entry) in reqs.iter().zip(&used) {
                assert_eq!(*entry, (*head, 4), "{policy}");
                assert_eq!(d.status(*status), VIRTIO_PMEM_RESP_OK, "{policy}");
            }
            let s = d.flusher.stats.snapshot();
            assert_eq!(s.flush_requests, 8, "{policy}");
            assert_eq!(s.batches, 1, "{policy}");
            assert_eq!(s.syncs, syncs, "{policy}");
        }
    }

    /// Group commit, exactly: the first request's sync is held until 15 more are on
    /// the ring. Those 15 arrived after that sync started, so they must not be
    /// answered by it (one pass completes only the first), and they share one sync
    /// (the next pass): 2 syncs for 16 requests, neither 1 nor 16.
    #[test]
    fn requests_queued_during_a_sync_share_the_next_one() {
        use std::sync::{mpsc, Mutex};
        let mem = memory();
        let mut d = Driver::new(&mem, Policy::Datasync);
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let first = std::sync::atomic::AtomicBool::new(true);
        d.flusher.set_sync_hook(Box::new(move || {
            if first.swap(false, Ordering::SeqCst) {
                entered_tx.send(()).unwrap();
                release_rx.lock().unwrap().recv().unwrap();
            }
        }));
        let mut statuses = vec![d.request(VIRTIO_PMEM_REQ_TYPE_FLUSH).1];
        // Chains for the 15 late requests, written now, published during the sync.
        let late: Vec<Vec<RawDescriptor>> = (0..15)
            .map(|_| {
                let req = d.buf(4, VIRTIO_PMEM_REQ_TYPE_FLUSH);
                let status = d.buf(4, UNTOUCHED);
                statuses.push(status);
                vec![
                    RawDescriptor::from(SplitDescriptor::new(req, 4, VRING_DESC_F_NEXT as u16, 0)),
                    RawDescriptor::from(SplitDescriptor::new(
                        status,
                        4,
                        VRING_DESC_F_WRITE as u16,
                        0,
                    )),
                ]
            })
            .collect();
        let Driver {
            mock,
            queue,
            flusher,
            state,
            next_desc,
            ..
        } = &mut d;
        let first_pass = std::thread::scope(|s| {
            let worker = s.spawn(|| process_queue(queue, &mem, flusher, state).unwrap());
            entered_rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("the first sync never started");
            for chain in &late {
                let head = *next_desc;
                let chain: Vec<RawDescriptor> = chain
                    .iter()
                    .enumerate()
                    .map(|(i, raw)| {
                        let desc = SplitDescriptor::from(*raw);
                        RawDescriptor::from(SplitDescriptor::new(
                            desc.addr().0,
                            desc.len(),
                            desc.flags(),
                            head + i as u16 + 1,
                        ))
                    })
                    .collect();
                mock.add_desc_chains(&chain, head).unwrap();
                *next_desc += 2;
            }
            release_tx.send(()).unwrap();
            worker.join().unwrap()
        });
        assert_eq!(first_pass, pass(1, 1));
        assert_eq!(d.run(), pass(15, 15));
        assert_eq!(d.used().len(), 16);
        for s in statuses {
            assert_eq!(d.status(s), VIRTIO_PMEM_RESP_OK);
        }
        let s = d.flusher.stats.snapshot();
        assert_eq!((s.flush_requests, s.batches, s.syncs), (16, 2, 2));
    }

    /// A driver whose queue has a flush rate limit of `burst` tokens and a bucket
    /// whose clock is held: it never refills by itself (its last refill is an
    /// hour ahead), only when [`refill`] puts a fresh full one in. No timing.
    fn limited(mem: &GuestMemoryMmap, burst: u32) -> Driver<'_> {
        let limit = FlushRateLimit {
            ops_per_sec: 1,
            burst,
        };
        let mut d = Driver::new(mem, Policy::Fsync);
        d.state = QueueState::new(Arc::new(QueueStats::with_limit(Some(limit)).unwrap()));
        refill(&d);
        d
    }

    fn refill(d: &Driver) {
        d.state.stats.limiter.as_ref().unwrap().refill_and_hold();
    }

    #[test]
    fn a_flush_over_the_limit_stays_on_the_ring_until_a_token_and_is_then_answered_ok() {
        let mem = memory();
        let mut d = limited(&mem, 3);
        let reqs: Vec<_> = (0..8)
            .map(|_| d.request(VIRTIO_PMEM_REQ_TYPE_FLUSH))
            .collect();
        // The burst goes through at once; the pass stops in front of the fourth.
        assert_eq!(
            d.run(),
            Pass {
                completed: 3,
                flushes: 3
            }
        );
        assert!(d.state.held_back().is_some());
        assert_eq!(
            d.queue.next_avail(),
            3,
            "the held flush is left on the ring"
        );
        let used = d.used();
        assert_eq!(
            used,
            reqs[..3].iter().map(|(h, _)| (*h, 4)).collect::<Vec<_>>()
        );
        for (_, status) in &reqs[3..] {
            assert_eq!(d.status(*status), UNTOUCHED, "a held flush was answered");
        }
        assert!(d.state.stats.limiter.as_ref().unwrap().holding());
        assert_eq!(d.state.stats.snapshot().flush_throttled, 0);
        // No token, no progress: another pass (a kick) takes nothing.
        assert_eq!(d.run(), Pass::default());
        assert!(d.state.held_back().is_some());
        // Tokens come: the held ones are taken in order, counted once each.
        refill(&d);
        assert_eq!(d.run().completed, 3);
        assert_eq!(d.state.stats.snapshot().flush_throttled, 3);
        assert!(d.state.held_back().is_some());
        refill(&d);
        assert_eq!(
            d.run(),
            Pass {
                completed: 2,
                flushes: 2
            }
        );
        assert_eq!(d.state.held_back(), None);
        assert!(!d.state.stats.limiter.as_ref().unwrap().holding());
        let mut used = used;
        used.extend(d.used());
        assert_eq!(used, reqs.iter().map(|(h, _)| (*h, 4)).collect::<Vec<_>>());
        for (_, status) in &reqs {
            assert_eq!(d.status(*status), VIRTIO_PMEM_RESP_OK);
        }
        let q = d.state.stats.snapshot();
        assert_eq!(q.flush_throttled, 5);
        // Every flush was answered after a sync that started after it was taken:
        // one per pass that took flushes.
        let s = d.flusher.stats.snapshot();
        assert_eq!((s.flush_requests, s.errors, s.syncs), (8, 0, 3));
    }

    #[test]
    fn requests_behind_a_held_flush_wait_in_order_and_other_types_need_no_token() {
        let mem = memory();
        let mut d = limited(&mem, 1);
        let (u1, su1) = d.request(7);
        let (f1, sf1) = d.request(VIRTIO_PMEM_REQ_TYPE_FLUSH);
        let (_, sf2) = d.request(VIRTIO_PMEM_REQ_TYPE_FLUSH);
        let (_, su2) = d.request(7);
        assert_eq!(
            d.run(),
            Pass {
                completed: 2,
                flushes: 1
            }
        );
        assert_eq!(d.used(), vec![(u1, 4), (f1, 4)]);
        assert_eq!(d.status(su1), VIRTIO_PMEM_RESP_EIO);
        assert_eq!(d.status(sf1), VIRTIO_PMEM_RESP_OK);
        // The unsupported request behind the held flush keeps its place.
        assert_eq!((d.status(sf2), d.status(su2)), (UNTOUCHED, UNTOUCHED));
        refill(&d);
        assert_eq!(
            d.run(),
            Pass {
                completed: 2,
                flushes: 1
            }
        );
        assert_eq!(d.status(sf2), VIRTIO_PMEM_RESP_OK);
        assert_eq!(d.status(su2), VIRTIO_PMEM_RESP_EIO);
        assert_eq!(d.state.stats.snapshot().flush_throttled, 1);
        assert_eq!(d.state.held_back(), None);
    }

    #[test]
    fn without_a_limit_nothing_is_held_or_counted() {
        let mem = memory();
        let mut d = Driver::new(&mem, Policy::Volatile);
        for _ in 0..32 {
            d.request(VIRTIO_PMEM_REQ_TYPE_FLUSH);
        }
        assert_eq!(d.run().completed, 32);
        assert_eq!(d.state.held_back(), None);
        let q = d.state.stats.snapshot();
        assert_eq!((q.flush_throttled, q.flush_throttled_us), (0, 0));
    }

    #[test]
    fn thousands_of_distinct_unsupported_types_are_all_answered_and_counted() {
        let mem = memory();
        let mut state = QueueState::new(Arc::default());
        // The mock ring does not wrap: a fresh queue every 16 requests, one log.
        for round in 0..80u32 {
            let mut d = Driver::new(&mem, Policy::Fsync);
            d.state = state;
            let reqs: Vec<_> = (0..16).map(|i| d.request(1000 + round * 16 + i)).collect();
            assert_eq!(d.run().completed, 16);
            for (_, status) in reqs {
                assert_eq!(d.status(status), VIRTIO_PMEM_RESP_EIO);
            }
            state = d.state;
        }
        assert_eq!(state.stats.snapshot().unsupported_requests, 1280);
        let log = state.log;
        assert_eq!(log.logged(), GuestLog::BURST);
        assert_eq!(log.suppressed(), 1280 - u64::from(GuestLog::BURST));
    }

    #[test]
    fn an_unknown_request_type_gets_eio_and_no_sync() {
        let mem = memory();
        let mut d = Driver::new(&mem, Policy::Fsync);
        let (head, status) = d.request(7);
        let (again, status2) = d.request(7);
        assert_eq!(d.run(), pass(2, 0));
        assert_eq!(d.used(), vec![(head, 4), (again, 4)]);
        assert_eq!(d.status(status), VIRTIO_PMEM_RESP_EIO);
        assert_eq!(d.status(status2), VIRTIO_PMEM_RESP_EIO);
        let (s, q) = (d.flusher.stats.snapshot(), d.state.stats.snapshot());
        assert_eq!(
            (q.unsupported_requests, s.flush_requests, s.syncs),
            (2, 0, 0)
        );
    }

    #[test]
    fn a_failed_sync_answers_every_flush_of_the_batch_with_eio() {
        // fsync(2) on a socket fails with EINVAL: a real failing sync, no mocking.
        let (sock, _peer) = UnixStream::pair().unwrap();
        let file = File::from(OwnedFd::from(sock));
        let mem = memory();
        let mut d = Driver::with_file(&mem, file, Policy::Fsync);
        let (a, sa) = d.request(VIRTIO_PMEM_REQ_TYPE_FLUSH);
        let (b, sb) = d.request(VIRTIO_PMEM_REQ_TYPE_FLUSH);
        assert_eq!(d.run(), pass(2, 2));
        assert_eq!(d.used(), vec![(a, 4), (b, 4)]);
        assert_eq!(d.status(sa), VIRTIO_PMEM_RESP_EIO);
        assert_eq!(d.status(sb), VIRTIO_PMEM_RESP_EIO);
        let s = d.flusher.stats.snapshot();
        assert_eq!((s.flush_requests, s.errors, s.syncs), (2, 2, 1));
    }

    /// Malformed chains, each completed with 0 bytes (its status buffer, if it has
    /// one, left untouched) while the queue goes on serving: a name and the chain
    /// submitted, `(head, status buffer)`.
    type Malformed = (&'static str, fn(&mut Driver) -> (u16, Option<u64>));
    const MALFORMED: [Malformed; 7] = [
        (
            "a request shorter than four bytes is completed empty",
            |d| {
                let req = d.buf(2, VIRTIO_PMEM_REQ_TYPE_FLUSH);
                let status = d.buf(4, UNTOUCHED);
                let head = d.submit(&[D(req, 2, false), D(status, 4, true)]);
                (head, Some(status))
            },
        ),
        (
            "a request without a status buffer is completed empty",
            |d| {
                let req = d.buf(4, VIRTIO_PMEM_REQ_TYPE_FLUSH);
                let head = d.submit(&[D(req, 4, false)]);
                (head, None)
            },
        ),
        (
            "a status buffer shorter than four bytes is completed empty",
            |d| {
                let req = d.buf(4, VIRTIO_PMEM_REQ_TYPE_FLUSH);
                let status = d.buf(4, UNTOUCHED);
                let head = d.submit(&[D(req, 4, false), D(status, 2, true)]);
                (head, Some(status))
            },
        ),
        (
            "a readable descriptor after a writable one is completed empty",
            |d| {
                let req = d.buf(4, VIRTIO_PMEM_REQ_TYPE_FLUSH);
                let status = d.buf(4, UNTOUCHED);
                let extra = d.buf(4, 0);
                let head = d.submit(&[D(req, 4, false), D(status, 4, true), D(extra, 4, false)]);
                (head, Some(status))
            },
        ),
        ("a request outside guest memory is completed empty", |d| {
            let status = d.buf(4, UNTOUCHED);
            let head = d.submit(&[D(OUTSIDE, 4, false), D(status, 4, true)]);
            (head, Some(status))
        }),
        (
            "a status buffer outside guest memory is completed empty",
            |d| {
                let req = d.buf(4, VIRTIO_PMEM_REQ_TYPE_FLUSH);
                let head = d.submit(&[D(req, 4, false), D(OUTSIDE, 4, true)]);
                (head, None)
            },
        ),
        (
            "a buffer straddling the end of guest memory is completed empty",
            |d| {
                let req = d.buf(4, VIRTIO_PMEM_REQ_TYPE_FLUSH);
                let head = d.submit(&[D(req, 4, false), D(MEM_SIZE as u64 - 2, 4, true)]);
                (head, None)
            },
        ),
    ];

    #[test]
    fn malformed_chains_are_completed_empty_and_the_queue_stays_usable() {
        let mem = memory();
        for (case, submit) in MALFORMED {
            eprintln!("case: {case}");
            let mut d = Driver::new(&mem, Policy::Fsync);
            let (head, status) = submit(&mut d);
            d.assert_completed_empty_then_usable(head, status);
        }
    }

    #[test]
    fn a_request_in_a_device_writable_buffer_is_completed_empty() {
        let mem = memory();
        let mut d = Driver::new(&mem, Policy::Fsync);
        let req = d.buf(8, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        let head = d.submit(&[D(req, 8, true)]);
        d.assert_completed_empty_then_usable(head, None);
        // The device did not write into it either.
        assert_eq!(d.status(req), VIRTIO_PMEM_REQ_TYPE_FLUSH);
    }

    /// A request header, then `n - 1` one-byte status descriptors.
    fn split_status_chain(d: &mut Driver, n: usize) -> (Vec<D>, u64) {
        let req = d.buf(4, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        let status = d.buf(n as u32 - 1, UNTOUCHED);
        let mut descs = vec![D(req, 4, false)];
        descs.extend((0..n as u64 - 1).map(|i| D(status + i, 1, true)));
        (descs, status)
    }

    #[test]
    fn a_chain_of_max_len_is_served_and_one_more_is_completed_empty() {
        let mem = memory();
        let mut d = Driver::new(&mem, Policy::Fsync);
        let (descs, status) = split_status_chain(&mut d, MAX_CHAIN_LEN);
        let head = d.submit(&descs);
        assert_eq!(d.run(), pass(1, 1));
        assert_eq!(d.used(), vec![(head, 4)]);
        assert_eq!(d.status(status), VIRTIO_PMEM_RESP_OK);

        let mut d = Driver::new(&mem, Policy::Fsync);
        let (descs, status) = split_status_chain(&mut d, MAX_CHAIN_LEN + 1);
        let head = d.submit(&descs);
        d.assert_completed_empty_then_usable(head, Some(status));
    }

    #[test]
    fn an_indirect_chain_is_served() {
        let mem = memory();
        let mut d = Driver::new(&mem, Policy::Fsync);
        let req = d.buf(4, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        let status = d.buf(4, UNTOUCHED);
        let table = d.buf(32, 0);
        let entries = [
            SplitDescriptor::new(req, 4, VRING_DESC_F_NEXT as u16, 1),
            SplitDescriptor::new(status, 4, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, e) in entries.into_iter().enumerate() {
            mem.write_obj(RawDescriptor::from(e), GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let head = d.next_desc;
        let indirect = SplitDescriptor::new(table, 32, VRING_DESC_F_INDIRECT as u16, 0);
        d.mock
            .add_desc_chains(&[RawDescriptor::from(indirect)], head)
            .unwrap();
        d.next_desc += 1;
        assert_eq!(d.run(), pass(1, 1));
        assert_eq!(d.used(), vec![(head, 4)]);
        assert_eq!(d.status(status), VIRTIO_PMEM_RESP_OK);
        assert_eq!(d.state.stats.snapshot().malformed_chains, 0);
    }

    /// Found by the fuzzer: a head index past the ring made `add_used` fail, which
    /// ended the pass and stranded every chain taken after it (never answered: the
    /// guest's flushes hung).
    #[test]
    fn a_head_index_past_the_ring_is_skipped_and_the_rest_answered() {
        let mem = memory();
        let mut d = Driver::new(&mem, Policy::Fsync);
        let (_, first) = d.request(VIRTIO_PMEM_REQ_TYPE_FLUSH);
        let (b, sb) = d.request(VIRTIO_PMEM_REQ_TYPE_FLUSH);
        d.mock
            .avail()
            .ring()
            .ref_at(0)
            .unwrap()
            .store(QUEUE_LEN + 100);
        assert_eq!(d.run(), pass(1, 1));
        assert_eq!(d.used(), vec![(b, 4)]);
        assert_eq!(d.status(sb), VIRTIO_PMEM_RESP_OK);
        assert_eq!(d.status(first), UNTOUCHED);
        assert_eq!(d.state.stats.snapshot().malformed_chains, 1);
    }

    #[test]
    fn good_and_bad_chains_in_one_pass_are_all_completed() {
        let mem = memory();
        let mut d = Driver::new(&mem, Policy::Datasync);
        let (a, sa) = d.request(VIRTIO_PMEM_REQ_TYPE_FLUSH);
        let req = d.buf(4, VIRTIO_PMEM_REQ_TYPE_FLUSH);
        let bad = d.submit(&[D(req, 4, false)]);
        let (u, su) = d.request(3);
        let (b, sb) = d.request(VIRTIO_PMEM_REQ_TYPE_FLUSH);
        assert_eq!(d.run(), pass(4, 2));
        let mut used = d.used();
        used.sort();
        let mut want = vec![(a, 4), (bad, 0), (u, 4), (b, 4)];
        want.sort();
        assert_eq!(used, want);
        assert_eq!(d.status(sa), VIRTIO_PMEM_RESP_OK);
        assert_eq!(d.status(sb), VIRTIO_PMEM_RESP_OK);
        assert_eq!(d.status(su), VIRTIO_PMEM_RESP_EIO);
        let (s, q) = (d.flusher.stats.snapshot(), d.state.stats.snapshot());
        assert_eq!(
            (
                s.flush_requests,
                s.syncs,
                q.malformed_chains,
                q.unsupported_requests
            ),
            (2, 1, 1, 1)
        );
    }
}
