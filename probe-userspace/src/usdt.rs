//! USDT probes as request timelines (docs/modes/usdt.md): a broker instrumented with
//! SystemTap SDT probes (the `usdt` or `probe` crates, C's `DTRACE_PROBE`) is profiled
//! through a probe map, a TOML file that says which probe is which marker event and which
//! of its arguments carries the request id, the model, the status…
//!
//! Reading the probes: each `.note.stapsdt` entry gives the probe's address, its
//! semaphore's and the link-time address of `.stapsdt.base` (both addresses move with that
//! section if the binary was prelinked), and its arguments' locations as assembler
//! operands (`-4@-20(%rbp)`), which are decoded here into [`UsdtArg`]s the kernel can read.

use std::{collections::BTreeMap, fmt, fs, path::Path};

use anyhow::{Context as _, Result, bail};
use object::{
    Endianness, Object as _, ObjectSection as _,
    elf::{PF_X, PT_LOAD},
    read::elf::{ElfFile64, FileHeader as _, ProgramHeader as _, SectionHeader as _},
};
use probe_common::{
    marker::{MarkerKind, Stage, TEXT_CAP},
    usdt::{ArgKind, UsdtArg, UsdtSpec},
};
use serde::Deserialize;

use crate::target::FileSegments;

/// One `.note.stapsdt` entry, addresses adjusted for where `.stapsdt.base` really is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SdtNote {
    pub provider: String,
    pub name: String,
    /// Link-time address of the probe point.
    pub pc: u64,
    /// Link-time address of its semaphore; 0 when the probe is not gated.
    pub semaphore: u64,
    /// Argument specs, e.g. `8@%rdi -4@-12(%rbp)`.
    pub args: String,
}

impl SdtNote {
    pub fn label(&self) -> String {
        format!("{}:{}", self.provider, self.name)
    }
}

/// The SDT notes of an ELF executable (none if it has no `.note.stapsdt`). Notes of
/// code the linker dropped (`--gc-sections`) stay in the file with an address outside
/// any executable segment: they name no probe and are left out.
pub fn sdt_notes<'data>(
    elf: &ElfFile64<'data, Endianness, &'data [u8]>,
    data: &'data [u8],
) -> Vec<SdtNote> {
    let endian = elf.endian();
    let code: Vec<(u64, u64)> = elf
        .elf_program_headers()
        .iter()
        .filter(|ph| ph.p_type(endian) == PT_LOAD && ph.p_flags(endian) & PF_X != 0)
        .map(|ph| (ph.p_vaddr(endian), ph.p_memsz(endian)))
        .collect();
    let in_code = |pc: u64| {
        code.iter()
            .any(|(start, size)| (*start..start.saturating_add(*size)).contains(&pc))
    };
    let Ok(sections) = elf.elf_header().sections(endian, data) else {
        return Vec::new();
    };
    let base = elf.section_by_name(".stapsdt.base").map(|s| s.address());
    let mut notes = Vec::new();
    for section in sections.iter() {
        if sections.section_name(endian, section) != Ok(b".note.stapsdt".as_slice()) {
            continue;
        }
        let Ok(Some(mut entries)) = section.notes(endian, data) else {
            continue;
        };
        while let Ok(Some(note)) = entries.next() {
            // NT_STAPSDT (3), owner "stapsdt".
            if note.name() != b"stapsdt" || note.n_type(endian) != 3 {
                continue;
            }
            if let Some(sdt) = parse_sdt_desc(note.desc(), base).filter(|n| in_code(n.pc)) {
                notes.push(sdt);
            }
        }
    }
    notes
}

