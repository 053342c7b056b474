//! Ring-buffer records as the kernel side might write them, or not: decoding any bytes
//! must give an event or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|record: &[u8]| {
    let _ = probe_userspace::decode::decode(record);
});
