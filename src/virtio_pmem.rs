// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-pmem wire format (virtio spec 5.19) and the parsing of one request chain.
//!
//! Owns: the `#[repr(C)]` structs the guest reads and writes, and the decision whether a
//! descriptor chain is a well-formed request. Never touches the backing file and never
//! panics on guest input: every defect becomes a [`ChainError`] with the reason.

use thiserror::Error as ThisError;
use virtio_queue::{desc::split::Descriptor as SplitDescriptor, DescriptorChain, Reader, Writer};
use vm_memory::{ByteValued, GuestMemory, Le32, Le64};

/// Virtio device id of virtio-pmem.
pub const VIRTIO_ID_PMEM: u32 = 27;
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
    #[error("descriptor chain has an invalid descriptor or address: {0}")]
    BadDescriptor(String),
    #[error("device-readable part has {0} bytes, a request header needs 4")]
    ShortRequest(usize),
    #[error("device-writable part has {0} bytes, a response needs 4")]
    ShortResponse(usize),
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
}

/// A parsed request: its type and where its response goes.
pub struct Request<'a, B: vm_memory::bitmap::BitmapSlice> {
    pub kind: RequestType,
    pub response: Writer<'a, B>,
}

/// Parses one chain. On `Err`, the caller completes the chain with 0 bytes written;
/// a chain whose status buffer is missing cannot be answered any other way.
pub fn parse_request<'a, M>(
    mem: &'a M,
    chain: DescriptorChain<&'a M>,
) -> Result<
    Request<'a, <<M as GuestMemory>::Bitmap as vm_memory::bitmap::WithBitmapSlice<'a>>::S>,
    ChainError,
>
where
    M: GuestMemory,
{
    check_shape(chain.clone())?;
    let mut reader =
        Reader::new(mem, chain.clone()).map_err(|e| ChainError::BadDescriptor(e.to_string()))?;
    let writer = Writer::new(mem, chain).map_err(|e| ChainError::BadDescriptor(e.to_string()))?;
    if reader.available_bytes() < std::mem::size_of::<PmemReq>() {
        return Err(ChainError::ShortRequest(reader.available_bytes()));
    }
    if writer.available_bytes() < std::mem::size_of::<PmemResp>() {
        return Err(ChainError::ShortResponse(writer.available_bytes()));
    }
    let req: PmemReq = reader
        .read_obj()
        .map_err(|e| ChainError::BadDescriptor(e.to_string()))?;
    let kind = match req.type_.to_native() {
        VIRTIO_PMEM_REQ_TYPE_FLUSH => RequestType::Flush,
        other => RequestType::Unsupported(other),
    };
    Ok(Request {
        kind,
        response: writer,
    })
}

/// Length and ordering checks the Reader/Writer do not make: bounded length, and all
/// device-readable descriptors before the device-writable ones (virtio 2.7.4.2).
fn check_shape<M: GuestMemory>(chain: DescriptorChain<&M>) -> Result<(), ChainError> {
    let mut seen_writable = false;
    for (n, desc) in chain.enumerate() {
        let desc: SplitDescriptor = desc;
        if n >= MAX_CHAIN_LEN {
            return Err(ChainError::TooLong);
        }
        if desc.is_write_only() {
            seen_writable = true;
        } else if seen_writable {
            return Err(ChainError::ReadableAfterWritable);
        }
    }
    Ok(())
}

/// Writes the response status. Returns the number of bytes written (for the used ring).
pub fn write_response<B: vm_memory::bitmap::BitmapSlice>(
    response: &mut Writer<'_, B>,
    status: u32,
) -> Result<u32, ChainError> {
    response
        .write_obj(PmemResp {
            ret: Le32::from(status),
        })
        .map_err(|e| ChainError::BadDescriptor(e.to_string()))?;
    Ok(std::mem::size_of::<PmemResp>() as u32)
}
