//! Bad input to `brokerprobe attach`: one clear line on stderr, exit code 1, nothing else.

use std::process::{Command, Output};

use e2e::harness::{
    bin, kernel_thread_pid, require_root, start_demo_broker, start_demo_broker_variant,
};

fn attach(pid: &str) -> Output {
    attach_with(pid, &[])
}

fn attach_with(pid: &str, extra: &[&str]) -> Output {
    Command::new(bin("brokerprobe"))
        .args([
            "attach",
            "--pid",
            pid,
            "--metrics-addr",
            "127.0.0.1:0",
            "--duration",
            "1s",
        ])
        .args(extra)
        .output()
        .unwrap()
}

/// Exactly one line on stderr, containing every needle; exit code 1; nothing on stdout.
fn assert_one_clear_line(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} missing from: {stderr}");
    }
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn pid_that_does_not_exist() {
    require_root();
    assert_one_clear_line(&attach("999999999"), &["no process with PID 999999999"]);
}

#[test]
fn kernel_thread() {
    require_root();
    assert_one_clear_line(
        &attach(&kernel_thread_pid().to_string()),
        &["kernel thread"],
    );
}

#[test]
fn binary_without_markers_names_them() {
    require_root();
    // Debian's binaries are stripped: the message must say so rather than "no markers".
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = sleeper.id().to_string();
    let required = attach_with(&pid, &["--mode", "markers"]);
    // Left to choose, brokerprobe says why and follows the sockets instead.
    let auto = attach(&pid);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    assert_one_clear_line(&required, &["stripped", "sleep"]);
    let stdout = String::from_utf8_lossy(&auto.stdout);
    assert!(auto.status.success(), "{auto:?}");
    assert!(
        stdout.contains("no usable markers") && stdout.contains("stripped"),
        "{stdout}"
    );
    assert!(stdout.contains("socket-only mode"), "{stdout}");
}

#[test]
fn unstripped_binary_without_markers_lists_the_missing_ones() {
    require_root();
    // fake-upstream is a Rust binary with symbols that does not link probe-markers.
    let mut upstream = e2e::harness::Proc::spawn(
        "fake-upstream",
        Command::new(bin("fake-upstream")).args(["--listen", "127.0.0.1:0"]),
    )
    .unwrap();
    upstream
        .wait_for_line("listening on", std::time::Duration::from_secs(30))
        .unwrap();
    let out = attach_with(&upstream.pid().to_string(), &["--mode", "markers"]);
    assert_one_clear_line(
        &out,
        &[
            "fake-upstream",
            "markers not found",
            "brokerprobe_v1_request_begin",
            "brokerprobe_v1_request_end",
        ],
    );
}

