//! deploy/ (issue 9): the systemd unit passes `systemd-analyze verify`, and the command
//! lines of the unit and of the Kubernetes DaemonSet profile the demo broker with only the
//! capabilities they grant (root's uid, everything else dropped, as systemd and the
//! container runtime would run them). No systemd init or cluster runs here: these are
//! what can be checked of them for real.

use std::{path::Path, process::Command, time::Duration};

use e2e::{
    harness::{Proc, bin, health_figure, require_root, start_demo_broker, wait_for_requests},
    load::{self, Mix},
};

const REQUESTS: usize = 50;

fn deploy_file(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The shipped arguments, made runnable here: the broker is the demo broker, metrics go to
/// a free loopback port (the later flag wins), and the upstream named by host is named by
/// address, as this machine resolves no public names.
fn runnable(args: &[String], broker: &Path) -> Vec<String> {
    let mut args: Vec<String> = args
        .iter()
        .map(|arg| {
            arg.replace("/usr/local/bin/my-broker", &broker.display().to_string())
                .replace("api.openai.com:443", "127.0.0.1:443")
        })
        .collect();
    args.extend(["--metrics-addr".into(), "127.0.0.1:0".into()]);
    args
}

/// Runs brokerprobe with `args` as root's uid with only `caps` (e.g. `bpf,perfmon`) in
/// its bounding set, against the demo broker under load; checks it profiled every request.
fn profiles_with_only(caps: &[String], args: &[String], what: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_broker, url) = start_demo_broker(&[]).unwrap();
    let set = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--bounding-set={set}"))
        .arg(format!("--inh-caps={set}"))
        .arg("--")
        .arg(bin("brokerprobe"))
        .args(runnable(args, &bin("demo-broker")));
    let mut probe = Proc::spawn(what, &mut command).unwrap();
    let attached = probe
        .wait_for_line("brokerprobe: attached", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let metrics_url = attached.rsplit(' ').next().unwrap().to_owned();
    let sent = rt
        .block_on(load::drive(&url, REQUESTS, 8, &Mix::default(), 9))
        .unwrap();
    rt.block_on(wait_for_requests(&metrics_url, sent.len()))
        .unwrap();
    probe.interrupt().unwrap();
    assert_eq!(
        health_figure(&probe.stdout, "requests "),
        REQUESTS as u64,
        "{what}: {:#?}",
        probe.stdout
    );
    println!("deploy: {what}: profiled {REQUESTS} requests with only {caps:?}");
}

#[test]
fn systemd_unit_verifies_and_runs_with_its_capabilities() {
    require_root();
    let unit = deploy_file("systemd/brokerprobe.service");
    // verify checks that ExecStart's binary exists: point it at the one built.
    let checked = std::env::temp_dir().join("brokerprobe-test.service");
    std::fs::write(
        &checked,
        unit.replace(
            "/usr/local/bin/brokerprobe",
            &bin("brokerprobe").display().to_string(),
        ),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&checked)
        .output()
        .expect("systemd-analyze is missing: `cargo xtask setup` installs systemd");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );

    let value = |key: &str| -> String {
        let start = unit
            .find(&format!("\n{key}="))
            .unwrap_or_else(|| panic!("no {key}= in the unit"));
        // With its continuation lines.
        let mut value = String::new();
        for line in unit[start + key.len() + 2..].lines() {
            match line.strip_suffix('\\') {
                Some(part) => value.push_str(part),
                None => {
                    value.push_str(line);
                    break;
                }
            }
        }
        value
    };
    let exec: Vec<String> = value("ExecStart")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(exec[0], "/usr/local/bin/brokerprobe");
    let caps: Vec<String> = value("CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    assert_eq!(
        value("AmbientCapabilities").split_whitespace().count(),
        caps.len(),
        "ambient and bounding capabilities differ"
    );
    profiles_with_only(&caps, &exec[1..], "the systemd unit's ExecStart");
}

#[test]
fn daemonset_args_run_with_its_capabilities() {
    require_root();
    let manifest = deploy_file("kubernetes/brokerprobe-daemonset.yaml");
    let lines: Vec<&str> = manifest.lines().collect();
    let args_at = lines
        .iter()
        .position(|l| l.trim() == "args:")
        .expect("the container has args");
    let args: Vec<String> = lines[args_at + 1..]
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.starts_with('#'))
        .map_while(|l| l.strip_prefix("- "))
        .map(String::from)
        .collect();
    assert_eq!(args[0], "attach", "{args:?}");
    let added = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("add: "))
        .expect("capabilities it adds");
    let caps: Vec<String> = added
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|c| c.trim().trim_matches('"').to_owned())
        .collect();
    assert!(
        lines.iter().any(|l| l.trim() == r#"drop: ["ALL"]"#),
        "the DaemonSet must drop every other capability"
    );
    profiles_with_only(&caps, &args, "the DaemonSet's args");
}

/// With CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE only: sockets attach; uprobes (markers)
/// attach too on kernels that allow it, and where the kernel wants CAP_SYS_ADMIN for
/// them (6.18 does), the refusal is one line naming it, not a bare "permission denied".
#[test]
fn without_cap_sys_admin_sockets_attach_and_uprobes_say_why_not() {
    require_root();
    let (broker, _url) = start_demo_broker(&[]).unwrap();
    let caps = "-all,+bpf,+perfmon,+sys_ptrace";
    let attach = |mode: &str| {
        Command::new("setpriv")
            .arg(format!("--bounding-set={caps}"))
            .arg(format!("--inh-caps={caps}"))
            .arg("--")
            .arg(bin("brokerprobe"))
            .args(["attach", "--pid", &broker.pid().to_string(), "--mode", mode])
            .args(["--metrics-addr", "127.0.0.1:0", "--duration", "1s"])
            .output()
            .unwrap()
    };
    let sockets = attach("sockets");
    assert!(
        sockets.status.success(),
        "{}",
        String::from_utf8_lossy(&sockets.stderr)
    );
    let markers = attach("markers");
    let stderr = String::from_utf8_lossy(&markers.stderr);
    if markers.status.success() {
        println!("deploy: this kernel lets CAP_PERFMON create uprobes");
        return;
    }
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("only CAP_SYS_ADMIN create uprobes") && stderr.contains("--mode sockets"),
        "{stderr}"
    );
    println!("deploy: without CAP_SYS_ADMIN: {}", stderr.trim());
}
