// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fuzz target: the queue pass ([`process_queue`] and [`parse_request`]) over
//! arbitrary descriptor tables, available rings and guest memory contents, laid out
//! as a driver lays out a split ring in real mmap'd guest memory, with and without a
//! flush rate limit (whose passes, taken together, must leave the ring as one
//! unlimited pass does). Owns only properties; never changes the code under test.

use std::{
    collections::HashMap,
    fs::File,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use proptest::{collection::vec, prelude::*, prop_oneof};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{
    desc::{split::Descriptor as SplitDescriptor, RawDescriptor},
    Queue, QueueOwnedT, QueueT,
};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use crate::{
    device::{
        queue::{process_queue, Pass, QueueError, QueueState, QueueStats, MAX_QUEUE_SIZE},
        wire::{MAX_CHAIN_LEN, VIRTIO_PMEM_RESP_OK},
    },
    durability::{Flusher, Policy},
    util::rate::FlushRateLimit,
};

/// The split ring (virtio 2.7): descriptor table, available and used rings.
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x400;
const USED_RING: u64 = 0x800;
/// Guest memory: two regions with a hole between them.
const REGIONS: [(u64, u64); 2] = [(0, 0x9000), (0x2_0000, 0x1000)];
/// Buffers of the generated descriptors point here (noise is written over it).
const DATA: (u64, u64) = (0x1000, 0x2000);
/// Generated indirect tables.
const INDIRECT: [u64; 2] = [0x3000, 0x3100];
/// The planted well-formed flush: header and status, which nothing else targets.
const GOOD_REQ: u64 = 0x8000;
const GOOD_STATUS: u64 = 0x8010;
const UNTOUCHED: u32 = 0xdead_beef;

/// One descriptor as generated.
#[derive(Clone, Copy, Debug)]
struct Gen {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Gen {
    fn raw(self) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            self.addr, self.len, self.flags, self.next,
        ))
    }
}

#[derive(Clone, Debug)]
struct Case {
    qsize: u16,
    table: Vec<Gen>,
    indirect: [Vec<Gen>; 2],
    /// Where the pass starts (ring positions wrap).
    start: u16,
    /// Available ring index minus `start`: at most `qsize` for a sane ring, a jump
    /// otherwise.
    avail: u16,
    heads: Vec<u16>,
    /// Position of the planted flush among the available entries, if any.
    good: Option<u16>,
    noise: u64,
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (DATA.0..DATA.0 + DATA.1).prop_map(|a| a & !3),
        2 => DATA.0..DATA.0 + DATA.1,
        2 => prop_oneof![Just(INDIRECT[0]), Just(INDIRECT[1])],
        1 => (0u64..8).prop_map(|d| REGIONS[0].1 - d),
        1 => REGIONS[0].1..REGIONS[1].0,
        1 => REGIONS[1].0..REGIONS[1].0 + REGIONS[1].1,
        1 => (0u64..8).prop_map(|d| REGIONS[1].0 + REGIONS[1].1 - d),
        1 => 0u64..0x400,
        1 => any::<u64>(),
        1 => (0u64..16).prop_map(|d| u64::MAX - d),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        6 => Just(4u32),
        4 => 0u32..9,
        2 => (1u32..9).prop_map(|n| n * 16),
        1 => 0u32..0x3000,
        1 => any::<u32>(),
        1 => (0u32..16).prop_map(|d| u32::MAX - d),
    ]
}

fn desc(qsize: u16) -> impl Strategy<Value = Gen> {
    let flags = prop_oneof![
        8 => (0u16..8).prop_map(|f| {
            // bit 0 NEXT, bit 1 WRITE, bit 2 INDIRECT, as the virtio flags are.
            debug_assert_eq!((VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT), (1, 2, 4));
            f
        }),
        1 => any::<u16>(),
    ];
    let next = prop_oneof![8 => 0..qsize + 2, 1 => any::<u16>()];
    (addr(), len(), flags, next).prop_map(|(addr, len, flags, next)| Gen {
        addr,
        len,
        flags,
        next,
    })
}

fn case() -> impl Strategy<Value = Case> {
    prop_oneof![Just(1u16), Just(2), Just(4), Just(8), Just(16), Just(32)].prop_flat_map(|qsize| {
        let table = vec(desc(qsize), usize::from(qsize));
        let indirect = [vec(desc(8), 0..8), vec(desc(8), 0..8)];
        let avail = prop_oneof![8 => 0..=qsize, 1 => any::<u16>()];
        let heads = vec(
            prop_oneof![8 => 0..qsize + 1, 1 => any::<u16>()],
            usize::from(qsize),
        );
        let start = prop_oneof![Just(0u16), any::<u16>()];
        (
            table,
            indirect,
            start,
            avail,
            heads,
            any::<u64>(),
            any::<u16>(),
        )
            .prop_map(move |(table, indirect, start, avail, heads, noise, good)| {
                let good = (qsize >= 4 && avail > 0 && avail <= qsize).then(|| good % avail);
                Case {
                    qsize,
                    table,
                    indirect,
                    start,
                    avail,
                    heads,
                    good,
                    noise,
                }
            })
    })
}

