//! `brokerprobe inspect`: what an executable offers to attach to, without attaching:
//! markers (and their ABI), SystemTap SDT (USDT) probes, whether symbols are there, and
//! functions of known frameworks that could delimit stages. One pass over the symbol
//! tables of the memory-mapped file.

use std::fmt;

use anyhow::{Context as _, Result};
use object::{Endianness, Object as _, ObjectSymbol as _, SymbolKind, read::elf::ElfFile64};

use crate::{
    target::{MarkerProblem, MarkerScan, find_markers_in},
    usdt::{SdtNote, sdt_notes},
};

/// Everything inspect reports about one executable.
pub struct Inspection {
    pub size_bytes: u64,
    pub symtab_symbols: usize,
    pub dynsym_symbols: usize,
    pub markers: MarkerScan,
    pub usdt: Vec<SdtNote>,
    pub frameworks: Vec<Framework>,
}

/// Functions of one well-known crate present in the binary.
pub struct Framework {
    pub name: &'static str,
    /// Demangled functions that could begin or end a stage, with why each matters.
    pub candidates: Vec<Candidate>,
}

pub struct Candidate {
    pub function: String,
    pub stage: &'static str,
    /// Entered once per poll (an async fn's body, a `poll*` method), so a uprobe on it
    /// would not time the stage.
    pub polled: bool,
}

/// (crate, demangled path prefix, the stage it could delimit).
const KNOWN_FUNCTIONS: &[(&str, &str, &str)] = &[
    ("axum", "axum::routing::route::Route", "request routing"),
    ("axum", "axum::serve::", "inbound connection"),
    (
        "hyper",
        "hyper::proto::h1::dispatch::Dispatcher",
        "inbound request",
    ),
    ("hyper", "hyper::server::conn::", "inbound connection"),
    (
        "reqwest",
        "reqwest::async_impl::client::Client::execute",
        "upstream call",
    ),
    (
        "reqwest",
        "reqwest::async_impl::response::Response::chunk",
        "upstream stream chunk",
    ),
    (
        "reqwest",
        "reqwest::async_impl::response::Response::bytes",
        "upstream body",
    ),
    (
        "tokio",
        "tokio::sync::semaphore::Semaphore::acquire",
        "key pool wait",
    ),
    (
        "serde_json",
        "serde_json::ser::to_vec",
        "response serialization",
    ),
    (
        "serde_json",
        "serde_json::ser::to_writer",
        "response serialization",
    ),
    (
        "serde_json",
        "serde_json::de::from_slice",
        "request parsing",
    ),
];

/// At most this many candidates per framework are listed (generic code repeats).
const CANDIDATES_SHOWN: usize = 8;

/// Inspects an executable's bytes (malformed ones included: an error, never a panic).
pub fn inspect(data: &[u8]) -> Result<Inspection> {
    let markers = find_markers_in(data)?;
    let elf = ElfFile64::<Endianness, _>::parse(data).context("not a 64-bit ELF executable")?;
    let mut frameworks: Vec<Framework> = Vec::new();
    let mut symtab_symbols = 0;
    for symbol in elf.symbols() {
        symtab_symbols += 1;
        if symbol.kind() != SymbolKind::Text || symbol.is_undefined() {
            continue;
        }
        let Ok(name) = symbol.name() else { continue };
        // Rust paths only; a cheap test before demangling.
        if !(name.starts_with("_ZN") || name.starts_with("_R")) {
            continue;
        }
        let demangled = format!("{:#}", rustc_demangle::demangle(name));
        let Some((framework, _, stage)) = KNOWN_FUNCTIONS
            .iter()
            .find(|(_, prefix, _)| demangled.starts_with(prefix))
        else {
            continue;
        };
        let entry = match frameworks.iter_mut().position(|f| f.name == *framework) {
            Some(i) => &mut frameworks[i],
            None => {
                frameworks.push(Framework {
                    name: framework,
                    candidates: Vec::new(),
                });
                frameworks.last_mut().expect("just pushed")
            }
        };
        let known = entry.candidates.iter().any(|c| c.function == demangled);
        if !known && entry.candidates.len() < CANDIDATES_SHOWN {
            entry.candidates.push(Candidate {
                polled: is_polled(&demangled),
                function: demangled,
                stage,
            });
        }
    }
    Ok(Inspection {
        size_bytes: data.len() as u64,
        symtab_symbols,
        dynsym_symbols: elf.dynamic_symbols().count(),
        usdt: sdt_notes(&elf, data),
        frameworks,
        markers,
    })
}

