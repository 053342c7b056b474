//! The marker functions themselves: the ABI brokerprobe attaches to (docs/markers.md).
//!
//! Each is `extern "C"` (arguments in the platform's C argument registers) and does
//! nothing: its entry is a 5-byte NOP that a uprobe can replace with a call on the kernel's
//! fast path, then a distinct `mov` so no linker folds two markers into one address.
//!
//! The markers are only called while [`brokerprobe_v1_semaphore`] is raised.
#![allow(unused_variables)]

use core::sync::atomic::{AtomicU16, Ordering};

/// Non-zero while brokerprobe is attached: the kernel counts it up and down, as the
/// reference counter of a uprobe brokerprobe holds on `brokerprobe_v1_semaphore_anchor`.
/// In `.probes` (like USDT semaphores) so that it is file-backed: the kernel finds it by
/// file offset, which `.bss` does not have.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".probes")]
#[allow(non_upper_case_globals)]
pub static brokerprobe_v1_semaphore: AtomicU16 = AtomicU16::new(0);

/// Whether anyone is attached: one load and a branch when nobody is.
#[inline(always)]
pub fn attached() -> bool {
    brokerprobe_v1_semaphore.load(Ordering::Relaxed) != 0
}

/// Appended to `brokerprobe_v1_request_begin`, after its `ret`: the semaphore's anchor, an
/// instruction that never runs, in a function every broker keeps.
macro_rules! semaphore_anchor {
    () => {
        concat!(
            ".globl brokerprobe_v1_semaphore_anchor\n",
            ".type brokerprobe_v1_semaphore_anchor, %function\n",
            "brokerprobe_v1_semaphore_anchor:\n",
            "nop",
        )
    };
}

macro_rules! markers {
    ($($(#[$doc:meta])* $name:ident = $id:literal ($($arg:ident: $ty:ty),*) $(+ $tail:expr)?;)*) => {$(
        $(#[$doc])*
        #[unsafe(no_mangle)]
        #[unsafe(naked)]
        pub extern "C" fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            core::arch::naked_asm!(
                ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00", // nopl 0(%rax,%rax,1): the probed NOP
                "mov eax, {id}",
                "ret",
                $($tail,)?
                id = const $id,
            );
            #[cfg(target_arch = "aarch64")]
            core::arch::naked_asm!("nop", "mov w0, #{id}", "ret", $($tail,)? id = const $id);
        }
    )*};
}

markers! {
    /// `model`, `traceparent`: UTF-8 (ptr, len); traceparent may be (null, 0).
    brokerprobe_v1_request_begin = 1 (request_id: u64, model: *const u8, model_len: usize,
        traceparent: *const u8, traceparent_len: usize) + semaphore_anchor!();
    /// `status`: HTTP status; `error_type`: (ptr, len), (null, 0) on success.
    brokerprobe_v1_request_end = 2 (request_id: u64, status: u32, error_type: *const u8,
        error_type_len: usize);
    /// `stage`: Stage wire value, 0 for a custom stage named by `name`; for tool.execute
    /// `name` is the tool.
    brokerprobe_v1_stage_begin = 3 (request_id: u64, stage: u32, name: *const u8,
        name_len: usize);
    brokerprobe_v1_stage_end = 4 (request_id: u64, stage: u32, name: *const u8,
        name_len: usize);
    brokerprobe_v1_provider = 5 (request_id: u64, provider: *const u8, provider_len: usize);
    brokerprobe_v1_first_byte = 6 (request_id: u64);
    brokerprobe_v1_chunk = 7 (request_id: u64);
    brokerprobe_v1_token_usage = 8 (request_id: u64, input_tokens: u64, output_tokens: u64);
    brokerprobe_v1_fallback = 9 (request_id: u64, from: *const u8, from_len: usize,
        to: *const u8, to_len: usize);
}