/// pc, link-time base, semaphore (8 bytes each), then provider, name and args, each
/// NUL-terminated. `actual_base`: the address of `.stapsdt.base` in this file.
fn parse_sdt_desc(desc: &[u8], actual_base: Option<u64>) -> Option<SdtNote> {
    let word = |i: usize| -> Option<u64> {
        let bytes = desc.get(i * 8..i * 8 + 8)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    };
    let (mut pc, link_base, mut semaphore) = (word(0)?, word(1)?, word(2)?);
    if let Some(actual) = actual_base.filter(|_| link_base != 0) {
        let shift = actual.wrapping_sub(link_base);
        pc = pc.wrapping_add(shift);
        if semaphore != 0 {
            semaphore = semaphore.wrapping_add(shift);
        }
    }
    let mut strings = desc.get(24..)?.split(|b| *b == 0);
    let mut text = || {
        strings
            .next()
            .map(|s| String::from_utf8_lossy(s).into_owned())
    };
    Some(SdtNote {
        provider: text()?,
        name: text()?,
        args: text().unwrap_or_default(),
        pc,
        semaphore,
    })
}

/// Offsets of x86-64's registers in the kernel's `struct pt_regs`, by every name an
/// operand may use (`%rdi`, `%edi`, `%di`, `%dil` are one register).
const REGISTERS: &[(&[&str], u32)] = &[
    (&["r15", "r15d", "r15w", "r15b"], 0),
    (&["r14", "r14d", "r14w", "r14b"], 8),
    (&["r13", "r13d", "r13w", "r13b"], 16),
    (&["r12", "r12d", "r12w", "r12b"], 24),
    (&["rbp", "ebp", "bp", "bpl"], 32),
    (&["rbx", "ebx", "bx", "bl"], 40),
    (&["r11", "r11d", "r11w", "r11b"], 48),
    (&["r10", "r10d", "r10w", "r10b"], 56),
    (&["r9", "r9d", "r9w", "r9b"], 64),
    (&["r8", "r8d", "r8w", "r8b"], 72),
    (&["rax", "eax", "ax", "al"], 80),
    (&["rcx", "ecx", "cx", "cl"], 88),
    (&["rdx", "edx", "dx", "dl"], 96),
    (&["rsi", "esi", "si", "sil"], 104),
    (&["rdi", "edi", "di", "dil"], 112),
    (&["rip", "eip"], 128),
    (&["rsp", "esp", "sp", "spl"], 152),
];

fn register_offset(operand: &str) -> Result<u32, String> {
    let name = operand
        .strip_prefix('%')
        .ok_or_else(|| format!("`{operand}` is not a register"))?;
    REGISTERS
        .iter()
        .find(|(names, _)| names.contains(&name))
        .map(|(_, offset)| *offset)
        .ok_or_else(|| format!("unknown register `{operand}`"))
}

/// Decodes one SDT argument spec, `SIZE@OPERAND`: `%reg`, `$constant`, `disp(%reg)`.
/// Indexed operands (`(%rax,%rbx,8)`) are refused: their probes cannot be mapped.
pub fn parse_arg_spec(spec: &str) -> Result<UsdtArg, String> {
    let (size, operand) = spec
        .split_once('@')
        .ok_or_else(|| format!("`{spec}` has no `SIZE@`"))?;
    let size: i32 = size
        .parse()
        .ok()
        .filter(|s: &i32| matches!(s.unsigned_abs(), 1 | 2 | 4 | 8))
        .ok_or_else(|| format!("`{spec}`: size must be ±1, 2, 4 or 8"))?;
    let arg = |kind: ArgKind, reg_offset, value| UsdtArg {
        kind: kind as u32,
        size,
        reg_offset,
        _reserved: 0,
        value,
    };
    if let Some(constant) = operand.strip_prefix('$') {
        let value = parse_integer(constant).ok_or_else(|| format!("`{spec}`: bad constant"))?;
        return Ok(arg(ArgKind::Constant, 0, value));
    }
    if operand.starts_with('%') {
        return Ok(arg(ArgKind::Register, register_offset(operand)?, 0));
    }
    let (disp, rest) = operand
        .split_once('(')
        .ok_or_else(|| format!("`{spec}`: unsupported operand"))?;
    let register = rest
        .strip_suffix(')')
        .ok_or_else(|| format!("`{spec}`: unsupported operand"))?;
    if register.contains(',') {
        return Err(format!("`{spec}`: indexed operands are not supported"));
    }
    let disp = match disp {
        "" => 0,
        text => parse_integer(text).ok_or_else(|| format!("`{spec}`: bad displacement"))?,
    };
    Ok(arg(ArgKind::Memory, register_offset(register)?, disp))
}

