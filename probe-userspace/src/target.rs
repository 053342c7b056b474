//! Finds what to attach to: the broker process, its executable, and the file offsets of
//! its marker functions (ELF symbol → program header → file offset).

use std::{
    fmt, fs,
    io::ErrorKind,
    path::{Component, Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use object::{
    Endianness, Object as _, ObjectSymbol as _, SymbolKind,
    elf::PT_LOAD,
    read::elf::{ElfFile64, ProgramHeader as _},
};
use probe_common::marker::{
    MARKER_ABI_VERSION, MARKER_SYMBOL_PREFIX, MarkerKind, SEMAPHORE_ANCHOR_SYMBOL, SEMAPHORE_SYMBOL,
};

use crate::semaphore::Semaphore;

/// A running process and the markers found in its executable.
#[derive(Debug)]
pub struct Target {
    pub pid: u32,
    /// Process name (`/proc/PID/comm`).
    pub name: String,
    /// The executable as the process sees it (may be in another mount namespace).
    pub exe_display: PathBuf,
    /// A path that opens that very file from here: `/proc/PID/exe`.
    pub exe: PathBuf,
    pub markers: Vec<FoundMarker>,
    pub missing: Vec<MarkerKind>,
    /// The gate the markers sit behind, if the broker has one (probe-markers does).
    pub semaphore: Option<Semaphore>,
    /// Why the markers cannot be used, if they cannot: then only sockets can be followed.
    pub marker_problem: Option<MarkerProblem>,
}

impl std::fmt::Display for Target {
    /// `PID n (name, executable)`, as every message about a process names it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PID {} ({}, {})",
            self.pid,
            self.name,
            self.exe_display.display()
        )
    }
}

/// What the symbol tables say about markers.
#[derive(Debug)]
pub struct MarkerScan {
    pub markers: Vec<FoundMarker>,
    pub semaphore: Option<Semaphore>,
    pub problem: Option<MarkerProblem>,
}

#[derive(Clone, Copy, Debug)]
pub struct FoundMarker {
    pub kind: MarkerKind,
    pub file_offset: u64,
}

/// Why markers could not be used; each says what to do.
#[derive(Debug)]
pub enum MarkerProblem {
    /// No symbol table at all: the binary was stripped.
    Stripped,
    /// Markers of another ABI version.
    AbiMismatch { found: u32 },
    /// Symbols present, but not the required markers.
    Missing(Vec<MarkerKind>),
    /// The executable could not be read as a 64-bit ELF file (e.g. a 32-bit binary).
    Unreadable(String),
    /// A semaphore without its anchor (or the reverse): the gate could not be opened.
    HalfSemaphore,
}

impl fmt::Display for MarkerProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MarkerProblem::Stripped => write!(
                f,
                "the binary has no symbol table (stripped), so its markers cannot be found; \
                 build it without `strip` (symbols add no run-time cost)"
            ),
            MarkerProblem::AbiMismatch { found } => write!(
                f,
                "the broker uses marker ABI v{found}, this brokerprobe understands \
                 v{MARKER_ABI_VERSION}; use a brokerprobe matching its probe-markers"
            ),
            MarkerProblem::Missing(kinds) => {
                let names: Vec<String> = kinds.iter().map(|k| marker_symbol(*k)).collect();
                write!(
                    f,
                    "markers not found: {} (does the broker link probe-markers and call them?)",
                    names.join(", ")
                )
            }
            MarkerProblem::Unreadable(why) => {
                write!(f, "its executable's symbols cannot be read: {why}")
            }
            MarkerProblem::HalfSemaphore => write!(
                f,
                "it has only one of {SEMAPHORE_SYMBOL} and {SEMAPHORE_ANCHOR_SYMBOL}: its \
                 markers cannot be switched on (docs/markers.md, \"Semaphore\")"
            ),
        }
    }
}

/// `path` absolute (from the current directory), without `.` and `..` components.
fn normalized(path: &Path) -> PathBuf {
    let absolute = match path.is_absolute() {
        true => path.to_path_buf(),
        false => std::env::current_dir().unwrap_or_default().join(path),
    };
    let mut normal = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    normal
}