/// Attached to a broker nobody calls: one notice saying what to check, then a clean exit.
#[test]
fn a_quiet_broker_gets_one_hint() {
    require_root();
    let (broker, _url) = start_demo_broker(&[]).unwrap();
    let out = attach_with(&broker.pid().to_string(), &["--duration", "12s"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert_eq!(stdout.matches("no event in 10 s").count(), 1, "{stdout}");
}

/// The live view without a terminal (piped, as here): refused before attaching.
#[test]
fn top_without_a_terminal_is_refused() {
    require_root();
    let (broker, _url) = start_demo_broker(&[]).unwrap();
    let out = Command::new(bin("brokerprobe"))
        .args(["top", "--pid", &broker.pid().to_string()])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_one_clear_line(&out, &["needs a terminal", "--interval"]);
}

#[test]
fn bad_flag_value_is_explained() {
    let out = Command::new(bin("brokerprobe"))
        .args(["attach", "--pid", "1", "--duration", "soon"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--duration"), "{stderr}");
}

#[test]
fn bad_bucket_bounds_are_explained() {
    for (flag, value, why) in [
        ("--latency-buckets", "0.1,0.05", "must increase"),
        ("--latency-buckets", "0.1,fast", "\"fast\" is not a number"),
        ("--token-buckets", "0,4", "not a positive number"),
    ] {
        let out = Command::new(bin("brokerprobe"))
            .args(["attach", "--pid", "1", flag, value])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(flag) && stderr.contains(why), "{stderr}");
    }
}

#[test]
fn an_otlp_protocol_brokerprobe_cannot_speak_is_named() {
    require_root();
    let attach = |endpoint: Option<&str>| {
        let mut command = Command::new(bin("brokerprobe"));
        command
            .args(["attach", "--pid", "999999999"])
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json");
        if let Some(endpoint) = endpoint {
            command.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
        }
        command.output().unwrap()
    };
    // With an endpoint, traces are on and the protocol matters...
    assert_one_clear_line(
        &attach(Some("http://127.0.0.1:4318")),
        &[
            "OTEL_EXPORTER_OTLP_PROTOCOL=http/json",
            "http/protobuf or grpc",
        ],
    );
    // ...without one, variables meant for another program are none of brokerprobe's business.
    assert_one_clear_line(&attach(None), &["no process with PID 999999999"]);
}

/// `setpriv` running `program` as user nobody, with `caps` (e.g. `+bpf,+perfmon`) as its
/// only capabilities.
fn as_nobody(caps: &str, program: &std::path::Path) -> Command {
    let mut command = Command::new("setpriv");
    command.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    if !caps.is_empty() {
        command.args([
            &format!("--inh-caps={caps}"),
            &format!("--ambient-caps={caps}"),
        ]);
    }
    command.arg(program);
    command
}

#[test]
fn without_the_capabilities_they_are_named() {
    require_root();
    // A process of nobody's own, so that only the missing capabilities stand in the way.
    let mut sleeper = as_nobody("", std::path::Path::new("/bin/sleep"))
        .arg("30")
        .spawn()
        .unwrap();
    let out = as_nobody("", &bin("brokerprobe"))
        .args(["attach", "--pid", &sleeper.id().to_string()])
        .output()
        .unwrap();
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    assert_one_clear_line(&out, &["CAP_BPF", "CAP_PERFMON", "sudo"]);
}

#[test]
fn a_process_it_may_not_inspect() {
    require_root();
    // root's process; brokerprobe may load eBPF but not look into other users' processes.
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let out = as_nobody("+bpf,+perfmon", &bin("brokerprobe"))
        .args(["attach", "--pid", &sleeper.id().to_string()])
        .output()
        .unwrap();
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    assert_one_clear_line(&out, &["may not inspect PID", "CAP_SYS_PTRACE"]);
}

/// A broker built against another marker ABI: named, with what to do.
#[test]
fn a_marker_abi_mismatch_is_named() {
    require_root();
    let dir = e2e::harness::scratch_dir("abi");
    // The demo broker with its marker symbols renamed to a future ABI version (same
    // length, so the binary runs as before).
    let mut bytes = std::fs::read(bin("demo-broker")).unwrap();
    let (old, new) = (b"brokerprobe_v1_", b"brokerprobe_v7_");
    let mut renamed = 0;
    let mut i = 0;
    while i + old.len() <= bytes.len() {
        if &bytes[i..i + old.len()] == old {
            bytes[i..i + old.len()].copy_from_slice(new);
            renamed += 1;
        }
        i += 1;
    }
    assert!(renamed > 0);
    let exe = dir.join("demo-broker-v7");
    std::fs::write(&exe, bytes).unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (broker, _) = e2e::harness::start_listening(
        "demo-broker-v7",
        Command::new(&exe).args(["--fake", "--listen", "127.0.0.1:0"]),
    )
    .unwrap();
    let out = attach_with(&broker.pid().to_string(), &["--mode", "markers"]);
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
    assert_one_clear_line(&out, &["marker ABI v7", "understands v1"]);
}

#[test]
fn an_unknown_stage_name_is_explained() {
    let out = Command::new(bin("brokerprobe"))
        .args([
            "attach",
            "--pid",
            "1",
            "--trace-keep-stage",
            "upstrem.chat=5s",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for needle in [
        "unknown stage \"upstrem.chat\"",
        "upstream.chat",
        "custom:NAME",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
}

/// A config file with `lines`; returns its path (in a fresh scratch directory).
fn config_file(name: &str, lines: &str) -> std::path::PathBuf {
    let path = e2e::harness::scratch_dir(name).join("brokerprobe.toml");
    std::fs::write(&path, lines).unwrap();
    path
}

#[test]
fn config_file_errors_name_the_file_and_line() {
    for (name, text, needles) in [
        (
            "config-syntax",
            "pid = [1]\nmetrics-addr = \"127.0.0.1:0\n",
            &["brokerprobe.toml:2:"][..],
        ),
        (
            "config-unknown",
            "pid = [1]\n# a comment\nmetrics_addr = \"127.0.0.1:0\"\n",
            &["brokerprobe.toml:3:", "unknown setting `metrics_addr`"][..],
        ),
        (
            "config-value",
            "pid = [1]\nrequest-timeout = \"forever\"\n",
            &["brokerprobe.toml:2:", "`request-timeout`", "forever"][..],
        ),
        (
            "config-stage",
            "pid = [1]\n\n[trace-keep-stage]\n\"keypool.aquire\" = \"1s\"\n",
            &["brokerprobe.toml:3:", "unknown stage \"keypool.aquire\""][..],
        ),
    ] {
        let path = config_file(name, text);
        let out = Command::new(bin("brokerprobe"))
            .args(["attach", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
        assert_one_clear_line(&out, needles);
    }
}

/// Settings from the file are used, and flags on the command line win over them.
#[test]
fn config_file_settings_apply_and_flags_win() {
    require_root();
    let (broker, _) = start_demo_broker(&[]).unwrap();
    let path = config_file(
        "config-ok",
        &format!(
            "pid = [{}]\nmetrics-addr = \"127.0.0.1:1\"\nduration = \"1s\"\nno-sockets = true\n",
            broker.pid()
        ),
    );
    let out = Command::new(bin("brokerprobe"))
        .args(["attach", "--config", path.to_str().unwrap()])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    drop(broker);
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    // --no-sockets from the file; port 1 from the file lost to the flag's 0.
    assert!(
        stdout.contains("attached 9 markers to PID") && !stdout.contains("127.0.0.1:1/"),
        "{stdout}"
    );
}

fn inspect(args: &[&str]) -> (Output, String) {
    let out = Command::new(bin("brokerprobe"))
        .arg("inspect")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout)
}

/// `inspect` tells what a broker offers, by path or PID, stripped or not.
#[test]
fn inspect_tells_what_can_be_attached() {
    let demo = bin("demo-broker");
    let (out, text) = inspect(&[demo.to_str().unwrap()]);
    println!("inspect demo-broker:\n{text}");
    assert!(out.status.success(), "{out:?}");
    for fact in [
        "symbol table present",
        "markers:       ABI v1: 9 of 9",
        "semaphore: yes",
        "USDT probes:   none",
        "framework:     axum",
        "framework:     reqwest",
        "[entered once per poll: cannot time a stage]",
        "attach would use: markers and sockets",
    ] {
        assert!(text.contains(fact), "{fact:?} not in:\n{text}");
    }

    let dir = e2e::harness::scratch_dir("inspect");
    let stripped = dir.join("demo-broker-stripped");
    let status = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&demo)
        .status()
        .unwrap();
    assert!(status.success());
    let (out, text) = inspect(&[stripped.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    for fact in [
        "0 in .symtab",
        "stripped: no symbol table",
        "markers:       none usable: the binary has no symbol table (stripped)",
        "frameworks:    none recognised",
        "attach would use: sockets only",
    ] {
        assert!(text.contains(fact), "{fact:?} not in:\n{text}");
    }
    let not_elf = dir.join("not-elf");
    std::fs::write(&not_elf, "#!/bin/sh\n").unwrap();
    let (out, _) = inspect(&[not_elf.to_str().unwrap()]);
    assert_one_clear_line(&out, &["not-elf", "not a 64-bit ELF executable"]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn inspect_by_pid_reads_the_running_executable() {
    require_root();
    let (broker, _) = start_demo_broker(&[]).unwrap();
    let (out, text) = inspect(&["--pid", &broker.pid().to_string()]);
    drop(broker);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.starts_with("PID ") && text.contains("(demo-broker)"),
        "{text}"
    );
    assert!(
        text.contains("attach would use: markers and sockets"),
        "{text}"
    );
}

/// The USDT test broker: its probes, their semaphores and argument specs, also once
/// stripped (the notes are not symbols: `strip` keeps them).
#[test]
fn inspect_lists_usdt_probes_stripped_or_not() {
    let usdt_broker = bin("demo-broker-usdt");
    let dir = e2e::harness::scratch_dir("inspect-usdt");
    let stripped = dir.join("demo-broker-usdt-stripped");
    let status = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&usdt_broker)
        .status()
        .unwrap();
    assert!(status.success());
    for binary in [&usdt_broker, &stripped] {
        let (out, text) = inspect(&[binary.to_str().unwrap()]);
        println!("inspect {}:\n{text}", binary.display());
        assert!(out.status.success(), "{out:?}");
        // One probe may sit at several sites (the compiler copied its caller): 11
        // probes, at least as many notes.
        let sites: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("USDT probes:   "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        assert!(sites >= 11, "{text}");
        for probe in [
            "request-start",
            "request-done",
            "stage-start",
            "stage-done",
            "tool-start",
            "tool-done",
            "provider",
            "first-byte",
            "chunk",
            "token-usage",
            "fallback",
        ] {
            let at = format!("  demo_broker:{probe} at 0x");
            assert!(text.contains(&at), "{at:?} not in:\n{text}");
        }
        for fact in [
            "markers:       none usable",
            "demo_broker:request-start at 0x",
            "args: 8@%rdi 8@%rsi 8@%rdx",
            // The status is a u16: its operand is a 16-bit register.
            "demo_broker:request-done at 0x",
            "args: 8@%rdi 2@%si 8@%rdx",
            "demo_broker:tool-start at 0x",
            "attach would use: sockets only; with --usdt-map, its USDT probes and sockets",
        ] {
            assert!(text.contains(fact), "{fact:?} not in:\n{text}");
        }
        let gated = text
            .lines()
            .filter(|l| l.contains(", semaphore 0x"))
            .count();
        assert_eq!(gated, 11, "every probe of the usdt crate is gated:\n{text}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A probe map that is wrong, or wrong for this broker: one clear line, nothing attached.
#[test]
fn usdt_map_errors_are_one_clear_line() {
    require_root();
    let dir = e2e::harness::scratch_dir("usdt-map-errors");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let map = std::fs::read_to_string(e2e::harness::demo_broker_usdt_map()).unwrap();
    let syntax = write("syntax.toml", "provider = \"demo_broker\"\n[[probe]\n");
    let own_pid = std::process::id().to_string();
    assert_one_clear_line(
        &attach_with(&own_pid, &["--usdt-map", &syntax]),
        &["syntax.toml:2"],
    );
    let absent = write(
        "absent.toml",
        &format!(
            "{map}\n[[probe]]\nprobe = \"nope\"\nevent = \"chunk\"\nargs = {{ request_id = 0 }}\n"
        ),
    );
    let beyond = write(
        "beyond.toml",
        &map.replace("args = { request_id = 0 }", "args = { request_id = 5 }"),
    );
    let (usdt_broker, _) = start_demo_broker_variant("usdt", &[]).unwrap();
    let pid = usdt_broker.pid().to_string();
    assert_one_clear_line(
        &attach_with(&pid, &["--usdt-map", &absent]),
        &[
            "probe demo_broker:nope is not in the executable",
            "it has: demo_broker:chunk, demo_broker:fallback, demo_broker:first-byte",
        ],
    );
    assert_one_clear_line(
        &attach_with(&pid, &["--usdt-map", &beyond]),
        &["argument 5 is mapped but the probe has 1 (`8@%rdi`)"],
    );
    drop(usdt_broker);
    let (marker_broker, _) = start_demo_broker(&[]).unwrap();
    let good = e2e::harness::demo_broker_usdt_map();
    assert_one_clear_line(
        &attach_with(
            &marker_broker.pid().to_string(),
            &["--usdt-map", good.to_str().unwrap()],
        ),
        &["the executable has no USDT probes"],
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A symbol map naming what a uprobe cannot time, or what is not there: one clear line
/// each, nothing attached.
#[test]
fn symbol_map_refuses_what_it_cannot_time() {
    require_root();
    let dir = e2e::harness::scratch_dir("symbol-map-errors");
    let map = |name: &str, stage: &str, function: &str| {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!("[[stage]]\nstage = \"{stage}\"\nfunction = \"{function}\"\n"),
        )
        .unwrap();
        path.to_str().unwrap().to_owned()
    };
    let async_body = map(
        "async.toml",
        "upstream.chat",
        "demo_broker::chat::chat_turn*",
    );
    let inlined = map(
        "inlined.toml",
        "tool.execute",
        "demo_broker::tools::execute",
    );
    let (broker, _) = start_demo_broker_variant("usdt", &[]).unwrap();
    let pid = broker.pid().to_string();
    assert_one_clear_line(
        &attach_with(&pid, &["--symbol-map", &async_body]),
        &[
            "stage upstream.chat: `demo_broker::chat::chat_turn::{{closure}}`",
            "entered once per poll",
            "a uprobe cannot time it",
        ],
    );
    assert_one_clear_line(
        &attach_with(&pid, &["--symbol-map", &inlined]),
        &[
            "no function `demo_broker::tools::execute`",
            "inlined it everywhere (mark it #[inline(never)])",
        ],
    );
    drop(broker);
    // Stripped: the symbol table a map needs is gone.
    let stripped = dir.join("demo-broker-stripped");
    assert!(
        std::process::Command::new("strip")
            .arg("-o")
            .arg(&stripped)
            .arg(bin("demo-broker"))
            .status()
            .unwrap()
            .success()
    );
    let mut command = std::process::Command::new(&stripped);
    command.args(["--fake", "--listen", "127.0.0.1:0"]);
    let (stripped_broker, _) =
        e2e::harness::start_listening("demo-broker-stripped", &mut command).unwrap();
    let route = map("route.toml", "route", "demo_broker::routing::lookup");
    assert_one_clear_line(
        &attach_with(
            &stripped_broker.pid().to_string(),
            &["--symbol-map", &route],
        ),
        &["no symbol table (stripped): a symbol map needs one"],
    );
    drop(stripped_broker);
    let _ = std::fs::remove_dir_all(dir);
}