fn parse_integer(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let value = match digits.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16).ok()?,
        None => digits.parse().ok()?,
    };
    Some(if negative { -value } else { value })
}

/// Where a mapped value goes in the event (`MarkerEvent`'s field use by kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    RequestId,
    Value(usize),
    Text(usize),
}

/// The arguments each event takes from a probe, by the name the probe map uses.
fn slots(kind: MarkerKind) -> &'static [(&'static str, Slot)] {
    use Slot::*;
    match kind {
        MarkerKind::RequestBegin => &[
            ("request_id", RequestId),
            ("model", Text(0)),
            ("traceparent", Text(1)),
        ],
        MarkerKind::RequestEnd => &[
            ("request_id", RequestId),
            ("status", Value(0)),
            ("error_type", Text(0)),
        ],
        MarkerKind::StageBegin | MarkerKind::StageEnd => &[
            ("request_id", RequestId),
            ("stage", Text(0)),
            ("tool", Text(0)),
        ],
        MarkerKind::Provider => &[("request_id", RequestId), ("provider", Text(0))],
        MarkerKind::FirstByte | MarkerKind::Chunk => &[("request_id", RequestId)],
        MarkerKind::TokenUsage => &[
            ("request_id", RequestId),
            ("input_tokens", Value(0)),
            ("output_tokens", Value(1)),
        ],
        MarkerKind::Fallback => &[
            ("request_id", RequestId),
            ("from", Text(0)),
            ("to", Text(1)),
        ],
    }
}

/// The probe map file as written (docs/modes/usdt.md).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MapFile {
    /// Provider of the probes whose `probe` has none.
    provider: Option<String>,
    #[serde(default)]
    probe: Vec<ProbeEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeEntry {
    /// `name` or `provider:name`.
    probe: String,
    event: String,
    /// For stage events: the stage this probe begins or ends.
    stage: Option<String>,
    /// Event field → index of the probe argument that carries it.
    #[serde(default)]
    args: BTreeMap<String, usize>,
}

/// One probe of the map, checked.
#[derive(Clone, Debug)]
struct Mapping {
    provider: String,
    name: String,
    kind: MarkerKind,
    /// A stage fixed by the map: (wire value, custom name if not a known stage).
    stage: Option<(u32, Option<String>)>,
    args: Vec<(Slot, usize)>,
}

/// A probe map: which USDT probe is which marker event.
#[derive(Clone, Debug)]
pub struct UsdtMap {
    origin: String,
    mappings: Vec<Mapping>,
}

/// One probe site to attach: where it is and what a hit of it means.
#[derive(Clone, Debug)]
pub struct MappedProbe {
    /// `provider:name`, for messages.
    pub label: String,
    pub kind: MarkerKind,
    /// File offset of the probe instruction.
    pub file_offset: u64,
    /// File offset of its semaphore, if gated.
    pub semaphore_offset: Option<u64>,
    pub spec: UsdtSpec,
}

