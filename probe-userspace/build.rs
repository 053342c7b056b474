//! Builds the eBPF object with Debian's bpfel-capable toolchain (see docs/build.md) and
//! drops it in OUT_DIR, where src/attach.rs embeds it.

fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "probe-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../probe-ebpf"),
        ..Default::default()
    };
    // probe-common is compiled into the eBPF object too.
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../probe-common")
    );
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom("debian-bpf"))
}
