//! The marker functions themselves: the ABI brokerprobe attaches to (docs/markers.md).
//!
//! Each is `extern "C"` (arguments in the platform's C argument registers) and does
//! nothing: its entry is a 5-byte NOP that a uprobe can replace with a call on the kernel's
//! fast path, then a distinct `mov` so no linker folds two markers into one address.
#![allow(unused_variables)]

macro_rules! markers {
    ($($(#[$doc:meta])* $name:ident = $id:literal ($($arg:ident: $ty:ty),*);)*) => {$(
        $(#[$doc])*
        #[unsafe(no_mangle)]
        #[unsafe(naked)]
        pub extern "C" fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            core::arch::naked_asm!(
                ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00", // nopl 0(%rax,%rax,1): the probed NOP
                "mov eax, {id}",
                "ret",
                id = const $id,
            );
            #[cfg(target_arch = "aarch64")]
            core::arch::naked_asm!("nop", "mov w0, #{id}", "ret", id = const $id);
        }
    )*};
}

markers! {
    /// `model`, `traceparent`: UTF-8 (ptr, len); traceparent may be (null, 0).
    brokerprobe_v1_request_begin = 1 (request_id: u64, model: *const u8, model_len: usize,
        traceparent: *const u8, traceparent_len: usize);
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