impl UsdtMap {
    pub fn load(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("reading the USDT probe map {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let file: MapFile = crate::toml_file::parse(text, origin).map_err(anyhow::Error::msg)?;
        let mut mappings = Vec::new();
        for entry in file.probe {
            let mapping = Mapping::check(entry, file.provider.as_deref())
                .map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
            mappings.push(mapping);
        }
        for required in [MarkerKind::RequestBegin, MarkerKind::RequestEnd] {
            if !mappings.iter().any(|m| m.kind == required) {
                bail!(
                    "{origin}: no probe is mapped to {}: without a request's begin and end \
                     nothing can be timed",
                    required.symbol_suffix()
                );
            }
        }
        Ok(Self {
            origin: origin.to_owned(),
            mappings,
        })
    }

    /// The probe sites of an executable, for every probe of the map. A probe the map
    /// names but the executable lacks, or whose argument cannot be read, is an error.
    pub fn resolve(&self, data: &[u8]) -> Result<Vec<MappedProbe>> {
        let elf = ElfFile64::<Endianness, _>::parse(data).context("not a 64-bit ELF executable")?;
        let notes = sdt_notes(&elf, data);
        if notes.is_empty() {
            bail!("the executable has no USDT probes (no .note.stapsdt section)");
        }
        let segments = FileSegments::of(&elf);
        let to_file_offset = |vaddr: u64| segments.file_offset(vaddr);
        let mut sites = Vec::new();
        for mapping in &self.mappings {
            let found: Vec<&SdtNote> = notes
                .iter()
                .filter(|n| n.provider == mapping.provider && n.name == mapping.name)
                .collect();
            if found.is_empty() {
                let mut known: Vec<String> = notes.iter().map(SdtNote::label).collect();
                known.sort_unstable();
                known.dedup();
                bail!(
                    "{}: probe {}:{} is not in the executable; it has: {}",
                    self.origin,
                    mapping.provider,
                    mapping.name,
                    known.join(", ")
                );
            }
            for note in found {
                let spec = mapping
                    .spec(note)
                    .map_err(|e| anyhow::anyhow!("{}: probe {}: {e}", self.origin, note.label()))?;
                let file_offset = to_file_offset(note.pc).with_context(|| {
                    format!(
                        "probe {} at {:#x}: in no file-backed segment",
                        note.label(),
                        note.pc
                    )
                })?;
                let semaphore_offset = match note.semaphore {
                    0 => None,
                    vaddr => Some(to_file_offset(vaddr).with_context(|| {
                        format!(
                            "probe {}: its semaphore at {vaddr:#x} is in no file-backed segment",
                            note.label()
                        )
                    })?),
                };
                sites.push(MappedProbe {
                    label: note.label(),
                    kind: mapping.kind,
                    file_offset,
                    semaphore_offset,
                    spec,
                });
            }
        }
        Ok(sites)
    }
}

impl Mapping {
    fn check(entry: ProbeEntry, default_provider: Option<&str>) -> Result<Self, String> {
        let (provider, name) = match entry.probe.split_once(':') {
            Some((provider, name)) => (provider.to_owned(), name.to_owned()),
            None => (
                default_provider
                    .ok_or_else(|| {
                        format!(
                            "probe `{}`: give it as PROVIDER:NAME or set `provider`",
                            entry.probe
                        )
                    })?
                    .to_owned(),
                entry.probe.clone(),
            ),
        };
        let label = format!("probe {provider}:{name}");
        let kind = MarkerKind::ALL
            .into_iter()
            .find(|k| k.symbol_suffix() == entry.event)
            .ok_or_else(|| {
                let events: Vec<&str> = MarkerKind::ALL.iter().map(|k| k.symbol_suffix()).collect();
                format!(
                    "{label}: unknown event `{}` (one of: {})",
                    entry.event,
                    events.join(", ")
                )
            })?;
        let allowed = slots(kind);
        let mut args = Vec::new();
        for (field, index) in &entry.args {
            let slot = allowed
                .iter()
                .find(|(name, _)| name == field)
                .map(|(_, slot)| *slot)
                .ok_or_else(|| {
                    let names: Vec<&str> = allowed.iter().map(|(n, _)| *n).collect();
                    format!(
                        "{label}: event {} has no argument `{field}` (it takes: {})",
                        entry.event,
                        names.join(", ")
                    )
                })?;
            args.push((slot, *index));
        }
        if !args.iter().any(|(slot, _)| *slot == Slot::RequestId) {
            return Err(format!(
                "{label}: `args.request_id` is required (the argument that names the \
                 request)"
            ));
        }
        let is_stage = matches!(kind, MarkerKind::StageBegin | MarkerKind::StageEnd);
        let stage_arg = entry.args.contains_key("stage");
        let tool_arg = entry.args.contains_key("tool");
        let stage = match (&entry.stage, is_stage) {
            (Some(_), false) => {
                return Err(format!(
                    "{label}: `stage` is only for stage_begin and stage_end"
                ));
            }
            (None, true) if !stage_arg => {
                return Err(format!(
                    "{label}: say which stage: `stage = \"route\"`, or the argument \
                     carrying its name as `args.stage`"
                ));
            }
            (Some(_), true) if stage_arg => {
                return Err(format!(
                    "{label}: `stage` and `args.stage` both given; keep one"
                ));
            }
            (Some(stage), true) => Some(stage_by_name(stage, &label)?),
            (None, _) => None,
        };
        let is_tool = stage
            .as_ref()
            .is_some_and(|(wire, _)| *wire == Stage::ToolExecute as u32);
        if tool_arg && !is_tool {
            return Err(format!(
                "{label}: `args.tool` needs `stage = \"tool.execute\"`"
            ));
        }
        Ok(Self {
            provider,
            name,
            kind,
            stage,
            args,
        })
    }

