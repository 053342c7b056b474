//! A broker whose executable lives in another mount namespace (as in a container) is
//! found and profiled through /proc/PID, although its path does not exist here.

use std::{fs, path::Path, process::Command, time::Duration};

use e2e::{
    harness::{Proc, attach_brokerprobe, bin, require_root, wait_for_requests},
    load::{self, Mix},
};

#[test]
fn broker_in_private_mount_namespace_is_profiled() {
    require_root();
    let dir = std::env::temp_dir().join(format!("brokerprobe-e2e-mntns-{}", std::process::id()));
    let hidden = dir.join("hidden");
    fs::create_dir_all(&hidden).unwrap();
    // In the child namespace a tmpfs over `hidden` holds the broker; here `hidden` stays empty.
    let script = format!(
        "mount -t tmpfs none {h} && cp {b} {h}/ns-broker && exec {h}/ns-broker --fake --listen 127.0.0.1:0",
        h = hidden.display(),
        b = bin("demo-broker").display()
    );
    let mut broker = Proc::spawn(
        "ns-broker",
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]),
    )
    .unwrap();
    let line = broker
        .wait_for_line("listening on", Duration::from_secs(30))
        .unwrap();
    let url = format!("http://{}", line.rsplit(' ').next().unwrap());
    assert!(
        !Path::new(&hidden).join("ns-broker").exists(),
        "the namespace leaked its mount"
    );

    let out = dir.join("requests.jsonl");
    let (mut probe, metrics_url) =
        attach_brokerprobe(broker.pid(), &["--requests-out", out.to_str().unwrap()]).unwrap();
    assert!(probe.stdout[0].contains("ns-broker"), "{:?}", probe.stdout);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let sent = rt
        .block_on(load::drive(&url, 200, 8, &Mix::default(), 5))
        .unwrap();
    rt.block_on(wait_for_requests(&metrics_url, sent.len()))
        .unwrap();
    probe.interrupt().unwrap();
    let observed = fs::read_to_string(&out).unwrap().lines().count();
    assert_eq!(
        observed,
        sent.len(),
        "requests of the namespaced broker not all observed"
    );
    drop(broker);
    let _ = fs::remove_dir_all(dir);
}
