//! Symbol-mapped stages (docs/modes/symbols.md): a broker with neither markers nor USDT
//! probes still has functions. A symbol map names, per stage, the function whose one
//! synchronous call is that stage (demangled Rust names, `*` and `?` as wildcards);
//! brokerprobe times each call from entry to return on its thread.
//!
//! What a uprobe cannot time is refused, never timed wrongly: an async fn's body (its
//! `{{closure}}`) and `poll` methods run once per poll, so entry to return is one poll,
//! not the stage; and an async fn's own symbol only builds its future. A function the
//! compiler inlined everywhere has no symbol: that is said, with what it could be.

use std::{collections::HashSet, fs, path::Path};

use anyhow::{Context as _, Result, bail};
use object::{Endianness, Object as _, ObjectSymbol as _, SymbolKind, read::elf::ElfFile64};
use serde::Deserialize;
use wildmatch::WildMatch;

use crate::{inspect::is_polled, target::FileSegments, usdt::stage_by_name};

/// Names offered when a function is not found.
const SIMILAR_SHOWN: usize = 3;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MapFile {
    #[serde(default)]
    stage: Vec<StageEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StageEntry {
    /// A known stage (`route`, …) or a custom name.
    stage: String,
    /// Demangled function name, without the hash; `*` and `?` match anything.
    function: String,
}

/// A symbol map: which function's call is which stage.
#[derive(Clone, Debug)]
pub struct SymbolMap {
    origin: String,
    /// (stage, function pattern); the index is the stage's number on the wire.
    stages: Vec<(String, String)>,
}

/// One function to probe at entry and return.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolProbe {
    /// Index in the map: the probes' attach cookie, the sample's stage.
    pub stage: u32,
    /// Demangled, for messages.
    pub function: String,
    pub file_offset: u64,
}

impl SymbolMap {
    pub fn load(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("reading the symbol map {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let file: MapFile = crate::toml_file::parse(text, origin).map_err(anyhow::Error::msg)?;
        if file.stage.is_empty() {
            bail!("{origin}: no [[stage]]: nothing to time");
        }
        let mut stages = Vec::new();
        for entry in file.stage {
            stage_by_name(&entry.stage, &format!("function {}", entry.function))
                .map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
            if entry.function.trim().is_empty() {
                bail!("{origin}: stage {}: `function` is empty", entry.stage);
            }
            stages.push((entry.stage, entry.function));
        }
        Ok(Self {
            origin: origin.to_owned(),
            stages,
        })
    }

    /// Stage names by their number.
    pub fn stage_names(&self) -> Vec<String> {
        self.stages.iter().map(|(stage, _)| stage.clone()).collect()
    }

    /// The functions of an executable to probe, for every stage of the map; a stage that
    /// matches nothing, or only what a uprobe cannot time, is an error.
    pub fn resolve(&self, data: &[u8]) -> Result<Vec<SymbolProbe>> {
        let elf = ElfFile64::<Endianness, _>::parse(data).context("not a 64-bit ELF executable")?;
        if elf.section_by_name(".symtab").is_none() {
            bail!(
                "the executable has no symbol table (stripped): a symbol map needs one; build \
                 it without `strip` (symbols cost nothing at run time)"
            );
        }
        let segments = FileSegments::of(&elf);
        let functions: Vec<(String, u64)> = elf
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Text && !s.is_undefined() && s.address() != 0)
            .filter_map(|s| {
                let name = s.name().ok()?;
                Some((format!("{:#}", rustc_demangle::demangle(name)), s.address()))
            })
            .collect();
        let names: HashSet<&str> = functions.iter().map(|(name, _)| name.as_str()).collect();
        let mut probes = Vec::new();
        for (index, (stage, pattern)) in self.stages.iter().enumerate() {
            let wanted = WildMatch::new(pattern);
            let mut addresses = HashSet::new();
            let mut matched = 0;
            for (name, address) in functions.iter().filter(|(name, _)| wanted.matches(name)) {
                matched += 1;
                if let Some(why) = untimeable(name, &names) {
                    bail!(
                        "{}: stage {stage}: `{name}` {why}: a uprobe cannot time it; mark the \
                         stage with probe-markers or a USDT probe instead",
                        self.origin
                    );
                }
                if !addresses.insert(*address) {
                    continue; // an alias of a function already taken
                }
                let file_offset = segments
                    .file_offset(*address)
                    .with_context(|| format!("`{name}` is in no file-backed segment"))?;
                probes.push(SymbolProbe {
                    stage: index as u32,
                    function: name.clone(),
                    file_offset,
                });
            }
            if matched == 0 {
                bail!(
                    "{}: stage {stage}: no function `{pattern}` in the executable: the compiler \
                     inlined it everywhere (mark it #[inline(never)]) or it is named otherwise{}",
                    self.origin,
                    similar(pattern, &functions)
                );
            }
        }
        Ok(probes)
    }
}

