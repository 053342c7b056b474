//! Sizes of every eBPF map, in one place. docs/maps.md explains each choice.

/// Marker events ring buffer, in bytes (power of two, page multiple). At ~200 bytes an
/// event this holds ~40k events: several seconds of a busy broker if userspace stalls.
pub const MARKER_EVENTS_BYTES: u32 = 8 << 20;
