// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-pmem wire format (virtio spec 5.19) and the parsing of one request chain.
//!
//! Owns: the `#[repr(C)]` structs the guest reads and writes, and the decision whether a
//! descriptor chain is a well-formed request. Never touches the backing file and never
//! panics on guest input: every defect becomes a [`ChainError`] with the reason.

use thiserror::Error as ThisError;
use virtio_queue::{desc::split::Descriptor as SplitDescriptor, DescriptorChain};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory, Le32, Le64, Permissions};

/// The device exposes its region as virtio shared memory region 0 (feature bit 0).
pub const VIRTIO_PMEM_F_SHMEM_REGION: u64 = 1 << 0;
/// Shared memory region id of the pmem region.
pub const VIRTIO_PMEM_SHMEM_REGION_ID: u8 = 0;

/// Request type: make everything written to the region so far persistent.
pub const VIRTIO_PMEM_REQ_TYPE_FLUSH: u32 = 0;
/// Response: success.
pub const VIRTIO_PMEM_RESP_OK: u32 = 0;
/// Response: the request failed (linux maps any non-zero value to -EIO).
pub const VIRTIO_PMEM_RESP_EIO: u32 = 1;

/// The longest chain we accept. A request is two descriptors; drivers may split a
/// buffer, but nothing legitimate comes near this.
pub const MAX_CHAIN_LEN: usize = 16;

/// Device configuration space (`struct virtio_pmem_config`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct PmemConfig {
    /// Guest physical address of the region, for drivers without SHMEM_REGION.
    pub start: Le64,
    /// Size of the region in bytes.
    pub size: Le64,
}
// SAFETY: two little-endian u64 fields, no padding, every bit pattern valid.
unsafe impl ByteValued for PmemConfig {}

/// Request header (`struct virtio_pmem_req`).
#[derive(Copy, Clone, Debug, Default)]
#[repr(C)]
pub struct PmemReq {
    pub type_: Le32,
}
// SAFETY: one little-endian u32, every bit pattern valid.
unsafe impl ByteValued for PmemReq {}

/// Response (`struct virtio_pmem_resp`).
#[derive(Copy, Clone, Debug, Default)]
#[repr(C)]
pub struct PmemResp {
    pub ret: Le32,
}
// SAFETY: one little-endian u32, every bit pattern valid.
unsafe impl ByteValued for PmemResp {}

/// What a well-formed chain asks for.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RequestType {
    Flush,
    /// A type this device does not implement; answered with EIO.
    Unsupported(u32),
}

/// Why a chain is not a well-formed request.
#[derive(Debug, ThisError, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor chain is longer than {MAX_CHAIN_LEN} descriptors")]
    TooLong,
    #[error("descriptor [{addr:#x}, +{len}) is not inside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("device-readable part has {0} bytes, a request header needs 4")]
    ShortRequest(usize),
    #[error("device-writable part has {0} bytes, a response needs 4")]
    ShortResponse(usize),
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
}

/// Where a request's 4-byte status goes: the first bytes of the chain's
/// device-writable part, which may be split over up to 4 descriptors. Plain data,
/// kept without borrowing guest memory until the answer is known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatusBuffer {
    segments: [(u64, u32); STATUS_LEN],
    count: u8,
}

const STATUS_LEN: usize = std::mem::size_of::<PmemResp>();

impl StatusBuffer {
    /// Adds a writable descriptor; takes what the status still needs of it.
    fn add(&mut self, addr: u64, len: u32) {
        let have: u32 = self.segments[..usize::from(self.count)]
            .iter()
            .map(|s| s.1)
            .sum();
        let need = STATUS_LEN as u32 - have;
        if need > 0 && len > 0 {
            self.segments[usize::from(self.count)] = (addr, len.min(need));
            self.count += 1;
        }
    }
}

/// A parsed request: its type and where its response goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub status: StatusBuffer,
}

/// Parses one chain in a single walk, without allocating: bounded length, every
/// descriptor inside guest memory, device-readable descriptors before
/// device-writable ones (virtio 2.7.4.2), a 4-byte header in the readable part, room
/// for a 4-byte status in the writable part. On `Err`, the caller completes the
/// chain with 0 bytes written; a chain whose status buffer is missing cannot be
/// answered any other way.
pub fn parse_request<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
) -> Result<Request, ChainError> {
    let mut header = [0u8; std::mem::size_of::<PmemReq>()];
    let (mut readable, mut writable) = (0usize, 0usize);
    let mut seen_writable = false;
    let mut status = StatusBuffer::default();
    for (n, desc) in chain.enumerate() {
        let desc: SplitDescriptor = desc;
        if n >= MAX_CHAIN_LEN {
            return Err(ChainError::TooLong);
        }
        let (addr, len) = (desc.addr(), desc.len());
        let access = if desc.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(addr, len as usize, access) {
            return Err(ChainError::OutsideMemory { addr: addr.0, len });
        }
        if desc.is_write_only() {
            seen_writable = true;
            status.add(addr.0, len);
            writable += len as usize;
        } else {
            if seen_writable {
                return Err(ChainError::ReadableAfterWritable);
            }
            if readable < header.len() {
                let take = (header.len() - readable).min(len as usize);
                mem.read_slice(&mut header[readable..readable + take], addr)
                    .map_err(|_| ChainError::OutsideMemory { addr: addr.0, len })?;
            }
            readable += len as usize;
        }
    }
    if readable < header.len() {
        return Err(ChainError::ShortRequest(readable));
    }
    if writable < STATUS_LEN {
        return Err(ChainError::ShortResponse(writable));
    }
    let kind = match u32::from_le_bytes(header) {
        VIRTIO_PMEM_REQ_TYPE_FLUSH => RequestType::Flush,
        other => RequestType::Unsupported(other),
    };
    Ok(Request { kind, status })
}

/// Writes the response status. Returns the number of bytes written (for the used ring).
pub fn write_response<M: GuestMemory>(
    mem: &M,
    status: &StatusBuffer,
    value: u32,
) -> Result<u32, ChainError> {
    let bytes = value.to_le_bytes();
    let mut at = 0;
    for &(addr, len) in &status.segments[..usize::from(status.count)] {
        let len = len as usize;
        mem.write_slice(&bytes[at..at + len], GuestAddress(addr))
            .map_err(|_| ChainError::OutsideMemory {
                addr,
                len: len as u32,
            })?;
        at += len;
    }
    Ok(STATUS_LEN as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_split_over_descriptors_takes_only_the_bytes_it_needs() {
        let mut s = StatusBuffer::default();
        s.add(0x100, 1);
        s.add(0x200, 0);
        s.add(0x300, 2);
        s.add(0x400, 64);
        s.add(0x500, 64);
        assert_eq!(s.count, 3);
        assert_eq!(&s.segments[..3], &[(0x100, 1), (0x300, 2), (0x400, 1)]);
    }
}