/// Why a uprobe on `name` would not time a stage, if it would not.
fn untimeable(name: &str, names: &HashSet<&str>) -> Option<&'static str> {
    if name.contains("{{closure}}") {
        return Some("is a closure or an async fn's body, entered once per poll");
    }
    if is_polled(name) {
        return Some("is a poll method, entered once per poll");
    }
    if names.contains(format!("{name}::{{{{closure}}}}").as_str()) {
        return Some("is an async fn (or returns a closure): its call only builds the future");
    }
    None
}

/// `; similar: a, b, c` — functions whose names end like the pattern's last segment.
fn similar(pattern: &str, functions: &[(String, u64)]) -> String {
    let last = pattern
        .rsplit("::")
        .next()
        .unwrap_or(pattern)
        .trim_matches('*');
    if last.is_empty() {
        return String::new();
    }
    let mut found: Vec<&str> = functions
        .iter()
        .map(|(name, _)| name.as_str())
        .filter(|name| name.rsplit("::").next() == Some(last))
        .collect();
    found.sort_unstable();
    found.dedup();
    found.truncate(SIMILAR_SHOWN);
    if found.is_empty() {
        String::new()
    } else {
        format!("; similar: {}", found.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_checked() {
        let map = SymbolMap::parse(
            "[[stage]]\nstage = \"route\"\nfunction = \"broker::route\"\n\
             [[stage]]\nstage = \"cache.lookup\"\nfunction = \"broker::cache::*\"\n",
            "map.toml",
        )
        .unwrap();
        assert_eq!(map.stage_names(), ["route", "cache.lookup"]);
        let fails = |text: &str, expected: &str| {
            let error = format!("{:#}", SymbolMap::parse(text, "map.toml").unwrap_err());
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        };
        fails("", "no [[stage]]");
        fails(
            "[[stage]]\nstage = \"a b\"\nfunction = \"f\"\n",
            "custom stage name",
        );
        fails(
            "[[stage]]\nstage = \"route\"\nfunction = \" \"\n",
            "`function` is empty",
        );
        fails("[[stage]]\nstage = \"route\"\nfn = \"f\"\n", "map.toml:3");
    }

    #[test]
    fn what_runs_once_per_poll_is_refused() {
        let names: HashSet<&str> = ["b::serve", "b::serve::{{closure}}", "b::route"].into();
        assert!(untimeable("b::serve::{{closure}}", &names).is_some());
        assert!(untimeable("b::serve", &names).unwrap().contains("async fn"));
        assert!(untimeable("<b::Body as http_body::Body>::poll_frame", &names).is_some());
        assert_eq!(untimeable("b::route", &names), None);
    }

    #[inline(never)]
    fn a_stage_function() -> u64 {
        std::hint::black_box(7)
    }

    /// This test binary: its own function, found by demangled name and glob.
    #[test]
    fn this_binary_resolves() {
        assert_eq!(a_stage_function(), 7);
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let map = SymbolMap::parse(
            "[[stage]]\nstage = \"route\"\nfunction = \"probe_userspace::symbols::*::a_stage_fun?tion\"\n",
            "map.toml",
        )
        .unwrap();
        let probes = map.resolve(&exe).unwrap();
        assert_eq!(probes.len(), 1, "{probes:?}");
        assert_eq!(
            probes[0].function,
            "probe_userspace::symbols::tests::a_stage_function"
        );
        let absent = SymbolMap::parse(
            "[[stage]]\nstage = \"route\"\nfunction = \"nowhere::a_stage_function\"\n",
            "map.toml",
        )
        .unwrap();
        let error = format!("{:#}", absent.resolve(&exe).unwrap_err());
        assert!(
            error.contains("no function `nowhere::a_stage_function`")
                && error.contains("similar: probe_userspace::symbols::tests::a_stage_function"),
            "{error}"
        );
    }
}