    fn spec(&self, note: &SdtNote) -> Result<UsdtSpec, String> {
        let operands: Vec<&str> = note.args.split_whitespace().collect();
        let mut spec = UsdtSpec {
            marker: self.kind as u32,
            fixed_text_len: 0,
            request_id: UsdtArg::ABSENT,
            values: [UsdtArg::ABSENT; 2],
            texts: [UsdtArg::ABSENT; 2],
            fixed_text: [0; TEXT_CAP],
        };
        for (slot, index) in &self.args {
            let operand = operands.get(*index).ok_or_else(|| {
                format!(
                    "argument {index} is mapped but the probe has {} (`{}`)",
                    operands.len(),
                    note.args
                )
            })?;
            let arg = parse_arg_spec(operand).map_err(|e| format!("argument {index}: {e}"))?;
            match slot {
                Slot::RequestId => spec.request_id = arg,
                Slot::Value(i) => spec.values[*i] = arg,
                Slot::Text(i) => spec.texts[*i] = arg,
            }
        }
        if let Some((wire, custom)) = &self.stage {
            spec.values[0] = UsdtArg::constant(i64::from(*wire));
            if let Some(name) = custom {
                let bytes = name.as_bytes();
                spec.fixed_text[..bytes.len()].copy_from_slice(bytes);
                spec.fixed_text_len = bytes.len() as u32;
            }
        }
        Ok(spec)
    }
}

/// A stage named in a map: a known stage's wire value, or a custom stage and its name.
/// `label` names what the map says about, in errors.
pub(crate) fn stage_by_name(name: &str, label: &str) -> Result<(u32, Option<String>), String> {
    if let Some(known) = Stage::ALL
        .into_iter()
        .find(|s| *s != Stage::Custom && s.name() == name)
    {
        return Ok((known as u32, None));
    }
    let valid = !name.is_empty()
        && name.len() < TEXT_CAP
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !valid {
        return Err(format!(
            "{label}: stage `{name}`: a custom stage name is 1 to {} characters of \
             letters, digits, `.`, `_` and `-`",
            TEXT_CAP - 1
        ));
    }
    Ok((Stage::Custom as u32, Some(name.to_owned())))
}

/// Where the instruction at `file_offset` of `exe` is in process `pid`'s memory (the
/// address a uprobe there sees).
pub fn runtime_address(pid: u32, exe: &Path, file_offset: u64) -> Result<u64> {
    mapped_address(pid, exe, file_offset, 'x')
}

/// Where `file_offset` of `exe` is in process `pid`'s memory: found in /proc/PID/maps by
/// the file's device and inode. Linkers may let two segments share a file page (lld: the
/// end of the read-only data and the start of the code, or of the writable data), so the
/// mapping with permission `perm` (`x` for code, `w` for data the process writes) is
/// preferred.
pub fn mapped_address(pid: u32, exe: &Path, file_offset: u64, perm: char) -> Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let file = fs::metadata(exe).with_context(|| format!("reading {}", exe.display()))?;
    let device = format!(
        "{:02x}:{:02x}",
        libc::major(file.dev()),
        libc::minor(file.dev())
    );
    let maps_path = format!("/proc/{pid}/maps");
    let maps = fs::read_to_string(&maps_path).with_context(|| format!("reading {maps_path}"))?;
    let mut found = None;
    for line in maps.lines() {
        // start-end perms offset dev inode [path]
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms), Some(offset), Some(dev), Some(inode)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        if dev != device || inode.parse::<u64>().ok() != Some(file.ino()) {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let hex = |text: &str| u64::from_str_radix(text, 16).ok();
        let (Some(start), Some(end), Some(offset)) = (hex(start), hex(end), hex(offset)) else {
            continue;
        };
        if (offset..offset + (end - start)).contains(&file_offset) {
            let address = start + (file_offset - offset);
            if perms.contains(perm) {
                return Ok(address);
            }
            found.get_or_insert(address);
        }
    }
    if let Some(address) = found {
        return Ok(address);
    }
    bail!(
        "file offset {file_offset:#x} of {} is not mapped in PID {pid}",
        exe.display()
    )
}

