//! Wire types shared by the eBPF programs and brokerprobe's user side.
//!
//! Everything here is `#[repr(C)]`, plain old data, and `no_std`: the kernel half writes
//! these structs into the ring buffer, the user half reads them back byte for byte.
#![no_std]

pub mod event;
pub mod maps;
pub mod marker;
pub mod socket;
pub mod symbol;
pub mod usdt;