/// Bytes of a process name the kernel keeps (`TASK_COMM_LEN` - 1).
const COMM_LEN: usize = 15;

/// Which processes `--follow` attaches to: those running an executable of this name, or
/// at this path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// The executable's file name, or the process name (`comm`) if at most 15 bytes.
    Name(String),
    /// The executable's path, as the process sees it.
    Path(PathBuf),
}

impl Selector {
    /// A value with a `/` is a path. The kernel names a process's executable by its
    /// resolved absolute path, so the path is resolved too (symbolic links, `..`, relative
    /// to here) when it exists here, else made absolute and rid of `.` and `..` (a path in
    /// another mount namespace, as in a container).
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "" => Err("an empty name".into()),
            path if path.contains('/') => Ok(Selector::Path(
                fs::canonicalize(path).unwrap_or_else(|_| normalized(Path::new(path))),
            )),
            name => Ok(Selector::Name(name.to_owned())),
        }
    }

    /// The PIDs of the processes that match now, lowest first; brokerprobe itself never.
    pub fn scan(&self) -> Vec<u32> {
        let own = std::process::id();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut pids: Vec<u32> = entries
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .filter(|pid| *pid != own && self.matches(*pid))
            .collect();
        pids.sort_unstable();
        pids
    }

    fn matches(&self, pid: u32) -> bool {
        // Kernel threads and processes gone meanwhile have no readable executable.
        let Ok(exe) = fs::read_link(format!("/proc/{pid}/exe")) else {
            return false;
        };
        match self {
            Selector::Path(path) => exe == *path,
            Selector::Name(name) => {
                let exe_name = exe.file_name().and_then(|n| n.to_str()).unwrap_or("");
                // The process name is cut to 15 bytes: a longer one cannot be told by it.
                let by_comm = name.len() <= COMM_LEN
                    && fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|comm| comm.trim_end() == name);
                exe_name == name || by_comm
            }
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Name(name) => write!(f, "name {name}"),
            Selector::Path(path) => write!(f, "path {}", path.display()),
        }
    }
}

pub fn marker_symbol(kind: MarkerKind) -> String {
    format!("{MARKER_SYMBOL_PREFIX}{}", kind.symbol_suffix())
}

impl Target {
    /// Looks up `pid` and the markers of its executable.
    pub fn open(pid: u32) -> Result<Self> {
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let name = match fs::read_to_string(proc_dir.join("comm")) {
            Ok(comm) => comm.trim_end().to_owned(),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                bail!("no process with PID {pid}: check the PID (e.g. `pgrep -a BROKER`)")
            }
            Err(e) => return Err(e).with_context(|| format!("reading /proc/{pid}/comm")),
        };
        let exe = proc_dir.join("exe");
        let exe_display = match fs::read_link(&exe) {
            Ok(path) => path,
            Err(e) if e.kind() == ErrorKind::NotFound => bail!(
                "PID {pid} ({name}) has no executable: it is a kernel thread or has exited; \
                 attach to a broker process"
            ),
            Err(e) if e.kind() == ErrorKind::PermissionDenied => bail!(
                "may not inspect PID {pid} ({name}): run brokerprobe as root \
                 (or with CAP_SYS_PTRACE, CAP_BPF and CAP_PERFMON)"
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {}", exe.display())),
        };
        let file = fs::File::open(&exe).with_context(|| {
            format!(
                "opening the executable of PID {pid} ({})",
                exe_display.display()
            )
        })?;
        let scan = find_markers(&file).unwrap_or_else(|e| MarkerScan {
            markers: Vec::new(),
            semaphore: None,
            problem: Some(MarkerProblem::Unreadable(format!("{e:#}"))),
        });
        let missing = missing_kinds(&scan.markers);
        Ok(Self {
            pid,
            name,
            exe_display,
            exe,
            markers: scan.markers,
            missing,
            semaphore: scan.semaphore,
            marker_problem: scan.problem,
        })
    }
}

