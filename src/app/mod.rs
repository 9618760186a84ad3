// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The two exports, each a small front end on the host runtime ([`crate::host`]).
//!
//! Owns: nothing but the two. Never shares state between them: one export per
//! process.

pub mod nvdimm;
pub mod serve;