/// An async fn's body (`{{closure}}`) or a `poll*` method: entered once per poll.
pub(crate) fn is_polled(function: &str) -> bool {
    let last = function.rsplit("::").next().unwrap_or(function);
    function.contains("{{closure}}") || last.starts_with("poll")
}

impl Inspection {
    /// Which probes `brokerprobe attach` would use.
    pub fn attach_mode(&self) -> &'static str {
        let symbols = self.symtab_symbols > 0;
        match (&self.markers.problem, self.usdt.is_empty(), symbols) {
            (None, true, _) => "markers and sockets",
            (None, false, _) => {
                "markers and sockets (with --usdt-map: its USDT probes instead of markers)"
            }
            (Some(_), false, _) => {
                "sockets only; with --usdt-map, its USDT probes and sockets (docs/modes/usdt.md)"
            }
            (Some(_), true, true) => {
                "sockets only; with --symbol-map, its synchronous stages' functions and sockets \
                 (docs/modes/symbols.md)"
            }
            (Some(_), true, false) => "sockets only",
        }
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let size = match self.size_bytes {
            bytes if bytes >= 1_000_000 => format!("{:.1} MB", bytes as f64 / 1e6),
            bytes => format!("{:.1} kB", bytes as f64 / 1e3),
        };
        let stripped = if self.symtab_symbols == 0 {
            "stripped: no symbol table (markers and symbol maps need one)"
        } else {
            "symbol table present"
        };
        writeln!(f, "size:          {size}")?;
        writeln!(
            f,
            "symbols:       {} in .symtab, {} in .dynsym; {stripped}",
            self.symtab_symbols, self.dynsym_symbols
        )?;
        match &self.markers.problem {
            None | Some(MarkerProblem::HalfSemaphore) => {
                let names: Vec<&str> = self
                    .markers
                    .markers
                    .iter()
                    .map(|m| m.kind.symbol_suffix())
                    .collect();
                writeln!(
                    f,
                    "markers:       ABI v{}: {} of {} ({}); semaphore: {}",
                    probe_common::marker::MARKER_ABI_VERSION,
                    names.len(),
                    probe_common::marker::MarkerKind::ALL.len(),
                    names.join(", "),
                    if self.markers.semaphore.is_some() {
                        "yes"
                    } else {
                        "no"
                    }
                )?;
            }
            Some(problem) => writeln!(f, "markers:       none usable: {problem}")?,
        }
        if self.usdt.is_empty() {
            writeln!(f, "USDT probes:   none")?;
        } else {
            writeln!(f, "USDT probes:   {}", self.usdt.len())?;
            for probe in &self.usdt {
                let gate = if probe.semaphore == 0 {
                    "ungated".to_owned()
                } else {
                    format!("semaphore {:#x}", probe.semaphore)
                };
                writeln!(
                    f,
                    "  {}:{} at {:#x}, {gate}, args: {}",
                    probe.provider, probe.name, probe.pc, probe.args
                )?;
            }
        }
        if self.frameworks.is_empty() {
            writeln!(f, "frameworks:    none recognised")?;
        }
        for framework in &self.frameworks {
            writeln!(f, "framework:     {}", framework.name)?;
            for candidate in &framework.candidates {
                let polled = if candidate.polled {
                    " [entered once per poll: cannot time a stage]"
                } else {
                    ""
                };
                writeln!(f, "  {} ({}){polled}", candidate.function, candidate.stage)?;
            }
        }
        write!(f, "attach would use: {}", self.attach_mode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test binary links probe-markers (dev-dependency) and the crates brokers use.
    #[test]
    fn this_binary_is_inspected() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let inspection = inspect(&exe).unwrap();
        assert!(inspection.symtab_symbols > 1000);
        assert!(inspection.markers.problem.is_none());
        assert_eq!(inspection.attach_mode(), "markers and sockets");
        let text = inspection.to_string();
        assert!(text.contains("symbol table present"), "{text}");
        assert!(inspect(b"not an executable").is_err());
    }
}