/// What the chain of one head really is, walked by virtio-queue (the driver-side
/// library, not our parser), capped one past the longest chain we accept.
#[derive(Clone, Debug)]
struct Walk {
    descs: Vec<(u64, u32, bool)>,
}

impl Walk {
    fn writable(&self) -> u64 {
        self.descs
            .iter()
            .filter(|d| d.2)
            .map(|d| u64::from(d.1))
            .sum()
    }

    /// The device contract, restated: short enough, every buffer inside guest
    /// memory, readable before writable, a 4-byte header and room for a 4-byte status.
    fn well_formed(&self, mem: &GuestMemoryMmap) -> bool {
        let inside = |&(a, l, _): &(u64, u32, bool)| {
            if l == 0 {
                return mem.check_range(GuestAddress(a), 0, Permissions::Read);
            }
            let (a, e) = (u128::from(a), u128::from(a) + u128::from(l));
            REGIONS
                .iter()
                .any(|&(s, n)| a >= u128::from(s) && e <= u128::from(s + n))
        };
        let first_writable = self
            .descs
            .iter()
            .position(|d| d.2)
            .unwrap_or(self.descs.len());
        let readable: u64 = self
            .descs
            .iter()
            .filter(|d| !d.2)
            .map(|d| u64::from(d.1))
            .sum();
        self.descs.len() <= MAX_CHAIN_LEN
            && self.descs.iter().all(inside)
            && self.descs[first_writable..].iter().all(|d| d.2)
            && readable >= 4
            && self.writable() >= 4
    }

    /// The bytes a response may write: the first 4 of the writable part.
    fn status_bytes(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for &(a, l, _) in self.descs.iter().filter(|d| d.2) {
            for i in 0..u64::from(l).min(4 - out.len() as u64) {
                out.push(a + i);
            }
            if out.len() == 4 {
                break;
            }
        }
        out
    }
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
    REGIONS
        .iter()
        .map(|&(s, n)| {
            let mut v = vec![0u8; n as usize];
            mem.read_slice(&mut v, GuestAddress(s)).unwrap();
            v
        })
        .collect()
}

/// What the generated cases exercised, so a generator that drifts into testing
/// nothing fails too.
#[derive(Default)]
struct Seen {
    refused_rings: AtomicU64,
    answered: AtomicU64,
    malformed: AtomicU64,
    too_long: AtomicU64,
    outside: AtomicU64,
    indirect: AtomicU64,
    heads_past: AtomicU64,
}