/// Reads the symbol tables (.symtab and .dynsym) of an ELF file for marker symbols and
/// the semaphore that gates them.
pub fn find_markers(file: &fs::File) -> Result<MarkerScan> {
    // Mapped, not read: a broker binary can be 100+ MB, of which only the symbol tables
    // are touched (read piecewise, its many small names cost a syscall each).
    // SAFETY: the file is a running executable, which the kernel does not let anyone
    // write to (ETXTBSY); replacing it on disk leaves this inode as it is.
    let map = unsafe { memmap2::Mmap::map(file) }.context("mapping the executable")?;
    find_markers_in(&map)
}

/// [`find_markers`] on an executable's bytes, whatever they are (fuzzed: fuzz/).
pub fn find_markers_in(data: &[u8]) -> Result<MarkerScan> {
    let elf = ElfFile64::<Endianness, _>::parse(data).context("not a 64-bit ELF executable")?;
    let segments = FileSegments::of(&elf);
    let file_offset = |name: &str, vaddr: u64| {
        segments
            .file_offset(vaddr)
            .with_context(|| format!("{name} at {vaddr:#x} is in no file-backed segment"))
    };

    let mut markers = Vec::new();
    let (mut counter, mut anchor) = (None, None);
    let mut other_abi = None;
    // Only symbols defined here: an undefined reference (address 0) is not a marker.
    let defined = elf
        .symbols()
        .chain(elf.dynamic_symbols())
        .filter(|sym| !sym.is_undefined());
    for symbol in defined {
        let Ok(name) = symbol.name() else { continue };
        let Some(rest) = name.strip_prefix("brokerprobe_v") else {
            continue;
        };
        match (name, symbol.kind()) {
            (SEMAPHORE_SYMBOL, SymbolKind::Data) => {
                counter = Some(file_offset(name, symbol.address())?);
                continue;
            }
            (SEMAPHORE_ANCHOR_SYMBOL, SymbolKind::Text) => {
                anchor = Some(file_offset(name, symbol.address())?);
                continue;
            }
            (_, SymbolKind::Text) => {}
            _ => continue,
        }
        let Some(suffix) = name.strip_prefix(MARKER_SYMBOL_PREFIX) else {
            if other_abi.is_none() {
                other_abi = rest.split('_').next().and_then(|v| v.parse().ok());
            }
            continue;
        };
        let Some(kind) = MarkerKind::ALL
            .into_iter()
            .find(|k| k.symbol_suffix() == suffix)
        else {
            continue;
        };
        if markers.iter().any(|m: &FoundMarker| m.kind == kind) {
            continue; // the same marker in .symtab and .dynsym
        }
        let file_offset = file_offset(name, symbol.address())?;
        markers.push(FoundMarker { kind, file_offset });
    }

    let missing = missing_kinds(&markers);
    let usable = missing.iter().all(|k| !k.is_required());
    // Markers live in .symtab; .dynsym alone (kept by `strip`) does not list them.
    let stripped = elf.section_by_name(".symtab").is_none();
    let semaphore = anchor
        .zip(counter)
        .map(|(anchor_offset, counter_offset)| Semaphore {
            anchor_offset,
            counter_offset,
        });
    let half_semaphore = anchor.is_some() != counter.is_some();
    let problem = match (usable, stripped, other_abi) {
        (true, _, _) => half_semaphore.then_some(MarkerProblem::HalfSemaphore),
        (false, _, Some(found)) => Some(MarkerProblem::AbiMismatch { found }),
        (false, true, None) => Some(MarkerProblem::Stripped),
        (false, false, None) => Some(MarkerProblem::Missing(missing)),
    };
    Ok(MarkerScan {
        markers,
        semaphore,
        problem,
    })
}

/// The file-backed bytes of an executable's loaded segments: the kernel finds code, and
/// counters it raises, by file offset.
pub struct FileSegments(Vec<(u64, u64, u64)>);

