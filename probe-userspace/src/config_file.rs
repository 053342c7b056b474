//! `brokerprobe attach --config FILE`: the same settings as the flags, in TOML, for a
//! service unit or a deployment. A key is a long flag's name (`metrics-addr = "..."`), a
//! list repeats or joins its values as the flag takes them, a table gives `KEY=VALUE`
//! pairs (`[trace-keep-stage]`); flags on the command line win. Every value is checked
//! exactly as its flag would be, and a bad one is reported with its file and line.

use std::{ffi::OsString, path::Path};

use clap::{ArgAction, Command};
use probe_userspace::toml_file;

/// The command line with the settings of the file named by `--config` put in front of
/// the command line's own (which, coming later, win). Without `--config`, `args` as is.
/// `attach` is the subcommand the settings are for (`top` takes the same).
pub fn expand(args: Vec<OsString>, attach: &Command) -> Result<Vec<OsString>, String> {
    // After the subcommand's name: the settings are its flags.
    let Some(at) = args
        .iter()
        .position(|a| a == "attach" || a == "top")
        .map(|i| i + 1)
    else {
        return Ok(args);
    };
    let Some(path) = config_path(&args[at..]) else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("reading the config file {}: {e}", path.display()))?;
    let settings = settings(&path, &text, attach)?;
    let mut expanded = args[..at].to_vec();
    expanded.extend(settings.into_iter().map(OsString::from));
    expanded.extend_from_slice(&args[at..]);
    Ok(expanded)
}

/// `--config FILE` or `--config=FILE`, wherever it is.
fn config_path(args: &[OsString]) -> Option<std::path::PathBuf> {
    args.iter().enumerate().find_map(|(i, arg)| {
        let arg = arg.to_str()?;
        if arg == "--config" {
            args.get(i + 1).map(Into::into)
        } else {
            arg.strip_prefix("--config=").map(Into::into)
        }
    })
}

/// The file's settings as flags, each checked by `attach`'s own parser.
fn settings(path: &Path, text: &str, attach: &Command) -> Result<Vec<String>, String> {
    let table: toml::Table = toml_file::parse(text, &path.display().to_string())?;
    let mut flags = Vec::new();
    for (key, value) in &table {
        let at = format!("{}:{}", path.display(), key_line(text, key));
        let arg = attach
            .get_arguments()
            .find(|arg| arg.get_long() == Some(key.as_str()) && key != "config")
            .ok_or_else(|| {
                format!(
                    "{at}: unknown setting `{key}`: settings are the long flags of \
                     `brokerprobe attach` (see --help), e.g. metrics-addr"
                )
            })?;
        let repeats = matches!(arg.get_action(), ArgAction::Append);
        let is_switch = matches!(arg.get_action(), ArgAction::SetTrue);
        let these = flags_of(key, value, repeats, is_switch)
            .map_err(|why| format!("{at}: `{key}`: {why}"))?;
        check(attach, key, &these).map_err(|why| format!("{at}: `{key}`: {why}"))?;
        flags.extend(these);
    }
    Ok(flags)
}

/// One setting as the flags that say the same.
fn flags_of(
    key: &str,
    value: &toml::Value,
    repeats: bool,
    is_switch: bool,
) -> Result<Vec<String>, String> {
    let flag = format!("--{key}");
    let scalar = |value: &toml::Value| -> Result<String, String> {
        match value {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(n) => Ok(n.to_string()),
            toml::Value::Float(x) => Ok(x.to_string()),
            toml::Value::Boolean(b) => Ok(b.to_string()),
            other => Err(format!("expected a value, got {}", other.type_str())),
        }
    };
    match value {
        toml::Value::Boolean(on) if is_switch => Ok(if *on { vec![flag] } else { Vec::new() }),
        _ if is_switch => Err("expected true or false".into()),
        toml::Value::Array(items) if repeats => items
            .iter()
            .map(|item| Ok([flag.clone(), scalar(item)?]))
            .collect::<Result<Vec<_>, String>>()
            .map(|pairs| pairs.concat()),
        toml::Value::Array(items) => {
            let joined = items.iter().map(scalar).collect::<Result<Vec<_>, _>>()?;
            Ok(vec![flag, joined.join(",")])
        }
        toml::Value::Table(pairs) if repeats => pairs
            .iter()
            .map(|(name, value)| Ok([flag.clone(), format!("{name}={}", scalar(value)?)]))
            .collect::<Result<Vec<_>, String>>()
            .map(|pairs| pairs.concat()),
        toml::Value::Table(_) => Err("expected a value, got a table".into()),
        value => Ok(vec![flag, scalar(value)?]),
    }
}