impl fmt::Display for MappedProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} as {} at {:#x}",
            self.label,
            self.kind.symbol_suffix(),
            self.file_offset
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdt_descriptions_are_read_and_follow_their_base() {
        let mut desc = Vec::new();
        for word in [0x1130u64, 0x2000, 0x4010] {
            desc.extend(word.to_le_bytes());
        }
        desc.extend(b"broker\0request_begin\08@%rdi -8@%rsi\0");
        let note = SdtNote {
            provider: "broker".into(),
            name: "request_begin".into(),
            pc: 0x1130,
            semaphore: 0x4010,
            args: "8@%rdi -8@%rsi".into(),
        };
        assert_eq!(parse_sdt_desc(&desc, Some(0x2000)), Some(note.clone()));
        // Prelinked: .stapsdt.base moved by 0x100, and the probe and semaphore with it.
        let moved = parse_sdt_desc(&desc, Some(0x2100)).unwrap();
        assert_eq!((moved.pc, moved.semaphore), (0x1230, 0x4110));
        assert_eq!(parse_sdt_desc(&desc[..20], None), None);
    }

    #[test]
    fn argument_specs_decode_to_kernel_reads() {
        let reg = parse_arg_spec("8@%rdi").unwrap();
        assert_eq!(
            (reg.kind, reg.size, reg.reg_offset),
            (ArgKind::Register as u32, 8, 112)
        );
        let sub = parse_arg_spec("-4@%eax").unwrap();
        assert_eq!((sub.size, sub.reg_offset), (-4, 80));
        let mem = parse_arg_spec("-4@-20(%rbp)").unwrap();
        assert_eq!(
            (mem.kind, mem.reg_offset, mem.value),
            (ArgKind::Memory as u32, 32, -20)
        );
        let bare = parse_arg_spec("8@(%rsp)").unwrap();
        assert_eq!(
            (bare.kind, bare.reg_offset, bare.value),
            (ArgKind::Memory as u32, 152, 0)
        );
        let constant = parse_arg_spec("4@$-0x10").unwrap();
        assert_eq!(
            (constant.kind, constant.value),
            (ArgKind::Constant as u32, -16)
        );
        for bad in [
            "%rdi",
            "3@%rdi",
            "8@%xmm0",
            "8@(%rax,%rbx,8)",
            "8@16",
            "8@$x",
        ] {
            assert!(parse_arg_spec(bad).is_err(), "{bad} accepted");
        }
    }