fn check(c: Case, burst: Option<u32>, file: &File, seen: &Seen) -> Result<(), TestCaseError> {
    let count = |a: &AtomicU64| a.fetch_add(1, Ordering::Relaxed);
    let ranges: Vec<_> = REGIONS
        .iter()
        .map(|&(s, n)| (GuestAddress(s), n as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
    // Noise over the data area: half the words 0 (a flush header), half random.
    let mut fill = super::Fill::new(c.noise);
    let noise: Vec<u8> = (0..DATA.1 / 4)
        .flat_map(|_| {
            let r = fill.next_u64();
            (if r & 1 == 0 { 0 } else { (r >> 32) as u32 }).to_le_bytes()
        })
        .collect();
    mem.write_slice(&noise, GuestAddress(DATA.0)).unwrap();
    // The ring layout of virtio 2.7 at fixed addresses (not virtio-queue's mock:
    // its `SplitQueueRing::end` counts elements, not bytes, so the used ring it
    // lays out overlaps the available ring's entries).
    let desc_at = |i: u16| GuestAddress(DESC_TABLE + 16 * u64::from(i));
    for (i, d) in c.table.iter().enumerate() {
        mem.write_obj(d.raw(), desc_at(i as u16)).unwrap();
    }
    for (table, at) in c.indirect.iter().zip(INDIRECT) {
        for (i, d) in table.iter().enumerate() {
            mem.write_obj(d.raw(), GuestAddress(at + 16 * i as u64))
                .unwrap();
        }
    }
    let mut heads = c.heads.clone();
    let good_head = c.qsize.wrapping_sub(2);
    if let Some(pos) = c.good {
        let req = Gen {
            addr: GOOD_REQ,
            len: 4,
            flags: VRING_DESC_F_NEXT as u16,
            next: good_head + 1,
        };
        let status = Gen {
            addr: GOOD_STATUS,
            len: 4,
            flags: VRING_DESC_F_WRITE as u16,
            next: 0,
        };
        mem.write_obj(req.raw(), desc_at(good_head)).unwrap();
        mem.write_obj(status.raw(), desc_at(good_head + 1)).unwrap();
        mem.write_obj(0u32, GuestAddress(GOOD_REQ)).unwrap();
        mem.write_obj(UNTOUCHED, GuestAddress(GOOD_STATUS)).unwrap();
        heads[usize::from(pos)] = good_head;
    }
    for i in 0..c.qsize {
        let slot = u64::from(c.start.wrapping_add(i) % c.qsize);
        mem.write_obj(
            heads[usize::from(i)],
            GuestAddress(AVAIL_RING + 4 + 2 * slot),
        )
        .unwrap();
    }
    mem.write_obj(c.start.wrapping_add(c.avail), GuestAddress(AVAIL_RING + 2))
        .unwrap();
    // A ring in use: the used index is where the device left it.
    mem.write_obj(c.start, GuestAddress(USED_RING + 2)).unwrap();
    let new_queue = || {
        let mut q = Queue::new(c.qsize).unwrap();
        q.set_size(c.qsize);
        q.set_ready(true);
        q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        q.set_used_ring_address(Some(USED_RING as u32), Some(0));
        q.set_next_avail(c.start);
        q.set_next_used(c.start);
        q
    };

    // The oracle: every chain as virtio-queue walks it, before the pass.
    let mut oracle = new_queue();
    let walks: Option<Vec<(u16, Walk)>> = oracle.iter(&mem).ok().map(|it| {
        it.map(|chain| {
            let head = chain.head_index();
            let descs = chain
                .take(MAX_CHAIN_LEN + 1)
                .map(|d: SplitDescriptor| (d.addr().0, d.len(), d.is_write_only()))
                .collect();
            (head, Walk { descs })
        })
        .collect()
    });
    let before = snapshot(&mem);

    let mut queue = new_queue();
    let flusher = Flusher::new(file.try_clone().unwrap(), Policy::Volatile);
    let result = match burst {
        None => process_queue(
            &mut queue,
            &mem,
            &flusher,
            &mut QueueState::new(Arc::default()),
        ),
        Some(burst) => {
            // Under a flush rate limit of `burst` tokens per refill: passes until
            // none is held back must leave the ring as one unlimited pass does.
            let limit = FlushRateLimit {
                ops_per_sec: 1,
                burst,
            };
            let stats = Arc::new(QueueStats::with_limit(Some(limit)).unwrap());
            let limiter = stats.limiter.as_ref().unwrap();
            let mut state = QueueState::new(stats.clone());
            let mut total = Pass::default();
            let mut result = Ok(Pass::default());
            // Each pass takes at least `burst` flushes or ends the ring.
            for _ in 0..=usize::from(MAX_QUEUE_SIZE) {
                limiter.refill_and_hold();
                match process_queue(&mut queue, &mem, &flusher, &mut state) {
                    Ok(p) => {
                        total.completed += p.completed;
                        total.flushes += p.flushes;
                        result = Ok(Pass {
                            completed: total.completed,
                            flushes: total.flushes,
                        });
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
                if state.held_back().is_none() {
                    break;
                }
            }
            prop_assert!(state.held_back().is_none(), "flushes still held back");
            result
        }
    };

    let after = snapshot(&mem);
    let Some(walks) = walks else {
        count(&seen.refused_rings);
        // A jump of the available index: the ring is refused whole, nothing written.
        prop_assert!(c.avail > c.qsize, "the oracle refused a sane ring");
        prop_assert!(
            matches!(result, Err(QueueError::AvailRing(_))),
            "{result:?}"
        );
        prop_assert!(before == after, "a refused ring changed guest memory");
        return Ok(());
    };
    let pass = match result {
        Ok(p) => p,
        Err(e) => {
            return Err(TestCaseError::fail(format!(
                "pass failed on a sane ring: {e}"
            )))
        }
    };
    prop_assert_eq!(walks.len(), usize::from(c.avail));
    // A head past the ring names nothing the driver could get back: not completed.
    let before_filter = walks.len();
    let walks: Vec<_> = walks.into_iter().filter(|(h, _)| *h < c.qsize).collect();
    if walks.len() < before_filter {
        count(&seen.heads_past);
    }
    prop_assert_eq!(pass.completed, walks.len());

    // Used ring: one entry per chain, in order, 4 bytes iff well-formed, never more
    // than the chain can take.
    let mut allowed: HashMap<u64, u16> = HashMap::new();
    let used_start = USED_RING;
    let used_end = used_start + 4 + 8 * u64::from(c.qsize) + 2;
    for (i, (head, walk)) in walks.iter().enumerate() {
        let slot = u64::from(c.start.wrapping_add(i as u16) % c.qsize);
        let (id, len): (u32, u32) = (
            mem.read_obj(GuestAddress(USED_RING + 4 + 8 * slot))
                .unwrap(),
            mem.read_obj(GuestAddress(USED_RING + 8 + 8 * slot))
                .unwrap(),
        );
        prop_assert_eq!(id, u32::from(*head));
        prop_assert!(
            u64::from(len) <= walk.writable(),
            "used len {} > writable {} of {walk:?}",
            len,
            walk.writable()
        );
        let ok = walk.well_formed(&mem);
        count(if ok { &seen.answered } else { &seen.malformed });
        if walk.descs.len() > MAX_CHAIN_LEN {
            count(&seen.too_long);
        }
        if walk
            .descs
            .iter()
            .any(|&(a, l, _)| !mem.check_range(GuestAddress(a), l as usize, Permissions::Read))
        {
            count(&seen.outside);
        }
        if c.table[usize::from(*head)].flags & VRING_DESC_F_INDIRECT as u16 != 0
            && !walk.descs.is_empty()
        {
            count(&seen.indirect);
        }
        prop_assert_eq!(len, if ok { 4 } else { 0 }, "chain {:?}", walk);
        if len == 4 {
            for b in walk.status_bytes() {
                allowed.insert(b, *head);
            }
        }
    }
    let used_idx: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
    prop_assert_eq!(used_idx, c.start.wrapping_add(walks.len() as u16));

    // No byte outside the used ring and the answered status buffers changed.
    for (r, (old, new)) in before.iter().zip(&after).enumerate() {
        // memcmp per 64-byte chunk, bytes only where a chunk differs.
        let chunks = old.chunks(64).zip(new.chunks(64)).enumerate();
        for (k, (a, b)) in chunks.filter(|(_, (a, b))| a != b) {
            for (j, (a, b)) in a.iter().zip(b.iter()).enumerate() {
                let at = REGIONS[r].0 + (64 * k + j) as u64;
                if a != b && !(used_start..used_end).contains(&at) && !allowed.contains_key(&at) {
                    return Err(TestCaseError::fail(format!(
                        "byte {at:#x} changed ({a:#x} -> {b:#x}) outside every status buffer"
                    )));
                }
            }
        }
    }

    // The planted flush among the garbage is answered OK (unless garbage chains
    // share its status buffer and answered into it).
    if c.good.is_some() {
        let shared = (0..4).any(|i| {
            allowed
                .get(&(GOOD_STATUS + i))
                .is_some_and(|&h| h != good_head)
        });
        let Some((_, walk)) = walks.iter().find(|(h, _)| *h == good_head) else {
            return Err(TestCaseError::fail("the planted flush was not taken"));
        };
        prop_assert!(walk.well_formed(&mem));
        if !shared {
            let status: u32 = mem.read_obj(GuestAddress(GOOD_STATUS)).unwrap();
            prop_assert_eq!(status, VIRTIO_PMEM_RESP_OK);
        }
    }
    Ok(())
}

#[test]
fn queue_pass() {
    let file = tempfile::tempfile().unwrap();
    let seen = Seen::default();
    super::run("queue-pass", case(), |c| check(c, None, &file, &seen));
    let all = [
        ("rings refused", &seen.refused_rings),
        ("chains answered", &seen.answered),
        ("chains malformed", &seen.malformed),
        ("chains too long", &seen.too_long),
        ("buffers outside memory", &seen.outside),
        ("indirect chains", &seen.indirect),
        ("heads past the ring", &seen.heads_past),
    ]
    .map(|(what, n)| (what, n.load(Ordering::Relaxed)));
    eprintln!("fuzz queue-pass exercised: {all:?}");
    if super::cases() >= 1000 {
        for (what, n) in all {
            assert!(n > 0, "the generator produced no {what}: {all:?}");
        }
    }
}

/// The same cases under a flush rate limit of 1 to 4 tokens per pass: every chain is
/// answered, in the ring's order, exactly as one unlimited pass answers it.
#[test]
fn queue_pass_limited() {
    let file = tempfile::tempfile().unwrap();
    let seen = Seen::default();
    super::run("queue-pass-limited", (case(), 1u32..=4), |(c, burst)| {
        check(c, Some(burst), &file, &seen)
    });
    let answered = seen.answered.load(Ordering::Relaxed);
    eprintln!("fuzz queue-pass-limited: {answered} chains answered");
    if super::cases() >= 1000 {
        assert!(answered > 0, "the generator produced no answered chain");
    }
}