/// Parses `flags` alone with `attach`'s parser, so a bad value is reported against the
/// file's line with the flag's own message.
fn check(attach: &Command, key: &str, flags: &[String]) -> Result<(), String> {
    // A PID (or a --follow) to satisfy the required target; never used.
    let target: &[&str] = match key {
        "pid" | "follow" => &[],
        _ => &["--pid", "1"],
    };
    let argv = std::iter::once("attach")
        .chain(target.iter().copied())
        .chain(flags.iter().map(String::as_str));
    match attach.clone().try_get_matches_from(argv) {
        Ok(_) => Ok(()),
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid");
            Err(first.trim_start_matches("error: ").to_owned())
        }
    }
}

/// The line defining `key` (`key =` or a `[key]` table), for messages.
fn key_line(text: &str, key: &str) -> usize {
    text.lines()
        .position(|line| {
            let line = line.trim_start();
            let bare = line.strip_prefix(key).map(str::trim_start);
            let quoted = line
                .strip_prefix('"')
                .and_then(|l| l.strip_prefix(key))
                .and_then(|l| l.strip_prefix('"'))
                .map(str::trim_start);
            bare.or(quoted).is_some_and(|rest| rest.starts_with('='))
                || line.starts_with(&format!("[{key}]"))
        })
        .map_or(1, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use clap::{Arg, ArgAction, Command};

    use super::*;

    fn attach() -> Command {
        Command::new("attach")
            .arg(
                Arg::new("pid")
                    .long("pid")
                    .action(ArgAction::Append)
                    .required(true),
            )
            .arg(Arg::new("config").long("config"))
            .arg(
                Arg::new("metrics-addr")
                    .long("metrics-addr")
                    .value_parser(clap::value_parser!(std::net::SocketAddr)),
            )
            .arg(
                Arg::new("no-sockets")
                    .long("no-sockets")
                    .action(ArgAction::SetTrue),
            )
            .arg(Arg::new("buckets").long("buckets"))
            .arg(Arg::new("keep").long("keep").action(ArgAction::Append))
    }

    fn expand_text(text: &str, cli: &[&str]) -> Result<Vec<String>, String> {
        static FILES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "brokerprobe-config-{}-{n}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        let mut args: Vec<OsString> = ["brokerprobe", "attach", "--config"]
            .into_iter()
            .map(OsString::from)
            .collect();
        args.push(path.clone().into());
        args.extend(cli.iter().map(OsString::from));
        let expanded = expand(args, &attach());
        let _ = std::fs::remove_file(&path);
        expanded.map(|args| {
            args.into_iter()
                .skip(2)
                .map(|a| a.into_string().unwrap())
                .filter(|a| !a.starts_with('/') && a != "--config")
                .collect()
        })
    }

    #[test]
    fn settings_become_flags_before_the_command_line() {
        let text = "pid = [1, 2]\nmetrics-addr = \"127.0.0.1:1\"\nno-sockets = true\n\
                    buckets = [0.1, 1]\n[keep]\n\"upstream.chat\" = \"5s\"\n";
        let args = expand_text(text, &["--metrics-addr", "127.0.0.1:2"]).unwrap();
        assert_eq!(
            args,
            [
                "--buckets",
                "0.1,1",
                "--keep",
                "upstream.chat=5s",
                "--metrics-addr",
                "127.0.0.1:1",
                "--no-sockets",
                "--pid",
                "1",
                "--pid",
                "2",
                "--metrics-addr",
                "127.0.0.1:2"
            ]
        );
    }

    #[test]
    fn errors_say_where() {
        let err = |text| expand_text(text, &[]).unwrap_err();
        let syntax = err("pid = [1]\nmetrics-addr = \n");
        assert!(syntax.contains(":2: "), "{syntax}");
        let unknown = err("pid = [1]\n\nmetricz-addr = \"x\"\n");
        assert!(
            unknown.contains(":3: unknown setting `metricz-addr`"),
            "{unknown}"
        );
        let bad = err("pid = [1]\nmetrics-addr = \"nowhere\"\n");
        assert!(
            bad.contains(":2: `metrics-addr`: invalid value 'nowhere'"),
            "{bad}"
        );
        let switch = err("no-sockets = \"yes\"\n");
        assert!(
            switch.contains(":1: `no-sockets`: expected true or false"),
            "{switch}"
        );
    }
}
