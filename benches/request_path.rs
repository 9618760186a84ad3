// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The request path alone, no socket and no syscall: `process_queue` over a
//! `MockSplitQueue` with a volatile `Flusher`, and `parse_request` on one chain.
//!
//! The ring is laid out once (chain i: a 4-byte flush request in descriptor 2i, a
//! 4-byte status in 2i+1); each pass the driver side publishes N heads on the
//! available ring (not timed) and `process_queue` takes, answers and completes them.

use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vhost_device_pmem::{
    device::queue::{process_queue, QueueState},
    device::wire::{parse_request, VIRTIO_PMEM_REQ_TYPE_FLUSH},
    durability::{Flusher, Policy},
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{
    desc::{split::Descriptor as SplitDescriptor, RawDescriptor},
    mock::MockSplitQueue,
    Queue, QueueOwnedT,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The daemon's queue size.
const QUEUE_LEN: u16 = 256;
const MAX_CHAINS: u16 = 64;
const MEM_SIZE: usize = 1 << 20;
/// Request and status buffers: chain i uses [BUFFERS + 16 i, +4) and [+8, +12).
const BUFFERS: u64 = 0x1_0000;

/// A split ring in guest memory with `MAX_CHAINS` flush requests laid out.
struct Ring<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    queue: Queue,
    avail_idx: u16,
}

impl<'a> Ring<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let mock = MockSplitQueue::new(mem, QUEUE_LEN);
        for i in 0..MAX_CHAINS {
            let (req, status) = (BUFFERS + 16 * u64::from(i), BUFFERS + 16 * u64::from(i) + 8);
            mem.write_obj(VIRTIO_PMEM_REQ_TYPE_FLUSH.to_le(), GuestAddress(req))
                .unwrap();
            let head = 2 * i;
            let descs = [
                SplitDescriptor::new(req, 4, VRING_DESC_F_NEXT as u16, head + 1),
                SplitDescriptor::new(status, 4, VRING_DESC_F_WRITE as u16, 0),
            ];
            for (j, d) in descs.into_iter().enumerate() {
                mock.desc_table()
                    .store(head + j as u16, RawDescriptor::from(d))
                    .unwrap();
            }
        }
        let queue = mock.create_queue::<Queue>().unwrap();
        Self {
            mock,
            queue,
            avail_idx: 0,
        }
    }

    /// The driver's side: makes chains 0..n available. Written by hand because
    /// `MockSplitQueue::add_desc_chains` indexes the available ring without wrapping,
    /// so it writes past the ring once more than a ring's worth of heads were added.
    fn publish(&mut self, n: u16) {
        let avail = self.mock.avail();
        for i in 0..n {
            let pos = self.avail_idx.wrapping_add(i) % QUEUE_LEN;
            avail
                .ring()
                .ref_at(usize::from(pos))
                .unwrap()
                .store((2 * i).to_le());
        }
        self.avail_idx = self.avail_idx.wrapping_add(n);
        avail.idx().store(self.avail_idx.to_le());
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn bench_process_queue(c: &mut Criterion) {
    let mem = memory();
    let flusher = Flusher::new(tempfile::tempfile().unwrap(), Policy::Volatile);
    let mut state = QueueState::new(Default::default());
    let mut group = c.benchmark_group("process_queue");
    for n in [1u16, 16, MAX_CHAINS] {
        let mut ring = Ring::new(&mem);
        group.throughput(Throughput::Elements(u64::from(n)));
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    ring.publish(n);
                    let start = Instant::now();
                    let pass = process_queue(&mut ring.queue, &mem, &flusher, &mut state).unwrap();
                    total += start.elapsed();
                    assert_eq!(pass.completed, usize::from(n));
                }
                total
            })
        });
    }
    group.finish();
    assert_eq!(flusher.stats.snapshot().syncs, 0);
}

fn bench_parse_request(c: &mut Criterion) {
    let mem = memory();
    let mut ring = Ring::new(&mem);
    ring.publish(1);
    let chain = ring.queue.iter(&mem).unwrap().next().unwrap();
    c.bench_function("parse_request", |b| {
        b.iter(|| {
            parse_request(black_box(&mem), black_box(chain.clone()))
                .unwrap()
                .kind
        })
    });
}

/// Defaults sized for a 2-core machine; command-line flags (after `--`) win.
fn config() -> Criterion {
    Criterion::default()
        .without_plots()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_process_queue, bench_parse_request
}
criterion_main!(benches);