impl FileSegments {
    pub fn of<'data>(elf: &ElfFile64<'data, Endianness, &'data [u8]>) -> Self {
        let endian = elf.endian();
        Self(
            elf.elf_program_headers()
                .iter()
                .filter(|ph| ph.p_type(endian) == PT_LOAD)
                .map(|ph| (ph.p_vaddr(endian), ph.p_filesz(endian), ph.p_offset(endian)))
                .collect(),
        )
    }

    /// The file offset of link-time address `vaddr`, if a segment's file bytes hold it.
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.0
            .iter()
            .find(|(start, size, _)| (*start..start.saturating_add(*size)).contains(&vaddr))
            .and_then(|(start, _, offset)| (vaddr - start).checked_add(*offset))
    }
}

fn missing_kinds(markers: &[FoundMarker]) -> Vec<MarkerKind> {
    MarkerKind::ALL
        .into_iter()
        .filter(|kind| !markers.iter().any(|m| m.kind == *kind))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{io::Read as _, io::Seek as _, process::Command};

    use super::*;

    /// `--follow` values: a path has a `/`; a name matches the executable's file name, or
    /// the process name when it is short enough for the kernel to keep it whole.
    #[test]
    fn follow_selectors_match_by_name_or_path() {
        let own = std::process::id();
        let exe = fs::read_link("/proc/self/exe").unwrap();
        let exe_name = exe.file_name().unwrap().to_str().unwrap().to_owned();
        assert_eq!(Selector::parse(""), Err("an empty name".into()));
        assert_eq!(
            Selector::parse(exe.to_str().unwrap()),
            Ok(Selector::Path(exe.clone()))
        );
        // Spelt with `..` (or relative, or through a link), the same executable.
        let dir = exe.parent().unwrap();
        let roundabout = dir
            .join("..")
            .join(dir.file_name().unwrap())
            .join(&exe_name);
        assert_eq!(
            Selector::parse(roundabout.to_str().unwrap()),
            Ok(Selector::Path(exe.clone()))
        );
        // A path not here (another mount namespace) is only tidied.
        assert_eq!(
            Selector::parse("/opt/app/../bin/./broker"),
            Ok(Selector::Path("/opt/bin/broker".into()))
        );
        assert!(Selector::Path(exe).matches(own));
        assert!(Selector::Name(exe_name.clone()).matches(own));
        assert!(!Selector::Name(format!("{exe_name}-not")).matches(own));
        assert!(!Selector::Path("/no/such/broker".into()).matches(own));
        // Never brokerprobe itself, even when it matches.
        assert!(!Selector::Name(exe_name).scan().contains(&own));
        // A kernel thread has no executable: never matched.
        assert!(!Selector::Name("kthreadd".into()).matches(2));
    }

    /// Links every marker into this test binary, so it is itself a target.
    fn call_every_marker() {
        let id = probe_markers::RequestId::next();
        probe_markers::request_begin(id, "m", None);
        probe_markers::stage_begin(id, probe_markers::Stage::Route);
        probe_markers::stage_end(id, probe_markers::Stage::Route);
        probe_markers::provider(id, "p");
        probe_markers::first_byte(id);
        probe_markers::chunk(id);
        probe_markers::token_usage(id, 1, 2);
        probe_markers::fallback(id, "a", "b");
        probe_markers::request_end(id, 200, None);
    }

    fn markers_of(path: &std::path::Path) -> MarkerScan {
        find_markers(&fs::File::open(path).unwrap()).unwrap()
    }

    /// Markers of a copy of this test binary changed by `objcopy`/`strip` with `args`.
    fn markers_of_altered(tool: &str, args: &[&str], name: &str) -> MarkerScan {
        let out = std::env::temp_dir().join(format!(
            "brokerprobe-target-test-{}-{name}",
            std::process::id()
        ));
        fs::copy(std::env::current_exe().unwrap(), &out).unwrap();
        let status = Command::new(tool)
            .args(args)
            .arg(&out)
            .status()
            .unwrap_or_else(|e| panic!("{tool} (binutils) is needed for this test: {e}"));
        assert!(status.success());
        let found = markers_of(&out);
        fs::remove_file(&out).unwrap();
        found
    }

    #[test]
    fn finds_every_marker_at_its_nop() {
        call_every_marker();
        let exe = std::env::current_exe().unwrap();
        let MarkerScan {
            markers,
            semaphore,
            problem,
        } = markers_of(&exe);
        assert!(problem.is_none(), "{problem:?}");
        assert_eq!(markers.len(), MarkerKind::ALL.len());
        let mut file = fs::File::open(&exe).unwrap();
        // The semaphore is a file-backed u16 that starts at 0; its anchor never runs: it
        // follows a `ret`.
        let semaphore = semaphore.expect("probe-markers has a semaphore");
        let mut bytes = [0xffu8; 2];
        file.seek(std::io::SeekFrom::Start(semaphore.counter_offset))
            .unwrap();
        file.read_exact(&mut bytes).unwrap();
        assert_eq!(bytes, [0, 0]);
        file.seek(std::io::SeekFrom::Start(semaphore.anchor_offset - 1))
            .unwrap();
        file.read_exact(&mut bytes).unwrap();
        assert_eq!(bytes[0], 0xc3, "the anchor does not follow a ret");
        for marker in markers {
            let mut entry = [0u8; 5];
            file.seek(std::io::SeekFrom::Start(marker.file_offset))
                .unwrap();
            file.read_exact(&mut entry).unwrap();
            assert_eq!(
                entry,
                [0x0f, 0x1f, 0x44, 0x00, 0x00],
                "{:?} offset is not the NOP",
                marker.kind
            );
        }
    }

    #[test]
    fn stripped_binary_is_named_as_such() {
        call_every_marker();
        let problem = markers_of_altered("strip", &[], "stripped").problem;
        assert!(
            matches!(problem, Some(MarkerProblem::Stripped)),
            "{problem:?}"
        );
        assert!(problem.unwrap().to_string().contains("stripped"));
    }

    #[test]
    fn other_abi_version_is_reported() {
        call_every_marker();
        let renames: Vec<String> = MarkerKind::ALL
            .iter()
            .flat_map(|k| {
                [
                    "--redefine-sym".to_owned(),
                    format!(
                        "{}={}",
                        marker_symbol(*k),
                        marker_symbol(*k).replace("_v1_", "_v2_")
                    ),
                ]
            })
            .collect();
        let args: Vec<&str> = renames.iter().map(String::as_str).collect();
        let problem = markers_of_altered("objcopy", &args, "v2").problem;
        assert!(
            matches!(problem, Some(MarkerProblem::AbiMismatch { found: 2 })),
            "{problem:?}"
        );
    }

    #[test]
    fn missing_required_marker_is_named() {
        call_every_marker();
        let symbol = marker_symbol(MarkerKind::RequestEnd);
        let scan = markers_of_altered("objcopy", &["--strip-symbol", &symbol], "missing");
        assert_eq!(scan.markers.len(), MarkerKind::ALL.len() - 1);
        let message = scan.problem.expect("request_end is required").to_string();
        assert!(
            message.contains(&symbol) && !message.contains("request_begin"),
            "{message}"
        );
    }

    #[test]
    fn semaphore_without_anchor_is_named() {
        call_every_marker();
        let scan = markers_of_altered(
            "objcopy",
            &["--strip-symbol", SEMAPHORE_ANCHOR_SYMBOL],
            "half-semaphore",
        );
        assert!(scan.semaphore.is_none());
        let message = scan.problem.expect("half a semaphore").to_string();
        assert!(message.contains(SEMAPHORE_ANCHOR_SYMBOL), "{message}");
    }

    #[test]
    fn missing_pid_gets_a_clear_error() {
        // (A kernel thread's error is tested end to end in tests/e2e/tests/cli.rs.)
        let err = Target::open(u32::MAX - 1).unwrap_err().to_string();
        assert!(err.contains("no process with PID"), "{err}");
    }
}
