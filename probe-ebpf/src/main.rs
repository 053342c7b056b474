//! brokerprobe's kernel side. One module per probe family; map sizes live in
//! probe_common::maps.
#![no_std]
#![feature(asm_experimental_arch)]
#![no_main]

mod events;
mod markers;
mod sockets;
mod symbols;
mod trap_time;
mod usdt;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this is never executed.
    loop {}
}

/// bpf_probe_read_user is GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
