//! USDT probes turned into marker events (docs/modes/usdt.md): brokerprobe tells the
//! kernel, per probe site, which [`crate::marker::MarkerKind`] a hit means and where each
//! of its values lives (the probe's SystemTap argument specs, decoded in user space), and
//! the kernel writes the same [`crate::marker::MarkerEvent`] a marker hit would.

use crate::marker::TEXT_CAP;

/// Where a USDT argument lives. The discriminant is the wire value.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgKind {
    /// Not mapped: the value is 0, the string empty.
    Absent = 0,
    /// `$imm` in the spec, or a value fixed by the stage map (a stage number).
    Constant = 1,
    /// `%reg`: the register's value.
    Register = 2,
    /// `off(%reg)`: `size` bytes at register + offset in the broker's memory.
    Memory = 3,
}

/// One value of a hit: how to read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsdtArg {
    /// An [`ArgKind`] wire value.
    pub kind: u32,
    /// Bytes (1, 2, 4 or 8); negative when signed, as in the spec (`-4@%eax`).
    pub size: i32,
    /// Offset of the register in the kernel's `struct pt_regs`.
    pub reg_offset: u32,
    pub _reserved: u32,
    /// The constant, or the memory operand's offset.
    pub value: i64,
}

impl UsdtArg {
    pub const ABSENT: UsdtArg = UsdtArg {
        kind: ArgKind::Absent as u32,
        size: 0,
        reg_offset: 0,
        _reserved: 0,
        value: 0,
    };

    pub const fn constant(value: i64) -> Self {
        UsdtArg {
            kind: ArgKind::Constant as u32,
            size: 8,
            value,
            ..Self::ABSENT
        }
    }
}

/// What a hit of one probe site means (value of [`USDT_SITES`](crate::maps)).
///
/// Slots follow [`crate::marker::MarkerEvent`]'s field use by kind; text arguments are
/// pointers to NUL-terminated strings, as SDT probes pass them.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UsdtSpec {
    /// The [`crate::marker::MarkerKind`] wire value a hit is reported as.
    pub marker: u32,
    /// Text slot 0 is `fixed_text` rather than an argument (a stage named by the map).
    pub fixed_text_len: u32,
    pub request_id: UsdtArg,
    pub values: [UsdtArg; 2],
    pub texts: [UsdtArg; 2],
    pub fixed_text: [u8; TEXT_CAP],
}

/// Key of a probe site: the process, and the probe's address in it (the instruction
/// pointer a uprobe sees when the site is hit).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UsdtSite {
    pub pid: u32,
    pub _reserved: u32,
    pub address: u64,
}

// SAFETY: repr(C) plain old data without padding; any bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for UsdtSpec {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for UsdtSite {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_sizes_have_no_padding() {
        assert_eq!(size_of::<UsdtArg>(), 24);
        assert_eq!(size_of::<UsdtSpec>(), 8 + 5 * 24 + TEXT_CAP);
        assert_eq!(size_of::<UsdtSite>(), 16);
    }
}