    const MAP: &str = r#"
provider = "broker"

[[probe]]
probe = "request-start"
event = "request_begin"
args = { request_id = 0, model = 1 }

[[probe]]
probe = "route-start"
event = "stage_begin"
stage = "route"
args = { request_id = 0 }

[[probe]]
probe = "other:cache-start"
event = "stage_begin"
stage = "cache.lookup"
args = { request_id = 0 }

[[probe]]
probe = "request-done"
event = "request_end"
args = { request_id = 0, status = 1 }
"#;

    #[test]
    fn probe_maps_are_checked() {
        let map = UsdtMap::parse(MAP, "map.toml").unwrap();
        assert_eq!(map.mappings.len(), 4);
        assert_eq!(map.mappings[1].stage, Some((Stage::Route as u32, None)));
        assert_eq!(map.mappings[2].provider, "other");
        assert_eq!(
            map.mappings[2].stage,
            Some((Stage::Custom as u32, Some("cache.lookup".into())))
        );
        let fails = |text: &str, expected: &str| {
            let error = format!("{:#}", UsdtMap::parse(text, "map.toml").unwrap_err());
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        };
        let end =
            "\n[[probe]]\nprobe = \"b:e\"\nevent = \"request_end\"\nargs = { request_id = 0 }\n";
        fails("", "no probe is mapped to request_begin");
        fails(
            &format!("[[probe]]\nprobe = \"b:s\"\nevent = \"begin\"\n{end}"),
            "unknown event `begin` (one of: request_begin",
        );
        fails(
            &format!("[[probe]]\nprobe = \"s\"\nevent = \"request_begin\"\n{end}"),
            "give it as PROVIDER:NAME",
        );
        fails(
            &format!(
                "[[probe]]\nprobe = \"b:s\"\nevent = \"request_begin\"\nargs = {{ request_id = 0, \
                 status = 1 }}\n{end}"
            ),
            "has no argument `status` (it takes: request_id, model, traceparent)",
        );
        fails(
            &format!(
                "[[probe]]\nprobe = \"b:s\"\nevent = \"request_begin\"\nargs = {{ model = 1 }}\n{end}"
            ),
            "`args.request_id` is required",
        );
        fails(
            &format!(
                "{end}[[probe]]\nprobe = \"b:x\"\nevent = \"stage_begin\"\nargs = {{ request_id = 0 }}\n"
            ),
            "say which stage",
        );
        fails(
            &format!(
                "{end}[[probe]]\nprobe = \"b:x\"\nevent = \"stage_begin\"\nstage = \"a b\"\nargs = {{ request_id = 0 }}\n"
            ),
            "a custom stage name is 1 to 63 characters",
        );
        fails("provider = 3\n", "map.toml:1");
    }

    #[test]
    fn mapped_arguments_must_exist_in_the_probe() {
        let map = UsdtMap::parse(MAP, "map.toml").unwrap();
        let note = |args: &str| SdtNote {
            provider: "broker".into(),
            name: "request-start".into(),
            pc: 0,
            semaphore: 0,
            args: args.into(),
        };
        let spec = map.mappings[0].spec(&note("8@%rdi 8@%rsi")).unwrap();
        assert_eq!(spec.request_id.reg_offset, 112);
        assert_eq!(spec.texts[0].reg_offset, 104);
        let error = map.mappings[0].spec(&note("8@%rdi")).unwrap_err();
        assert!(
            error.contains("argument 1 is mapped but the probe has 1"),
            "{error}"
        );
        let route = map.mappings[1].spec(&note("8@%rdi")).unwrap();
        assert_eq!(route.values[0], UsdtArg::constant(Stage::Route as i64));
        let cache = map.mappings[2].spec(&note("8@%rdi")).unwrap();
        assert_eq!(
            &cache.fixed_text[..cache.fixed_text_len as usize],
            b"cache.lookup"
        );
    }
}
