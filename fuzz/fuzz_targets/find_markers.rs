//! Executables as a broker might ship them, malformed included: looking for markers in
//! any bytes must give markers or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|executable: &[u8]| {
    let _ = probe_userspace::target::find_markers_in(executable);
});
