//! `fake-upstream`: runs the fake OpenAI-compatible provider as a process.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use fake_upstream::FakeConfig;

#[derive(Parser)]
#[command(
    version,
    about = "OpenAI-compatible fake LLM provider with scripted latency and failures"
)]
struct Cli {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// JSON file: {"default": BEHAVIOUR, "models": {"NAME": BEHAVIOUR}}, where BEHAVIOUR has
    /// ttfb_ms, chunks, chunk_interval_ms, fail_status, fail_every (all optional).
    #[arg(long, conflicts_with = "demo_models")]
    config: Option<PathBuf>,
    /// Serve the demo broker's models (gpt-fast, claude-slow, flaky), as its built-in
    /// fake does.
    #[arg(long)]
    demo_models: bool,
    /// Overrides the default behaviour's delay before the response head.
    #[arg(long)]
    ttfb_ms: Option<u64>,
    /// Overrides the default behaviour's number of streamed content chunks.
    #[arg(long)]
    chunks: Option<u32>,
    /// Overrides the default behaviour's pause between streamed chunks.
    #[arg(long)]
    chunk_interval_ms: Option<u64>,
    /// Run at this SCHED_FIFO real-time priority (1-99; needs root): a provider has
    /// machines of its own, and a fake sharing a busy test machine with the broker would
    /// otherwise answer late and make its scripted delays loose.
    #[arg(long, value_name = "PRIORITY", value_parser = clap::value_parser!(i32).range(1..=99))]
    realtime: Option<i32>,
}

impl Cli {
    fn fake_config(&self) -> anyhow::Result<FakeConfig> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", path.display()))?
            }
            None if self.demo_models => FakeConfig::demo(),
            None => FakeConfig::default(),
        };
        let default = &mut config.default;
        default.ttfb_ms = self.ttfb_ms.unwrap_or(default.ttfb_ms);
        default.chunks = self.chunks.unwrap_or(default.chunks);
        default.chunk_interval_ms = self.chunk_interval_ms.unwrap_or(default.chunk_interval_ms);
        Ok(config)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.fake_config()?;
    if let Some(priority) = cli.realtime {
        // Before the runtime starts: its threads inherit the policy.
        set_realtime(priority)?;
    }
    tokio::runtime::Runtime::new()?.block_on(async {
        let listener = fake_upstream::bind_announced(cli.listen).await?;
        fake_upstream::serve(listener, config).await
    })
}

fn set_realtime(priority: i32) -> anyhow::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: sets this thread's policy from a valid sched_param; no memory is shared.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        anyhow::bail!(
            "--realtime {priority}: {} (needs root or CAP_SYS_NICE)",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
